"""The `hsmflash-app-v1` app image: layout, parse, verify; espsecure is the signature oracle.

ROMFS images come from mpremote's VfsRomWriter (the writer `app build` uses); keys from a
software DigestSigner (the token path is in tests/integration/test_app_cli.py).
"""

from __future__ import annotations

import hashlib
import io
import struct

import espsecure
import esptool
import pytest
from mpremote.romfs import VfsRomWriter

from hsmflash.errors import InputError, VerificationFailed
from hsmflash.formats.appimage import (
    MAGIC,
    build_unsigned,
    parse_app_image,
    sign_app_image,
    verify_app_image,
)
from softsigner import SoftwareSigner, public_pem

SECTOR = 4096


@pytest.fixture(scope="module")
def rsa_signer() -> SoftwareSigner:
    return SoftwareSigner.generate("rsa-3072")


@pytest.fixture(scope="module")
def other_signer() -> SoftwareSigner:
    return SoftwareSigner.generate("rsa-3072")


def romfs(files: dict[str, bytes]) -> bytes:
    writer = VfsRomWriter()
    for name, data in sorted(files.items()):
        writer.mkfile(name, data)
    return bytes(writer.finalise())


ROMFS = romfs({"main.mpy": b"M\x06\x00\x1f" + b"x" * 5000, "lib.mpy": b"M\x06\x00\x1f"})


def espsecure_verify(signer: SoftwareSigner, image: bytes) -> None:
    espsecure.verify_signature("2", False, None, io.BytesIO(public_pem(signer)),
                               io.BytesIO(image))


def test_layout_is_romfs_padded_then_descriptor_then_signature(rsa_signer: SoftwareSigner) -> None:
    content = build_unsigned(ROMFS, app_version=7, mpy_version=6)
    signed = sign_app_image(content, rsa_signer)
    padded = -(-len(ROMFS) // SECTOR) * SECTOR
    assert signed[:len(ROMFS)] == ROMFS
    assert set(signed[len(ROMFS):padded]) == {0xFF}
    magic, version, length, digest, mpy, fs = struct.unpack_from("<6sII32sBB", signed, padded)
    assert (magic, version, length, mpy, fs) == (MAGIC, 7, len(ROMFS), 6, 1)
    assert digest == hashlib.sha256(ROMFS).digest()
    assert set(signed[padded + 48:padded + SECTOR]) == {0xFF}
    assert len(signed) == padded + 2 * SECTOR
    assert signed[padded + SECTOR] == 0xE7  # SBv2 block magic


@pytest.mark.parametrize("algorithm", ["rsa-3072", "ec-p256"])
def test_espsecure_verifies_the_signature(algorithm: str) -> None:
    signer = SoftwareSigner.generate(algorithm)  # type: ignore[arg-type]
    signed = sign_app_image(build_unsigned(ROMFS, 1, 6), signer)
    espsecure_verify(signer, signed)
    image, block = verify_app_image(signed, signer.public_key(), min_version=1)
    assert (image.app_version, block, image.romfs) == (1, 0, ROMFS)


def test_parse_reads_descriptor_and_blocks(rsa_signer: SoftwareSigner) -> None:
    signed = sign_app_image(build_unsigned(ROMFS, 3, 4), rsa_signer)
    image = parse_app_image(signed, "app.img")
    assert (image.app_version, image.mpy_version, image.image_length) == (3, 4, len(ROMFS))
    assert image.signed and len(image.signature_blocks) == 1
    assert image.signature_blocks[0].algorithm == "rsa-3072"
    unsigned = parse_app_image(build_unsigned(ROMFS, 3, 4))
    assert not unsigned.signed and unsigned.signature_blocks == ()


def test_flipped_byte_fails_with_both_verifiers(rsa_signer: SoftwareSigner) -> None:
    signed = bytearray(sign_app_image(build_unsigned(ROMFS, 1, 6), rsa_signer))
    signed[100] ^= 1
    with pytest.raises(VerificationFailed, match="digest does not match"):
        verify_app_image(bytes(signed), rsa_signer.public_key())
    with pytest.raises(esptool.FatalError):
        espsecure_verify(rsa_signer, bytes(signed))


def test_refusals(rsa_signer: SoftwareSigner, other_signer: SoftwareSigner) -> None:
    content = build_unsigned(ROMFS, 5, 6)
    signed = sign_app_image(content, rsa_signer)
    with pytest.raises(VerificationFailed, match="not signed"):
        verify_app_image(content, rsa_signer.public_key())
    with pytest.raises(VerificationFailed, match="another key"):
        verify_app_image(signed, other_signer.public_key())
    with pytest.raises(VerificationFailed, match="below the minimum 6"):
        verify_app_image(signed, rsa_signer.public_key(), min_version=6)
    with pytest.raises(VerificationFailed, match="not an hsmflash-app-v1"):
        verify_app_image(signed[:-100], rsa_signer.public_key())
    with pytest.raises(InputError, match="already signed"):
        sign_app_image(signed, rsa_signer)


def test_descriptor_lie_about_romfs_is_caught(rsa_signer: SoftwareSigner) -> None:
    # a descriptor whose hash does not match its ROMFS, even when validly signed
    content = bytearray(build_unsigned(ROMFS, 1, 6))
    padded = len(content) - SECTOR
    content[padded + 14] ^= 0xFF  # first byte of the SHA-256
    signed = sign_app_image(bytes(content), rsa_signer)
    with pytest.raises(VerificationFailed, match="SHA-256 does not match"):
        verify_app_image(signed, rsa_signer.public_key())


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda b: b[:SECTOR], "not an hsmflash-app-v1"),
    (lambda b: b"\x00" * len(b), "no HFAPP descriptor"),
    (lambda b: b[:-SECTOR + 48] + b"\x00" + b[-SECTOR + 49:], "reserved bytes"),
    (lambda b: b[:-SECTOR + 47] + b"\x02" + b[-SECTOR + 48:], "filesystem type 2"),
    (lambda b: b[:-SECTOR + 46] + b"\x05" + b[-SECTOR + 47:], "mpy version 5"),
    (lambda b: b[:len(ROMFS)] + b"\x00" + b[len(ROMFS) + 1:], "padding after the ROMFS"),
])
def test_parse_names_what_is_wrong(mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InputError, match=message):
        parse_app_image(mutate(build_unsigned(ROMFS, 1, 6)), "x.img")


def test_build_refuses_bad_inputs() -> None:
    with pytest.raises(InputError, match="not a MicroPython ROMFS"):
        build_unsigned(b"hello", 1, 6)
    with pytest.raises(InputError, match="mpy version 5"):
        build_unsigned(ROMFS, 1, 5)
    with pytest.raises(InputError, match="app version -1"):
        build_unsigned(ROMFS, -1, 6)
