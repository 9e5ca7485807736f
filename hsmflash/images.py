"""What an ESP firmware file is: chip, kind, integrity, and which Secure Boot signatures it carries.

The ESP image itself is parsed by esptool's own firmware-image classes; this module adds the
one-line diagnostics a user needs ("truncated: segment 2 runs past end of file") and reads the
Secure Boot trailers that follow the image:

- Secure Boot V2: the file is padded to a 4 KiB boundary and ends with a 4 KiB signature
  sector holding up to three 1216-byte signature blocks (magic 0xE7, CRC-32 over 1196 bytes).
- Secure Boot V1 (ESP32 app): a 4-byte version word (0) and a 64-byte ECDSA P-256 signature
  appended directly after the image.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from esptool.bin_image import LoadFirmwareImage
from esptool.targets import CHIP_DEFS

from hsmflash.chips import Chip
from hsmflash.errors import InputError

ESP_IMAGE_MAGIC = 0xE9
COMMON_HEADER_LEN = 8
EXTENDED_HEADER_LEN = 16
HEADER_LEN = COMMON_HEADER_LEN + EXTENDED_HEADER_LEN
SEGMENT_HEADER_LEN = 8
SHA256_LEN = 32

SECTOR_SIZE = 4096
SIG_BLOCK_SIZE = 1216
SIG_BLOCK_SIGNED_LEN = 1196  # bytes covered by the block's CRC-32
SIG_BLOCK_MAGIC = 0xE7
SIG_BLOCK_VERSION_RSA = 0x02
SIG_BLOCK_VERSION_ECDSA = 0x03
SIG_BLOCK_MAX = 3
ECDSA_SHA_256 = 0
ECDSA_SHA_384 = 1
CURVE_ID_P256 = 2
CURVE_ID_P384 = 3

SBV1_TRAILER_LEN = 4 + 64

ImageKind = Literal["app", "bootloader"]


@dataclass(frozen=True)
class SignatureBlock:
    """One valid (magic and CRC correct) Secure Boot V2 signature block."""

    index: int
    algorithm: str  # "rsa-3072", "ec-p256", "ec-p384" or "unknown"
    image_digest: bytes  # the digest the block claims for the signed content
    key_digest: bytes  # SHA-256 of the key material in the block, as burned into eFuse
    raw: bytes


@dataclass(frozen=True)
class ImageInfo:
    """What `inspect_image` found; all sizes in bytes."""

    name: str
    chip: str
    kind: ImageKind
    size: int  # the whole file
    image_size: int  # the ESP image proper, including its appended SHA-256 if any
    segments: int
    entry: int
    sha256: str  # hex SHA-256 of the whole file
    has_sha256_digest: bool  # the header asks for an appended SHA-256 (and it is valid)
    sbv2_blocks: tuple[SignatureBlock, ...]
    sbv1_signed: bool

    @property
    def sbv2_signed(self) -> bool:
        return bool(self.sbv2_blocks)


def _esptool_chip_name(chip_id: int) -> str | None:
    for name, rom in CHIP_DEFS.items():
        if getattr(rom, "IMAGE_CHIP_ID", None) == chip_id:
            return str(name)
    return None


def image_chip_name(data: bytes) -> str | None:
    """The chip an ESP image header says it is for (esptool's name), or None."""
    if len(data) < HEADER_LEN or data[0] != ESP_IMAGE_MAGIC:
        return None
    (chip_id,) = struct.unpack_from("<H", data, COMMON_HEADER_LEN + 4)
    return _esptool_chip_name(chip_id)


def _walk_layout(data: bytes, name: str) -> tuple[int, bool]:
    """Check that every part of the image lies inside `data`; return (image end, has digest).

    esptool's parser reports truncation without saying which part is missing; this walk names it.
    """
    if len(data) < HEADER_LEN:
        raise InputError(f"{name}: truncated: header is {len(data)} bytes, {HEADER_LEN} needed")
    segment_count = data[1]
    append_digest = data[HEADER_LEN - 1]
    if append_digest not in (0, 1):
        raise InputError(
            f"{name}: corrupt header (hash-appended flag is {append_digest:#04x}, not 0 or 1)"
        )
    offset = HEADER_LEN
    for index in range(segment_count):
        if offset + SEGMENT_HEADER_LEN > len(data):
            raise InputError(f"{name}: truncated: header of segment {index} runs past end of file")
        load_addr, length = struct.unpack_from("<II", data, offset)
        offset += SEGMENT_HEADER_LEN
        if offset + length > len(data):
            raise InputError(
                f"{name}: truncated: segment {index} ({length} bytes for {load_addr:#010x}) "
                "runs past end of file"
            )
        offset += length
    # checksum byte: last byte of the next 16-byte boundary
    offset += 16 - (offset % 16)
    if offset > len(data):
        raise InputError(f"{name}: truncated: checksum byte missing after the last segment")
    if append_digest:
        if offset + SHA256_LEN > len(data):
            missing = offset + SHA256_LEN - len(data)
            raise InputError(
                f"{name}: truncated: appended SHA-256 is missing {missing} of {SHA256_LEN} bytes"
            )
        offset += SHA256_LEN
    return offset, bool(append_digest)


def _block_algorithm(block: bytes) -> tuple[str, bytes, bytes]:
    """(algorithm, claimed image digest, key material) of a CRC-valid signature block."""
    version, sha_scheme = block[1], block[2]
    if version == SIG_BLOCK_VERSION_RSA:
        return "rsa-3072", block[4:36], block[36:812]
    if sha_scheme == ECDSA_SHA_384:
        curve = block[52]
        algorithm = "ec-p384" if curve == CURVE_ID_P384 else "unknown"
        return algorithm, block[4:52], block[52:149]
    curve = block[36]
    algorithm = "ec-p256" if curve == CURVE_ID_P256 else "unknown"
    return algorithm, block[4:36], block[36:101]


def read_signature_blocks(data: bytes) -> tuple[SignatureBlock, ...]:
    """The valid Secure Boot V2 signature blocks at the end of `data`, in sector order.

    A block is valid when its magic, version and CRC-32 are right (what espsecure and the ROM
    check before looking at the signature); invalid slots are skipped, as `espsecure
    verify-signature` does. Raises nothing: an unsigned file gives an empty tuple.
    """
    if len(data) < 2 * SECTOR_SIZE or len(data) % SECTOR_SIZE:
        return ()
    sector = data[-SECTOR_SIZE:]
    blocks: list[SignatureBlock] = []
    for index in range(SIG_BLOCK_MAX):
        raw = sector[index * SIG_BLOCK_SIZE : (index + 1) * SIG_BLOCK_SIZE]
        magic, version = raw[0], raw[1]
        (crc,) = struct.unpack_from("<I", raw, SIG_BLOCK_SIGNED_LEN)
        if (
            magic != SIG_BLOCK_MAGIC
            or version not in (SIG_BLOCK_VERSION_RSA, SIG_BLOCK_VERSION_ECDSA)
            or crc != zlib.crc32(raw[:SIG_BLOCK_SIGNED_LEN])
        ):
            continue
        algorithm, image_digest, key_material = _block_algorithm(raw)
        blocks.append(
            SignatureBlock(
                index, algorithm, image_digest, hashlib.sha256(key_material).digest(), raw
            )
        )
    return tuple(blocks)


def _kind(image: Any) -> ImageKind:
    # Apps map code/rodata from flash; second-stage bootloaders run from RAM only.
    if any(image.is_flash_addr(segment.addr) for segment in image.segments):
        return "app"
    return "bootloader"


def _xor_fold(data: bytes) -> int:
    """XOR of all bytes, by folding one big integer in halves (C speed, no per-byte loop)."""
    if not data:
        return 0
    width = 1 << max(0, (len(data) - 1).bit_length())  # bytes, a power of two
    value = int.from_bytes(data, "little")
    while width > 1:
        width //= 2
        value = (value >> (8 * width)) ^ (value & ((1 << (8 * width)) - 1))
    return value


def esp_checksum(segments: Iterable[bytes]) -> int:
    """The ESP image checksum (0xEF XOR every segment data byte), as esptool computes it."""
    result = 0xEF
    for seg in segments:
        result ^= _xor_fold(seg)
    return result


def inspect_image(data: bytes, chip: Chip, name: str = "image") -> ImageInfo:
    """Check that `data` is a complete ESP app or bootloader image for `chip` and describe it.

    `name` (usually the file name) starts every error message.

    Raises:
        InputError: not an ESP image, built for another chip, truncated, bad checksum or
            appended SHA-256, or a layout esptool's parser rejects.
    """
    if not data:
        raise InputError(f"{name}: empty file, not an ESP image")
    if data[0] != ESP_IMAGE_MAGIC:
        raise InputError(f"{name}: not an ESP image (magic {data[0]:#04x} != 0xE9)")
    if len(data) >= HEADER_LEN:
        (chip_id,) = struct.unpack_from("<H", data, COMMON_HEADER_LEN + 4)
        image_chip = _esptool_chip_name(chip_id)
        if image_chip is None:
            raise InputError(f"{name}: unknown chip id {chip_id} in the image header")
        if image_chip != chip.name:
            raise InputError(f"{name}: image is for {image_chip}, not {chip.name}")
    image_end, has_digest = _walk_layout(data, name)

    try:
        image = LoadFirmwareImage(chip.name, bytes(data))
    except (RuntimeError, ValueError, struct.error) as e:  # esptool's FatalError is a RuntimeError
        raise InputError(f"{name}: not a valid {chip.name} image ({e})") from e

    computed = esp_checksum(bytes(seg.data) for seg in image.segments
                            if getattr(seg, "include_in_checksum", True))
    if image.checksum != computed:
        raise InputError(
            f"{name}: corrupt: checksum {image.checksum:#04x} stored, {computed:#04x} computed"
        )
    if has_digest and image.stored_digest != image.calc_digest:
        raise InputError(f"{name}: corrupt: appended SHA-256 does not match the image")

    trailer = data[image_end:]
    # a signature sector can only follow the image, never overlap it
    sbv2_blocks = read_signature_blocks(data) if len(data) - SECTOR_SIZE >= image_end else ()
    sbv1_signed = (
        not sbv2_blocks and len(trailer) == SBV1_TRAILER_LEN and trailer[:4] == b"\x00\x00\x00\x00"
    )
    return ImageInfo(
        name=name,
        chip=chip.name,
        kind=_kind(image),
        size=len(data),
        image_size=image_end,
        segments=len(image.segments),
        entry=int(image.entrypoint),
        sha256=hashlib.sha256(data).hexdigest(),
        has_sha256_digest=has_digest,
        sbv2_blocks=sbv2_blocks,
        sbv1_signed=sbv1_signed,
    )
