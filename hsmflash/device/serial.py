"""A chip in download mode on a serial port, driven through esptool's API.

The wire is the bottleneck of a station (a few MiB of incompressible ciphertext per device), so
the path is built for it:

- esptool's flasher stub (`run_stub`, esptool's own stub images) unless `stub=False` or the chip
  is in Secure Download Mode, where the ROM refuses RAM uploads;
- the highest rate asked for (`baud`), reached by CHANGE_BAUDRATE after connecting at 115200, and
  checked with a command at the new rate; when the change fails the link falls back to 115200
  (`baud_note` says so), or, when the chip is lost at the new rate, a `DeviceError` says to reset
  it and re-run;
- plain FLASH_DATA blocks of the loader's largest size (16 KiB with the stub): ciphertext does
  not compress, so deflate would cost CPU and bytes;
- 4 KiB sectors that are all 0xFF in the data are not sent: they are erased (one small command
  per run of them) instead of written;
- the MD5 of each region read back where the loader allows it (`flash_md5`);
- esptool 5.x formats every packet as a hex dump for its trace log even when tracing is off
  (`HexFormatter` inside f-strings: ~4 s of CPU per MiB written); hsmflash never traces, so its
  writes run with a formatter that prints the length only (`bench/bench_serial.py` shows it),
  and its per-block XOR checksum is computed without a per-byte Python loop (`esp_checksum`,
  tested equal to esptool's).
"""


from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from typing import Any

from hsmflash.chips import Chip, get_chip
from hsmflash.device.base import Device, Revision, espressif_call
from hsmflash.errors import DeviceError, Error, InputError
from hsmflash.formats.images import esp_checksum

INITIAL_BAUD = 115200  # what the ROM auto-bauds to reliably; every station connects here first
SECTOR = 0x1000
_ERASED_SECTOR = b"\xff" * SECTOR
_PROBE_TIMEOUT = 0.5
REAPPEAR_TIMEOUT = 15.0  # a native-USB chip's port comes back within a few seconds of a reset


class SecureDownloadModeError(DeviceError):
    """The chip is in Secure Download Mode and refuses what was asked (reads of any kind)."""


