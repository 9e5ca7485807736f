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

The wire (a model of the UART link, so tests and benchmarks see wire time):

- Every frame in either direction costs ``len(SLIP frame) * 10 / baud`` seconds at the rate the
  chip is at, plus ``turnaround`` per reply. ``wire_seconds`` adds it up (a virtual clock, always
  on); with ``realtime=1.0`` the double also sleeps that long before a frame "arrives", so wall
  time includes it (``realtime=0.25`` sleeps a quarter of it, for quicker benchmark runs).
- The chip auto-bauds at the first SYNC (the line rate esptool opened the port at) and moves to a
  new rate on CHANGE_BAUDRATE, after answering at the old one. A frame sent at any other rate is
  garbled: dropped without an answer (``garbled_frames`` counts them), as a UART would see it.

The flasher stub: MEM_BEGIN/MEM_DATA/MEM_END uploads are kept in RAM; when MEM_END starts an
entry point and the uploaded segments are esptool's own stub image for the chip (either stub
generation shipped with esptool), the double answers with the stub's "OHAI" greeting and from then
on speaks the stub's dialect: 2 status bytes, 16 KiB FLASH_DATA blocks, erase as it writes,
SPI_FLASH_MD5 as 16 raw bytes, CHANGE_BAUDRATE with the old rate as second argument, READ_FLASH
(0xD2, blocks acknowledged by the host, MD5 at the end), ERASE_REGION (0xD1), ERASE_FLASH (0xD0).
Any other uploaded code is "run" and never answers. The ROM dialect is what esptool's ROM classes
expect: READ_FLASH_SLOW (64 bytes), MD5 as 32 hex characters, 4 status bytes, erase up front in
FLASH_BEGIN.

Secure Download Mode: when the chip starts (``start()``) with ENABLE_SECURITY_DOWNLOAD burned,
the ROM accepts only SYNC, SPI_ATTACH, SPI_SET_PARAMS, CHANGE_BAUDRATE, FLASH_BEGIN/DATA/END and
GET_SECURITY_INFO; everything else (register and so eFuse reads, RAM uploads so no stub, MD5,
flash reads, compressed writes) is refused with the ROM's "invalid command" status. The eFuse is
read at start, as the ROM reads it at reset: burning it mid-session takes effect at the next
``start()``.

Other rules the product meets: ``before="no-reset"`` or the default reset (a pty has no DTR/RTS:
pyserial raises ENOTTY, esptool warns and carries on). Encrypted writes (FLASH_BEGIN with the
encrypt flag) are refused: hsmflash encrypts on the host and writes ciphertext.

Fault injection:
- ``drop_after_flash_blocks=N`` accepts N flash data blocks (FLASH_DATA or FLASH_DEFL_DATA, counted
  across the whole session), then hangs up on the next one, as an unplugged USB cable would: the
  pty goes away, esptool's next read raises ``serial.SerialException``. esptool's ``write_flash``
  retries a lost connection by reopening the port for about 7 s; set
  ``esp.WRITE_FLASH_ATTEMPTS = 1`` to get the error at once.
- ``max_baud=R``: the link (adapter, cable) garbles every rate above R. The chip still accepts a
  CHANGE_BAUDRATE above R and moves there, and is then lost until reset (a new ``start()``).
