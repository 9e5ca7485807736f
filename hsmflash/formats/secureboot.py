"""Secure Boot signatures in espsecure's exact formats, whoever holds the key.

Digests are computed here, on the host; the key holder (a token via `DigestSigner`, or AES-ECB
via `BlockCipher` for the V1 bootloader digest) only performs the raw key operation. Every
signature is checked against the signer's public key before it is written, so a faulty signer
cannot produce an image that will not boot.

Secure Boot V2 (RSA-3072-PSS, ECDSA P-256/SHA-256, ECDSA P-384/SHA-384): the signed content is
the image padded with 0xFF to a 4 KiB boundary, followed by a 4 KiB signature sector with up to
three 1216-byte blocks. Big numbers in a block are little-endian (the RSA peripheral and
micro-ecc read them that way).

Secure Boot V1 (ESP32): apps carry a version word and a raw ECDSA P-256 signature; the bootloader
is protected by an AES-256-based digest stored at flash offset 0x0.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, rsa

from hsmflash.chips import CHIPS, SBV1, SBV2, Chip
from hsmflash.errors import InputError, InternalError, VerificationFailed
from hsmflash.formats.images import (
    CURVE_ID_P256,
    CURVE_ID_P384,
    ECDSA_SHA_256,
    ECDSA_SHA_384,
    SBV1_TRAILER_LEN,
    SECTOR_SIZE,
    SIG_BLOCK_MAGIC,
    SIG_BLOCK_MAX,
    SIG_BLOCK_SIGNED_LEN,
    SIG_BLOCK_VERSION_ECDSA,
    SIG_BLOCK_VERSION_RSA,
    ImageInfo,
    SignatureBlock,
    inspect_image,
    read_signature_blocks,
)
from hsmflash.formats.primitives import (
    BlockCipher,
    DigestSigner,
    PublicKey,
    SignatureAlgorithm,
    verify_digest_signature,
)

RSA_BITS = 3072
RSA_LEN = RSA_BITS // 8
SBV1_IV_LEN = 128
SBV1_DIGEST_SECTOR = 0x1000
_ECDSA_LEN = {"ec-p256": 32, "ec-p384": 48}


def key_algorithm(public_key: PublicKey) -> SignatureAlgorithm:
    """The hsmflash algorithm name of a Secure Boot public key.

    Raises:
        InputError: the key is not RSA-3072, EC P-256 or EC P-384.
    """
    if isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size != RSA_BITS:
            raise InputError(
                f"RSA key has {public_key.key_size} bits; Secure Boot V2 needs RSA-3072"
            )
        return "rsa-3072"
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        if isinstance(public_key.curve, ec.SECP256R1):
            return "ec-p256"
        if isinstance(public_key.curve, ec.SECP384R1):
            return "ec-p384"
        if isinstance(public_key.curve, ec.SECP192R1):
            raise InputError("EC P-192 is too weak (about 96-bit security) and hsmflash refuses "
                             "it for Secure Boot; ESP32-C2 accepts ECDSA P-256: use an ec-p256 "
                             "key")
        raise InputError(f"EC curve {public_key.curve.name} is not P-256 or P-384")
    raise InputError(f"unsupported public key type {type(public_key).__name__}")


def _content_digest(algorithm: str, content: bytes) -> bytes:
    if algorithm == "ec-p384":
        return hashlib.sha384(content).digest()
    return hashlib.sha256(content).digest()


def _microecc(a: int, b: int, width: int) -> bytes:
    """Two numbers as micro-ecc's native little-endian layout (espsecure._microecc_format)."""
    return a.to_bytes(width, "little") + b.to_bytes(width, "little")


