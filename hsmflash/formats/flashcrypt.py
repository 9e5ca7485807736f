"""Espressif flash encryption, byte for byte as `espsecure encrypt-flash-data` does it.

Two schemes, both pure functions of their inputs:

* **XTS-AES-128/256** (ESP32-S2/S3/C3/C6/H2/P4...): 128-byte data units whose tweak is the unit's
  flash address, each unit byte-reversed around a standard IEEE 1619 XTS step. The keys stay with
  their holder: `xts_encrypt`/`xts_decrypt` need only two bulk AES-ECB calls on `BlockCipher`s,
  one on the tweak key K2 (all unit tweaks at once) and one on the data key K1 (all data at once).
  In an espsecure key file (32 or 64 bytes) K1 is the first half and K2 the second.
* **ESP32 classic** (ESP32 rev0..3): AES-256 with the key XORed per 32-byte block with a mask
  derived from the block's address (`FLASH_CRYPT_CONFIG` selects which key bits are tweaked), AES
  run backwards (encrypting flash uses AES decryption) on byte-reversed 16-byte blocks. A token
  would need one derived key per 32-byte block, so `esp32_encrypt`/`esp32_decrypt` take the key in
  memory (the exported-key path); `esp32_block_tweak` gives the XOR mask for an in-token path.

Addresses and lengths must be multiples of 16 bytes; nothing is ever padded. Neither scheme needs
ciphertext stealing, so any 16-aligned address and length is exact: partial data units at the
edges of an XTS image are processed as if padded, as espsecure does, without the padding.
"""

from __future__ import annotations

import sys
from array import array

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from hsmflash.errors import InputError, InternalError
from hsmflash.formats.primitives import BlockCipher

# Key bytes the caller may wipe afterwards; they are read in place.
Buffer = bytes | bytearray | memoryview

__all__ = [
    "ESP32_KEY_BYTES",
    "XTS_DATA_UNIT",
    "SoftwareAes",
    "esp32_block_tweak",
    "esp32_decrypt",
    "esp32_encrypt",
    "software_xts_pair",
    "xts_decrypt",
    "xts_encrypt",
]

XTS_DATA_UNIT = 128
ESP32_KEY_BYTES = 32
_BLOCK = 16
_ESP32_KEY_BLOCK = 32
# espsecure packs an XTS unit's address as a 32-bit word into the 16-byte tweak.
_ADDRESS_LIMIT = 1 << 32
_XTS_KEY_BYTES = (32, 64)


class SoftwareAes:
    """A `BlockCipher` holding an AES-128/192/256 key in process memory (pyca/cryptography).

    For tests, benchmarks and the ESP32-classic exported-key path; token keys use `keyuse`.
    """

    def __init__(self, key: Buffer) -> None:
        """Wrap a copy of `key` (16, 24 or 32 bytes): the caller may wipe its buffer at once.

        Raises InputError for any other length.
        """
        size = memoryview(key).nbytes
        if size not in (16, 24, 32):
            raise InputError(f"AES key is {size} bytes; 16, 24 or 32 expected")
        # cryptography reads the key again for every context, so it must not change under us.
        # ECB is the primitive the formats are built from, never a mode applied to data as is.
        self._cipher = Cipher(algorithms.AES(bytes(key)), modes.ECB())  # noqa: S305

    def encrypt_ecb(self, data: bytes) -> bytes:
        """AES-ECB-encrypt `data`. Raises InputError if its length is not a multiple of 16."""
        _check_blocks(data, "AES-ECB input")
        enc = self._cipher.encryptor()
        return enc.update(data) + enc.finalize()

    def decrypt_ecb(self, data: bytes) -> bytes:
        """AES-ECB-decrypt `data`. Raises InputError if its length is not a multiple of 16."""
        _check_blocks(data, "AES-ECB input")
        dec = self._cipher.decryptor()
        return dec.update(data) + dec.finalize()


