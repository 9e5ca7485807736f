"""Per-device key derivation, scheme `aes-ecb-v1` (a public, stable format; docs/formats.md).

    H   = SHA-256(b"hsmflash/kdf/aes-ecb-v1\\x00" || P || b"\\x00" || D || uint16_be(L))
    X_i = H[0:15] || uint8(i)                       for i = 1 .. L/16
    K_D = AES-ECB_M(X_1) || ... || AES-ECB_M(X_{L/16})

The master M stays in the token (CKA_DERIVE only); each part of K_D is made inside the token
with C_DeriveKey(M, CKM_AES_ECB_ENCRYPT_DATA, X_i || ... || X_j) as a session object.
"""

from __future__ import annotations

import hashlib
import re

from hsmflash.errors import InputError

SCHEME = "aes-ecb-v1"
_DOMAIN = b"hsmflash/kdf/aes-ecb-v1\x00"

# purpose -> key length in bytes (new purposes name their L here)
PURPOSES: dict[str, int] = {
    "XTS_AES_128_KEY": 32,
    "XTS_AES_256_KEY": 64,
    "XTS_AES_128_KEY_DERIVED_FROM_128_EFUSE_BITS": 16,  # ESP32-C2's 128-bit eFuse key
    "FLASH_ENCRYPTION": 32,
    "SECURE_BOOT_V1": 32,
    "NVS_KEYS": 64,
    "CREDENTIAL": 32,
    "NVS_HMAC_UP": 32,  # the eFuse HMAC_UP key from which the chip derives its NVS keys
}
_MAC_RE = re.compile(r"^[0-9a-fA-F]{2}([:-]?)[0-9a-fA-F]{2}(\1[0-9a-fA-F]{2}){4}$")


def parse_mac(text: str) -> bytes:
    """Parse a base MAC (`aa:bb:cc:dd:ee:ff`, `aa-bb-...` or 12 hex digits) to 6 bytes.

    Raises:
        InputError: malformed, all-zero or multicast (every such chip would share keys).
    """
    text = text.strip()
    if not _MAC_RE.match(text):
        raise InputError(f"device MAC {text!r} is malformed (expected aa:bb:cc:dd:ee:ff)")
    mac = bytes.fromhex(text.replace(":", "").replace("-", ""))
    check_device_id(mac)
    return mac


def check_device_id(mac: bytes) -> None:
    """Refuse ids that many devices share.

    Raises:
        InputError: wrong length, all-zero, all-ones or multicast.
    """
    if len(mac) != 6:
        raise InputError(f"device id must be a 6-byte MAC, got {len(mac)} bytes")
    text = format_mac(mac)
    if mac == bytes(6):
        raise InputError(f"device MAC {text} is all-zero: every such chip would share keys")
    if mac == b"\xff" * 6:
        raise InputError(f"device MAC {text} is all-ones (blank eFuses?): every such chip "
                         "would share keys")
    if mac[0] & 1:
        raise InputError(f"device MAC {text} is a multicast address, not a chip's base MAC")


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def key_length(purpose: str) -> int:
    """The key length L (bytes) a purpose fixes.

    Raises:
        InputError: unknown purpose.
    """
    try:
        return PURPOSES[purpose]
    except KeyError:
        raise InputError(
            f"unknown purpose {purpose!r} (one of: {', '.join(PURPOSES)})"
        ) from None


def derivation_blocks(device: bytes, purpose: str) -> list[bytes]:
    """The ECB inputs X_1 .. X_{L/16} for a device and purpose (public values).

    Raises:
        InputError: bad device id or purpose.
    """
    check_device_id(device)
    length = key_length(purpose)
    h = hashlib.sha256(
        _DOMAIN + purpose.encode("ascii") + b"\x00" + device + length.to_bytes(2, "big")
    ).digest()
    return [h[:15] + bytes([i]) for i in range(1, length // 16 + 1)]


def split_for_purpose(purpose: str) -> list[int]:
    """How many X_i blocks go into each token object for a purpose."""
    n = key_length(purpose) // 16
    if purpose in ("XTS_AES_128_KEY", "XTS_AES_256_KEY", "NVS_KEYS"):
        return [n // 2, n // 2]  # K1 (data/first half) and K2 (tweak/second half)
    return [n]
