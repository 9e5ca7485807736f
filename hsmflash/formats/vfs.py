"""The `vfs` partition: a LittleFS v2 image with the geometry MicroPython's esp32 port mounts.

MicroPython mounts `vfs` with `vfs.VfsLfs2(bdev)`: block size 4 KiB (the partition's erase
size), block count = partition size / 4 KiB, and extmod/vfs_lfs.c's defaults read size 32,
prog size 32, lookahead 32 bytes. The image is built with littlefs-python (the reference C
library) and only the blocks LittleFS programmed are written to the device: on an encrypted
partition the others read as noise, which LittleFS never reads before erasing and programming.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hsmflash.errors import InputError

BLOCK_SIZE = 4096
READ_SIZE = 32
PROG_SIZE = 32
LOOKAHEAD_SIZE = 32


@dataclass(frozen=True)
class VfsImage:
    """A formatted LittleFS image for one partition size, and the blocks it programmed."""

    image: bytes = field(repr=False)
    used_blocks: tuple[int, ...]
    files: int

    def regions(self) -> list[tuple[int, bytes]]:
        """(offset within the partition, bytes) for each run of programmed blocks."""
        out = []
        for _, run in itertools.groupby(enumerate(self.used_blocks), lambda t: t[1] - t[0]):
            blocks = [b for _, b in run]
            start, end = blocks[0] * BLOCK_SIZE, (blocks[-1] + 1) * BLOCK_SIZE
            out.append((start, self.image[start:end]))
        return out


def littlefs(buffer: bytearray | None = None, *, block_count: int, mount: bool = True) -> Any:
    """A littlefs-python filesystem on `buffer` with MicroPython's geometry, and a context
    that records which blocks were programmed (`ctx.programmed`)."""
    from littlefs import LittleFS, UserContext

    class RecordingContext(UserContext):
        def __init__(self, buf: bytearray) -> None:
            super().__init__(buffer=buf)
            self.programmed: set[int] = set()

        def prog(self, cfg: Any, block: int, off: int, data: bytes) -> int:
            self.programmed.add(block)
            return int(super().prog(cfg, block, off, data))

    buf = buffer if buffer is not None else bytearray(b"\xff" * (block_count * BLOCK_SIZE))
    ctx = RecordingContext(buf)
    fs = LittleFS(context=ctx, block_size=BLOCK_SIZE, block_count=block_count,
                  read_size=READ_SIZE, prog_size=PROG_SIZE, lookahead_size=LOOKAHEAD_SIZE,
                  mount=mount)
    return fs, ctx


def build(partition_size: int, source: Path | None = None, name: str = "vfs") -> VfsImage:
    """Format LittleFS for a partition of `partition_size` bytes, copying `source`'s tree in.

    Raises:
        InputError: a size that is not a multiple of 4 KiB (or under 2 blocks), a missing
            source directory, or files that do not fit (naming the file).
    """
    if partition_size % BLOCK_SIZE or partition_size < 2 * BLOCK_SIZE:
        raise InputError(f"{name} partition size {partition_size:#x} is not a multiple of "
                         "4 KiB of at least 2 blocks")
    if source is not None and not source.is_dir():
        raise InputError(f"--vfs-dir {str(source)!r} is not a directory")
    from littlefs import LittleFSError

    block_count = partition_size // BLOCK_SIZE
    fs, ctx = littlefs(block_count=block_count, mount=False)
    fs.format()
    fs.mount()
    files = 0
    if source is not None:
        for path in sorted(source.rglob("*")):
            rel = path.relative_to(source).as_posix()
            try:
                if path.is_dir():
                    fs.makedirs(rel, exist_ok=True)
                elif path.is_file():
                    with fs.open(rel, "wb") as f:
                        f.write(path.read_bytes())
                    files += 1
            except LittleFSError as e:
                raise InputError(f"--vfs-dir: {rel!r} does not fit in the {name} partition "
                                 f"({partition_size // 1024} KiB): {e}") from None
    fs.unmount()
    return VfsImage(bytes(ctx.buffer), tuple(sorted(ctx.programmed)), files)