def software_xts_pair(key: Buffer) -> tuple[SoftwareAes, SoftwareAes]:
    """Split an espsecure XTS key file (32 or 64 bytes) into (K1 data key, K2 tweak key).

    Raises InputError if the key is not 32 or 64 bytes (a 16-byte ESP32-C2 eFuse key is
    expanded first, by `expand_efuse_128`).
    """
    view = memoryview(key).cast("B")
    if view.nbytes not in _XTS_KEY_BYTES:
        raise InputError(f"XTS-AES key is {view.nbytes} bytes; 32 or 64 expected")
    half = view.nbytes // 2
    return SoftwareAes(view[:half]), SoftwareAes(view[half:])


def expand_efuse_128(key: Buffer) -> bytes:
    """The XTS-AES-128 key pair (K1 || K2) a chip derives from a 128-bit eFuse key
    (ESP32-C2's XTS_AES_128_KEY_DERIVED_FROM_128_EFUSE_BITS): SHA-256 of the key, as
    espsecure's `_load_hardware_key` expands 16-byte key files.

    Raises:
        InputError: the key is not 16 bytes.
    """
    import hashlib

    if len(memoryview(key)) != 16:
        raise InputError(f"a 128-bit eFuse key is 16 bytes, got {len(memoryview(key))}")
    return hashlib.sha256(key).digest()


def xts_encrypt(data: bytes, address: int, k1: BlockCipher, k2: BlockCipher) -> bytes:
    """Encrypt `data` for flash `address` with XTS-AES, as `espsecure --aes-xts` does.

    `k1` holds the data key (first half of the key file), `k2` the tweak key (second half).
    Raises InputError if `address` or `len(data)` is not a multiple of 16, `data` is empty, or
    the image reaches past 4 GiB; InternalError if a key holder returns the wrong length.
    """
    return _xts(data, address, k1, k2, decrypt=False)


def xts_decrypt(data: bytes, address: int, k1: BlockCipher, k2: BlockCipher) -> bytes:
    """Decrypt flash contents read at `address`; the inverse of `xts_encrypt`.

    Raises the same errors as `xts_encrypt`.
    """
    return _xts(data, address, k1, k2, decrypt=True)


def _xts(data: bytes, address: int, k1: BlockCipher, k2: BlockCipher, *, decrypt: bool) -> bytes:
    size = _check_image(data, address)
    # Work on the whole image reversed: that turns every 128-byte unit into the byte order of
    # standard XTS and lists the units last first, each 16-byte block at its own XTS index.
    first_unit = address - address % XTS_DATA_UNIT
    last_unit = (address + size - 1) - (address + size - 1) % XTS_DATA_UNIT
    units = (last_unit - first_unit) // XTS_DATA_UNIT + 1
    tweaks = _xts_tweak_stream(last_unit, units, k2)
    # In the reversed, padded image the data starts after the right-hand padding.
    start = last_unit + XTS_DATA_UNIT - (address + size)
    mask = int.from_bytes(tweaks[start : start + size], "little")
    reversed_data = bytes(data)[::-1]
    whitened = (int.from_bytes(reversed_data, "little") ^ mask).to_bytes(size, "little")
    crypted = k1.decrypt_ecb(whitened) if decrypt else k1.encrypt_ecb(whitened)
    _check_returned(crypted, size, "data key K1")
    out = (int.from_bytes(crypted, "little") ^ mask).to_bytes(size, "little")
    return out[::-1]