class SerialDevice(Device):
    """A chip in ROM download mode (or running esptool's flasher stub) on a serial port.

    espefuse shares the same connection; in Secure Download Mode there are no eFuse, MAC or
    flash reads at all (`secure_download_mode`), only writes and `security_info`.
    """

    def __init__(self, chip: Chip, commands: Any, esp: Any, port: str,
                 baud_note: str | None = None, *, baud: int = 921600, stub: bool = True) -> None:
        super().__init__(chip, commands)
        self._esp = esp
        self.port = port
        self.baud_note = baud_note
        self._closed = False
        self._baud, self._stub = baud, stub
        self._mac: bytes | None = None
        self._found_by_mac = False
        self.reconnects = 0

    @property
    def esp(self) -> Any:
        """esptool's connected `ESPLoader` (a stub loader when the stub runs)."""
        return self._esp

    @property
    def secure_download_mode(self) -> bool:
        """The ROM is in Secure Download Mode: write-only, nothing can be read back."""
        return bool(self._esp.secure_download_mode)

    @property
    def stub(self) -> bool:
        """esptool's flasher stub is running."""
        return bool(self._esp.IS_STUB)

    @property
    def baud(self) -> int:
        """The rate the link runs at now."""
        return int(self._esp._port.baudrate)

    def _refuse_in_sdm(self, what: str) -> None:
        if self.secure_download_mode:
            raise SecureDownloadModeError(
                f"{self.port}: the chip is in Secure Download Mode and cannot {what}")

    @property
    def commands(self) -> Any:
        self._refuse_in_sdm("have its eFuses read")
        return self._commands

    @property
    def efuses(self) -> Any:
        self._refuse_in_sdm("have its eFuses read")
        return self._commands.efuses

    @property
    def revision(self) -> Revision:
        self._refuse_in_sdm("report its revision")
        with espressif_call(f"reading chip revision on {self.port}"):
            return Revision(
                int(self._esp.get_major_chip_version()), int(self._esp.get_minor_chip_version())
            )

    @property
    def mac(self) -> bytes:
        self._refuse_in_sdm("report its MAC (name the device with --device MAC)")
        with espressif_call(f"reading MAC on {self.port}"):
            mac = bytes(self._esp.read_mac("BASE_MAC"))
        if self._mac is None:  # USB-Serial-JTAG names itself by the MAC: it can be found again
            self._mac = mac
            self._found_by_mac = _port_with_serial(mac) == os.path.realpath(self.port)
        return mac

    def security_info(self) -> dict[str, Any]:
        """esptool's parsed GET_SECURITY_INFO (works in Secure Download Mode; not on ESP32).

        Raises:
            DeviceError: the chip does not answer it.
        """
        with espressif_call(f"reading security info on {self.port}"):
            return dict(self._esp.get_security_info(cache=False))

    def _check_range(self, address: int, size: int) -> None:
        if address < 0 or size < 0:
            raise InputError(f"flash range {address:#x}+{size:#x} is invalid")

    def read_flash(self, address: int, size: int) -> bytes:
        self._check_range(address, size)
        self._refuse_in_sdm("read flash")
        with espressif_call(f"reading flash on {self.port}"):
            return bytes(self._esp.read_flash(address, size))

    def write_flash(self, address: int, data: bytes) -> None:
        """Write `data` at `address`: sectors with data written, all-0xFF sectors erased.

        Raises:
            InputError: the range is invalid.
            DeviceError: the chip refused a block or the connection was lost.
        """
        self._check_range(address, len(data))
        try:
            self._write_region(address, data)
        except DeviceError as e:
            if not _connection_lost(e) or not self._can_follow():
                raise
            self._reopen(e)
            self._write_region(address, data)  # the whole region again: nothing else is known

    def _write_region(self, address: int, data: bytes) -> None:
        with espressif_call(f"writing flash at {address:#x} on {self.port}"):
            for run_address, run, erased in sector_runs(address, data):
                if erased:
                    self._erase(run_address, len(run))
                else:
                    self._write_run(run_address, run)

    # -- following a port that went away (native USB: the chip reset, the cable re-seated) --
    def _can_follow(self) -> bool:
        """A stable name to find the chip again: a symlink such as /dev/serial/by-id/..., or
        a MAC already read (USB-Serial-JTAG reports the MAC as the USB serial number)."""
        return self.reconnects == 0 and (os.path.islink(self.port) or self._found_by_mac)

    def _reopen(self, cause: DeviceError) -> None:
        """Reconnect to the same chip after the link dropped, or re-raise `cause`.

        Raises:
            DeviceError: the port did not come back in time, or another chip answered there.
        """
        self.reconnects += 1
        with contextlib.suppress(Exception):
            self._esp._port.close()
        deadline = time.monotonic() + REAPPEAR_TIMEOUT
        while True:
            port = self.port if os.path.islink(self.port) else _port_with_serial(self._mac)
            if port is not None and os.path.exists(port):
                try:
                    again = open_serial(port, self.chip.name, self._baud, self._stub)
                    break
                except DeviceError:
                    pass  # still enumerating, or the chip is still resetting
            if time.monotonic() > deadline:
                raise cause
            time.sleep(0.2)
        if self._mac is not None and not again.secure_download_mode and again.mac != self._mac:
            again.close()
            raise DeviceError(f"{port}: another chip answered after the link came back "
                              f"(MAC {again.mac.hex(':')}, expected {self._mac.hex(':')})")
        self._esp, self._commands, self.baud_note = again._esp, again._commands, again.baud_note

    def _erase(self, address: int, size: int) -> None:
        esp = self._esp
        if esp.IS_STUB:
            esp.erase_region(address, size)
        else:
            esp.flash_begin(size, address, logging=False)  # the ROM erases on FLASH_BEGIN

    def _write_run(self, address: int, data: bytes) -> None:
        esp = self._esp
        block = int(esp.FLASH_WRITE_SIZE)
        # generous: three times the block's wire time, never below esptool's default
        timeout = max(3.0, 3 * (block + 64) * 10 / self.baud)
        with _untraced_packets():
            blocks = esp.flash_begin(len(data), address, logging=False)
            for seq in range(blocks):
                chunk = data[seq * block:(seq + 1) * block]
                esp.flash_block(chunk.ljust(block, b"\xff"), seq, timeout=timeout)
            if esp.IS_STUB:
                esp.flash_finish(reboot=False)  # the stub flushes its last block on FLASH_END

    def flash_md5(self, address: int, size: int) -> str:
        self._check_range(address, size)
        self._refuse_in_sdm("compute a flash MD5 (nothing can be read back)")
        with espressif_call(f"computing flash MD5 on {self.port}"):
            return str(self._esp.flash_md5sum(address, size)).lower()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            self._esp._port.close()


class _LengthOnly:
    """Stands in for esptool's `HexFormatter` while hsmflash writes: the length, not a dump."""

    def __init__(self, data: bytes, auto_split: bool = True) -> None:
        self._length = len(data)

    def __str__(self) -> str:
        return f"<{self._length} bytes>"


@contextlib.contextmanager
def _untraced_packets() -> Iterator[None]:
    import esptool.loader

    saved = esptool.loader.HexFormatter
    esptool.loader.HexFormatter = _LengthOnly
    try:
        yield
    finally:
        esptool.loader.HexFormatter = saved


def _connection_lost(error: DeviceError) -> bool:
    import serial

    return isinstance(error.__cause__, serial.SerialException | OSError)


