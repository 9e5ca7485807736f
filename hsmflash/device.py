"""One chip to provision: identity, eFuses, SPI flash, whether virtual or on a serial port.

Two implementations behind one `Device` shape:

- `VirtualDevice`: espefuse's own eFuse emulator (Espressif's model of write-once bits,
  read/write protection and coding schemes) on a file, plus a plain file standing in for the
  SPI flash. Used for development, demos and tests.
- `SerialDevice`: a chip in its ROM download mode, driven by esptool and espefuse over a port.

Open either with `open_device(...)` (a context manager). Everything that talks to esptool or
espefuse runs inside `espressif_call`, which keeps their console output away from the user
(the library never prints) and turns their `FatalError` into `DeviceError`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hsmflash.chips import Chip, get_chip
from hsmflash.errors import DeviceError, Error, InputError
from hsmflash.kdf import check_device_id, format_mac

DEFAULT_FLASH_SIZE = 4 * 1024 * 1024
_ERASED = b"\xff"


@dataclass(frozen=True, order=True)
class Revision:
    """Chip revision as esptool reports it (`v3.0` is major 3, minor 0)."""

    major: int
    minor: int

    @property
    def as_int(self) -> int:
        """esptool's integer form, `major * 100 + minor` (e.g. 300 for ESP32 v3.0)."""
        return self.major * 100 + self.minor

    def __str__(self) -> str:
        return f"v{self.major}.{self.minor}"


@dataclass(frozen=True)
class Identity:
    """What tells one chip from another: type, revision and 6-byte base MAC."""

    chip: Chip
    revision: Revision
    mac: bytes

    @property
    def mac_text(self) -> str:
        return format_mac(self.mac)


def check_unique_mac(mac: bytes) -> None:
    """Refuse a MAC that cannot name one chip: per-device keys are derived from it.

    Raises:
        DeviceError: the MAC is not 6 bytes, all-zero, all-ones or multicast.
    """
    try:
        check_device_id(mac)
    except InputError as e:
        raise DeviceError(e.diagnostics()) from None


@contextlib.contextmanager
def espressif_call(what: str) -> Iterator[None]:
    """Run esptool/espefuse code quietly; their `FatalError` becomes `DeviceError`.

    Their output is discarded, not echoed into messages: espefuse prints eFuse block contents
    when it compares a block before a burn, and those can be key bytes.

    Raises:
        DeviceError: esptool or espefuse reported a fatal error; the message starts with `what`.
    """
    import esptool
    import serial

    sink = io.StringIO()
    try:
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            yield
    except esptool.FatalError as e:
        first_line = str(e).strip().splitlines()[0].strip() if str(e).strip() else "failed"
        raise DeviceError(f"{what}: {first_line}") from e
    except (serial.SerialException, OSError) as e:  # cable pulled, port gone, I/O error
        first_line = str(e).strip().splitlines()[0].strip() if str(e).strip() else "I/O error"
        raise DeviceError(f"{what}: connection lost ({first_line}); re-run to finish") from e


class Device(ABC):
    """One chip: identity, eFuses (espefuse's `EspEfuses`) and SPI flash.

    Use as a context manager or call `close()`.
    """

    chip: Chip

    def __init__(self, chip: Chip, commands: Any) -> None:
        self.chip = chip
        self._commands = commands

    # -- identity ------------------------------------------------------------------------
    @property
    @abstractmethod
    def revision(self) -> Revision:
        """Chip revision (major, minor)."""

    @property
    @abstractmethod
    def mac(self) -> bytes:
        """The 6-byte factory base MAC, as esptool reads it."""

    def identify(self) -> Identity:
        """Chip type, revision and base MAC, after checking the MAC can name one chip.

        Raises:
            DeviceError: the MAC is all-zero, all-ones or multicast.
        """
        mac = self.mac
        check_unique_mac(mac)
        return Identity(self.chip, self.revision, mac)

    # -- eFuses --------------------------------------------------------------------------
    @property
    def commands(self) -> Any:
        """espefuse's command object for this chip (`BaseCommands` subclass)."""
        return self._commands

    @property
    def efuses(self) -> Any:
        """espefuse's `EspEfuses` object: the chip's eFuses as last read."""
        return self._commands.efuses

    def reload_efuses(self) -> None:
        """Read the eFuses again from the chip, dropping anything queued but not burned.

        Raises:
            DeviceError: espefuse could not read the eFuses.
        """
        with espressif_call(f"reading eFuses of {self.chip.name}"):
            self._commands.get_efuses(do_not_confirm=True)
            self._commands.efuses.postpone = True

    def efuses_burned(self) -> None:  # noqa: B027 - optional hook, a no-op on real chips
        """Hook called after every eFuse burn (the virtual device makes the file durable)."""

    # -- flash ---------------------------------------------------------------------------
    @abstractmethod
    def read_flash(self, address: int, size: int) -> bytes:
        """Read `size` bytes of SPI flash at `address`.

        Raises:
            InputError: the range lies outside the flash.
            DeviceError: the chip did not answer.
        """

    @abstractmethod
    def write_flash(self, address: int, data: bytes) -> None:
        """Write `data` to SPI flash at `address` (erasing first, as esptool does); durable.

        Raises:
            InputError: the range lies outside the flash.
            DeviceError: the write failed.
        """

    @abstractmethod
    def flash_md5(self, address: int, size: int) -> str:
        """Lower-case hex MD5 of a flash range, computed where the flash is.

        Raises:
            InputError: the range lies outside the flash.
            DeviceError: the chip did not answer.
        """

    @abstractmethod
    def close(self) -> None:
        """Release the port or files. Safe to call twice."""

    def __enter__(self) -> Device:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------
