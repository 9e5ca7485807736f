"""Key types and usages hsmflash knows (pure data: no token needed to check a policy).

A key type names what the key is for the chip (`xts-aes-128` is one 32-byte espsecure key file,
held in the token as two AES-128 objects); a usage names the one kind of operation a key may do.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

from hsmflash.errors import InputError

KeyTypeName = Literal["aes-128", "aes-256", "xts-aes-128", "xts-aes-256", "rsa-3072", "ec-p256",
                      "ec-p384"]
Usage = Literal["sign", "derive", "encrypt", "wrap"]

KEY_TYPES: dict[str, str] = {
    "aes-128": "AES-128 secret key",
    "aes-256": "AES-256 secret key (master keys, SBv1 bootloader key, ESP32 flash key)",
    "xts-aes-128": "XTS-AES-128 flash-encryption key (32-byte espsecure file; two AES-128 objects)",
    "xts-aes-256": "XTS-AES-256 flash-encryption key (64-byte espsecure file; two AES-256 objects)",
    "rsa-3072": "RSA-3072 Secure Boot V2 signing key",
    "ec-p256": "ECDSA P-256 signing key (SBv1, SBv2 ECDSA, audit checkpoints)",
    "ec-p384": "ECDSA P-384 Secure Boot V2 signing key",
}
USAGES: tuple[str, ...] = get_args(Usage)
ALLOWED_USAGES: dict[str, tuple[str, ...]] = {
    "aes-128": ("derive", "encrypt", "wrap"),
    "aes-256": ("derive", "encrypt", "wrap"),
    "xts-aes-128": ("encrypt",),
    "xts-aes-256": ("encrypt",),
    "rsa-3072": ("sign",),
    "ec-p256": ("sign",),
    "ec-p384": ("sign",),
}
DEFAULT_USAGE: dict[str, tuple[str, ...]] = {
    "aes-128": ("encrypt",),
    "aes-256": ("derive",),
    "xts-aes-128": ("encrypt",),
    "xts-aes-256": ("encrypt",),
    "rsa-3072": ("sign",),
    "ec-p256": ("sign",),
    "ec-p384": ("sign",),
}

def check_type_usage(key_type: str, usage: Sequence[str] | None) -> tuple[str, ...]:
    """Validate a key type and its usages; return the usages (defaults filled in).

    Raises:
        InputError: unknown type or a usage the type cannot have.
    """
    if key_type in ("ec-p192", "ecdsa-p192", "p192"):
        raise InputError(f"key type {key_type!r}: ECDSA P-192 is too weak (about 96-bit "
                         "security); hsmflash refuses it. ESP32-C2 Secure Boot V2 takes ec-p256")
    if key_type not in KEY_TYPES:
        raise InputError(f"unknown key type {key_type!r} (one of: {', '.join(KEY_TYPES)})")
    chosen = tuple(usage) if usage else DEFAULT_USAGE[key_type]
    for u in chosen:
        if u not in USAGES:
            raise InputError(f"unknown usage {u!r} (one of: {', '.join(USAGES)})")
        if u not in ALLOWED_USAGES[key_type]:
            raise InputError(
                f"usage {u!r} is not possible for a {key_type} key "
                f"(allowed: {', '.join(ALLOWED_USAGES[key_type])})"
            )
    return tuple(sorted(set(chosen)))
