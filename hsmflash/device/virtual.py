"""Virtual chips: espefuse's eFuse emulator on a file plus a flash file; chips with identities.
"""


from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, BinaryIO

from hsmflash.chips import Chip, get_chip
from hsmflash.device.base import (
    _ERASED,
    DEFAULT_FLASH_SIZE,
    Device,
    Revision,
    _blank_efuse_size,
    espressif_call,
    read_base_mac,
)
from hsmflash.errors import DeviceError, InputError
from hsmflash.fileio import atomic_write_with, open_regular, refuse_special_output, temp_beside
from hsmflash.formats.kdf import format_mac


def _esptool_major_revision_esp32(rev_bit0: int, rev_bit1: int, eco3_bit: int) -> int:
    # esptool's ESP32ROM.get_major_chip_version table
    return {0: 0, 1: 1, 3: 2, 7: 3}.get((eco3_bit << 2) | (rev_bit1 << 1) | rev_bit0, 0)


class VirtualDevice(Device):
    """espefuse's virtual eFuses (a file) plus a flash image file.

    The flash file is created 0xFF-filled (erased NOR flash) when missing; every write is
    flushed and fsync'd before `write_flash` returns, and the eFuse file is fsync'd after
    every burn.

    ESP32 revisions: esptool reads bit 2 of the major revision from the APB_CTL_DATE register,
    which a virtual chip does not have (espefuse's emulator always reports it set, so a virtual
    v1 looks like v0 to espefuse). Here it is taken as set exactly when CHIP_VER_REV2 is, so
    virtual ESP32 v0, v1 and v3 read back as created; v2 cannot be represented.
    """

    def __init__(
        self, chip: Chip, commands: Any, efuse_file: Path, flash_file: Path, flash_size: int
    ) -> None:
        super().__init__(chip, commands)
        self.efuse_file = efuse_file
        self.flash_file = flash_file
        self.flash_size = flash_size

    @property
    def _emulator(self) -> Any:
        return self._commands.esp

    @property
    def revision(self) -> Revision:
        emu = self._emulator
        if self.chip.is_esp32_classic:
            rev_bit0 = (emu.read_efuse(3) >> 15) & 1
            rev_bit1 = (emu.read_efuse(5) >> 20) & 1
            major = _esptool_major_revision_esp32(rev_bit0, rev_bit1, eco3_bit=rev_bit1)
            return Revision(major, int(emu.get_minor_chip_version()))
        return Revision(int(emu.get_major_chip_version()), int(emu.get_minor_chip_version()))

    @property
    def mac(self) -> bytes:
        return read_base_mac(self._emulator)

    def efuses_burned(self) -> None:
        fd = os.open(self.efuse_file, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _check_range(self, address: int, size: int) -> None:
        if address < 0 or size < 0 or address + size > self.flash_size:
            raise InputError(
                f"flash range {address:#x}+{size:#x} is outside the {self.flash_size:#x}-byte "
                f"flash {self.flash_file}"
            )

    def read_flash(self, address: int, size: int) -> bytes:
        self._check_range(address, size)
        if not os.path.lexists(self.flash_file):  # never written: erased
            return _ERASED * size
        fd = open_regular(self.flash_file, "virtual flash file", follow=False)
        try:
            return os.pread(fd, size, address)
        finally:
            os.close(fd)

    def write_flash(self, address: int, data: bytes) -> None:
        self._check_range(address, len(data))
        try:
            _ensure_flash_file(self.flash_file, self.flash_size)
            fd = open_regular(self.flash_file, "virtual flash file", os.O_RDWR, follow=False)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.pwrite(fd, view, address + len(data) - len(view)):]
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            raise DeviceError(f"writing virtual flash {self.flash_file}: "
                              f"{e.strerror or e}") from e

    def flash_md5(self, address: int, size: int) -> str:
        return hashlib.md5(self.read_flash(address, size), usedforsecurity=False).hexdigest()

    def close(self) -> None:
        """Nothing stays open between calls."""