# Virtual chip: espefuse's emulator + a flash image file
# ---------------------------------------------------------------------------------------


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
        if not self.flash_file.exists():  # never written: erased
            return _ERASED * size
        with open(self.flash_file, "rb") as f:
            f.seek(address)
            return f.read(size)

    def write_flash(self, address: int, data: bytes) -> None:
        self._check_range(address, len(data))
        try:
            _ensure_flash_file(self.flash_file, self.flash_size)
            with open(self.flash_file, "r+b") as f:
                f.seek(address)
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise DeviceError(f"writing virtual flash {self.flash_file}: "
                              f"{e.strerror or e}") from e

    def flash_md5(self, address: int, size: int) -> str:
        return hashlib.md5(self.read_flash(address, size), usedforsecurity=False).hexdigest()

    def close(self) -> None:
        """Nothing stays open between calls."""


def read_base_mac(esp: Any) -> bytes:
    """The base MAC the way esptool's `read_mac("BASE_MAC")` reads it, from eFuse words.

    Works on espefuse's emulator: ESP32 keeps the MAC in BLOCK0 words 1-2, later chips in
    the MAC_SYS block words 0-1; in both, the second word's low 16 bits are the first two
    bytes and the first word is the last four, big-endian.
    """
    mac_field = next(f for f in esp.Fields.EFUSES if f.name == "MAC")
    block_index = [esp.Blocks.get(b).id for b in esp.Blocks.BLOCKS].index(mac_field.block)
    low_word = esp.read_efuse(mac_field.word, block=block_index)
    high_word = esp.read_efuse(mac_field.word + 1, block=block_index)
    return bytes((high_word & 0xFFFF).to_bytes(2, "big") + low_word.to_bytes(4, "big"))


@functools.cache
def _blank_efuse_size(chip: str) -> int:
    """The size of the eFuse file espefuse's emulator writes for `chip`."""
    import importlib
    import tempfile

    module = importlib.import_module(f"espefuse.efuse.{chip}.emulate_efuse_controller")
    with tempfile.TemporaryDirectory() as tmp, espressif_call(f"sizing {chip} eFuses"):
        path = Path(tmp) / "blank.bin"
        module.EmulateEfuseController(str(path))
        return path.stat().st_size if path.exists() else -1


@functools.cache
def efuse_field_names(chip: str) -> frozenset[str]:
    """The names of `chip`'s eFuse fields, from espefuse's own tables (no device needed).

    Raises:
        DeviceError: espefuse does not know the chip.
    """
    from espefuse import init_commands

    with espressif_call(f"loading {chip} eFuse definitions"):
        commands = init_commands(chip=chip, virt=True, do_not_confirm=True)
        return frozenset(str(e.name) for e in commands.efuses)


def _check_flash_file(flash_file: Path, size: int) -> None:
    if size <= 0 or size % 4096:
        raise InputError(
            f"flash size {size:#x} for {flash_file} is not a positive multiple of 4 KiB"
        )
    if flash_file.exists():
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
    """Create the flash file erased (0xFF), atomically, unless it exists."""
    if flash_file.exists():
        return
    tmp = flash_file.with_name(flash_file.name + ".tmp")
    with open(tmp, "wb") as f:
        chunk = _ERASED * 65536
        for _ in range(size // len(chunk)):
            f.write(chunk)
        f.write(_ERASED * (size % len(chunk)))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, flash_file)