def _sbv2_key_material(public_key: PublicKey) -> bytes:
    """The public key as a signature block holds it (and as its eFuse digest covers it)."""
    algorithm = key_algorithm(public_key)
    if isinstance(public_key, rsa.RSAPublicKey):
        numbers = public_key.public_numbers()
        n = numbers.n
        # Montgomery constants the RSA peripheral needs: R^2 mod n and -n^-1 mod 2^32
        rinv = (1 << (2 * RSA_BITS)) % n
        m_prime = -pow(n, -1, 1 << 32) & 0xFFFFFFFF
        return struct.pack(
            "<384sI384sI",
            n.to_bytes(RSA_LEN, "little"),
            numbers.e,
            rinv.to_bytes(RSA_LEN, "little"),
            m_prime,
        )
    point = public_key.public_numbers()
    curve_id = CURVE_ID_P384 if algorithm == "ec-p384" else CURVE_ID_P256
    return bytes([curve_id]) + _microecc(point.x, point.y, _ECDSA_LEN[algorithm])


def sbv2_public_key_digest(public_key: PublicKey) -> bytes:
    """SHA-256 of the key material, the value burned into a Secure Boot V2 key block.

    Equals `espsecure digest-sbv2-public-key` for the same key.

    Raises:
        InputError: the key is not RSA-3072, EC P-256 or EC P-384.
    """
    return hashlib.sha256(_sbv2_key_material(public_key)).digest()


def sbv1_public_key_bytes(public_key: PublicKey) -> bytes:
    """The raw P-256 point X || Y (big-endian, 64 bytes) a Secure Boot V1 bootloader embeds.

    Equals `espsecure extract-public-key --version 1` for the same key.

    Raises:
        InputError: the key is not EC P-256.
    """
    if key_algorithm(public_key) != "ec-p256" or not isinstance(
        public_key, ec.EllipticCurvePublicKey
    ):
        raise InputError("Secure Boot V1 needs an EC P-256 key")
    point = public_key.public_numbers()
    return point.x.to_bytes(32, "big") + point.y.to_bytes(32, "big")


def _check_signature(
    public_key: PublicKey, algorithm: str, digest: bytes, raw_signature: bytes
) -> bool:
    """Whether `raw_signature` (signer layout: big-endian) signs `digest` under `public_key`."""
    if algorithm in _ECDSA_LEN and len(raw_signature) != 2 * _ECDSA_LEN[algorithm]:
        return False
    return verify_digest_signature(public_key, raw_signature, digest)


def _sign_checked(signer: DigestSigner, algorithm: str, digest: bytes) -> bytes:
    """Have the signer sign `digest`; refuse a signature its own public key rejects."""
    signature = signer.sign_digest(digest)
    if not _check_signature(signer.public_key(), algorithm, digest, signature):
        raise VerificationFailed(
            f"the {algorithm} signature returned by the signer does not verify with its "
            "public key; nothing was written"
        )
    return signature


def _signature_block(
    public_key: PublicKey, algorithm: str, digest: bytes, signature: bytes
) -> bytes:
    """A complete 1216-byte signature block (espsecure's generate_*_signature_block + CRC)."""
    key_material = _sbv2_key_material(public_key)
    if algorithm == "rsa-3072":
        body = (
            struct.pack("<BBxx32s", SIG_BLOCK_MAGIC, SIG_BLOCK_VERSION_RSA, digest)
            + key_material
            + signature[::-1]
        )
    else:
        width = _ECDSA_LEN[algorithm]
        sha_scheme = ECDSA_SHA_384 if algorithm == "ec-p384" else ECDSA_SHA_256
        r = int.from_bytes(signature[:width], "big")
        s = int.from_bytes(signature[width:], "big")
        body = (
            struct.pack("<BBBx", SIG_BLOCK_MAGIC, SIG_BLOCK_VERSION_ECDSA, sha_scheme)
            + digest
            + key_material
            + _microecc(r, s, width)
        )
        body += b"\x00" * (SIG_BLOCK_SIGNED_LEN - len(body))
    if len(body) != SIG_BLOCK_SIGNED_LEN:
        raise InternalError(f"signature block body is {len(body)} bytes, not 1196")
    return body + struct.pack("<I", zlib.crc32(body)) + b"\x00" * 16


