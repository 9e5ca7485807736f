"""`hsmflash app check`, the lockdown report, on provisioned virtual chips.

The firmware images here are stand-ins (no MicroPython build runs in this sandbox): byte
strings carrying the markers a real build contains (the MicroPython banner, the REPL's prompts,
frozen module names such as `hsmboot` and `webrepl`, Pycom's Telnet/FTP strings). The report's
eFuse evidence comes from espefuse's reading of the provisioned virtual eFuse file.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from test_micropython_provision import CHIP, TEMPLATE, app_image, bench, images_with, table_file
from test_provision import REFUSED, Bench

from conftest import Result, run_cli
from hsmflash.formats import partitions

__all__ = ["app_image", "bench"]  # module fixtures shared with test_micropython_provision

LOCKED_FW = b"\xe9" + b"\x00" * 64 + b"MicroPython v1.26.0 on 2026-01-01; ESP32S3" + b"\x00" * 8 \
    + b"hsmboot" + b"\x00" * 8 + b"_boot" + b"\x00" * 100
STOCK_FW = b"\xe9" + b"\x00" * 64 + b"MicroPython v1.26.0" + b"\x00" + \
    b'Type "help()" for more information.' + b"\x00raw REPL; CTRL-B to exit\x00webrepl\x00" + \
    b"usb_serial_jtag\x00" + b"\x00" * 100
PYCOM_FW = b"\xe9" + b"\x00" * 64 + b"Pycom MicroPython 1.20.2.r6 [v1.11]" + b"\x00" + \
    b'Type "help()" for more information.\x00Login as: \x00FTP Server\x00safe boot\x00' + \
    b"hsmboot\x00" * 2


def channels(r: Result) -> dict[str, dict[str, Any]]:
    return {c["id"]: c for c in json.loads(r.out)["channels"]}


@pytest.fixture(scope="module")
def provisioned_s3(bench: Bench, app_image: Path, tmp_path_factory: pytest.TempPathFactory
                   ) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("s3")
    efuse, flash = bench.new_chip(tmp, CHIP)
    r = bench.cli(*bench.provision_args(CHIP, efuse, flash, "--app", app_image,
                                        images=images_with(bench, table_file(tmp, TEMPLATE))))
    assert r.code == 0, r.output
    return efuse, flash


def test_report_on_a_provisioned_s3_gives_evidence_for_every_channel(
        bench: Bench, cli: Callable[..., Result], tmp_path: Path, app_image: Path,
        provisioned_s3: tuple[Path, Path]) -> None:
    efuse, flash = provisioned_s3
    fw = tmp_path / "fw.bin"
    fw.write_bytes(LOCKED_FW)
    r = run_cli("--json", "app", "check", "--chip", CHIP, "--firmware", fw, "--app", app_image,
                "--pubkey", bench.pubkeys[CHIP], "--virtual-efuses", efuse,
                "--virtual-flash", flash)
    assert r.code == 0, r.output
    ch = channels(r)
    assert set(ch) == {"repl-uart", "repl-usb", "ctrl-c", "webrepl", "telnet-ftp", "safe-boot",
                       "filesystem", "import-path", "app-signature", "secure-boot",
                       "download-mode", "jtag", "nvs-credentials"}
    for c in ch.values():
        assert c["evidence"] and c["status"] in ("closed", "open", "unknown")
    # the table was read from the device (development keys are readable) and protects
    assert "decrypted with the readable BLOCK_KEY0 key" in json.loads(r.out)["inputs"][
        "partition_table"]
    fs = ch["filesystem"]
    assert fs["status"] == "closed", fs
    assert any("romfs" in e and "`encrypted` flag" in e for e in fs["evidence"])
    assert any("SPI_BOOT_CRYPT_CNT" in e and "on" in e for e in fs["evidence"])
    assert ch["secure-boot"]["status"] == "closed"
    assert ch["app-signature"]["status"] == "closed"
    assert any("verifies with" in e for e in ch["app-signature"]["evidence"])
    assert ch["import-path"]["status"] == "closed" and ch["ctrl-c"]["status"] == "closed"
    # the dev policy leaves these open, and says which eFuse shows it
    assert ch["download-mode"]["status"] == "open"
    assert any("DIS_DOWNLOAD_MODE = 0" in e for e in ch["download-mode"]["evidence"])
    assert ch["jtag"]["status"] == "open"
    assert any("DIS_PAD_JTAG = 1" in e and "DIS_USB_JTAG = 0" in e
               for e in ch["jtag"]["evidence"])
    # under a production flag, open channels fail the check
    r = run_cli("app", "check", "--chip", CHIP, "--firmware", fw, "--virtual-efuses", efuse,
                "--virtual-flash", flash, "--production")
    assert r.code == REFUSED and "download-mode" in r.err and "jtag" in r.err


def test_stock_firmware_leaves_the_repl_and_import_path_open(
        cli: Callable[..., Result], tmp_path: Path) -> None:
    fw = tmp_path / "stock.bin"
    fw.write_bytes(STOCK_FW)
    r = run_cli("--json", "app", "check", "--chip", CHIP, "--firmware", fw)
    assert r.code == 0, r.output
    ch = channels(r)
    for cid in ("repl-uart", "repl-usb", "ctrl-c", "webrepl", "import-path"):
        assert ch[cid]["status"] == "open", ch[cid]
    assert ch["nvs-credentials"]["status"] == "open"
    # what the firmware does not contain is evidence too; no eFuses: unknown, never closed
    assert ch["telnet-ftp"]["status"] == "closed"
    for cid in ("secure-boot", "download-mode", "jtag", "filesystem"):
        assert ch[cid]["status"] == "unknown"


def test_table_without_encrypted_flags_reports_the_filesystem_open_and_fails_production(
        bench: Bench, cli: Callable[..., Result], tmp_path: Path) -> None:
    plain = tmp_path / "plain.csv"
    plain.write_text(partitions.to_csv(TEMPLATE).replace(", encrypted", ""))
    r = run_cli("--json", "--policy", bench.release_policy, "app", "check", "--chip", CHIP,
                "--table", plain)
    assert r.code == REFUSED, r.output
    fs = channels(r)["filesystem"]
    assert fs["status"] == "open"
    assert any("vfs" in e and "lacks the `encrypted` flag" in e for e in fs["evidence"])
    assert "filesystem" in r.err
    # the dev policy (release_mode = false) reports the same without failing
    r = run_cli("--json", "--policy", bench.policy, "app", "check", "--chip", CHIP, "--table",
                plain)
    assert r.code == 0 and channels(r)["filesystem"]["status"] == "open"


def test_fipy_report_names_rebuild_only_and_unclosable_channels(
        bench: Bench, cli: Callable[..., Result], tmp_path: Path) -> None:
    efuse, flash = bench.new_chip(tmp_path, "esp32")  # ESP32 v1.0, as on a FiPy
    r = bench.cli(*bench.provision_args("esp32", efuse, flash, policy=bench.release_policy))
    assert r.code == 0, r.output
    fw = tmp_path / "pycom.bin"
    fw.write_bytes(PYCOM_FW)
    r = run_cli("--json", "app", "check", "--chip", "esp32", "--firmware", fw,
                "--virtual-efuses", efuse, "--virtual-flash", flash)
    assert r.code == 0, r.output
    ch = channels(r)
    for cid in ("telnet-ftp", "safe-boot"):
        assert ch[cid]["status"] == "open"
        assert ch[cid]["close"].startswith("firmware rebuild only")
    dl = ch["download-mode"]
    assert dl["status"] == "open" and "cannot be closed on ESP32 rev0-1" in dl["close"]
    assert any("DISABLE_DL_DECRYPT = 1" in e for e in dl["evidence"])
    assert ch["repl-usb"]["status"] == "closed"  # evidence: the chip has no USB
    assert ch["jtag"]["status"] == "closed" and ch["secure-boot"]["status"] == "closed"
    r = run_cli("app", "check", "--chip", "esp32", "--firmware", fw, "--virtual-efuses", efuse,
                "--production")
    assert r.code == REFUSED