def open_virtual(
    chip: str | Chip,
    efuse_file: Path,
    flash_file: Path,
    flash_size: int = DEFAULT_FLASH_SIZE,
) -> VirtualDevice:
    """Open a virtual chip: espefuse's emulator on `efuse_file` and a flash image file.

    The eFuse file must exist (make one with `hsmflash.virtual.create_virtual_chip`); a
    missing flash file reads as erased (0xFF) and is created at the first write, so a dry
    run leaves nothing behind.

    Raises:
        InputError: unknown chip, missing eFuse file, or a flash file of the wrong size.
        DeviceError: espefuse rejected the eFuse file.
    """
    chip_obj = chip if isinstance(chip, Chip) else get_chip(chip)
    efuse_file = Path(efuse_file)
    flash_file = Path(flash_file)
    if not efuse_file.is_file():
        raise InputError(
            f"virtual eFuse file {efuse_file} does not exist (create it with a MAC first)"
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
        tmp = efuse_file.with_name(efuse_file.name + ".tmp")
        with open(tmp, "wb") as f:
            emulator.mem.tofile(f)
        os.replace(tmp, efuse_file)

    emulator.save_to_file = save_to_file


# ---------------------------------------------------------------------------------------
# Serial port: esptool + espefuse on a chip in download mode
# ---------------------------------------------------------------------------------------


class SerialDevice(Device):
    """A chip in ROM download mode on a serial port, driven through esptool's API.

    The flasher stub is loaded when the chip allows it (faster reads, MD5 and compressed
    writes); espefuse shares the same connection.
    """

    def __init__(self, chip: Chip, commands: Any, esp: Any, port: str) -> None:
        super().__init__(chip, commands)
        self._esp = esp
        self.port = port
        self._closed = False

    @property
    def esp(self) -> Any:
        """esptool's connected `ESPLoader`."""
        return self._esp

    @property
    def revision(self) -> Revision:
        with espressif_call(f"reading chip revision on {self.port}"):
            return Revision(
                int(self._esp.get_major_chip_version()), int(self._esp.get_minor_chip_version())
            )

    @property
    def mac(self) -> bytes:
        with espressif_call(f"reading MAC on {self.port}"):
            return bytes(self._esp.read_mac("BASE_MAC"))

    def _check_range(self, address: int, size: int) -> None:
        if address < 0 or size < 0:
            raise InputError(f"flash range {address:#x}+{size:#x} is invalid")

    def read_flash(self, address: int, size: int) -> bytes:
        self._check_range(address, size)
        with espressif_call(f"reading flash on {self.port}"):
            return bytes(self._esp.read_flash(address, size))

    def write_flash(self, address: int, data: bytes) -> None:
        self._check_range(address, len(data))
        from esptool.cmds import write_flash

        # force: the data is already encrypted/signed on the host; esptool's plaintext and
        # image-header safety checks would refuse exactly what provisioning must write.
        with espressif_call(f"writing flash at {address:#x} on {self.port}"):
            write_flash(
                self._esp,
                [(address, data)],
                flash_freq="keep",
                flash_mode="keep",
                flash_size="keep",
                force=True,
                no_progress=True,
            )

    def flash_md5(self, address: int, size: int) -> str:
        self._check_range(address, size)
        with espressif_call(f"computing flash MD5 on {self.port}"):
            return str(self._esp.flash_md5sum(address, size)).lower()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            self._esp._port.close()


def open_serial(port: str, chip: str = "auto", baud: int = 115200,
                stub: bool = False) -> SerialDevice:
    """Connect to a chip in download mode on `port` (ROM loader; the flasher stub with `stub`).

    The ROM loader is the default: it is what a chip in secure download mode offers, and
    hsmflash only writes, checks MD5s and reads eFuses, which the ROM does.

    Raises:
        InputError: `chip` is unknown.
        DeviceError: no chip answered, or it is not the expected chip.
    """
    expected = None if chip == "auto" else get_chip(chip)
    from espefuse import init_commands
    from esptool.cmds import attach_flash, detect_chip, run_stub

    esp: Any = None
    try:
        with espressif_call(f"connecting to {port}"):
            esp = detect_chip(port, baud)
        found = get_chip(str(esp.CHIP_NAME))
        if expected is not None and found != expected:
            raise DeviceError(f"port {port}: found {found.name}, expected {expected.name}")
        with espressif_call(f"attaching the flash on {port}"):
            if stub and not esp.secure_download_mode:
                esp = run_stub(esp)
            attach_flash(esp)
        with espressif_call(f"reading eFuses on {port}"):
            commands = init_commands(esp=esp, do_not_confirm=True)
            commands.efuses.postpone = True  # as espefuse's CLI: protection bits burn last
    except InputError as e:
        if esp is not None:
            esp._port.close()
        raise DeviceError(f"port {port}: unsupported chip ({e})") from e
    except Error:
        if esp is not None:
            esp._port.close()
        raise
    return SerialDevice(found, commands, esp, port)


@contextlib.contextmanager
def open_device(
    chip: str = "auto",
    *,
    port: str | None = None,
    efuse_file: Path | None = None,
    flash_file: Path | None = None,
    flash_size: int = DEFAULT_FLASH_SIZE,
    baud: int = 115200,
) -> Iterator[Device]:
    """Open a serial device (`port`) or a virtual one (`efuse_file` + `flash_file`); close on exit.

    Raises:
        InputError: both or neither device kind given, unknown chip, bad virtual files.
        DeviceError: the chip or its eFuses could not be read.
    """
    virtual = efuse_file is not None or flash_file is not None
    if port is not None and virtual:
        raise InputError("give either a serial port or virtual eFuse/flash files, not both")
    device: Device
    if port is not None:
        device = open_serial(port, chip, baud)
    elif efuse_file is not None and flash_file is not None:
        if chip == "auto":
            raise InputError("a virtual device needs its chip named (e.g. esp32s3)")
        device = open_virtual(chip, efuse_file, flash_file, flash_size)
    else:
        raise InputError("no device: give a serial port, or both virtual eFuse and flash files")
    try:
        yield device
    finally:
        device.close()
