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
import io
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hsmflash.chips import Chip
from hsmflash.errors import DeviceError, Error, InputError
from hsmflash.formats.kdf import check_device_id, format_mac

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


_BLOCK_DATA = re.compile(r"(?:0x)?[0-9a-fA-F]{16,}|(?:\b[0-9a-fA-F]{2}[ :]){8,}[0-9a-fA-F]{2}\b"
                         r"|(?:0x)?[0-9a-fA-F]{9,}")


def redact_block_data(text: str) -> str:
    """`text` with anything that could be eFuse block contents (long hex runs, hex byte
    lists; espefuse quotes a block's hex when a read-protected block is not all zeros)
    replaced by `<block data>`."""
    return _BLOCK_DATA.sub("<block data>", text)


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
        clean = redact_block_data(first_line)
        if clean != first_line:  # the original (and its traceback) carried block contents
            raise DeviceError(f"{what}: {clean}") from None
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
def efuse_field_specs(chip: str, major: int | None = None, *,
                      cached: bool = False) -> dict[str, tuple[int, str]]:
    """`chip`'s writable eFuse fields as {name: (bit length, espefuse type)}, from espefuse's
    own tables, picked by chip revision the way espefuse picks them (ESP32-P4 v3.x has its
    own map; ESP32-H2 up to v1.1 has extra fields). `major=None`: the fields every covered
    revision has in common is not known, so the newest table is used.

    `cached`: keep the tables in the user's cache, per esptool and hsmflash version, so
    `policy check` needs no espefuse import; a cache that cannot be read or written is
    ignored. Provisioning reads espefuse's tables themselves (it has espefuse loaded anyway).

    Raises:
        DeviceError: espefuse does not know the chip.
    """
    if not cached:
        return _read_efuse_specs(chip, major)
    import json
    import os
    from importlib.metadata import version

    from hsmflash import __version__

    try:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    except RuntimeError:  # no home directory: no cache
        return _read_efuse_specs(chip, major)
    cache = Path(base) / "hsmflash" / "efuse-fields.json"
    key = f"v1 hsmflash {__version__} esptool {version('esptool')}: {chip} {major}"
    entries: dict[str, object] = {}
    try:
        loaded = json.loads(cache.read_text(encoding="utf-8"))
        if isinstance(loaded, dict):
            entries = loaded
        found = entries.get(key)
        if isinstance(found, dict) and found:
            return {str(k): (int(v[0]), str(v[1])) for k, v in found.items()}
    except (OSError, ValueError, TypeError, IndexError, KeyError):
        pass  # no cache, or a damaged one: read the tables again
    specs = _read_efuse_specs(chip, major)
    entries[key] = specs
    try:
        from hsmflash.fileio import atomic_write

        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(cache, json.dumps(entries, sort_keys=True).encode())
    except (OSError, Error):  # a cache that cannot be written is no error
        pass
    return specs


def _read_efuse_specs(chip: str, major: int | None) -> dict[str, tuple[int, str]]:
    import importlib

    with espressif_call(f"loading {chip} eFuse definitions"):
        module = importlib.import_module(f"espefuse.efuse.{chip}.mem_definition")
        tables = [module.EfuseDefineFields(None)]
        if chip == "esp32p4" and (major is None or major >= 3):
            tables = [module.EfuseDefineFields(None, revision="esp32p4_v3.0")]
        if chip == "esp32h2" and major is not None and major <= 1:
            tables.append(module.EfuseDefineFields(None, revision="esp32h2_v0.0_v1.1"))
        return {str(e.name): (int(e.bit_len), str(e.type))
                for t in tables for e in t.EFUSES if e is not None}