def _xts_tweak_stream(last_unit: int, units: int, k2: BlockCipher) -> memoryview:
    """The XTS tweak of every 16-byte block, units from `last_unit` downwards, in XTS order."""
    addresses = array("Q", range(last_unit, last_unit - units * XTS_DATA_UNIT, -XTS_DATA_UNIT))
    words = array("Q", bytes(units * _BLOCK))
    words[0::2] = addresses  # each tweak plaintext is the unit address, 128-bit little-endian
    if sys.byteorder == "big":
        words.byteswap()
    encrypted = k2.encrypt_ecb(words.tobytes())
    _check_returned(encrypted, units * _BLOCK, "tweak key K2")

    # Multiply every 128-bit little-endian lane by alpha at once: shift left by one within the
    # lane and fold the bit shifted out of the lane back in as x^7 + x^2 + x + 1 (0x87).
    lane_lows = int.from_bytes((b"\x01" + bytes(_BLOCK - 1)) * units, "little")
    keep = ~(lane_lows << 127)
    stream = bytearray(units * XTS_DATA_UNIT)
    out_words = memoryview(stream).cast("Q")
    lane = int.from_bytes(encrypted, "little")
    per_unit = XTS_DATA_UNIT // 8
    for j in range(XTS_DATA_UNIT // _BLOCK):
        if j:
            lane = ((lane & keep) << 1) ^ (((lane >> 127) & lane_lows) * 0x87)
        lane_words = memoryview(lane.to_bytes(units * _BLOCK, "little")).cast("Q")
        out_words[2 * j :: per_unit] = lane_words[0::2]
        out_words[2 * j + 1 :: per_unit] = lane_words[1::2]
    return memoryview(stream)


def esp32_block_tweak(address: int, crypt_config: int = 0xF) -> bytes:
    """The 32-byte mask XORed into the ESP32-classic key for the 32-byte block at `address`.

    `address` may be any multiple of 16; both halves of a 32-byte block share one mask.
    `crypt_config` is the FLASH_CRYPT_CONFIG eFuse (0..15; 0 means no tweak). The mask is public
    (it depends on the address only), so a token with CKM_XOR_BASE_AND_DATA can derive
    `key XOR mask` itself. Raises InputError for a bad address or crypt_config.
    """
    _check_address(address)
    _check_crypt_config(crypt_config)
    return _esp32_tweak(address >> 5, _tweak_range(crypt_config)).to_bytes(32, "big")


def esp32_encrypt(data: bytes, address: int, key: Buffer, crypt_config: int = 0xF) -> bytes:
    """Encrypt `data` for ESP32-classic flash at `address`, as `espsecure encrypt-flash-data`.

    `key` is the 32-byte BLOCK1 key (bytes or a bytearray the caller wipes afterwards; it is
    read in place). A length that is a multiple of 16 but not of 32, or an address 16 bytes
    into a 32-byte block, is exact: the lone 16-byte block uses its 32-byte block's key, as the
    chip and espsecure do. Python cannot wipe the per-block keys it derives; none outlives the
    call. Raises InputError for an address or length that is not a multiple of 16, empty data,
    a key that is not 32 bytes, or a crypt_config outside 0..15.
    """
    return _esp32(data, address, key, crypt_config, decrypt=False)


def esp32_decrypt(data: bytes, address: int, key: Buffer, crypt_config: int = 0xF) -> bytes:
    """Decrypt ESP32-classic flash contents read at `address`; the inverse of `esp32_encrypt`.

    Raises the same errors as `esp32_encrypt`.
    """
    return _esp32(data, address, key, crypt_config, decrypt=True)


def _esp32(data: bytes, address: int, key: Buffer, crypt_config: int, *, decrypt: bool) -> bytes:
    size = _check_image(data, address)
    _check_crypt_config(crypt_config)
    key_view = memoryview(key).cast("B")
    if key_view.nbytes != ESP32_KEY_BYTES:
        raise InputError(f"ESP32 flash-encryption key is {key_view.nbytes} bytes; 32 expected")
    tweak_range = _tweak_range(crypt_config)

    # Reversing the whole image reverses every 16-byte block and lists the blocks last first,
    # so each 32-byte block (or 16-byte half block at either edge) is one contiguous slice.
    source = memoryview(bytes(data)[::-1])
    end = address + size
    # One Cipher whose algorithm's key is swapped per block: building a Cipher per 32-byte
    # block costs more than the AES work itself (espsecure swaps keys the same way).
    aes = algorithms.AES(bytes(ESP32_KEY_BYTES))
    cipher = Cipher(aes, modes.ECB())  # noqa: S305 - ECB with a key per 32-byte block
    # AES runs backwards in ESP32 flash encryption: encrypting flash is AES decryption.
    new_context = cipher.encryptor if decrypt else cipher.decryptor
    if tweak_range == 0:  # FLASH_CRYPT_CONFIG 0: one key for the whole image
        aes.key = bytes(key_view)
        return new_context().update(source)[::-1]

    keys = _esp32_block_keys(key_view, address >> 5, (end - 1) >> 5, tweak_range)
    # The top 32-byte block may hold only 16 bytes of the image (`head`), as may the bottom one.
    head = end - max(address, ((end - 1) >> 5) << 5)
    chunks = []
    lane_keys = range(_LANE - ESP32_KEY_BYTES, len(keys), _LANE)
    block_starts = range(head - _ESP32_KEY_BLOCK, size, _ESP32_KEY_BLOCK)
    for key_start, block_start in zip(lane_keys, block_starts, strict=True):
        aes.key = keys[key_start : key_start + ESP32_KEY_BYTES]
        chunks.append(
            new_context().update(source[max(0, block_start) : block_start + _ESP32_KEY_BLOCK])
        )
    return b"".join(chunks)[::-1]


# Lane width for computing every block's tweak at once: wide enough for _MUL1 * block index.
_LANE = 40


def _esp32_block_keys(key: memoryview, first: int, last: int, tweak_range: int) -> bytes:
    """`key XOR tweak(block)` for blocks `last` down to `first`, each the tail of a 40-byte lane.

    One big-int multiplication tweaks every block: lanes of 320 bits hold the block indexes, and
    the products never carry into the next lane.
    """
    blocks = last - first + 1
    words = array("Q", bytes(blocks * _LANE))
    words[0 :: _LANE // 8] = array("Q", range(first, last + 1))
    if sys.byteorder == "big":
        words.byteswap()
    indexes = int.from_bytes(words, "little")

    def repeat(value: int) -> int:
        return int.from_bytes(value.to_bytes(_LANE, "little") * blocks, "little")

    tweaks = ((_MUL1 * indexes) | ((_MUL2 * indexes) & repeat(_MUL2_MASK))) & repeat(tweak_range)
    # Big-endian output puts the last block's lane first, each key big-endian as espsecure's.
    return (tweaks ^ repeat(int.from_bytes(key, "big"))).to_bytes(blocks * _LANE, "big")


# Which key bits each FLASH_CRYPT_CONFIG bit tweaks, and the address-to-mask multipliers,
# from espsecure (`_flash_encryption_tweak_range_bits`, `_flash_encryption_tweak_key`).
_TWEAK_RANGES = (
    0xFFFFFFFFFFFFFFFFE00000000000000000000000000000000000000000000000,
    0x00000000000000001FFFFFFFFFFFFFFFF0000000000000000000000000000000,
    0x000000000000000000000000000000000FFFFFFFFFFFFFFFE000000000000000,
    0x0000000000000000000000000000000000000000000000001FFFFFFFFFFFFFFF,
)
_MUL1 = 0x0000200004000080000004000080001000000200004000080000040000800010
_MUL2 = 0x0000000000000000200000000000000010000000000000002000000000000001
_MUL2_MASK = 0x000000000000007FE00000000000000FF000000000000007E00000000000000F


def _tweak_range(crypt_config: int) -> int:
    return sum(bits for i, bits in enumerate(_TWEAK_RANGES) if crypt_config >> i & 1)


def _esp32_tweak(block: int, tweak_range: int) -> int:
    return ((_MUL1 * block) | ((_MUL2 * block) & _MUL2_MASK)) & tweak_range


def _check_address(address: int) -> None:
    if address < 0 or address % _BLOCK:
        raise InputError(f"flash address {address:#x} is not a non-negative multiple of 16")


def _check_image(data: bytes, address: int) -> int:
    _check_address(address)
    size = len(data)
    if size == 0:
        raise InputError("image data is empty")
    _check_blocks(data, "image data")
    if address + size > _ADDRESS_LIMIT:
        raise InputError(
            f"image at address {address:#x} of {size} bytes reaches past the 4 GiB flash "
            "address space"
        )
    return size


def _check_blocks(data: bytes, what: str) -> None:
    if len(data) % _BLOCK:
        raise InputError(f"{what} length {len(data)} is not a multiple of 16 bytes")


def _check_crypt_config(crypt_config: int) -> None:
    if not 0 <= crypt_config <= 0xF:
        raise InputError(f"FLASH_CRYPT_CONFIG {crypt_config!r} is outside 0..15")


def _check_returned(data: bytes, expected: int, holder: str) -> None:
    if len(data) != expected:
        raise InternalError(f"{holder} returned {len(data)} bytes for {expected}")