- ``lose_baud_change=True``: CHANGE_BAUDRATE never reaches the chip (no answer, no change).
"""

from __future__ import annotations

import base64
import hashlib
import importlib
import json
import os
import select
import struct
import termios
import threading
import time
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
# Flasher stub only.
ERASE_FLASH = 0xD0
ERASE_REGION = 0xD1
READ_FLASH = 0xD2

# What the ROM still does in Secure Download Mode.
SECURE_DOWNLOAD_COMMANDS = frozenset({SYNC, SPI_ATTACH, SPI_SET_PARAMS, CHANGE_BAUDRATE,
                                      FLASH_BEGIN, FLASH_DATA, FLASH_END, GET_SECURITY_INFO})
STUB_MAX_BLOCK = 0x4000
BITS_PER_BYTE = 10  # 8N1: start bit, 8 data bits, stop bit

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

# ESP32: factory CLK8M_FREQ and the RTC calibration value that make the ROM's computed crystal
# 40 MHz (cali * 15625 * clk8m / 40), so esptool's baud workaround sends the rate unchanged.
ESP32_CLK8M_FREQ = 50
ESP32_RTCCALICFG1 = 0x3FF5F06C
ESP32_RTC_CALI = 2048

# ESP32-S3: rom_spiflash_legacy_funcs.read, which esptool patches to start the stub when Secure
# Boot is on (esptool.loader.ESPLoader.run_stub).
ESP32S3_ROM_SPIFLASH_READ_PTR = 0x3FCEF688

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
    # XOR of all bytes, by folding one big integer in halves (a byte loop is ~50x slower).
    value, width = int.from_bytes(data, "little"), len(data) * 8
    while width > 8:
        half = (width // 16) * 8 or 8
        value = (value >> half) ^ (value & ((1 << half) - 1))
        width -= half
    return CHECKSUM_SEED ^ (value & 0xFF)


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
    erase_end: int = 0  # the stub erases as it writes, up to the size FLASH_BEGIN announced


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
        realtime: float = 0.0,
        turnaround: float = 0.0,
        max_baud: int | None = None,
        lose_baud_change: bool = False,
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
        self.realtime = realtime
        self.turnaround = turnaround
        self.max_baud = max_baud
        self.lose_baud_change = lose_baud_change
        self.flash_blocks_written = 0
        self.baud: int | None = None  # the chip's UART rate; set by auto-baud at the first SYNC
        self.wire_seconds = 0.0  # modelled time on the wire, both directions
        self.wire_bytes = 0
        self.garbled_frames = 0
        self.stub = False  # esptool's flasher stub is running
        self.halted = False  # code other than the stub was started from RAM
        self.secure_download = False  # read from the eFuse at start(), as the ROM at reset
        self._ram: dict[int, bytearray] = {}
        self._mem: tuple[int, int] | None = None  # (address, bytes received) of a MEM_BEGIN
        self._wire_clock = 0.0
        self._rx_started: float | None = None
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
        self.secure_download = self._security_download_burned()
        self.stub, self.halted, self.baud, self._ram = False, False, None, {}
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
            # The 8 MHz clock's factory calibration: esptool's ESP32 CHANGE_BAUDRATE workaround
            # scales the rate by the crystal frequency the ROM computed from it.
            self._direct_write_field("CLK8M_FREQ", ESP32_CLK8M_FREQ)
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

    def _security_download_burned(self) -> bool:
        try:
            return bool(self._efuse_field("ENABLE_SECURITY_DOWNLOAD"))
        except ValueError:
            return False  # ESP32 classic has no Secure Download Mode

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
                if not buffer:
                    self._rx_started = time.monotonic()  # a frame's first bytes are on the wire
                buffer += chunk
                while True:
                    frame = _take_slip_frame(buffer)
                    if frame is None:
                        break
                    if frame:
                        self._receive(frame)
                        self._rx_started = time.monotonic()
        except _HangUpError:
            self.dropped = True
            self._close_fds()
        except BaseException as e:  # surfaced by stop(): a broken double must fail the test
            self.error = e
            self._close_fds()

    # ----------------------------------------------------------------------------- the wire

    def _wire(self, frame_length: int, started: float | None = None) -> None:
        """One frame crosses the link at the chip's rate: count it, and sleep if real-time.

        A received frame was on the wire from its first byte (`started`: the host writes while
        the UART sends), so the time the pty took to hand it over is part of its wire time.
        """
        seconds = frame_length * BITS_PER_BYTE / (self.baud or 115200)
        self.wire_seconds += seconds
        self.wire_bytes += frame_length
        if self.realtime:
            now = time.monotonic()
            begin = now if started is None else min(now, started)
            self._wire_clock = max(self._wire_clock, begin) + seconds * self.realtime
            if self._wire_clock > now:
                time.sleep(self._wire_clock - now)

    def _receive(self, frame: bytes) -> None:
        if self.halted:
            return
        line = self._line_baud()
        if self.baud is None:
            if len(frame) >= 8 and frame[1] == SYNC:
                self.baud = line  # auto-baud on the SYNC pattern
            else:
                return
        if line != self.baud or (self.max_baud is not None and self.baud > self.max_baud):
            self.garbled_frames += 1  # framing errors: the chip sees noise, answers nothing
            return
        self._wire(len(slip_encode(frame)), self._rx_started)
        self._handle_packet(frame)

    def _send_frame(self, packet: bytes) -> None:
        frame = slip_encode(packet)
        self._wire(len(frame))
        master = self._master_fd
        if master is None:
            return
        view = memoryview(frame)
        while view:
            _, writable, _ = select.select([], [master], [], 5.0)
            if not writable:
                return  # nobody reads: drop the reply, as a UART with no listener would
            written = os.write(master, view)
            view = view[written:]

    def _send(self, op: int, value: int = 0, data: bytes = b"", status: int = 0) -> None:
        # ROM: 4 status bytes (status, error, 2 reserved); the stub sends 2.
        tail = bytes([1 if status else 0, status]) + (b"" if self.stub else b"\0\0")
        body = data + tail
        if self.turnaround:
            self.wire_seconds += self.turnaround
            if self.realtime:
                time.sleep(self.turnaround * self.realtime)
        self._send_frame(struct.pack("<BBHI", 1, op, len(body), value) + body)

    def _handle_packet(self, packet: bytes) -> None:
        if len(packet) < 8 or packet[0] != 0:
            return  # not a request (line noise, or a READ_FLASH acknowledgement)
        _, op, size, checksum = struct.unpack("<BBHI", packet[:8])
        data = packet[8 : 8 + size]
        self.commands.append(op)
        handler = self._HANDLERS.get(op)
        if handler is None or (op in self._STUB_ONLY and not self.stub) or (
            self.secure_download and op not in SECURE_DOWNLOAD_COMMANDS
        ):
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
        if self.stub:
            self._send(SYNC, 0)  # the stub answers once, with 0
            return
        # The ROM answers a SYNC eight times, with a non-zero value.
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

    def _cmd_change_baudrate(self, data: bytes, _checksum: int) -> None:
        if self.lose_baud_change:
            return  # lost on the wire: no answer, no change
        new, old = struct.unpack("<II", data[:8])
        if self.stub and old != self.baud:
            raise _CommandError(ERR_FAILED)  # the stub checks the rate it believes it is at
        if not 9600 <= new <= 5_000_000:
            raise _CommandError(ERR_INVALID_MESSAGE)
        self._send(CHANGE_BAUDRATE)  # answered at the old rate, then the UART moves
        self.baud = new

    def _cmd_flash_begin(self, data: bytes, _checksum: int) -> tuple[int, bytes]:
        return self._begin(data, compressed=False)

    def _cmd_flash_defl_begin(self, data: bytes, _checksum: int) -> tuple[int, bytes]:
        return self._begin(data, compressed=True)

    def _begin(self, data: bytes, *, compressed: bool) -> tuple[int, bytes]:
        erase_size, _blocks, block_size, offset = struct.unpack("<IIII", data[:16])
        encrypted = len(data) >= 20 and struct.unpack("<I", data[16:20])[0]
        if encrypted:
            raise _CommandError(ERR_FAILED)  # on-chip encryption is not modelled
        if offset + erase_size > len(self.flash) or (self.stub and block_size > STUB_MAX_BLOCK):
            raise _CommandError(ERR_FLASH_WRITE)
        if not self.stub and erase_size:
            self._erase(offset, erase_size)  # the ROM erases up front, whole sectors
        self._session = _FlashSession(
            offset=offset,
            block_size=block_size,
            compressed=compressed,
            decompressor=zlib.decompressobj() if compressed else None,
            erase_end=offset + erase_size,
        )
        return 0, b""

    def _erase(self, offset: int, size: int) -> None:
        start = offset - offset % SECTOR_SIZE
        end = min(len(self.flash), -(-(offset + size) // SECTOR_SIZE) * SECTOR_SIZE)
        self.flash[start:end] = b"\xff" * (end - start)

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
        address = session.offset + session.written
        if self.stub:
            # The stub erases each sector just before it first writes into it.
            # Padding past the announced size is programmed as 0xFF: a no-op on NOR flash.
            first = -(-address // SECTOR_SIZE) * SECTOR_SIZE
            end = min(address + len(payload), session.erase_end)
            if first < end:
                self._erase(first, end - first)
        self._program(address, payload)
        session.written += len(payload)
        self.flash_blocks_written += 1
        return 0, b""

    def _cmd_flash_end(self, _data: bytes, _checksum: int) -> tuple[int, bytes]:
        self._session = None
        return 0, b""

    def _cmd_read_flash_slow(self, data: bytes, _checksum: int) -> tuple[int, bytes] | None:
        # esptool's ESP32-S3 Secure Boot workaround: the ROM's flash-read function pointer,
        # patched to the stub's entry, runs the uploaded stub instead of reading.
        patched = self._registers.get(ESP32S3_ROM_SPIFLASH_READ_PTR)
        if self.chip == "esp32s3" and patched:
            self._registers.pop(ESP32S3_ROM_SPIFLASH_READ_PTR)
            if self._holds_stub(patched):
                self._start_stub()
            else:
                self.halted = True
            return None
        offset, length = struct.unpack("<II", data[:8])
        if length > READ_FLASH_SLOW_BLOCK or offset + length > len(self.flash):
            raise _CommandError(ERR_FLASH_READ)
        block = bytes(self.flash[offset : offset + length])
        return 0, block.ljust(READ_FLASH_SLOW_BLOCK, b"\xff")  # ROM always sends 64 bytes

    def _cmd_read_flash(self, data: bytes, _checksum: int) -> None:
        offset, length, block, _in_flight = struct.unpack("<IIII", data[:16])
        if offset + length > len(self.flash) or not 0 < block <= STUB_MAX_BLOCK:
            raise _CommandError(ERR_FLASH_READ)
        self._send(READ_FLASH)
        content = bytes(self.flash[offset : offset + length])
        # The host acknowledges each block; those 4-byte frames are ignored as non-requests.
        for i in range(0, length, block):
            self._send_frame(content[i : i + block])
        self._send_frame(hashlib.md5(content, usedforsecurity=False).digest())

    def _cmd_erase_region(self, data: bytes, _checksum: int) -> tuple[int, bytes]:
        offset, size = struct.unpack("<II", data[:8])
        if offset % SECTOR_SIZE or size % SECTOR_SIZE or offset + size > len(self.flash):
            raise _CommandError(ERR_FLASH_WRITE)
        self._erase(offset, size)
        return 0, b""

    def _cmd_erase_flash(self, _data: bytes, _checksum: int) -> tuple[int, bytes]:
        self._erase(0, len(self.flash))
        return 0, b""

    def _cmd_spi_flash_md5(self, data: bytes, _checksum: int) -> tuple[int, bytes]:
        address, size, _, _ = struct.unpack("<IIII", data[:16])
        if address + size > len(self.flash):
            raise _CommandError(ERR_FLASH_READ)
        digest = hashlib.md5(self.flash[address : address + size], usedforsecurity=False)
        # The ROM sends the digest as 32 hex characters, the stub as 16 raw bytes.
        return 0, digest.digest() if self.stub else digest.hexdigest().encode()

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

    def _cmd_mem_begin(self, data: bytes, _checksum: int) -> tuple[int, bytes]:
        size, _blocks, _block_size, address = struct.unpack("<IIII", data[:16])
        self._ram[address] = bytearray()
        self._mem = (address, size)
        return 0, b""

    def _cmd_mem_data(self, data: bytes, checksum: int) -> tuple[int, bytes]:
        if self._mem is None:
            raise _CommandError(ERR_FAILED)
        size, _seq, _, _ = struct.unpack("<IIII", data[:16])
        payload = data[16 : 16 + size]
        if len(payload) != size or rom_checksum(payload) != checksum & 0xFF:
            raise _CommandError(ERR_BAD_CHECKSUM)
        self._ram[self._mem[0]] += payload
        return 0, b""

    def _cmd_mem_end(self, data: bytes, _checksum: int) -> None:
        no_entry, entry = struct.unpack("<II", data[:8])
        self._mem = None
        runs = not no_entry and not (
            # ESP32-S3 ROM bug: with Secure Boot on, MEM_END does not run the code
            self.chip == "esp32s3" and self._efuse_field("SECURE_BOOT_EN")
        )
        stub = runs and self._holds_stub(entry)
        self.halted = runs and not stub  # other code "runs": the loader is never heard again
        self._send(MEM_END)
        if stub:
            self._start_stub()

    def _holds_stub(self, entry: int) -> bool:
        return any(_is_stub(image, self._ram, entry) for image in _stub_images(self.chip))

    def _start_stub(self) -> None:
        self.stub = True
        self._send_frame(b"OHAI")  # the stub's greeting, a bare SLIP frame

    _STUB_ONLY: ClassVar[frozenset[int]] = frozenset({ERASE_FLASH, ERASE_REGION, READ_FLASH})

    _HANDLERS: ClassVar[dict[int, Any]] = {
        SYNC: _cmd_sync,
        READ_REG: _cmd_read_reg,
        WRITE_REG: _cmd_write_reg,
        SPI_SET_PARAMS: _cmd_ok,
        SPI_ATTACH: _cmd_ok,
        CHANGE_BAUDRATE: _cmd_change_baudrate,
        FLASH_BEGIN: _cmd_flash_begin,
        FLASH_DATA: _cmd_flash_data,
        FLASH_END: _cmd_flash_end,
        FLASH_DEFL_BEGIN: _cmd_flash_defl_begin,
        FLASH_DEFL_DATA: _cmd_flash_defl_data,
        FLASH_DEFL_END: _cmd_flash_end,
        READ_FLASH_SLOW: _cmd_read_flash_slow,
        READ_FLASH: _cmd_read_flash,
        ERASE_REGION: _cmd_erase_region,
        ERASE_FLASH: _cmd_erase_flash,
        SPI_FLASH_MD5: _cmd_spi_flash_md5,
        GET_SECURITY_INFO: _cmd_get_security_info,
        MEM_BEGIN: _cmd_mem_begin,
        MEM_DATA: _cmd_mem_data,
        MEM_END: _cmd_mem_end,
    }

    # ----------------------------------------------------------------------------- memory map

    def _program(self, address: int, data: bytes) -> None:
        """NOR flash programming: bits can only go from 1 to 0 without an erase."""
        end = address + len(data)
        if end > len(self.flash):
            raise _CommandError(ERR_FLASH_WRITE)
        old = int.from_bytes(self.flash[address:end], "little")
        self.flash[address:end] = (old & int.from_bytes(data, "little")).to_bytes(
            len(data), "little"
        )

    def read_register(self, address: int) -> int:
        """A 32-bit read as the chip would answer it (eFuses via espefuse's emulator)."""
        target = self.target
        if address in self._efuse_range or address == getattr(
            self.efuses.REGS, "APB_CTL_DATE_ADDR", None
        ):
            return int(self.efuses.read_reg(address))
        if self.chip == "esp32" and address == ESP32_RTCCALICFG1:
            return ESP32_RTC_CALI << 7
        if target.USES_MAGIC_VALUE and address == target.CHIP_DETECT_MAGIC_REG_ADDR:
            return int(target.MAGIC_VALUE)
        if address == target.UART_CLKDIV_REG:
            # The divider the ROM's auto-baud would have set for the current line rate.
            divider = getattr(target, "XTAL_CLK_DIVIDER", 1)
            return int(40_000_000 * divider / (self.baud or self._line_baud())) & (
                target.UART_CLKDIV_MASK
            )
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


def _stub_images(chip: str) -> list[dict[str, Any]]:
    """esptool's flasher stub images for `chip`, every generation it ships."""
    from esptool.loader import StubFlasher

    images = []
    for subdir in ("2", "1"):
        path = Path(StubFlasher.STUB_DIR) / subdir / f"{chip}.json"
        if path.exists():
            images.append(json.loads(path.read_text()))
    return images


def _is_stub(image: dict[str, Any], ram: dict[int, bytearray], entry: int) -> bool:
    """The RAM holds this stub image's text and data, and `entry` is its entry point."""
    if entry != image["entry"] or bytes(ram.get(image["text_start"], b"")) != base64.b64decode(
        image["text"]
    ):
        return False
    return "data" not in image or bytes(ram.get(image["data_start"], b"")) == base64.b64decode(
        image["data"]
    )


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
