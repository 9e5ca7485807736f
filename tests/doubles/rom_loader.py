"""TEST DOUBLE: a fake ESP chip in ROM download mode, served over a pseudo-terminal.

`FakeRomLoader` stands in for the only thing hsmflash cannot have in a test: a chip on a serial
port. It opens a pty pair, gives esptool the slave's path (``/dev/pts/N``) as its port, and speaks
the ESP ROM loader protocol (SLIP frames, command/response packets) on the master side, in a
background thread. Everything above the wire is esptool's and espefuse's real code.

- eFuse semantics stay Espressif's: READ_REG/WRITE_REG in the eFuse controller's address range go
  to espefuse's own ``EmulateEfuseController`` for the chip (write-once bits, protection, coding
  schemes, burn commands), backed by a virtual eFuse file.
- The SPI flash is a ``bytearray`` (``flash``), 0xFF when erased, written NOR-style (a write can
  only clear bits, so a write without erase shows up).
- Other registers answer what esptool needs: chip magic (ESP32), chip id via GET_SECURITY_INFO
  (ESP32-S3, ESP32-C3), UART clock divider (crystal), SPI user commands (flash id, status).

What the product must pass to talk to it (see the unit tests for each):

- ROM loader only, no flasher stub: never call ``run_stub`` (MEM_BEGIN/MEM_DATA/MEM_END are
  refused). ``write_flash`` then writes uncompressed by default; ``compress=True`` also works
  (FLASH_DEFL_*). ``read_flash`` uses READ_FLASH_SLOW (64 bytes per command).
- ``before="no-reset"`` (``connect_mode`` for ``detect_chip``) and no hard reset afterwards. A pty
  has no DTR/RTS: pyserial raises ENOTTY, which esptool turns into a warning and carries on, so
  the default reset also connects, only noisier.
- Encrypted writes (FLASH_BEGIN with the encrypt flag) are refused: hsmflash encrypts on the
  host and writes ciphertext.

Fault injection: ``drop_after_flash_blocks=N`` accepts N flash data blocks (FLASH_DATA or
FLASH_DEFL_DATA, counted across the whole session), then hangs up on the next one, as an unplugged
USB cable would: the pty goes away, esptool's next read raises ``serial.SerialException`` and the
port path no longer opens. esptool's ``write_flash`` retries a lost connection by reopening the
port for about 7 s; set ``esp.WRITE_FLASH_ATTEMPTS = 1`` to get the error at once.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import select
import struct
import termios
import threading
import tty
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar

from esptool.targets import CHIP_DEFS

# ROM loader command opcodes (esptool.loader.ESPLoader.ESP_CMDS).
FLASH_BEGIN = 0x02
FLASH_DATA = 0x03
FLASH_END = 0x04
MEM_BEGIN = 0x05
MEM_END = 0x06
MEM_DATA = 0x07
SYNC = 0x08
WRITE_REG = 0x09
READ_REG = 0x0A
SPI_SET_PARAMS = 0x0B
SPI_ATTACH = 0x0D
READ_FLASH_SLOW = 0x0E
CHANGE_BAUDRATE = 0x0F
FLASH_DEFL_BEGIN = 0x10
FLASH_DEFL_DATA = 0x11
FLASH_DEFL_END = 0x12
SPI_FLASH_MD5 = 0x13
GET_SECURITY_INFO = 0x14

# ROM error codes, second status byte.
ERR_INVALID_MESSAGE = 0x05
ERR_FAILED = 0x06
ERR_BAD_CHECKSUM = 0x07
ERR_FLASH_WRITE = 0x08
ERR_FLASH_READ = 0x09
ERR_DEFLATE = 0x0B

SLIP_END = 0xC0
SLIP_ESC = 0xDB
CHECKSUM_SEED = 0xEF
SECTOR_SIZE = 0x1000
READ_FLASH_SLOW_BLOCK = 64
SPI_CMD_USR = 1 << 18

# SPI flash commands the double answers through the SPI peripheral's "user command" registers.
SPIFLASH_RDID = 0x9F
WINBOND_VENDOR_ID = 0xEF

# Chip revision (major * 100 + minor) used when the test does not care.
DEFAULT_REVISION = {"esp32": 300, "esp32s3": 2, "esp32c3": 4}

# GET_SECURITY_INFO flag bits (esptool.loader.ESPLoader.get_security_info).
_SECURITY_FLAGS = {
    "SECURE_BOOT_EN": 1 << 0,
    "SECURE_BOOT_AGGRESSIVE_REVOKE": 1 << 1,
    "ENABLE_SECURITY_DOWNLOAD": 1 << 2,
    "SECURE_BOOT_KEY_REVOKE0": 1 << 3,
    "SECURE_BOOT_KEY_REVOKE1": 1 << 4,
    "SECURE_BOOT_KEY_REVOKE2": 1 << 5,
    "SOFT_DIS_JTAG": 1 << 6,
    "DIS_PAD_JTAG": 1 << 7,
    "DIS_USB_OTG": 1 << 8,
    "DIS_DOWNLOAD_DCACHE": 1 << 9,
    "DIS_DOWNLOAD_ICACHE": 1 << 10,
}

_BAUD_BY_TERMIOS_SPEED = {
    getattr(termios, f"B{rate}"): rate
    for rate in (9600, 19200, 38400, 57600, 115200, 230400, 460800, 921600, 1500000, 3000000)
    if hasattr(termios, f"B{rate}")
}


def rom_checksum(data: bytes) -> int:
    """The ROM's XOR checksum of a data block, as sent in the packet's checksum field."""
    state = CHECKSUM_SEED
    for b in data:
        state ^= b
    return state


def slip_encode(packet: bytes) -> bytes:
    """Frame a packet the way the ROM does: 0xC0 delimiters, 0xDB escapes."""
    body = packet.replace(b"\xdb", b"\xdb\xdd").replace(b"\xc0", b"\xdb\xdc")
    return b"\xc0" + body + b"\xc0"


class _HangUpError(Exception):
    """Raised inside the server thread to drop the connection (fault injection)."""


class _CommandError(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(f"ROM error {code:#04x}")
        self.code = code


@dataclass
class _FlashSession:
    """An open FLASH_BEGIN or FLASH_DEFL_BEGIN: where the next data block lands."""

    offset: int
    block_size: int
    compressed: bool
    written: int = 0
    decompressor: Any = field(default=None)


class FakeRomLoader:
    """TEST DOUBLE of an ESP32 / ESP32-S3 / ESP32-C3 in ROM download mode behind a serial port.

    Use as a context manager; pass ``loader.port`` to esptool::

        with FakeRomLoader("esp32s3", mac="7c:df:a1:00:00:01", efuse_file=tmp / "ef.bin") as chip:
            esp = esptool.cmds.detect_chip(chip.port, 921600, "no-reset")
            ...
        assert chip.flash[0x10000:0x10004] == ...

    Attributes a test may inspect (safe once esptool has closed the port or the double stopped):
    ``flash`` (the SPI flash contents), ``efuses`` (espefuse's ``EmulateEfuseController``),
    ``flash_blocks_written``, ``dropped`` (the fault fired), ``commands`` (opcodes received).
    """

    def __init__(
        self,
        chip: str = "esp32",
        *,
        mac: str | bytes = "24:0a:c4:00:00:01",
        revision: int | None = None,
        efuse_file: str | os.PathLike[str] | None = None,
        flash_size: int = 4 * 1024 * 1024,
        drop_after_flash_blocks: int | None = None,
    ) -> None:
        """Prepare a virtual chip (not yet serving; call `start` or use ``with``).

        ``mac`` and ``revision`` (major * 100 + minor) are written into the factory eFuses of a
        fresh ``efuse_file``; an existing non-empty file is loaded as it is, so a test can reopen
        a chip after burning. Raises ValueError for an unsupported chip or malformed MAC.
        """
        if chip not in DEFAULT_REVISION:
            raise ValueError(f"FakeRomLoader supports {sorted(DEFAULT_REVISION)}, not {chip!r}")
        if flash_size <= 0 or flash_size & (flash_size - 1):
            raise ValueError("flash_size must be a power of two")
        self.chip = chip
        self.target = CHIP_DEFS[chip]
        self.mac = _parse_mac(mac)
        self.flash = bytearray(b"\xff" * flash_size)
        self.drop_after_flash_blocks = drop_after_flash_blocks
        self.flash_blocks_written = 0
        self.dropped = False
        self.commands: list[int] = []
        self.efuse_file = Path(efuse_file) if efuse_file is not None else None

        emulator_module = importlib.import_module(f"espefuse.efuse.{chip}.emulate_efuse_controller")
        fresh = self.efuse_file is None or not (
            self.efuse_file.exists() and self.efuse_file.stat().st_size > 0
        )
        self.efuses = emulator_module.EmulateEfuseController(
            str(self.efuse_file) if self.efuse_file is not None else None
        )
        if fresh:
            self._write_factory_efuses(revision if revision is not None else DEFAULT_REVISION[chip])

        regs = self.efuses.REGS
        self._efuse_range = range(
            regs.DR_REG_EFUSE_BASE, regs.DR_REG_EFUSE_BASE + regs.EFUSE_MEM_SIZE
        )
        self._registers: dict[int, int] = {}
        self._session: _FlashSession | None = None
        self._master_fd: int | None = None
        self._slave_fd: int | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._fd_lock = threading.Lock()
        self.port = ""
        self.error: BaseException | None = None

    # ----------------------------------------------------------------------------- lifecycle

    def start(self) -> FakeRomLoader:
        """Open the pty and start serving; ``port`` then names the device to give esptool."""
        self._master_fd, self._slave_fd = os.openpty()
        # Raw from the start: no echo, no line editing, whatever pyserial later sets.
        tty.setraw(self._slave_fd)
        self.port = os.ttyname(self._slave_fd)
        self._stop.clear()
        self._thread = threading.Thread(target=self._serve, name=f"FakeRomLoader({self.port})")
        self._thread.daemon = True
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the pty (idempotent); re-raise an internal error of the double."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self._close_fds()
        if self.error is not None:
            raise RuntimeError("FakeRomLoader failed while serving") from self.error

    def __enter__(self) -> FakeRomLoader:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _close_fds(self) -> None:
        # Both the server thread (hang-up fault) and stop() may get here.
        with self._fd_lock:
            for name in ("_master_fd", "_slave_fd"):
                fd = getattr(self, name)
                if fd is not None:
                    setattr(self, name, None)
                    os.close(fd)

    # ----------------------------------------------------------------------------- chip identity

    def _write_factory_efuses(self, revision: int) -> None:
        self.efuses.set_chip_revision(revision)
        self._direct_write_field("MAC", int.from_bytes(self.mac, "big"))
        if self.chip == "esp32":
            # ESP32 keeps a CRC8 of the factory MAC next to it; espefuse checks it.
            self._direct_write_field("MAC_CRC", _esp32_mac_crc(self.mac))
        self.efuses.save_to_file()

    def _direct_write_field(self, name: str, value: int) -> None:
        """OR ``value`` into an eFuse field's read registers, bypassing the burn sequence."""
        (definition,) = [f for f in self.efuses.Fields.EFUSES if f.name == name]
        start = definition.word * 32 + definition.pos
        for bit in range(0, definition.bit_len, 32):
            word, shift = divmod(start + bit, 32)
            chunk = (value >> bit) << shift
            self.efuses.direct_write_efuse(word, chunk & 0xFFFFFFFF, block=definition.block)
            if shift and chunk >> 32:
                self.efuses.direct_write_efuse(word + 1, chunk >> 32, block=definition.block)

    def _efuse_field(self, name: str) -> int:
        return int(self.efuses.read_field(name, bitstring=False))

    # ----------------------------------------------------------------------------- serving

    def _serve(self) -> None:
        buffer = bytearray()
        try:
            while not self._stop.is_set():
                master = self._master_fd
                if master is None:
                    return
                ready, _, _ = select.select([master], [], [], 0.05)
                if not ready:
                    continue
                chunk = os.read(master, 65536)
                if not chunk:
                    continue
                buffer += chunk
                while True:
                    frame = _take_slip_frame(buffer)
                    if frame is None:
                        break
                    if frame:
                        self._handle_packet(frame)
        except _HangUpError:
            self.dropped = True
            self._close_fds()
        except BaseException as e:  # surfaced by stop(): a broken double must fail the test
            self.error = e
            self._close_fds()

    def _send(self, op: int, value: int = 0, data: bytes = b"", status: int = 0) -> None:
        body = data + bytes([1 if status else 0, status, 0, 0])  # ROM: 4 status bytes
        packet = struct.pack("<BBHI", 1, op, len(body), value) + body
        frame = slip_encode(packet)
        assert self._master_fd is not None
        view = memoryview(frame)
        while view:
            _, writable, _ = select.select([], [self._master_fd], [], 1.0)
            if not writable:
                return  # nobody reads: drop the reply, as a UART with no listener would
            written = os.write(self._master_fd, view)
            view = view[written:]

    def _handle_packet(self, packet: bytes) -> None:
        if len(packet) < 8 or packet[0] != 0:
            return  # not a request (line noise)
        _, op, size, checksum = struct.unpack("<BBHI", packet[:8])
        data = packet[8 : 8 + size]
        self.commands.append(op)
        handler = self._HANDLERS.get(op)
        if handler is None:
            self._send(op, status=ERR_INVALID_MESSAGE)
            return
        try:
            result = handler(self, data, checksum)
        except _CommandError as e:
            self._send(op, status=e.code)
            return
        if result is None:
            return  # the handler answered itself
        value, payload = result
        self._send(op, value, payload)

    # ----------------------------------------------------------------------------- commands

    def _cmd_sync(self, data: bytes, _checksum: int) -> None:
        if data[:4] != b"\x07\x07\x12\x20":
            raise _CommandError(ERR_INVALID_MESSAGE)
        # The ROM answers a SYNC eight times, with a non-zero value (the stub would send 0).
        for _ in range(8):
            self._send(SYNC, 0x20120707)

    def _cmd_read_reg(self, data: bytes, _checksum: int) -> tuple[int, bytes]:
        (address,) = struct.unpack("<I", data[:4])
        return self.read_register(address), b""

    def _cmd_write_reg(self, data: bytes, _checksum: int) -> tuple[int, bytes]:
        if len(data) % 16:
            raise _CommandError(ERR_INVALID_MESSAGE)
        for i in range(0, len(data), 16):
            address, value, mask, _delay_us = struct.unpack("<IIII", data[i : i + 16])
            if mask:
                self.write_register(address, value, mask)
        return 0, b""

    def _cmd_ok(self, _data: bytes, _checksum: int) -> tuple[int, bytes]:
        return 0, b""

    def _cmd_flash_begin(self, data: bytes, _checksum: int) -> tuple[int, bytes]:
        return self._begin(data, compressed=False)

    def _cmd_flash_defl_begin(self, data: bytes, _checksum: int) -> tuple[int, bytes]:
        return self._begin(data, compressed=True)

    def _begin(self, data: bytes, *, compressed: bool) -> tuple[int, bytes]:
        erase_size, _blocks, block_size, offset = struct.unpack("<IIII", data[:16])
        encrypted = len(data) >= 20 and struct.unpack("<I", data[16:20])[0]
        if encrypted:
            raise _CommandError(ERR_FAILED)  # on-chip encryption is not modelled
        if offset + erase_size > len(self.flash):
            raise _CommandError(ERR_FLASH_WRITE)
        # The ROM erases up front, whole sectors.
        start = offset - offset % SECTOR_SIZE
        end = min(len(self.flash), -(-(offset + erase_size) // SECTOR_SIZE) * SECTOR_SIZE)
        if erase_size:
            self.flash[start:end] = b"\xff" * (end - start)
        self._session = _FlashSession(
            offset=offset,
            block_size=block_size,
            compressed=compressed,
            decompressor=zlib.decompressobj() if compressed else None,
        )
        return 0, b""

    def _cmd_flash_data(self, data: bytes, checksum: int) -> tuple[int, bytes]:
        return self._data(data, checksum, compressed=False)

    def _cmd_flash_defl_data(self, data: bytes, checksum: int) -> tuple[int, bytes]:
        return self._data(data, checksum, compressed=True)

    def _data(self, data: bytes, checksum: int, *, compressed: bool) -> tuple[int, bytes]:
        session = self._session
        if session is None or session.compressed != compressed:
            raise _CommandError(ERR_FAILED)
        if (
            self.drop_after_flash_blocks is not None
            and self.flash_blocks_written >= self.drop_after_flash_blocks
        ):
            raise _HangUpError
        size, _seq, _, _ = struct.unpack("<IIII", data[:16])
        payload = data[16 : 16 + size]
        if len(payload) != size or rom_checksum(payload) != checksum & 0xFF:
            raise _CommandError(ERR_BAD_CHECKSUM)
        if compressed:
            try:
                payload = session.decompressor.decompress(payload)
            except zlib.error as e:
                raise _CommandError(ERR_DEFLATE) from e
        self._program(session.offset + session.written, payload)
        session.written += len(payload)
        self.flash_blocks_written += 1
        return 0, b""

    def _cmd_flash_end(self, _data: bytes, _checksum: int) -> tuple[int, bytes]:
        self._session = None
        return 0, b""

    def _cmd_read_flash_slow(self, data: bytes, _checksum: int) -> tuple[int, bytes]:
        offset, length = struct.unpack("<II", data[:8])
        if length > READ_FLASH_SLOW_BLOCK or offset + length > len(self.flash):
            raise _CommandError(ERR_FLASH_READ)
        block = bytes(self.flash[offset : offset + length])
        return 0, block.ljust(READ_FLASH_SLOW_BLOCK, b"\xff")  # ROM always sends 64 bytes

    def _cmd_spi_flash_md5(self, data: bytes, _checksum: int) -> tuple[int, bytes]:
        address, size, _, _ = struct.unpack("<IIII", data[:16])
        if address + size > len(self.flash):
            raise _CommandError(ERR_FLASH_READ)
        digest = hashlib.md5(
            self.flash[address : address + size], usedforsecurity=False
        ).hexdigest()
        return 0, digest.encode()  # the ROM sends the digest as 32 hex characters

    def _cmd_get_security_info(self, _data: bytes, _checksum: int) -> tuple[int, bytes]:
        if self.chip == "esp32":
            raise _CommandError(ERR_INVALID_MESSAGE)  # not in the ESP32 ROM
        flags = 0
        for name, bit in _SECURITY_FLAGS.items():
            try:
                value = self._efuse_field(name)
            except ValueError:
                continue
            if bin(value).count("1") % 2 if name == "SOFT_DIS_JTAG" else value:
                flags |= bit
        purposes = [self._efuse_field(f"KEY_PURPOSE_{i}") for i in range(6)] + [0]
        info = struct.pack(
            "<IB7BII",
            flags,
            self._efuse_field("SPI_BOOT_CRYPT_CNT"),
            *purposes,
            self.target.IMAGE_CHIP_ID,
            0,
        )
        return 0, info

    def _cmd_mem(self, _data: bytes, _checksum: int) -> tuple[int, bytes]:
        # Uploading and running the flasher stub is not modelled: use the ROM loader.
        raise _CommandError(ERR_FAILED)

    _HANDLERS: ClassVar[dict[int, Any]] = {
        SYNC: _cmd_sync,
        READ_REG: _cmd_read_reg,
        WRITE_REG: _cmd_write_reg,
        SPI_SET_PARAMS: _cmd_ok,
        SPI_ATTACH: _cmd_ok,
        CHANGE_BAUDRATE: _cmd_ok,
        FLASH_BEGIN: _cmd_flash_begin,
        FLASH_DATA: _cmd_flash_data,
        FLASH_END: _cmd_flash_end,
        FLASH_DEFL_BEGIN: _cmd_flash_defl_begin,
        FLASH_DEFL_DATA: _cmd_flash_defl_data,
        FLASH_DEFL_END: _cmd_flash_end,
        READ_FLASH_SLOW: _cmd_read_flash_slow,
        SPI_FLASH_MD5: _cmd_spi_flash_md5,
        GET_SECURITY_INFO: _cmd_get_security_info,
        MEM_BEGIN: _cmd_mem,
        MEM_DATA: _cmd_mem,
        MEM_END: _cmd_mem,
    }

    # ----------------------------------------------------------------------------- memory map

    def _program(self, address: int, data: bytes) -> None:
        """NOR flash programming: bits can only go from 1 to 0 without an erase."""
        if address + len(data) > len(self.flash):
            raise _CommandError(ERR_FLASH_WRITE)
        for i, b in enumerate(data):
            self.flash[address + i] &= b

    def read_register(self, address: int) -> int:
        """A 32-bit read as the chip would answer it (eFuses via espefuse's emulator)."""
        target = self.target
        if address in self._efuse_range or address == getattr(
            self.efuses.REGS, "APB_CTL_DATE_ADDR", None
        ):
            return int(self.efuses.read_reg(address))
        if target.USES_MAGIC_VALUE and address == target.CHIP_DETECT_MAGIC_REG_ADDR:
            return int(target.MAGIC_VALUE)
        if address == target.UART_CLKDIV_REG:
            # The divider the ROM's auto-baud would have set for the current line rate.
            divider = getattr(target, "XTAL_CLK_DIVIDER", 1)
            return int(40_000_000 * divider / self._line_baud()) & target.UART_CLKDIV_MASK
        return self._registers.get(address, 0)

    def write_register(self, address: int, value: int, mask: int = 0xFFFFFFFF) -> None:
        """A masked 32-bit write (eFuses via espefuse's emulator, SPI commands executed)."""
        merged = (self.read_register(address) & ~mask) | (value & mask)
        if address in self._efuse_range:
            self.efuses.write_reg(address, merged)
            return
        self._registers[address] = merged
        spi_cmd_reg = self.target.SPI_REG_BASE
        if address == spi_cmd_reg and merged & SPI_CMD_USR:
            self._run_spi_user_command()
            self._registers[spi_cmd_reg] = merged & ~SPI_CMD_USR

    def _run_spi_user_command(self) -> None:
        target = self.target
        base = target.SPI_REG_BASE
        command = self._registers.get(base + target.SPI_USR2_OFFS, 0) & 0xFF
        if command == SPIFLASH_RDID:
            size_id = len(self.flash).bit_length() - 1  # JEDEC capacity byte: log2(bytes)
            result = WINBOND_VENDOR_ID | 0x40 << 8 | size_id << 16
        else:
            result = 0  # status registers: not busy, not write-protected; SFDP: none
        self._registers[base + target.SPI_W0_OFFS] = result

    def _line_baud(self) -> int:
        if self._slave_fd is None:
            return 115200
        speed = termios.tcgetattr(self._slave_fd)[5]
        return _BAUD_BY_TERMIOS_SPEED.get(speed, 115200)


def _take_slip_frame(buffer: bytearray) -> bytes | None:
    """Remove and return the first complete SLIP frame's payload (b"" for noise), or None."""
    start = buffer.find(SLIP_END)
    if start < 0:
        buffer.clear()
        return None
    end = buffer.find(SLIP_END, start + 1)
    if end < 0:
        del buffer[:start]
        return None
    raw = bytes(buffer[start + 1 : end])
    if not raw:
        del buffer[: start + 1]  # back-to-back delimiters: the second one opens the next frame
        return b""
    del buffer[: end + 1]
    return raw.replace(b"\xdb\xdc", b"\xc0").replace(b"\xdb\xdd", b"\xdb")


def _parse_mac(mac: str | bytes) -> bytes:
    raw = mac if isinstance(mac, bytes) else bytes.fromhex(mac.replace(":", "").replace("-", ""))
    if len(raw) != 6:
        raise ValueError(f"a MAC address has 6 bytes, got {len(raw)}")
    return raw


def _esp32_mac_crc(mac: bytes) -> int:
    """CRC-8 of the ESP32 factory MAC, as the ROM's esp_crc8() computes it."""
    result = 0
    for b in mac:
        result ^= b
        for _ in range(8):
            result = (result >> 1) ^ 0x8C if result & 1 else result >> 1
    return result
