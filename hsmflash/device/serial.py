"""A chip in ROM download mode on a serial port, driven through esptool's API."""


from __future__ import annotations

import contextlib
from typing import Any

from hsmflash.chips import Chip, get_chip
from hsmflash.device.base import Device, Revision, espressif_call
from hsmflash.errors import DeviceError, Error, InputError


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