def _existing_blocks_for_append(
    content: bytes,
    blocks: tuple[SignatureBlock, ...],
    algorithm: str,
    key_digest: bytes,
    chip: Chip,
    name: str,
) -> None:
    for position, block in enumerate(blocks):
        if block.index != position:
            raise InputError(
                f"{name}: signature block {position} is invalid (bad magic or CRC) while block "
                f"{block.index} is valid; re-sign from the unsigned image"
            )
    limit = min(SIG_BLOCK_MAX, chip.sbv2_max_signatures)
    if len(blocks) >= limit:
        raise InputError(
            f"{name}: already holds {len(blocks)} signature block(s), the most "
            f"{chip.name} Secure Boot V2 accepts is {limit}"
        )
    for block in blocks:
        if block.algorithm != algorithm:
            raise InputError(
                f"{name}: signature block {block.index} is {block.algorithm} and the key is "
                f"{algorithm}; one image carries one signature scheme"
            )
        if block.image_digest != _content_digest(algorithm, content):
            raise InputError(
                f"{name}: signature block {block.index} does not match the image content; "
                "re-sign from the unsigned image"
            )
        if block.key_digest == key_digest:
            raise InputError(f"{name}: already signed by this key (signature block {block.index})")


def sign_sbv2(
    image: bytes, signer: DigestSigner, chip: Chip, append: bool = False, name: str = "image",
    info: ImageInfo | None = None,
) -> bytes:
    """Sign an app or bootloader image for Secure Boot V2, exactly as `espsecure sign-data -v2`.

    Without `append` the image must be unsigned. With `append` a signature block is added to
    an already signed image (an unsigned one is simply signed). `info` is
    `inspect_image(image, chip)` when the caller has just computed it (it is not re-checked
    beyond size and chip); without it the image is inspected here.

    Raises:
        InputError: the image is not a valid image for `chip`; the chip does not accept the
            key's algorithm; the image is already signed (without `append`) or carries a
            Secure Boot V1 signature; with `append`: the signature sector is not at a 4 KiB
            aligned end, the chip's maximum number of signatures is reached, or the existing
            blocks have a gap, use another scheme, do not match the content, or are by the
            same key.
        VerificationFailed: the signer returned a signature its public key rejects.
        Errors of the signer (e.g. TokenError) pass through.
    """
    public_key = signer.public_key()
    algorithm = key_algorithm(public_key)
    if algorithm not in chip.sbv2_algorithms:
        raise InputError(
            f"{chip.name} Secure Boot V2 does not accept {algorithm} keys "
            f"(accepts: {', '.join(chip.sbv2_algorithms)})"
        )
    if info is None or info.size != len(image) or info.chip != chip.name:
        info = inspect_image(image, chip, name)  # unless the caller just did (release.py)
    if info.sbv1_signed:
        raise InputError(f"{name}: carries a Secure Boot V1 signature; sign the unsigned image")

    sector = b""
    if info.sbv2_signed:
        if not append:
            raise InputError(
                f"{name}: already signed ({len(info.sbv2_blocks)} signature block(s)); "
                "use --append to add a signature"
            )
        content = image[:-SECTOR_SIZE]
        key_digest = sbv2_public_key_digest(public_key)
        _existing_blocks_for_append(content, info.sbv2_blocks, algorithm, key_digest, chip, name)
        sector = b"".join(block.raw for block in info.sbv2_blocks)
    else:
        trailer = image[info.image_size :]
        if append and len(image) % SECTOR_SIZE and trailer.strip(b"\xff"):
            raise InputError(
                f"{name}: {len(image)} bytes is not a multiple of 4096, so no signature "
                "sector can be appended to; sign the unsigned image"
            )
        content = image + b"\xff" * (-len(image) % SECTOR_SIZE)

    digest = _content_digest(algorithm, content)
    signature = _sign_checked(signer, algorithm, digest)
    sector += _signature_block(public_key, algorithm, digest, signature)
    sector += b"\xff" * (SECTOR_SIZE - len(sector))
    return content + sector


