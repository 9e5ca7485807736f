"""The FakeRomLoader test double, driven by esptool's and espefuse's real code over a pty.

These tests pin down what the double promises the provisioning tests: chip detection, identity,
flash writes that read back, Espressif's eFuse semantics, and a connection that can drop.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import serial
from espefuse import init_commands
from esptool import ESPLoader, FatalError
from esptool.cmds import detect_chip, read_flash, write_flash

from doubles import FakeRomLoader

BAUD = 921600  # a pty ignores the rate; a high one keeps esptool's timeouts short
MAC = "7c:df:a1:12:34:56"
IMAGE_ADDRESS = 0x10000


@pytest.fixture
def efuse_file(tmp_path: Path) -> Path:
    return tmp_path / "efuses.bin"


@pytest.fixture(params=["esp32", "esp32s3", "esp32c3"])
def chip_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def fake_chip(chip_name: str, efuse_file: Path) -> Iterator[FakeRomLoader]:
    with FakeRomLoader(chip_name, mac=MAC, efuse_file=efuse_file) as chip:
        yield chip


@pytest.fixture
def esp(fake_chip: FakeRomLoader) -> Iterator[ESPLoader]:
    loader = detect_chip(fake_chip.port, BAUD, "no-reset")
    yield loader
    loader._port.close()


def image(size: int = 64 * 1024) -> bytes:
    return os.urandom(size)


def test_detect_chip_identifies_the_configured_chip(
    fake_chip: FakeRomLoader, esp: ESPLoader
) -> None:
    assert esp.CHIP_NAME == fake_chip.target.CHIP_NAME
    assert not esp.IS_STUB


def test_read_mac_returns_the_configured_mac(esp: ESPLoader) -> None:
    assert ":".join(f"{b:02x}" for b in esp.read_mac()) == MAC


@pytest.mark.parametrize(
    ("chip_name", "revision", "description"),
    [("esp32", 301, "v3.1"), ("esp32s3", 1, "v0.1"), ("esp32c3", 3, "v0.3")],
)
def test_chip_revision_is_the_configured_one(
    chip_name: str, revision: int, description: str, efuse_file: Path
) -> None:
    with FakeRomLoader(chip_name, mac=MAC, revision=revision, efuse_file=efuse_file) as chip:
        esp = detect_chip(chip.port, BAUD, "no-reset")
        try:
            assert esp.get_chip_revision() == revision
            assert description in esp.get_chip_description()
        finally:
            esp._port.close()


def test_flash_id_reports_the_configured_size(efuse_file: Path) -> None:
    with FakeRomLoader("esp32", efuse_file=efuse_file, flash_size=8 * 1024 * 1024) as chip:
        esp = detect_chip(chip.port, BAUD, "no-reset")
        try:
            assert esp.flash_id() >> 16 == 0x17  # JEDEC capacity byte of an 8 MiB part
        finally:
            esp._port.close()


@pytest.mark.parametrize("compress", [False, True])
def test_write_flash_reads_back_identical(
    fake_chip: FakeRomLoader, esp: ESPLoader, compress: bool
) -> None:
    data = image()
    write_flash(esp, [(IMAGE_ADDRESS, data)], compress=compress, no_progress=True)

    assert (
        esp.flash_md5sum(IMAGE_ADDRESS, len(data))
        == hashlib.md5(data, usedforsecurity=False).hexdigest()
    )
    assert esp.read_flash(IMAGE_ADDRESS, len(data)) == data
    assert bytes(fake_chip.flash[IMAGE_ADDRESS : IMAGE_ADDRESS + len(data)]) == data
    assert fake_chip.flash[:IMAGE_ADDRESS] == b"\xff" * IMAGE_ADDRESS


def test_read_flash_command_saves_to_a_file(
    fake_chip: FakeRomLoader, esp: ESPLoader, tmp_path: Path
) -> None:
    fake_chip.flash[0x2000:0x2100] = bytes(range(256))
    out = tmp_path / "dump.bin"
    read_flash(esp, 0x2000, 0x100, str(out), no_progress=True)
    assert out.read_bytes() == bytes(range(256))


def test_flash_behaves_like_nor_without_erase(fake_chip: FakeRomLoader, esp: ESPLoader) -> None:
    # Programming can only clear bits; FLASH_BEGIN erases the sectors it covers first.
    esp.flash_begin(0, 0)  # no erase
    fake_chip.flash[0:4] = b"\x0f\x0f\xff\xff"
    block = b"\xf0\xff\x00\xff" + b"\xff" * (esp.FLASH_WRITE_SIZE - 4)
    esp.flash_begin(0, 0)
    esp.flash_block(block, 0)
    assert bytes(fake_chip.flash[0:4]) == b"\x00\x0f\x00\xff"


def test_espefuse_reads_a_summary_over_the_connection(esp: ESPLoader, tmp_path: Path) -> None:
    efuses = init_commands(esp=esp, do_not_confirm=True)
    path = tmp_path / "summary.json"
    efuses.summary(format="json", file=path.open("w"))  # espefuse closes the file
    summary = json.loads(path.read_text())
    assert summary["MAC"]["value"].startswith(MAC)
    assert "invalid" not in summary["MAC"]["value"]  # ESP32: the factory MAC's CRC checks out


JTAG_FIELD = {"esp32": "JTAG_DISABLE", "esp32s3": "DIS_PAD_JTAG", "esp32c3": "DIS_PAD_JTAG"}


def test_espefuse_burns_a_field_into_the_virtual_efuse_file(
    chip_name: str, fake_chip: FakeRomLoader, esp: ESPLoader, efuse_file: Path
) -> None:
    field = JTAG_FIELD[chip_name]
    efuses = init_commands(esp=esp, do_not_confirm=True)
    assert efuses.efuses[field].get() is False

    efuses.burn_efuse({field: "1"})

    # Read the file back with espefuse's own virtual chip: the burn went through its emulator.
    from_file = init_commands(chip=chip_name, virt=True, virt_efuse_file=str(efuse_file))
    assert from_file.efuses[field].get() is True
    assert from_file.efuses["MAC"].get().startswith(MAC)


def test_burnt_key_is_read_protected_through_the_emulator(efuse_file: Path) -> None:
    key = bytes(range(32))
    with FakeRomLoader("esp32s3", mac=MAC, efuse_file=efuse_file) as chip:
        esp = detect_chip(chip.port, BAUD, "no-reset")
        try:
            efuses = init_commands(esp=esp, do_not_confirm=True)
            efuses.burn_key(["BLOCK_KEY0"], [io.BytesIO(key)], ["XTS_AES_128_KEY"])
        finally:
            esp._port.close()
    from_file = init_commands(chip="esp32s3", virt=True, virt_efuse_file=str(efuse_file))
    assert from_file.efuses["KEY_PURPOSE_0"].get() == "XTS_AES_128_KEY"
    assert from_file.efuses["BLOCK_KEY0"].get_raw() == bytes(32)  # read-protected: zeros


def test_reopening_an_efuse_file_keeps_the_chip(efuse_file: Path) -> None:
    with FakeRomLoader("esp32", mac=MAC, efuse_file=efuse_file):
        pass
    with FakeRomLoader("esp32", mac="02:00:00:00:00:99", efuse_file=efuse_file) as chip:
        esp = detect_chip(chip.port, BAUD, "no-reset")
        try:
            assert ":".join(f"{b:02x}" for b in esp.read_mac()) == MAC
        finally:
            esp._port.close()


def test_default_reset_on_a_pty_still_connects(efuse_file: Path) -> None:
    # A pty has no DTR/RTS; esptool warns and carries on rather than failing.
    with FakeRomLoader("esp32", mac=MAC, efuse_file=efuse_file) as chip:
        esp = detect_chip(chip.port, BAUD)
        try:
            assert esp.CHIP_NAME == "ESP32"
        finally:
            esp._port.close()


def test_esptools_stub_runs_and_speaks_the_stub_dialect(
    fake_chip: FakeRomLoader, esp: ESPLoader
) -> None:
    stub = esp.run_stub()  # esptool's own stub image, uploaded with MEM_BEGIN/DATA/END
    assert stub.IS_STUB and fake_chip.stub
    assert stub.FLASH_WRITE_SIZE == 0x4000
    data = image(96 * 1024)
    write_flash(stub, [(IMAGE_ADDRESS, data)], compress=False, no_progress=True)
    assert stub.flash_md5sum(IMAGE_ADDRESS, len(data)) == hashlib.md5(
        data, usedforsecurity=False).hexdigest()  # 16 raw bytes on the wire, hex in esptool
    assert stub.read_flash(IMAGE_ADDRESS, len(data)) == data  # READ_FLASH, acked blocks + MD5
    stub.erase_region(IMAGE_ADDRESS, 0x1000)
    assert fake_chip.flash[IMAGE_ADDRESS:IMAGE_ADDRESS + 0x1000] == b"\xff" * 0x1000
    assert fake_chip.flash[IMAGE_ADDRESS + 0x1000:IMAGE_ADDRESS + len(data)] == data[0x1000:]


def test_other_code_in_ram_never_answers(fake_chip: FakeRomLoader, esp: ESPLoader) -> None:
    esp.mem_begin(64, 1, 64, 0x40080000)
    esp.mem_block(b"\x00" * 64, 0)
    esp.mem_finish(0x40080000)  # not esptool's stub: it "runs", no OHAI, the loader is gone
    assert fake_chip.halted and not fake_chip.stub
    with pytest.raises(FatalError):
        esp.read_reg(esp.CHIP_DETECT_MAGIC_REG_ADDR, timeout=0.2)


def test_wire_time_is_bytes_times_ten_over_baud(chip_name: str, efuse_file: Path) -> None:
    with FakeRomLoader(chip_name, mac=MAC, efuse_file=efuse_file) as fake_chip:
        esp = detect_chip(fake_chip.port, 115200, "no-reset")  # the chip auto-bauds to 115200
        try:
            _write_at_two_rates(fake_chip, esp)
        finally:
            esp._port.close()


def _write_at_two_rates(fake_chip: FakeRomLoader, esp: ESPLoader) -> None:
    # The same write costs 8x less wire time at 921600 than at 115200.
    data = image(32 * 1024)
    assert fake_chip.baud == 115200
    before = fake_chip.wire_seconds
    write_flash(esp, [(IMAGE_ADDRESS, data)], compress=False, no_progress=True)
    slow = fake_chip.wire_seconds - before
    assert slow >= len(data) * 10 / 115200  # never below the physical floor
    esp.change_baud(921600)
    assert fake_chip.baud == 921600
    before = fake_chip.wire_seconds
    write_flash(esp, [(IMAGE_ADDRESS, data)], compress=False, no_progress=True)
    fast = fake_chip.wire_seconds - before
    assert len(data) * 10 / 921600 <= fast < slow / 7


def test_realtime_wire_is_seen_on_the_clock(efuse_file: Path) -> None:
    import time

    with FakeRomLoader("esp32s3", mac=MAC, efuse_file=efuse_file, realtime=1.0) as chip:
        esp = detect_chip(chip.port, 115200, "no-reset")
        try:
            started, wire = time.monotonic(), chip.wire_seconds
            esp.flash_begin(0x1000, IMAGE_ADDRESS)
            esp.flash_block(b"\x00" * esp.FLASH_WRITE_SIZE, 0)  # ~89 ms on the wire
            assert time.monotonic() - started >= chip.wire_seconds - wire > 0.08
        finally:
            esp._port.close()


def test_a_frame_at_the_wrong_rate_is_garbled(fake_chip: FakeRomLoader, esp: ESPLoader) -> None:
    esp._set_port_baudrate(460800)  # the host moves, the chip did not
    with pytest.raises(FatalError):
        esp.read_reg(esp.CHIP_DETECT_MAGIC_REG_ADDR, timeout=0.3)
    assert fake_chip.garbled_frames >= 1
    esp._set_port_baudrate(BAUD)
    esp.flush_input()  # a new SLIP reader: esptool's gives up after a timeout
    esp.read_reg(esp.CHIP_DETECT_MAGIC_REG_ADDR)


def test_secure_download_mode_refuses_reads_and_the_stub(efuse_file: Path) -> None:
    with FakeRomLoader("esp32s3", mac=MAC, efuse_file=efuse_file) as chip:
        esp = detect_chip(chip.port, BAUD, "no-reset")
        init_commands(esp=esp, do_not_confirm=True).burn_efuse({"ENABLE_SECURITY_DOWNLOAD": "1"})
        esp._port.close()
    with FakeRomLoader("esp32s3", efuse_file=efuse_file) as chip:  # after reset: SDM
        esp = detect_chip(chip.port, BAUD, "no-reset")
        try:
            assert chip.secure_download and esp.secure_download_mode
            data = image(8 * 1024)
            blocks = esp.flash_begin(len(data), IMAGE_ADDRESS)
            for seq in range(blocks):
                esp.flash_block(data[seq * 0x400:(seq + 1) * 0x400], seq)
            assert bytes(chip.flash[IMAGE_ADDRESS:IMAGE_ADDRESS + len(data)]) == data
            for refused in (lambda: esp.read_reg(esp.CHIP_DETECT_MAGIC_REG_ADDR),
                            lambda: esp.flash_md5sum(IMAGE_ADDRESS, len(data)),
                            lambda: esp.read_flash_slow(IMAGE_ADDRESS, 64, None),
                            lambda: esp.mem_begin(64, 1, 64, 0x40380000)):
                with pytest.raises(FatalError):
                    refused()
        finally:
            esp._port.close()


def test_connection_drop_mid_write_raises(efuse_file: Path) -> None:
    with FakeRomLoader("esp32s3", efuse_file=efuse_file, drop_after_flash_blocks=10) as chip:
        esp = detect_chip(chip.port, BAUD, "no-reset")
        esp.WRITE_FLASH_ATTEMPTS = 1  # esptool would otherwise retry opening the port for ~7 s
        data = image()
        with pytest.raises(serial.SerialException):
            write_flash(esp, [(IMAGE_ADDRESS, data)], no_progress=True)
        esp._port.close()

    assert chip.dropped
    assert chip.flash_blocks_written == 10
    written = 10 * esp.FLASH_WRITE_SIZE
    assert bytes(chip.flash[IMAGE_ADDRESS : IMAGE_ADDRESS + written]) == data[:written]
    assert chip.flash[IMAGE_ADDRESS + written : IMAGE_ADDRESS + len(data)] == b"\xff" * (
        len(data) - written
    )
