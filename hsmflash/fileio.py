"""The one atomic-write helper and input reading with errors that name the file."""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from hsmflash.errors import InputError

# no input hsmflash reads (images up to a 128 MiB flash, keys, CSVs, logs' lines) is larger
MAX_INPUT = 256 * 1024 * 1024


def open_regular(path: str | Path, what: str, flags: int = os.O_RDONLY,
                 *, follow: bool = True) -> int:
    """Open an existing regular file (never a device, FIFO, socket or directory; with
    `follow=False` never through a symbolic link), without blocking on a FIFO.

    Raises:
        InputError: missing, unreadable, not a regular file (the message names the path).
    """
    extra = os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags | extra)
    except FileNotFoundError:
        raise InputError(f"{what} {str(path)!r} not found") from None
    except IsADirectoryError:
        raise InputError(f"{what} {str(path)!r} is a directory") from None
    except OSError as e:
        if not follow and os.path.islink(path):
            raise InputError(f"{what} {str(path)!r} is a symbolic link; refusing to follow "
                             "it") from None
        raise InputError(f"{what} {str(path)!r} unreadable: {e.strerror}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file (a device, " \
            "FIFO or socket)"
        raise InputError(f"{what} {str(path)!r} is {kind}")
    os.set_blocking(fd, True)
    return fd


def read_input(path: str | Path, what: str = "input file", limit: int = MAX_INPUT) -> bytes:
    """Read a whole input file: a regular file of at most `limit` bytes.

    Raises:
        InputError: missing, unreadable, a directory, a device or FIFO, or too large (the
            message names the path).
    """
    fd = open_regular(path, what)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise InputError(f"{what} {str(path)!r} is {size} bytes, more than the "
                             f"{limit} hsmflash accepts")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise InputError(f"{what} {str(path)!r} grew past {limit} bytes while read")
        return data
    except OSError as e:
        raise InputError(f"{what} {str(path)!r} unreadable: {e.strerror}") from None
    finally:
        os.close(fd)


def refuse_special_output(path: str | Path, what: str = "output") -> bool:
    """Refuse to write at a path that holds anything but a regular file: a symbolic link
    (which could point anywhere), a directory, a device node, a FIFO or a socket. Returns
    whether a regular file is there.

    Raises:
        InputError: naming the path and what is there.
    """
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return False
    except OSError as e:
        raise InputError(f"{what} {str(path)!r}: {e.strerror}") from None
    if stat.S_ISREG(mode):
        return True
    if stat.S_ISLNK(mode):
        kind = "a symbolic link; refusing to write through or replace it"
    elif stat.S_ISDIR(mode):
        kind = "a directory"
    else:
        kind = "a device, FIFO or socket, not a regular file; refusing to replace it"
    raise InputError(f"{what} {str(path)!r} is {kind}")


def temp_beside(path: str | Path, mode: int = 0o600) -> tuple[int, Path]:
    """Create a new temp file (O_EXCL, random name, never through a link) beside `path`.

    Raises:
        InputError: the directory is missing or not writable.
    """
    target = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp",
                                   dir=target.parent)
    except FileNotFoundError:
        raise InputError(f"output directory {str(target.parent)!r} does not exist") from None
    except OSError as e:
        raise InputError(f"cannot write {str(path)!r}: {e.strerror}") from None
    os.fchmod(fd, mode)
    return fd, Path(tmp)


def open_append(path: str | Path, what: str, mode: int = 0o644) -> int:
    """Open a file for appending, creating it with `mode`; never through a symbolic link,
    never a device, FIFO or directory.

    Raises:
        InputError: naming the path.
    """
    refuse_special_output(path, what)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
                     | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    except OSError as e:
        raise InputError(f"cannot write {what} {str(path)!r}: {e.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise InputError(f"{what} {str(path)!r} is not a regular file")
    os.set_blocking(fd, True)
    return fd


def check_output(path: str | Path, what: str = "output") -> None:
    """Refuse an output path that cannot be written, before any key is used for it.

    Raises:
        InputError: the directory is missing or not writable, or the path is a directory.
    """
    target = Path(path)
    directory = target.parent  # Path("x").parent is Path(".")
    refuse_special_output(target, what)
    if not directory.is_dir():
        raise InputError(f"{what} {str(path)!r}: directory {str(directory)!r} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise InputError(f"{what} {str(path)!r}: directory {str(directory)!r} is not writable")


def atomic_write(path: str | Path, data: bytes, mode: int = 0o644) -> None:
    """Write `data` to `path` so readers see the old file or the whole new one, never a part.

    Writes a new temp file (O_EXCL, random name) in the same directory, fsyncs it, renames it
    over `path`, fsyncs the directory. A symbolic link, directory, device node or FIFO at
    `path` is refused, never replaced or written through; the temp file is removed on failure.

    Raises:
        InputError: the directory does not exist or is not writable, or `path` is not a
            regular file.
    """
    atomic_write_with(path, lambda f: f.write(data), mode=mode)


def atomic_write_with(path: str | Path, write: Callable[[BinaryIO], object], *,
                      mode: int = 0o644, what: str = "output",
                      sync_directory: bool = True) -> None:
    """`atomic_write` for content made while writing: `write(f)` fills the new temp file.

    `sync_directory=False` leaves the rename's durability to a later directory fsync (for a
    file rewritten many times in a row, as espefuse's emulator does per register).

    Raises:
        InputError: as `atomic_write`, naming `what`.
    """
    target = Path(path)
    directory = target.parent  # Path("x").parent is Path(".")
    refuse_special_output(target, what)
    fd, tmp = temp_beside(target, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        refuse_special_output(target, what)  # planted while we wrote
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if not sync_directory:
        return
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


@contextlib.contextmanager
def locked_directory(directory: Path, what: str, *, create: bool = False) -> Iterator[None]:
    """Hold an exclusive lock on a directory (flock on its descriptor) for read-modify-write
    of the files in it, across processes.

    Raises:
        InputError: the directory cannot be opened (or made, with `create`); names `what`.
    """
    try:
        if create:
            directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory if str(directory) else ".", os.O_RDONLY)
    except OSError as e:
        raise InputError(f"{what} {str(directory)!r}: {e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