def sign_sbv2_data(content: bytes, signer: DigestSigner, name: str = "data") -> bytes:
    """`content` followed by a Secure Boot V2 signature sector with one block, for data that is
    not an ESP image (the hsmflash app image); `espsecure verify-signature --version 2` checks it.

    Raises:
        InputError: `content` is empty or not a multiple of 4096 bytes; the key is not RSA-3072,
            EC P-256 or EC P-384.
        VerificationFailed: the signer returned a signature its public key rejects.
        Errors of the signer (e.g. TokenError) pass through.
    """
    if not content or len(content) % SECTOR_SIZE:
        raise InputError(f"{name}: {len(content)} bytes is not a whole number of 4 KiB sectors; "
                         "a signature sector can only follow 4 KiB-aligned content")
    public_key = signer.public_key()
    algorithm = key_algorithm(public_key)
    digest = _content_digest(algorithm, content)
    signature = _sign_checked(signer, algorithm, digest)
    sector = _signature_block(public_key, algorithm, digest, signature)
    return content + sector + b"\xff" * (SECTOR_SIZE - len(sector))


def verify_sbv2(image: bytes, public_key: PublicKey, name: str = "image") -> int:
    """Index of the Secure Boot V2 signature block that `public_key` signed over this image.

    As the bootloader does, a block counts only when its CRC is valid, its key material is
    `public_key` (the eFuse digest would match), its digest matches the content before the
    signature sector, and the signature verifies.

    Raises:
        InputError: the key is not RSA-3072, EC P-256 or EC P-384.
        VerificationFailed: the image is not signed, the content was changed after signing, or
            no block is signed by this key; the message says which.
    """
    algorithm = key_algorithm(public_key)
    if len(image) < 2 * SECTOR_SIZE or len(image) % SECTOR_SIZE:
        raise VerificationFailed(
            f"{name}: not signed for Secure Boot V2 ({len(image)} bytes is not a signed image's "
            "size: content and signature sector, each a multiple of 4096)"
        )
    blocks = read_signature_blocks(image)
    if not blocks:
        raise VerificationFailed(f"{name}: no valid Secure Boot V2 signature block")
    content = image[:-SECTOR_SIZE]
    key_digest = sbv2_public_key_digest(public_key)
    problems: list[str] = []
    for block in blocks:
        if block.key_digest != key_digest or block.algorithm != algorithm:
            problems.append(f"block {block.index} is for another key")
            continue
        digest = _content_digest(algorithm, content)
        if block.image_digest != digest:
            problems.append(f"block {block.index} digest does not match the image content")
            continue
        if algorithm == "rsa-3072":
            signature = block.raw[812 : 812 + RSA_LEN][::-1]
        else:
            width = _ECDSA_LEN[algorithm]
            start = 4 + len(digest) + 1 + 2 * width
            encoded = block.raw[start : start + 2 * width]
            r = int.from_bytes(encoded[:width], "little")
            s = int.from_bytes(encoded[width:], "little")
            signature = r.to_bytes(width, "big") + s.to_bytes(width, "big")
        if _check_signature(public_key, algorithm, digest, signature):
            return block.index
        problems.append(f"block {block.index} signature is invalid")
    raise VerificationFailed(f"{name}: Secure Boot V2 verification failed: {'; '.join(problems)}")


def sign_sbv1(image: bytes, signer: DigestSigner, name: str = "image") -> bytes:
    """Append a Secure Boot V1 signature to an ESP32 app, as `espsecure sign-data -v1`.

    Raises:
        InputError: the key is not EC P-256, the image is not a valid ESP32 image, or it is
            already signed.
        VerificationFailed: the signer returned a signature its public key rejects.
        Errors of the signer (e.g. TokenError) pass through.
    """
    if key_algorithm(signer.public_key()) != "ec-p256":
        raise InputError("Secure Boot V1 needs an EC P-256 signing key")
    info = inspect_image(image, CHIPS["esp32"], name)
    if info.sbv1_signed or info.sbv2_signed:
        raise InputError(f"{name}: already signed; sign the unsigned image")
    signature = _sign_checked(signer, "ec-p256", hashlib.sha256(image).digest())
    return image + struct.pack("<I", 0) + signature


