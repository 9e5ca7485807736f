"""What an ESP firmware file is: chip, kind, integrity, and which Secure Boot signatures it carries.

The ESP image is checked by the rules of esptool's image parser (`esptool.bin_image`): magic,
hash-appended flag, at most 16 segments each inside the file, the checksum byte at the next
16-byte boundary, the appended SHA-256. The rules are re-stated here rather than imported
because importing esptool's package costs about 100 ms (its CLI, rich and serial stacks), more
than the rest of a signature; `tests/unit/test_images.py` runs esptool's `LoadFirmwareImage`
as the oracle on every chip and on mutated images, and `tests/unit/test_chips.py` holds the
chip table to esptool's targets. This module adds the one-line diagnostics a user needs
("truncated: segment 2 runs past end of file") and reads the Secure Boot trailers that follow
the image:

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
from typing import Literal, NamedTuple

from hsmflash.chips import IMAGE_CHIP_NAMES, Chip
from hsmflash.errors import InputError

ESP_IMAGE_MAGIC = 0xE9
COMMON_HEADER_LEN = 8
EXTENDED_HEADER_LEN = 16
HEADER_LEN = COMMON_HEADER_LEN + EXTENDED_HEADER_LEN
SEGMENT_HEADER_LEN = 8
MAX_SEGMENTS = 16  # esptool: "Invalid segment count (max 16)"
ESP_CHECKSUM_MAGIC = 0xEF
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


def image_chip_name(data: bytes) -> str | None:
    """The chip an ESP image header says it is for (esptool's name), or None."""
    if len(data) < HEADER_LEN or data[0] != ESP_IMAGE_MAGIC:
        return None
    (chip_id,) = struct.unpack_from("<H", data, COMMON_HEADER_LEN + 4)
    return IMAGE_CHIP_NAMES.get(chip_id)


class _Layout(NamedTuple):
    segments: tuple[tuple[int, int, int], ...]  # (load address, data offset, length)
    checksum_at: int  # offset of the checksum byte
    end: int  # end of the image proper (after the appended SHA-256, if any)
    has_digest: bool


def _walk_layout(data: bytes, name: str) -> _Layout:
    """Check that every part of the image lies inside `data`, naming the part that does not
    (esptool only says "End of file reading segment")."""
    if len(data) < HEADER_LEN:
        raise InputError(f"{name}: truncated: header is {len(data)} bytes, {HEADER_LEN} needed")
    segment_count = data[1]
    append_digest = data[HEADER_LEN - 1]
    if append_digest not in (0, 1):
        raise InputError(
            f"{name}: corrupt header (hash-appended flag is {append_digest:#04x}, not 0 or 1)"
        )
    if segment_count > MAX_SEGMENTS:
        raise InputError(f"{name}: corrupt header ({segment_count} segments; an ESP image has "
                         f"at most {MAX_SEGMENTS})")
    offset = HEADER_LEN
    segments = []
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
        segments.append((load_addr, offset, length))
        offset += length
    # checksum byte: last byte of the next 16-byte boundary
    checksum_at = offset + 15 - (offset % 16)
    if checksum_at >= len(data):
        raise InputError(f"{name}: truncated: checksum byte missing after the last segment")
    end = checksum_at + 1
    if append_digest:
        if end + SHA256_LEN > len(data):
            missing = end + SHA256_LEN - len(data)
            raise InputError(
                f"{name}: truncated: appended SHA-256 is missing {missing} of {SHA256_LEN} bytes"
            )
        end += SHA256_LEN
    return _Layout(tuple(segments), checksum_at, end, bool(append_digest))


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


_FOLD_CHUNK = 1 << 16


def _xor_fold(data: bytes | memoryview) -> int:
    """XOR of all bytes, at C speed: XOR the 64 KiB chunks as big integers, then fold the
    result in halves (no per-byte loop; 4x faster than one integer for the whole buffer)."""
    view = memoryview(data)
    acc = 0
    for start in range(0, len(view), _FOLD_CHUNK):
        acc ^= int.from_bytes(view[start:start + _FOLD_CHUNK], "little")
    width = 1 << max(0, (min(len(view), _FOLD_CHUNK) - 1).bit_length())  # bytes, power of 2
    while width > 1:
        width //= 2
        acc = (acc >> (8 * width)) ^ (acc & ((1 << (8 * width)) - 1))
    return acc


def esp_checksum(segments: Iterable[bytes | memoryview]) -> int:
    """The ESP image checksum (0xEF XOR every segment data byte), as esptool computes it."""
    result = ESP_CHECKSUM_MAGIC
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
        image_chip = IMAGE_CHIP_NAMES.get(chip_id)
        if image_chip is None:
            raise InputError(f"{name}: unknown chip id {chip_id} in the image header")
        if image_chip != chip.name:
            raise InputError(f"{name}: image is for {image_chip}, not {chip.name}")
    layout = _walk_layout(data, name)

    view = memoryview(data)
    stored = data[layout.checksum_at]
    computed = esp_checksum(view[start:start + length] for _, start, length in layout.segments)
    if stored != computed:
        raise InputError(
            f"{name}: corrupt: checksum {stored:#04x} stored, {computed:#04x} computed"
        )
    # one pass over the file: the image digest (up to the checksum byte), then the whole file
    sha = hashlib.sha256(view[:layout.checksum_at + 1])
    if layout.has_digest:
        digest_at = layout.checksum_at + 1
        if sha.copy().digest() != data[digest_at:digest_at + SHA256_LEN]:
            raise InputError(f"{name}: corrupt: appended SHA-256 does not match the image")
    sha.update(view[layout.checksum_at + 1:])

    # apps map code and data from flash; second-stage bootloaders run from RAM only
    is_app = any(low <= addr < high for addr, _, _ in layout.segments
                 for low, high in chip.flash_maps)
    trailer = data[layout.end:]
    # a signature sector can only follow the image, never overlap it
    sbv2_blocks = read_signature_blocks(data) if len(data) - SECTOR_SIZE >= layout.end else ()
    sbv1_signed = (
        not sbv2_blocks and len(trailer) == SBV1_TRAILER_LEN and trailer[:4] == b"\x00\x00\x00\x00"
    )
    return ImageInfo(
        name=name,
        chip=chip.name,
        kind="app" if is_app else "bootloader",
        size=len(data),
        image_size=layout.end,
        segments=len(layout.segments),
        entry=struct.unpack_from("<I", data, 4)[0],
        sha256=sha.hexdigest(),
        has_sha256_digest=layout.has_digest,
        sbv2_blocks=sbv2_blocks,
        sbv1_signed=sbv1_signed,
    )


# ESP-IDF's esp_app_desc_t sits at the start of an app's first segment (DROM), right after the
# image header and that segment's header: magic_word (0xABCD5432), secure_version, ...
APP_DESC_MAGIC = 0xABCD5432
APP_DESC_OFFSET = HEADER_LEN + SEGMENT_HEADER_LEN


def app_secure_version(data: bytes) -> int | None:
    """The anti-rollback `secure_version` of an ESP-IDF app image, or None (no app descriptor:
    a bootloader, or an app built without one)."""
    if len(data) < APP_DESC_OFFSET + 8 or data[0] != ESP_IMAGE_MAGIC:
        return None
    magic, version = struct.unpack_from("<II", data, APP_DESC_OFFSET)
    return version if magic == APP_DESC_MAGIC else None