def _check_flash_file(flash_file: Path, size: int) -> None:
    if size <= 0 or size % 4096:
        raise InputError(
            f"flash size {size:#x} for {flash_file} is not a positive multiple of 4 KiB"
        )
    if refuse_special_output(flash_file, "virtual flash file"):
        actual = flash_file.stat().st_size
        if actual != size:
            raise InputError(
                f"flash file {flash_file} is {actual:#x} bytes, expected {size:#x}"
            )
        if not os.access(flash_file, os.W_OK):
            raise InputError(f"flash file {flash_file} is not writable")
        return
    # created at the first write, which comes after the first eFuse burn: check now
    parent = flash_file.parent
    if not parent.is_dir():
        raise InputError(f"flash file {flash_file}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"flash file {flash_file}: directory {parent} is not writable")


def _ensure_flash_file(flash_file: Path, size: int) -> None:
    """Create the flash file erased (0xFF), atomically, unless it exists; the temp file is new
    (never a planted link) and removed on failure."""
    if refuse_special_output(flash_file, "virtual flash file"):
        return

    def erased(f: BinaryIO) -> None:
        chunk = _ERASED * 65536
        for _ in range(size // len(chunk)):
            f.write(chunk)
        f.write(_ERASED * (size % len(chunk)))

    atomic_write_with(flash_file, erased, mode=0o600, what="virtual flash file")


def open_virtual(
    chip: str | Chip,
    efuse_file: Path,
    flash_file: Path,
    flash_size: int = DEFAULT_FLASH_SIZE,
) -> VirtualDevice:
    """Open a virtual chip: espefuse's emulator on `efuse_file` and a flash image file.

    The eFuse file must exist (make one with `create_virtual_chip` below); a
    missing flash file reads as erased (0xFF) and is created at the first write, so a dry
    run leaves nothing behind.

    Raises:
        InputError: unknown chip, missing eFuse file, or a flash file of the wrong size.
        DeviceError: espefuse rejected the eFuse file.
    """
    chip_obj = chip if isinstance(chip, Chip) else get_chip(chip)
    efuse_file = Path(efuse_file)
    flash_file = Path(flash_file)
    if not refuse_special_output(efuse_file, "virtual eFuse file"):
        raise InputError(
            f"virtual eFuse file {efuse_file} does not exist (create it first: `hsmflash virtual "
            "create --chip CHIP --mac MAC --efuse-file FILE`)"
        )
    expected = _blank_efuse_size(chip_obj.name)
    actual = efuse_file.stat().st_size
    if actual != expected:
        # espefuse's emulator would silently grow another chip's file into a blank chip
        raise DeviceError(f"virtual eFuse file {efuse_file} is {actual} bytes, not an "
                          f"{chip_obj.name} eFuse file ({expected} bytes): wrong chip")
    _check_flash_file(flash_file, flash_size)

    from espefuse import init_commands

    with espressif_call(f"opening virtual eFuses {efuse_file}"):
        commands = init_commands(
            chip=chip_obj.name,
            virt=True,
            virt_efuse_file=str(efuse_file),
            do_not_confirm=True,
        )
        commands.efuses.postpone = True  # as espefuse's CLI: protection bits burn last
    _save_atomically(commands.esp, efuse_file)
    return VirtualDevice(chip_obj, commands, efuse_file, flash_file, flash_size)


def _save_atomically(emulator: Any, efuse_file: Path) -> None:
    """espefuse's emulator truncates and rewrites its file on every register write; a process
    killed there would leave a blank chip, which real eFuses never become. Save through a temp
    file and a rename instead (made durable by `efuses_burned`)."""

    def save_to_file() -> None:
        # 0600: dev-mode eFuses hold readable keys
        atomic_write_with(efuse_file, emulator.mem.tofile, mode=0o600,
                          what="virtual eFuse file", sync_directory=False)

    emulator.save_to_file = save_to_file


# ---------------------------------------------------------------------------------------
# Serial port: esptool + espefuse on a chip in download mode
# ---------------------------------------------------------------------------------------



# ---- virtual chips with identities (factory MAC and revision) ----



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
    if os.path.lexists(efuse_file):
        raise InputError(f"virtual eFuse file {efuse_file} already exists; refusing to overwrite")
    if chip.is_esp32_classic:
        if rev.major not in (0, 1, 3) or not 0 <= rev.minor <= 3:
            raise InputError(
                f"revision {rev} for virtual esp32 {efuse_file}: supported are v0.x, v1.x, v3.x"
            )
    elif not (0 <= rev.major <= 3 and 0 <= rev.minor <= 15):
        raise InputError(f"revision {rev} is out of range for {chip.name} ({efuse_file})")

    emulator_class = _emulator_class(chip)
    fd, tmp = temp_beside(efuse_file, 0o600)  # new and ours; espefuse rewrites it by name
    os.close(fd)
    try:
        with espressif_call(f"creating virtual eFuses {efuse_file}"):
            emu = emulator_class(str(tmp))
            emu.set_chip_revision(rev.as_int)
            mac_field = next(f for f in emu.Fields.EFUSES if f.name == "MAC")
            block_index = [emu.Blocks.get(b).id for b in emu.Blocks.BLOCKS].index(mac_field.block)
            emu.direct_write_efuse(mac_field.word, int.from_bytes(mac[2:6], "big"),
                                   block=block_index)
            second = int.from_bytes(mac[0:2], "big")
            if chip.is_esp32_classic:
                crc_field = next(f for f in emu.Fields.EFUSES if f.name == "MAC_CRC")
                # MAC_CRC sits in the same word as the MAC's first two bytes
                assert crc_field.word == mac_field.word + 1  # noqa: S101 - espefuse layout fact
                second |= _crc8_esp32(mac) << crc_field.pos
            emu.direct_write_efuse(mac_field.word + 1, second, block=block_index)
            emu.save_to_file()
            stored = read_base_mac(emu)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if stored != mac:
        tmp.unlink(missing_ok=True)
        raise InputError(
            f"virtual eFuses {efuse_file}: MAC {format_mac(mac)} read back as {format_mac(stored)}"
        )
    fd = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        os.fchmod(fd, 0o600)
        os.fsync(fd)
    finally:
        os.close(fd)
    if os.path.lexists(efuse_file):
        tmp.unlink(missing_ok=True)
        raise InputError(f"virtual eFuse file {efuse_file} already exists; refusing to overwrite")
    os.replace(tmp, efuse_file)
