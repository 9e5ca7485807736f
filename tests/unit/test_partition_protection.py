"""Partition tables that protect the app: CSV round trip, the protection rules, the template."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import run_cli
from hsmflash.errors import InputError
from hsmflash.formats import partitions

# MicroPython's ports/esp32/partitions-4MiB-romfs.csv, as upstream ships it
UPSTREAM_ROMFS = """\
# Name,   Type, SubType, Offset,  Size, Flags
nvs,      data, nvs,     0x9000,  0x6000,
phy_init, data, phy,     0xf000,  0x1000,
factory,  app,  factory, 0x10000, 0x1D0000,
romfs,    data, 0x8f,    0x1E0000, 0x20000,
"""
REFUSED, BAD_INPUT = 5, 3


def test_upstream_romfs_table_parses_and_is_refused_for_its_plaintext_romfs() -> None:
    parts = partitions.parse_csv(UPSTREAM_ROMFS)
    romfs = partitions.find_romfs(parts)
    assert romfs is not None and (romfs.subtype, romfs.offset, romfs.size) == \
        (0x8F, 0x1E0000, 0x20000)
    problems = partitions.protection_problems(parts)
    assert len(problems) == 1 and "romfs" in problems[0] and "encrypted" in problems[0]
    # credentials asked for: the missing nvs_keys is named too
    assert any("nvs_keys" in p for p in partitions.protection_problems(parts, credentials=True))


def test_template_protects_and_round_trips_through_csv_and_binary() -> None:
    parts = partitions.micropython_template()
    assert partitions.protection_problems(parts, credentials=True) == []
    assert partitions.parse_csv(partitions.to_csv(parts)) == parts
    assert partitions.parse(partitions.build(parts)) == parts
    end = max(p.offset + p.size for p in parts)
    assert end == 4 * 1024 * 1024
    # phy_init stays where MicroPython's tables put it; nvs_keys is not on it
    assert partitions.find(parts, "phy_init").offset == 0xF000  # type: ignore[union-attr]
    assert partitions.find_nvs_keys(parts).offset != 0xF000  # type: ignore[union-attr]


def test_csv_empty_offsets_follow_like_gen_esp32part() -> None:
    parts = partitions.parse_csv("nvs, data, nvs, , 0x6000\nphy_init, data, phy, , 4K\n"
                                 "factory, app, factory, , 1M\n")
    assert [(p.offset, p.size) for p in parts] == [(0x9000, 0x6000), (0xF000, 0x1000),
                                                   (0x10000, 0x100000)]


@pytest.mark.parametrize(("text", "needle"), [
    ("nvs, data, nvs, 0x9000, 0x6000\nx, data, nvs, 0xA000, 0x1000\n", "overlap"),
    ("nvs, data, nvs, 0x9000, 0x6000, secret\n", "unknown flag"),
    ("nvs, data, nvs, 0x9000\n", "line 1"),
    ("app, app, factory, 0x11000, 0x1000\n", "aligned"),
])
def test_bad_csv_names_the_problem(text: str, needle: str) -> None:
    with pytest.raises(InputError, match=needle):
        partitions.parse_csv(text, "t.csv")


def test_cli_template_then_check(tmp_path: Path) -> None:
    csv_file, bin_file = tmp_path / "t.csv", tmp_path / "t.bin"
    assert run_cli("partitions", "template", "--chip", "esp32s3", "-o", csv_file).code == 0
    r = run_cli("partitions", "template", "--chip", "esp32s3", "--format", "bin", "-o",
                bin_file)
    assert r.code == 0, r.output
    for table in (csv_file, bin_file):
        r = run_cli("partitions", "check", table)
        assert r.code == 0, r.output


def test_cli_check_refuses_unencrypted_romfs_and_vfs(tmp_path: Path) -> None:
    table = tmp_path / "plain.csv"
    table.write_text(partitions.to_csv(partitions.micropython_template())
                     .replace(", encrypted", ""))
    r = run_cli("--json", "partitions", "check", table)
    assert r.code == REFUSED
    assert "romfs" in r.err and "encrypted" in r.err
    import json

    problems = json.loads(r.out)["problems"]
    assert {p.split()[0] for p in problems} == {"romfs", "vfs", "nvs_keys"}


def test_cli_check_garbage_is_bad_input(tmp_path: Path) -> None:
    table = tmp_path / "junk.bin"
    table.write_bytes(b"\x00\xff" * 100)
    r = run_cli("partitions", "check", table)
    assert r.code == BAD_INPUT and "junk.bin" in r.err


def test_cli_check_under_a_credentials_policy_needs_nvs_keys(tmp_path: Path,
                                                             policy_file: Path) -> None:
    table = tmp_path / "upstream.csv"
    table.write_text(UPSTREAM_ROMFS.replace("0x20000,", "0x20000, encrypted"))
    assert run_cli("partitions", "check", table).code == 0  # no credentials asked: fine
    r = run_cli("--policy", policy_file, "partitions", "check", table)
    assert r.code == REFUSED and "nvs_keys" in r.err, r.output
