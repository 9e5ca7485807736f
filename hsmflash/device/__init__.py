"""Devices: one chip to provision, virtual (espefuse's emulator + a flash file) or on a serial port.

`base` holds the shape every device has; `virtual` and `serial` the two kinds.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

from hsmflash.device.base import DEFAULT_FLASH_SIZE, Device
from hsmflash.errors import DeviceError, InputError


def lock_path(*, port: str | None = None, efuse_file: Path | None = None) -> Path:
    """The lock file of one device: beside a virtual chip's eFuse file; for a serial port, one
    per real device node (symlinks such as /dev/serial/by-id/... resolve to the same lock)."""
    if efuse_file is not None:
        return efuse_file.with_name(efuse_file.name + ".lock")
    real = os.path.realpath(str(port))
    return Path(tempfile.gettempdir()) / f"hsmflash-port{re.sub(r'[^A-Za-z0-9]+', '-', real)}.lock"


@contextlib.contextmanager
def device_lock(*, port: str | None = None, efuse_file: Path | None = None) -> Iterator[None]:
    """Hold one device for this process: a second process opening the same device (virtual
    eFuse file or port) is refused at once, before it reads, plans, audits or burns anything.
    The lock is an flock, so a killed process releases it.

    Raises:
        DeviceError: another process holds the device; or the lock file cannot be opened.
    """
    import fcntl

    path = lock_path(port=port, efuse_file=efuse_file)
    what = f"port {port}" if efuse_file is None else f"virtual chip {efuse_file}"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise DeviceError(f"{what}: cannot open its lock file {path}: {e.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DeviceError(f"{what} is in use by another hsmflash process (lock {path}); "
                              "wait for it to finish, then run again") from None
        yield
    finally:
        os.close(fd)


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
        DeviceError: the chip or its eFuses could not be read; another process holds it.
    """
    virtual = efuse_file is not None or flash_file is not None
    if port is not None and virtual:
        raise InputError("give either a serial port or virtual eFuse/flash files, not both")
    device: Device
    if port is not None:
        from hsmflash.device.serial import open_serial

        with device_lock(port=port):
            device = open_serial(port, chip, baud, stub=stub)
            try:
                yield device
            finally:
                device.close()
    elif efuse_file is not None and flash_file is not None:
        if chip == "auto":
            raise InputError("a virtual device needs its chip named (e.g. esp32s3)")
        from hsmflash.device.virtual import open_virtual

        if not Path(efuse_file).is_file():  # open_virtual names it; no lock file beside it
            open_virtual(chip, efuse_file, flash_file, flash_size)
        with device_lock(efuse_file=Path(efuse_file)):
            device = open_virtual(chip, efuse_file, flash_file, flash_size)
            try:
                yield device
            finally:
                device.close()
    else:
        raise InputError("no device: give a serial port, or both virtual eFuse and flash files")
