"""Virtual chips with identities: espefuse eFuse files carrying a factory MAC and revision.

A fresh espefuse virtual eFuse file reads MAC 00:00:00:00:00:00, and espefuse (rightly)
refuses to burn the factory MAC. A real chip leaves the factory with both its MAC and its
revision in eFuses; here they are put in the same places through espefuse's emulator
(`EmulateEfuseController.direct_write_efuse` / `set_chip_revision`, which write the eFuse
read registers as the factory programming would), so everything afterwards - reads,
burns, protection - follows espefuse's own eFuse model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hsmflash.chips import Chip, get_chip
from hsmflash.device import Revision, espressif_call, read_base_mac
from hsmflash.errors import InputError
from hsmflash.kdf import format_mac


def _crc8_esp32(data: bytes) -> int:
    # esp_crc8() of the ESP32 ROM: CRC-8, reflected polynomial 0x8C, initial value 0
    crc = 0
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x8C if crc & 1 else crc >> 1
    return crc


def _emulator_class(chip: Chip) -> Any:
    from espefuse.efuse_interface import SUPPORTED_CHIPS

    definition = SUPPORTED_CHIPS.get(chip.name)
    if definition is None:
        raise InputError(f"chip {chip.name} has no espefuse emulator")
    return definition.efuse_lib.EmulateEfuseController


def create_virtual_chip(
    chip_name: str,
    efuse_file: Path,
    mac: bytes,
    revision: Revision | tuple[int, int] = (0, 0),
) -> None:
    """Create a virtual eFuse file for a blank chip with factory `mac` and `revision`.

    The MAC is stored where the factory stores it (ESP32: BLOCK0 words 1-2 with its CRC8 in
    MAC_CRC; later chips: the MAC_SYS block) so that esptool's `read_mac` logic and espefuse's
    summary show it. Key blocks, security eFuses and protection bits are left blank.
    A MAC is not checked for uniqueness here (tests need bad ones); devices refuse them.

    Raises:
        InputError: unknown chip, `efuse_file` already exists, MAC not 6 bytes, or a
            revision the chip (or, for ESP32 v2, the emulator) cannot represent.
    """
    chip = get_chip(chip_name)
    efuse_file = Path(efuse_file)
    rev = revision if isinstance(revision, Revision) else Revision(*revision)
    if len(mac) != 6:
        raise InputError(f"MAC {mac.hex()} for {efuse_file} is {len(mac)} bytes, not 6")
    if efuse_file.exists():
        raise InputError(f"virtual eFuse file {efuse_file} already exists; refusing to overwrite")
    if chip.is_esp32_classic:
        if rev.major not in (0, 1, 3) or not 0 <= rev.minor <= 3:
            raise InputError(
                f"revision {rev} for virtual esp32 {efuse_file}: supported are v0.x, v1.x, v3.x"
            )
    elif not (0 <= rev.major <= 3 and 0 <= rev.minor <= 15):
        raise InputError(f"revision {rev} is out of range for {chip.name} ({efuse_file})")

    emulator_class = _emulator_class(chip)
    tmp = efuse_file.with_name(efuse_file.name + ".tmp")
    tmp.unlink(missing_ok=True)
    with espressif_call(f"creating virtual eFuses {efuse_file}"):
        emu = emulator_class(str(tmp))
        emu.set_chip_revision(rev.as_int)
        mac_field = next(f for f in emu.Fields.EFUSES if f.name == "MAC")
        block_index = [emu.Blocks.get(b).id for b in emu.Blocks.BLOCKS].index(mac_field.block)
        emu.direct_write_efuse(mac_field.word, int.from_bytes(mac[2:6], "big"), block=block_index)
        second = int.from_bytes(mac[0:2], "big")
        if chip.is_esp32_classic:
            crc_field = next(f for f in emu.Fields.EFUSES if f.name == "MAC_CRC")
            # MAC_CRC sits in the same word as the MAC's first two bytes
            assert crc_field.word == mac_field.word + 1  # noqa: S101 - espefuse layout fact
            second |= _crc8_esp32(mac) << crc_field.pos
        emu.direct_write_efuse(mac_field.word + 1, second, block=block_index)
        emu.save_to_file()
        stored = read_base_mac(emu)
    if stored != mac:
        tmp.unlink(missing_ok=True)
        raise InputError(
            f"virtual eFuses {efuse_file}: MAC {format_mac(mac)} read back as {format_mac(stored)}"
        )
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, efuse_file)
