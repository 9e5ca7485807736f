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

KEY_TYPES: dict[KeyTypeName, str] = {
    "aes-128": "AES-128 secret key",
    "aes-256": "AES-256 secret key (master keys, SBv1 bootloader key, ESP32 flash key)",
    "xts-aes-128": "XTS-AES-128 flash-encryption key (32-byte espsecure file; two AES-128 objects)",
    "xts-aes-256": "XTS-AES-256 flash-encryption key (64-byte espsecure file; two AES-256 objects)",
    "rsa-3072": "RSA-3072 Secure Boot V2 signing key",
    "ec-p256": "ECDSA P-256 signing key (SBv1, SBv2 ECDSA, audit checkpoints)",
    "ec-p384": "ECDSA P-384 Secure Boot V2 signing key",
}
USAGES: tuple[str, ...] = get_args(Usage)
ALLOWED_USAGES: dict[KeyTypeName, tuple[Usage, ...]] = {
    "aes-128": ("derive", "encrypt", "wrap"),
    "aes-256": ("derive", "encrypt", "wrap"),
    "xts-aes-128": ("encrypt",),
    "xts-aes-256": ("encrypt",),
    "rsa-3072": ("sign",),
    "ec-p256": ("sign",),
    "ec-p384": ("sign",),
}
DEFAULT_USAGE: dict[KeyTypeName, tuple[Usage, ...]] = {
    "aes-128": ("encrypt",),
    "aes-256": ("derive",),
    "xts-aes-128": ("encrypt",),
    "xts-aes-256": ("encrypt",),
    "rsa-3072": ("sign",),
    "ec-p256": ("sign",),
    "ec-p384": ("sign",),
}

def check_key_type(name: str) -> KeyTypeName:
    """The key type `name` names.

    Raises:
        InputError: unknown type (P-192 named as too weak).
    """
    if name in ("ec-p192", "ecdsa-p192", "p192"):
        raise InputError(f"key type {name!r}: ECDSA P-192 is too weak (about 96-bit "
                         "security); hsmflash refuses it. ESP32-C2 Secure Boot V2 takes ec-p256")
    for known in KEY_TYPES:
        if name == known:
            return known
    raise InputError(f"unknown key type {name!r} (one of: {', '.join(KEY_TYPES)})")


def check_type_usage(key_type: str, usage: Sequence[str] | None) -> tuple[str, ...]:
    """Validate a key type and its usages; return the usages (defaults filled in).

    Raises:
        InputError: unknown type or a usage the type cannot have.
    """
    kind = check_key_type(key_type)
    chosen: tuple[str, ...] = tuple(usage) if usage else DEFAULT_USAGE[kind]
    for u in chosen:
        if u not in USAGES:
            raise InputError(f"unknown usage {u!r} (one of: {', '.join(USAGES)})")
        if u not in ALLOWED_USAGES[kind]:
            raise InputError(
                f"usage {u!r} is not possible for a {kind} key "
                f"(allowed: {', '.join(ALLOWED_USAGES[kind])})"
            )
    return tuple(sorted(set(chosen)))
