"""Devices: one chip to provision, virtual (espefuse's emulator + a flash file) or on a serial port.

`base` holds the shape every device has; `virtual` and `serial` the two kinds.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from hsmflash.device.base import DEFAULT_FLASH_SIZE, Device
from hsmflash.errors import InputError


@contextlib.contextmanager
def open_device(
    chip: str = "auto",
    *,
    port: str | None = None,
    efuse_file: Path | None = None,
    flash_file: Path | None = None,
    flash_size: int = DEFAULT_FLASH_SIZE,
    baud: int = 921600,
    stub: bool = True,
) -> Iterator[Device]:
    """Open a serial device (`port`) or a virtual one (`efuse_file` + `flash_file`); close on exit.

    A serial device is reached at 115200, then runs esptool's flasher stub (unless `stub` is
    false) and moves to `baud` (see `hsmflash.device.serial`).

    Raises:
        InputError: both or neither device kind given, unknown chip, bad virtual files.
        DeviceError: the chip or its eFuses could not be read.
    """
    virtual = efuse_file is not None or flash_file is not None
    if port is not None and virtual:
        raise InputError("give either a serial port or virtual eFuse/flash files, not both")
    device: Device
    if port is not None:
        from hsmflash.device.serial import open_serial

        device = open_serial(port, chip, baud, stub=stub)
    elif efuse_file is not None and flash_file is not None:
        if chip == "auto":
            raise InputError("a virtual device needs its chip named (e.g. esp32s3)")
        from hsmflash.device.virtual import open_virtual

        device = open_virtual(chip, efuse_file, flash_file, flash_size)
    else:
        raise InputError("no device: give a serial port, or both virtual eFuse and flash files")
    try:
        yield device
    finally:
        device.close()
