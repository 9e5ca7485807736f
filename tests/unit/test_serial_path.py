"""Pure pieces of the serial path: which sectors are sent, the app's anti-rollback version."""

from __future__ import annotations

import pytest

from hsmflash.device.serial import sector_runs
from hsmflash.formats.images import app_secure_version
from imagebuilder import build_app, build_bootloader

FF = b"\xff" * 0x1000


def test_only_whole_erased_sectors_are_skipped() -> None:
    data = b"\x01" * 0x1000 + FF + FF + b"\x02" * 0x10 + FF[:0x10]
    runs = sector_runs(0x10000, data)
    assert [(a, len(d), e) for a, d, e in runs] == [
        (0x10000, 0x1000, False), (0x11000, 0x2000, True), (0x13000, 0x20, False)]
    assert b"".join(d for _, d, _ in runs) == data


def test_unaligned_start_never_skips_a_partial_sector() -> None:
    runs = sector_runs(0x10800, b"\xff" * 0x800 + FF + b"\x03")
    assert [(a, len(d), e) for a, d, e in runs] == [
        (0x10800, 0x800, False), (0x11000, 0x1000, True), (0x12000, 1, False)]


@pytest.mark.parametrize("chip", ["esp32", "esp32s3"])
def test_app_secure_version_from_the_app_descriptor(chip: str) -> None:
    assert app_secure_version(build_app(chip, secure_version=7)) == 7
    assert app_secure_version(build_app(chip)) == 0
    assert app_secure_version(build_bootloader(chip)) is None
    assert app_secure_version(b"\x00" * 64) is None


def test_block_checksum_is_esptools() -> None:
    import os

    from esptool.loader import ESPLoader

    from hsmflash.device.serial import _block_checksum

    for size in (0, 1, 7, 1024, 0x4000, 0x4000 + 3):
        data = os.urandom(size)
        assert _block_checksum(data) == ESPLoader.checksum(data)
        assert _block_checksum(data, 0x12) == ESPLoader.checksum(data, 0x12)
