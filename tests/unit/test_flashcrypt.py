"""Flash encryption must equal espsecure's byte for byte; espsecure is the reference oracle."""

from __future__ import annotations

import io
import os

import espsecure
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from hsmflash.errors import InputError
from hsmflash.formats.flashcrypt import (
    SoftwareAes,
    esp32_block_tweak,
    esp32_decrypt,
    esp32_encrypt,
    software_xts_pair,
    xts_decrypt,
    xts_encrypt,
)

MIB = 1 << 20


def espsecure_flash(
    key: bytes,
    data: bytes,
    address: int,
    *,
    aes_xts: bool,
    crypt_config: int = 0xF,
    decrypt: bool = False,
) -> bytes:
    """Run espsecure's encrypt-flash-data / decrypt-flash-data on in-memory files."""
    operation = espsecure.decrypt_flash_data if decrypt else espsecure.encrypt_flash_data
    out = io.BytesIO()
    operation(io.BytesIO(key), out, address, crypt_config, aes_xts, io.BytesIO(data))
    return out.getvalue()


class CountingAes:
    """A BlockCipher that records how often the key holder is asked to work."""

    def __init__(self, key: bytes) -> None:
        self._aes = SoftwareAes(key)
        self.calls = 0

    def encrypt_ecb(self, data: bytes) -> bytes:
        self.calls += 1
        return self._aes.encrypt_ecb(data)

    def decrypt_ecb(self, data: bytes) -> bytes:
        self.calls += 1
        return self._aes.decrypt_ecb(data)


# ---------------------------------------------------------------- XTS-AES


@pytest.mark.parametrize("key_bytes", [32, 64])
@pytest.mark.parametrize("address", [0, 0x10, 0x70, 0x80, 0x1230, 0x10000, 0xFFFFF0])
@pytest.mark.parametrize("length", [16, 32, 112, 128, 144, 4096 + 48])
def test_xts_matches_espsecure(key_bytes: int, address: int, length: int) -> None:
    key, plain = os.urandom(key_bytes), os.urandom(length)
    k1, k2 = software_xts_pair(key)
    expected = espsecure_flash(key, plain, address, aes_xts=True)
    assert xts_encrypt(plain, address, k1, k2) == expected
    assert xts_decrypt(expected, address, k1, k2) == plain


@pytest.mark.parametrize("key_bytes", [32, 64])
@pytest.mark.parametrize("offset", range(0, 128, 16))
def test_xts_single_block_at_every_position_in_a_unit(key_bytes: int, offset: int) -> None:
    key, plain = os.urandom(key_bytes), os.urandom(16)
    address = 0x20000 + offset
    k1, k2 = software_xts_pair(key)
    assert xts_encrypt(plain, address, k1, k2) == espsecure_flash(key, plain, address, aes_xts=True)


@pytest.mark.parametrize("key_bytes", [32, 64])
def test_xts_multi_mib_image_round_trips_through_espsecure(key_bytes: int) -> None:
    key, plain = os.urandom(key_bytes), os.urandom(3 * MIB + 48)
    address = 0x12350
    k1, k2 = software_xts_pair(key)
    ours = xts_encrypt(plain, address, k1, k2)
    assert ours == espsecure_flash(key, plain, address, aes_xts=True)
    assert espsecure_flash(key, ours, address, aes_xts=True, decrypt=True) == plain
    assert xts_decrypt(ours, address, k1, k2) == plain


def test_xts_key_file_halves_are_data_key_then_tweak_key() -> None:
    key, plain = os.urandom(32), os.urandom(256)
    k1, k2 = software_xts_pair(key)
    expected = espsecure_flash(key, plain, 0x1000, aes_xts=True)
    assert xts_encrypt(plain, 0x1000, k1, k2) == expected
    assert xts_encrypt(plain, 0x1000, k2, k1) != expected


def test_software_keys_survive_the_caller_wiping_its_key_buffer() -> None:
    key = bytearray(os.urandom(64))
    original = bytes(key)
    k1, k2 = software_xts_pair(key)
    key[:] = bytes(64)
    plain = os.urandom(256)
    assert xts_encrypt(plain, 0, k1, k2) == espsecure_flash(original, plain, 0, aes_xts=True)


def test_xts_asks_each_key_holder_once_per_image() -> None:
    """A token sees one bulk C_Encrypt per key, not one per block or data unit."""
    key = os.urandom(64)
    k1, k2 = CountingAes(key[:32]), CountingAes(key[32:])
    plain = os.urandom(64 * 1024 + 16)
    ciphertext = xts_encrypt(plain, 0x9010, k1, k2)
    assert (k1.calls, k2.calls) == (1, 1)
    assert xts_decrypt(ciphertext, 0x9010, k1, k2) == plain
    assert (k1.calls, k2.calls) == (2, 2)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    key=st.binary(min_size=32, max_size=32) | st.binary(min_size=64, max_size=64),
    block=st.integers(min_value=0, max_value=(16 * MIB) // 16 - 1),
    blocks=st.integers(min_value=1, max_value=300),
)
def test_xts_property_equals_espsecure(key: bytes, block: int, blocks: int) -> None:
    half = len(key) // 2
    # Equal halves are legal for the chip but rejected by OpenSSL's XTS, which espsecure uses.
    assume(key[:half] != key[half:])
    plain = os.urandom(16 * blocks)
    k1, k2 = software_xts_pair(key)
    expected = espsecure_flash(key, plain, 16 * block, aes_xts=True)
    assert xts_encrypt(plain, 16 * block, k1, k2) == expected
    assert xts_decrypt(expected, 16 * block, k1, k2) == plain


# ---------------------------------------------------------------- ESP32 classic