def verify_sbv1(image: bytes, public_key: PublicKey, name: str = "image") -> None:
    """Check the Secure Boot V1 signature appended to an ESP32 app.

    Raises:
        InputError: the key is not EC P-256.
        VerificationFailed: no signature, an unknown signature version, or a signature that
            does not verify with `public_key`.
    """
    if key_algorithm(public_key) != "ec-p256":
        raise InputError("Secure Boot V1 verification needs an EC P-256 key")
    if len(image) <= SBV1_TRAILER_LEN:
        raise VerificationFailed(f"{name}: too short to carry a Secure Boot V1 signature")
    content, trailer = image[:-SBV1_TRAILER_LEN], image[-SBV1_TRAILER_LEN:]
    (version,) = struct.unpack_from("<I", trailer)
    if version != 0:
        raise VerificationFailed(
            f"{name}: no Secure Boot V1 signature (version word {version:#x}, expected 0)"
        )
    if not _check_signature(public_key, "ec-p256", hashlib.sha256(content).digest(), trailer[4:]):
        raise VerificationFailed(
            f"{name}: Secure Boot V1 signature does not verify with the given key"
        )


def sbv1_bootloader_digest(
    bootloader: bytes, cipher: BlockCipher, iv: bytes, name: str = "bootloader"
) -> bytes:
    """Secure Boot V1 digest + bootloader, as written by `espsecure digest-secure-bootloader`.

    `cipher` holds the AES-256 secure boot key (BLOCK2); it is called once, with every block.
    The result (IV, digest, 0xFF padding to 0x1000, then the bootloader) is written at flash 0x0.

    Raises:
        InputError: `iv` is not 128 bytes, or the bootloader is not a valid ESP32 image.
        InternalError: the cipher returned the wrong amount of data.
        Errors of the cipher (e.g. TokenError) pass through.
    """
    if len(iv) != SBV1_IV_LEN:
        raise InputError(f"IV is {len(iv)} bytes, Secure Boot V1 needs {SBV1_IV_LEN}")
    info = inspect_image(bootloader, CHIPS["esp32"], name)
    plaintext = bootloader
    # The ROM reads whole 128-byte blocks but not an appended SHA-256 spilling into a new block.
    if info.has_sha256_digest and len(plaintext) % 128 <= 32:
        plaintext = plaintext[: len(plaintext) - len(plaintext) % 128]
    plaintext += b"\xff" * (-len(plaintext) % 128)

    # The hardware feeds each block reversed into AES and each output block reversed, then
    # byte-swapped per word, into SHA-512.
    blocks = iv + plaintext
    reversed_in = b"".join(blocks[i : i + 16][::-1] for i in range(0, len(blocks), 16))
    encrypted = cipher.encrypt_ecb(reversed_in)
    if len(encrypted) != len(reversed_in):
        raise InternalError(
            f"cipher returned {len(encrypted)} bytes for {len(reversed_in)} bytes of input"
        )
    sha = hashlib.sha512()
    for i in range(0, len(encrypted), 16):
        out_block = encrypted[i : i + 16][::-1]
        sha.update(b"".join(out_block[j : j + 4][::-1] for j in range(0, 16, 4)))
    digest = sha.digest()
    swapped = b"".join(digest[j : j + 4][::-1] for j in range(0, len(digest), 4))
    header = iv + swapped
    return header + b"\xff" * (SBV1_DIGEST_SECTOR - len(header)) + plaintext


def verify_image(image: bytes, public_key: PublicKey, scheme: str | None = None,
                 name: str = "image") -> dict[str, Any]:
    """Verify an SBv2 (any block) or SBv1 signature; the scheme is detected when not given.

    Raises:
        VerificationFailed: the signature does not verify (exit 6).
        InputError: the key type fits no scheme.
    """
    if scheme is None:
        # Only ECDSA P-256 keys sign both schemes; a (possibly damaged) SBv2 sector starts
        # with the block magic at the last 4 KiB boundary.
        looks_sbv2 = (len(image) >= SECTOR_SIZE and len(image) % SECTOR_SIZE == 0
                      and image[-SECTOR_SIZE] == SIG_BLOCK_MAGIC)
        is_p256 = key_algorithm(public_key) == "ec-p256"
        scheme = SBV2 if (looks_sbv2 or not is_p256) else SBV1
    if scheme == SBV2:
        index = verify_sbv2(image, public_key, name)
        return {"scheme": SBV2, "block": index, "ok": True}
    verify_sbv1(image, public_key, name)
    return {"scheme": SBV1, "ok": True}
