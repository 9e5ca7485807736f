"""`hsmflash provision --port` through esptool's and espefuse's real code, over a pty.

On the other end of the port is `FakeRomLoader` (tests/doubles/rom_loader.py), a TEST DOUBLE of
a chip in ROM download mode at the serial boundary only: it speaks the ROM loader protocol
(SLIP, commands, register reads/writes), hands the eFuse controller's registers to espefuse's own
emulator (backed by a virtual eFuse file) and keeps the SPI flash as a bytearray. Everything
above the wire - hsmflash, esptool's loader and write_flash, espefuse's burn sequence - is real.

After provisioning, the double's eFuse file and flash are judged by the same independent oracle
as the virtual chips (test_provision.py): espefuse's summary, espsecure decryption with the key
re-derived from the test master by the aes-ecb-v1 spec, signatures.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

import pytest
from test_provision import (
    MACS,
    Bench,
    check_provisioned,
    efuse_summary,
    kcv,
    make_bench,
)

from conftest import Result, run_cli
from doubles import FakeRomLoader

REVISION = {"esp32s3": 2, "esp32": 100}  # esp32 v1.0: FiPy-era, Secure Boot V1
FLASH_BEGIN, FLASH_DEFL_BEGIN = 0x02, 0x10


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Bench:
    return make_bench(tmp_path_factory.mktemp("serial-bench"))


@pytest.fixture(autouse=True)
def _one_write_attempt(monkeypatch: pytest.MonkeyPatch) -> None:
    """esptool retries a lost connection by reopening the port for ~7 s; fail at once."""
    from esptool.loader import ESPLoader

    monkeypatch.setattr(ESPLoader, "WRITE_FLASH_ATTEMPTS", 1)


def _double(chip: str, efuse: Path, mac: str | None = None, **kw: int) -> FakeRomLoader:
    return FakeRomLoader(chip, mac=mac or MACS[chip], revision=REVISION.get(chip),
                         efuse_file=efuse, **kw)


def _provision(bench: Bench, chip: str, *ports: str, extra: tuple[str | Path, ...] = (),
               json_out: bool = False) -> Result:
    return run_cli(*(["--json"] if json_out else []), "--policy", bench.policy, "provision",
                   "--chip", chip, *[a for p in ports for a in ("--port", p)],
                   *bench.image_args(chip), *map(str, extra))


@pytest.mark.parametrize("chip", ["esp32s3", "esp32"])
def test_provision_over_serial(bench: Bench, cli: Callable[..., Result], tmp_path: Path,
                               chip: str) -> None:
    efuse = tmp_path / "chip.efuse"
    with _double(chip, efuse) as dev:
        r = _provision(bench, chip, dev.port, json_out=True)
    assert r.code == 0, r.output
    assert "result" in r.out and '"provisioned"' in r.out
    assert FLASH_BEGIN in dev.commands or FLASH_DEFL_BEGIN in dev.commands
    check_provisioned(bench, chip, efuse_summary(chip, efuse), bytes(dev.flash), MACS[chip],
                      tmp_path)

    # re-run on the finished chip: exit 0, nothing burned, no flash write on the wire
    before_efuses, before_flash = efuse.read_bytes(), bytes(dev.flash)
    with _double(chip, efuse) as again:
        again.flash[:] = before_flash
        r = _provision(bench, chip, again.port)
    assert r.code == 0, r.output
    assert "already-provisioned" in r.out
    assert FLASH_BEGIN not in again.commands and FLASH_DEFL_BEGIN not in again.commands
    assert efuse.read_bytes() == before_efuses and bytes(again.flash) == before_flash


def test_cable_pulled_mid_write_then_rerun_finishes(bench: Bench, cli: Callable[..., Result],
                                                    tmp_path: Path) -> None:
    efuse = tmp_path / "chip.efuse"
    with _double("esp32s3", efuse, drop_after_flash_blocks=3) as dev:
        r = _provision(bench, "esp32s3", dev.port)
    assert dev.dropped
    assert r.code == 7, r.output  # a device error, one line, no traceback
    assert "Traceback" not in r.err
    with _double("esp32s3", efuse) as replugged:  # same chip, its flash as the cable left it
        replugged.flash[:] = dev.flash
        r = _provision(bench, "esp32s3", replugged.port)
    assert r.code == 0, r.output
    check_provisioned(bench, "esp32s3", efuse_summary("esp32s3", efuse), bytes(replugged.flash),
                      MACS["esp32s3"], tmp_path)


def test_wrong_chip_on_the_port_is_refused(bench: Bench, cli: Callable[..., Result],
                                           tmp_path: Path) -> None:
    efuse = tmp_path / "c3.efuse"
    with _double("esp32c3", efuse, mac="58:cf:79:00:00:09") as dev:
        before = efuse.read_bytes()
        r = _provision(bench, "esp32s3", dev.port)
    assert r.code == 7, r.output
    assert "esp32c3" in r.err.lower().replace("-", "")
    assert efuse.read_bytes() == before
    assert FLASH_BEGIN not in dev.commands and dev.flash == bytearray(b"\xff" * len(dev.flash))


def test_station_mode_two_ports_and_manifest(bench: Bench, cli: Callable[..., Result],
                                             tmp_path: Path) -> None:
    macs = ["7c:df:a1:00:30:01", "7c:df:a1:00:30:02"]
    manifest = tmp_path / "m.csv"
    with _double("esp32s3", tmp_path / "a.efuse", macs[0]) as a, \
            _double("esp32s3", tmp_path / "b.efuse", macs[1]) as b:
        r = bench.subprocess("--policy", bench.policy, "provision", "--chip", "esp32s3",
                             "--port", a.port, "--port", b.port, *bench.image_args("esp32s3"),
                             "--manifest", manifest, audit_log=tmp_path / "audit.jsonl")
    assert r.code == 0, r.output
    for dev, mac, name in ((a, macs[0], "a"), (b, macs[1], "b")):
        check_provisioned(bench, "esp32s3", efuse_summary("esp32s3", tmp_path / f"{name}.efuse"),
                          bytes(dev.flash), mac, tmp_path)
    rows = list(csv.DictReader(manifest.open()))
    assert sorted(row["mac"] for row in rows) == macs
    for row in rows:
        assert row["result"] == "provisioned" and row["chip"] == "esp32s3"
        spec = bench.spec_key(row["mac"], "XTS_AES_128_KEY")
        assert row["fe_kcv"] == f"{kcv(spec[:16])}/{kcv(spec[16:])}"
        assert "0x10000:" in row["images"]