@pytest.mark.parametrize("crypt_config", range(16))
@pytest.mark.parametrize(("address", "length"), [(0x10000, 4096 + 16), (0x10010, 48), (0x30, 16)])
def test_esp32_matches_espsecure_for_every_crypt_config(
    crypt_config: int, address: int, length: int
) -> None:
    key, plain = os.urandom(32), os.urandom(length)
    expected = espsecure_flash(key, plain, address, aes_xts=False, crypt_config=crypt_config)
    assert esp32_encrypt(plain, address, key, crypt_config) == expected
    assert esp32_decrypt(expected, address, key, crypt_config) == plain
    assert (
        espsecure_flash(
            key, expected, address, aes_xts=False, crypt_config=crypt_config, decrypt=True
        )
        == plain
    )


def test_esp32_multi_mib_image_matches_espsecure() -> None:
    key, plain = os.urandom(32), os.urandom(2 * MIB + 16)
    address = 0x10010
    expected = espsecure_flash(key, plain, address, aes_xts=False)
    assert esp32_encrypt(plain, address, key) == expected
    assert esp32_decrypt(expected, address, key) == plain


def test_esp32_accepts_a_bytearray_key_and_leaves_it_intact() -> None:
    key = bytearray(os.urandom(32))
    original = bytes(key)
    plain = os.urandom(96)
    ours = esp32_encrypt(plain, 0x1000, key)
    assert key == original
    assert ours == espsecure_flash(original, plain, 0x1000, aes_xts=False)
    assert esp32_decrypt(ours, 0x1000, memoryview(key)) == plain


@pytest.mark.parametrize("crypt_config", [0x0, 0x3, 0xF])
@pytest.mark.parametrize("address", [0x0, 0x1010, 0x3FFFE0])
def test_esp32_block_tweak_is_all_an_in_token_xor_path_needs(
    crypt_config: int, address: int
) -> None:
    """key XOR tweak, used backwards on the reversed block, encrypts as espsecure does."""
    key, plain = os.urandom(32), os.urandom(16)
    block_key = bytes(
        a ^ b for a, b in zip(key, esp32_block_tweak(address, crypt_config), strict=True)
    )
    ours = SoftwareAes(block_key).decrypt_ecb(plain[::-1])[::-1]
    assert ours == espsecure_flash(key, plain, address, aes_xts=False, crypt_config=crypt_config)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    key=st.binary(min_size=32, max_size=32),
    block=st.integers(min_value=0, max_value=(16 * MIB) // 16 - 1),
    blocks=st.integers(min_value=1, max_value=200),
    crypt_config=st.integers(min_value=0, max_value=15),
)
def test_esp32_property_equals_espsecure(
    key: bytes, block: int, blocks: int, crypt_config: int
) -> None:
    plain = os.urandom(16 * blocks)
    expected = espsecure_flash(key, plain, 16 * block, aes_xts=False, crypt_config=crypt_config)
    assert esp32_encrypt(plain, 16 * block, key, crypt_config) == expected
    assert esp32_decrypt(expected, 16 * block, key, crypt_config) == plain


# ---------------------------------------------------------------- bad input


def _xts_keys() -> tuple[SoftwareAes, SoftwareAes]:
    return software_xts_pair(os.urandom(32))


@pytest.mark.parametrize(
    ("data", "address", "match"),
    [
        (bytes(32), 0x1008, "address 0x1008"),
        (bytes(32), -16, "address"),
        (b"", 0x1000, "empty"),
        (bytes(40), 0x1000, "length 40"),
        (bytes(32), 0xFFFFFFF0, "4 GiB"),
    ],
)
def test_bad_images_are_refused_by_both_schemes(data: bytes, address: int, match: str) -> None:
    k1, k2 = _xts_keys()
    for operation in (
        lambda: xts_encrypt(data, address, k1, k2),
        lambda: xts_decrypt(data, address, k1, k2),
        lambda: esp32_encrypt(data, address, bytes(32)),
        lambda: esp32_decrypt(data, address, bytes(32)),
    ):
        with pytest.raises(InputError, match=match):
            operation()


@pytest.mark.parametrize("size", [16, 24, 31, 33, 64])
def test_esp32_refuses_a_key_that_is_not_32_bytes(size: int) -> None:
    with pytest.raises(InputError, match=f"key is {size} bytes"):
        esp32_encrypt(bytes(32), 0, bytes(size))


@pytest.mark.parametrize("size", [0, 16, 24, 48, 128])
def test_xts_key_file_must_be_32_or_64_bytes(size: int) -> None:
    with pytest.raises(InputError, match=f"key is {size} bytes"):
        software_xts_pair(bytes(size))


@pytest.mark.parametrize("crypt_config", [-1, 16])
def test_crypt_config_outside_0_to_15_is_refused(crypt_config: int) -> None:
    with pytest.raises(InputError, match="FLASH_CRYPT_CONFIG"):
        esp32_encrypt(bytes(32), 0, bytes(32), crypt_config)
    with pytest.raises(InputError, match="FLASH_CRYPT_CONFIG"):
        esp32_block_tweak(0, crypt_config)


def test_software_aes_refuses_partial_blocks_and_bad_keys() -> None:
    with pytest.raises(InputError, match="key is 20 bytes"):
        SoftwareAes(bytes(20))
    with pytest.raises(InputError, match="length 17"):
        SoftwareAes(bytes(16)).encrypt_ecb(bytes(17))


@pytest.mark.parametrize("key_bytes", [32, 64])
def test_xts_image_ending_at_the_top_of_the_address_space(key_bytes: int) -> None:
    key, plain = os.urandom(key_bytes), os.urandom(272)
    address = (1 << 32) - len(plain)
    k1, k2 = software_xts_pair(key)
    assert xts_encrypt(plain, address, k1, k2) == espsecure_flash(key, plain, address, aes_xts=True)
