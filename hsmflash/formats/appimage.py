"""The signed MicroPython app image `hsmflash-app-v1` (a public, stable format).

```
[ ROMFS image, padded with 0xFF to a 4 KiB boundary ]
[ descriptor sector, 4 KiB: b"HFAPP\\x01" | u32 app version | u32 image length |
  32-byte SHA-256 of the image | u8 mpy version | u8 fs type (1 = ROMFS) | 0xFF ... ]
[ Secure Boot V2 signature sector over everything before it ]
```
Integers are little-endian; length and hash are of the ROMFS image before padding. The signature
sector is the firmware's block format (hsmflash.formats.secureboot), so
`espsecure verify-signature --version 2` verifies an app image as it verifies an app binary.
The boot module frozen into the firmware (hsmflash/app/boot/hsmboot.py) checks the same things
in MicroPython: this module is its host-side reference.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from hsmflash.errors import InputError, VerificationFailed
from hsmflash.formats.images import SECTOR_SIZE, SignatureBlock, read_signature_blocks
from hsmflash.formats.primitives import DigestSigner, PublicKey
from hsmflash.formats.secureboot import sign_sbv2_data, verify_sbv2

FORMAT = "hsmflash-app-v1"
MAGIC = b"HFAPP\x01"
FS_ROMFS = 1
ROMFS_MAGIC = b"\xd2\xcd\x31"  # MicroPython's VfsRom header
MPY_VERSIONS = (4, 6)  # v4: MicroPython 1.11 (Pycom); v6: MicroPython >= 1.19 (ROMFS: >= 1.25)
DESCRIPTOR = struct.Struct("<6sII32sBB")
MAX_APP_VERSION = 0xFFFFFFFF


@dataclass(frozen=True)
class AppImage:
    """A parsed app image (structure checked; digest and signature not yet verified)."""

    name: str
    app_version: int
    image_length: int
    image_sha256: bytes  # as the descriptor claims it
    mpy_version: int
    fs_type: int
    romfs: bytes  # the ROMFS image, without padding
    signed_content: bytes  # padded ROMFS + descriptor sector: what the signature covers
    signature_blocks: tuple[SignatureBlock, ...]  # valid (magic + CRC) blocks, if signed
    size: int

    @property
    def signed(self) -> bool:
        return self.size > len(self.signed_content)

    def summary(self) -> dict[str, object]:
        return {
            "format": FORMAT, "image": self.name, "app_version": self.app_version,
            "romfs_length": self.image_length, "romfs_sha256": self.image_sha256.hex(),
            "mpy_version": self.mpy_version, "fs_type": "romfs", "size": self.size,
            "signature_blocks": [
                {"index": b.index, "algorithm": b.algorithm, "key_digest": b.key_digest.hex()}
                for b in self.signature_blocks
            ],
        }


def _check_version(app_version: int, mpy_version: int) -> None:
    if not 0 <= app_version <= MAX_APP_VERSION:
        raise InputError(f"app version {app_version} is outside 0..{MAX_APP_VERSION}")
    if mpy_version not in MPY_VERSIONS:
        raise InputError(f"mpy version {mpy_version} is not supported "
                         f"(4 for Pycom's MicroPython 1.11, 6 for MicroPython >= 1.19)")


def descriptor_sector(romfs: bytes, app_version: int, mpy_version: int) -> bytes:
    """The 4 KiB descriptor sector for a ROMFS image.

    Raises:
        InputError: version out of range, unsupported mpy version.
    """
    _check_version(app_version, mpy_version)
    packed = DESCRIPTOR.pack(MAGIC, app_version, len(romfs), hashlib.sha256(romfs).digest(),
                             mpy_version, FS_ROMFS)
    return packed + b"\xff" * (SECTOR_SIZE - len(packed))


def build_unsigned(romfs: bytes, app_version: int, mpy_version: int, name: str = "romfs") -> bytes:
    """Padded ROMFS + descriptor sector: the content the signature sector will cover.

    Raises:
        InputError: not a ROMFS image, version out of range, unsupported mpy version.
    """
    if not romfs.startswith(ROMFS_MAGIC):
        raise InputError(f"{name}: not a MicroPython ROMFS image (no VfsRom header)")
    if len(romfs) > MAX_APP_VERSION:
        raise InputError(f"{name}: ROMFS image of {len(romfs)} bytes is too large")
    padded = romfs + b"\xff" * (-len(romfs) % SECTOR_SIZE)
    return padded + descriptor_sector(romfs, app_version, mpy_version)


def sign_app_image(content: bytes, signer: DigestSigner, name: str = "app image") -> bytes:
    """`build_unsigned`'s output followed by its Secure Boot V2 signature sector.

    The caller goes through `Station.use` (hsmflash.app.build); this function is key-holder
    agnostic.

    Raises:
        InputError: `content` is not an unsigned app image.
        VerificationFailed: the signer returned a signature its public key rejects.
    """
    image = parse_app_image(content, name)
    if image.signed:
        raise InputError(f"{name}: already signed")
    return sign_sbv2_data(content, signer, name)


def parse_app_image(data: bytes, name: str = "app image") -> AppImage:
    """Read an app image's structure (signed or not); digest and signature are not checked.

    Raises:
        InputError: not an `hsmflash-app-v1` image: size not 4 KiB-aligned, no descriptor,
            lengths that do not fit, non-0xFF padding, unknown fs type or mpy version, not ROMFS.
    """
    if len(data) < 2 * SECTOR_SIZE or len(data) % SECTOR_SIZE:
        raise InputError(f"{name}: {len(data)} bytes is not an {FORMAT} image (a whole number "
                         "of 4 KiB sectors: ROMFS, descriptor, signature)")
    if data[-SECTOR_SIZE:].startswith(MAGIC):
        descriptor_at = len(data) - SECTOR_SIZE  # unsigned
    elif data[-2 * SECTOR_SIZE:].startswith(MAGIC) and len(data) >= 3 * SECTOR_SIZE:
        descriptor_at = len(data) - 2 * SECTOR_SIZE
    else:
        raise InputError(f"{name}: not an {FORMAT} image (no HFAPP descriptor in the last two "
                         "4 KiB sectors)")
    magic, version, length, digest, mpy, fs_type = DESCRIPTOR.unpack_from(data, descriptor_at)
    del magic
    if fs_type != FS_ROMFS:
        raise InputError(f"{name}: descriptor names filesystem type {fs_type}; only 1 (ROMFS) "
                         "is defined")
    if mpy not in MPY_VERSIONS:
        raise InputError(f"{name}: descriptor names mpy version {mpy}; 4 or 6 expected")
    if not descriptor_at - SECTOR_SIZE < length <= descriptor_at:
        raise InputError(f"{name}: descriptor says the ROMFS is {length} bytes, but "
                         f"{descriptor_at} bytes precede the descriptor")
    if data[descriptor_at + DESCRIPTOR.size:descriptor_at + SECTOR_SIZE].strip(b"\xff"):
        raise InputError(f"{name}: descriptor sector's reserved bytes are not 0xFF")
    if data[length:descriptor_at].strip(b"\xff"):
        raise InputError(f"{name}: padding after the ROMFS image is not 0xFF")
    romfs = data[:length]
    if not romfs.startswith(ROMFS_MAGIC):
        raise InputError(f"{name}: payload is not a MicroPython ROMFS image")
    content = data[:descriptor_at + SECTOR_SIZE]
    blocks = read_signature_blocks(data) if len(data) > len(content) else ()
    return AppImage(name=name, app_version=version, image_length=length, image_sha256=digest,
                    mpy_version=mpy, fs_type=fs_type, romfs=romfs, signed_content=content,
                    signature_blocks=blocks, size=len(data))


def verify_app_image(data: bytes, public_key: PublicKey, *, min_version: int | None = None,
                     name: str = "app image") -> tuple[AppImage, int]:
    """Check an app image as the boot module does: structure, signature by `public_key` over
    padded ROMFS + descriptor, the descriptor's SHA-256 of the ROMFS, and the minimum version.

    Returns the image and the index of the signature block that verified.

    Raises:
        InputError: the key is not a Secure Boot V2 key type.
        VerificationFailed: not an app image (damaged, truncated), unsigned, signed by another
            key, altered after signing, ROMFS digest mismatch, or app version below
            `min_version`; the message says which.
    """
    try:
        image = parse_app_image(data, name)
    except InputError as e:  # a damaged or truncated image fails verification
        raise VerificationFailed(str(e)) from None
    if not image.signed:
        raise VerificationFailed(f"{name}: not signed (no signature sector after the descriptor)")
    block = verify_sbv2(data, public_key, name)
    if hashlib.sha256(image.romfs).digest() != image.image_sha256:
        raise VerificationFailed(f"{name}: ROMFS SHA-256 does not match the descriptor")
    if min_version is not None and image.app_version < min_version:
        raise VerificationFailed(f"{name}: app version {image.app_version} is below the minimum "
                                 f"{min_version} (rollback refused)")
    return image, block