def _port_with_serial(mac: bytes | None) -> str | None:
    """The port whose USB serial number is this MAC (ESP32-S3/C3 USB-Serial-JTAG)."""
    if mac is None:
        return None
    from serial.tools import list_ports

    wanted = mac.hex(":").upper()
    for info in list_ports.comports():
        if (info.serial_number or "").upper() == wanted:
            return os.path.realpath(str(info.device))
    return None


def sector_runs(address: int, data: bytes) -> list[tuple[int, bytes, bool]]:
    """Split a region into runs of (address, bytes, all-0xFF) at 4 KiB sector boundaries.

    The first and last pieces follow `address` and the data's end; only whole sectors inside
    the region can be erased-only runs (a partial sector is always written).
    """
    view = memoryview(data)
    spans: list[list[Any]] = []  # [start, end, erased], offsets into data
    pos = 0
    while pos < len(data):
        end = min(len(data), ((address + pos) // SECTOR + 1) * SECTOR - address)
        erased = end - pos == SECTOR and view[pos:end] == _ERASED_SECTOR
        if spans and spans[-1][2] == erased:
            spans[-1][1] = end
        else:
            spans.append([pos, end, erased])
        pos = end
    return [(address + start, data[start:end], erased) for start, end, erased in spans]


def _probe(esp: Any) -> bool:
    """One cheap command at the current rate; True when the chip answers."""
    try:
        with espressif_call("probing the link"):
            if esp.secure_download_mode:
                esp.get_security_info(cache=False)  # the one read the ROM still allows
            else:
                esp.read_reg(esp.CHIP_DETECT_MAGIC_REG_ADDR, timeout=_PROBE_TIMEOUT)
        return True
    except DeviceError:
        return False


def change_baud(esp: Any, baud: int, port: str) -> str | None:
    """Move the link to `baud`; returns a note when it stayed at (or fell back to) 115200.

    The host port is asked first (a driver may refuse the rate: nothing is sent to the chip);
    then the chip, then one command at the new rate. When that fails, the host goes back to
    115200 and asks again: if the chip never got the change it answers there.

    Raises:
        DeviceError: the chip answers at neither rate (it moved and the link garbles the new
            rate): reset it or replug, then re-run with a lower --baud.
    """
    old = int(esp._port.baudrate)
    if baud == old:
        return None
    try:
        esp._port.baudrate = baud
        esp._port.baudrate = old
    except (OSError, ValueError) as e:
        with contextlib.suppress(OSError, ValueError):
            esp._port.baudrate = old
        return f"{port} does not accept {baud} baud ({e}); staying at {old}"
    try:
        with espressif_call(f"changing the baud rate on {port}"):
            esp.change_baud(baud)
    except DeviceError:
        pass  # no answer: the chip may or may not have moved; the probes tell
    if int(esp._port.baudrate) == baud and _probe(esp):
        return None
    with contextlib.suppress(Exception):
        esp._set_port_baudrate(old)
        esp.flush_input()
    if _probe(esp):
        return f"changing to {baud} baud failed on {port}; fell back to {old}"
    raise DeviceError(f"{port}: changing to {baud} baud failed and the chip answers at "
                      f"neither {baud} nor {old}: reset it (or replug it) and re-run, with "
                      "--baud 115200 if this port cannot do more")


def open_serial(port: str, chip: str = "auto", baud: int = 460800,
                stub: bool = True) -> SerialDevice:
    """Connect to a chip in download mode on `port` at 115200, load esptool's flasher stub
    (unless `stub` is false or the chip is in Secure Download Mode), then move to `baud`.

    Raises:
        InputError: `chip` is unknown.
        DeviceError: no chip answered, it is not the expected chip, or the baud change left
            the chip unreachable.
    """
    expected = None if chip == "auto" else get_chip(chip)
    from espefuse import init_commands
    from esptool.cmds import attach_flash, detect_chip, run_stub

    esp: Any = None
    try:
        with espressif_call(f"connecting to {port}"):
            esp = detect_chip(port, INITIAL_BAUD)
        found = get_chip(str(esp.CHIP_NAME))
        if expected is not None and found != expected:
            raise DeviceError(f"port {port}: found {found.name}, expected {expected.name}")
        if stub and not esp.secure_download_mode:
            with espressif_call(f"starting the flasher stub on {port}"):
                esp = run_stub(esp)
        note = change_baud(esp, baud, port)
        with espressif_call(f"attaching the flash on {port}"):
            attach_flash(esp)
        commands = None
        if not esp.secure_download_mode:
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
    esp.checksum = _block_checksum  # this instance only: esptool's loops over every byte
    return SerialDevice(found, commands, esp, port, note, baud=baud, stub=stub)


def _block_checksum(data: bytes, state: int = 0xEF) -> int:
    """esptool's `ESPLoader.checksum` (XOR of the bytes, seeded 0xEF), at C speed."""
    return esp_checksum([data]) ^ 0xEF ^ state
