"""The one atomic-write helper and input reading with errors that name the file."""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path

from hsmflash.errors import InputError


def read_input(path: str | Path, what: str = "input file") -> bytes:
    """Read a whole input file.

    Raises:
        InputError: missing, unreadable, or a directory (the message names the path).
    """
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise InputError(f"{what} {str(path)!r} not found") from None
    except IsADirectoryError:
        raise InputError(f"{what} {str(path)!r} is a directory") from None
    except OSError as e:
        raise InputError(f"{what} {str(path)!r} unreadable: {e.strerror}") from None


def check_output(path: str | Path, what: str = "output") -> None:
    """Refuse an output path that cannot be written, before any key is used for it.

    Raises:
        InputError: the directory is missing or not writable, or the path is a directory.
    """
    target = Path(path)
    directory = target.parent  # Path("x").parent is Path(".")
    if target.is_dir():
        raise InputError(f"{what} {str(path)!r} is a directory")
    if not directory.is_dir():
        raise InputError(f"{what} {str(path)!r}: directory {str(directory)!r} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise InputError(f"{what} {str(path)!r}: directory {str(directory)!r} is not writable")


def atomic_write(path: str | Path, data: bytes, mode: int = 0o644) -> None:
    """Write `data` to `path` so readers see the old file or the whole new one, never a part.

    Writes a temp file in the same directory, fsyncs it, renames it over `path`, fsyncs the
    directory.

    Raises:
        InputError: the directory does not exist or is not writable.
    """
    target = Path(path)
    directory = target.parent  # Path("x").parent is Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
    except FileNotFoundError:
        raise InputError(f"output directory {str(directory)!r} does not exist") from None
    except OSError as e:
        raise InputError(f"cannot write output {str(path)!r}: {e.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:
        dfd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class BackgroundWrite:
    """`atomic_write` in a thread, so the caller's token work (the audit checkpoint) overlaps
    the write and its fsyncs. `wait()` returns once the file is in place, or raises what
    `atomic_write` raised."""

    def __init__(self, path: str | Path, data: bytes, mode: int = 0o644) -> None:
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(path, data, mode),
                                        name="atomic-write")
        self._thread.start()

    def _run(self, path: str | Path, data: bytes, mode: int) -> None:
        try:
            atomic_write(path, data, mode)
        except BaseException as e:  # handed to wait()
            self._error = e

    def wait(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise self._error


def parse_int(text: str, what: str) -> int:
    """Parse a decimal or 0x-hex integer for a CLI input such as an address.

    Raises:
        InputError: not a non-negative integer.
    """
    try:
        value = int(text, 0)
    except ValueError:
        raise InputError(f"{what} {text!r} is not a number (use decimal or 0x hex)") from None
    if value < 0:
        raise InputError(f"{what} {text!r} is negative")
    return value
