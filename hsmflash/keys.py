"""Capability: the token's keys, made and migrated through the key-use choke point.

Generate a key inside the token, import an espsecure key file (the file's bytes are wiped after
use), or create every key a policy declares that the token lacks. Each creation is one audited
use; what goes in the log is the key's KCV or fingerprint, never its material.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hsmflash.keytypes import check_type_usage
from hsmflash.keyuse import Station
from hsmflash.token.keys import generate_key, import_key, key_exists

_LOGGED = ("kcv", "fingerprint")


def generate(st: Station, name: str, key_type: str, usage: Sequence[str] | None,
             *, policy: str | None = None) -> dict[str, Any]:
    """Generate a sensitive, non-extractable key with only the usages given; its description.

    Raises:
        InputError: unknown type or a usage the type cannot have.
        TokenError: the name is taken, or the token refuses the mechanism.
    """
    flags = check_type_usage(key_type, usage)
    detail: dict[str, Any] = {"type": key_type, "usage": list(flags)}
    if policy is not None:
        detail["policy"] = policy
    with st.use("keys.generate", subject={"name": name}, key_name=name, detail=detail) as out:
        info = generate_key(st.session, name, key_type, flags).describe()
        out.update({k: v for k, v in info.items() if k in _LOGGED})
    return info


def import_material(st: Station, name: str, key_type: str, material: bytearray,
                    usage: Sequence[str] | None, *, source: str,
                    wrappable: bool = False) -> dict[str, Any]:
    """Import espsecure key material (raw AES bytes or a PEM private key); its description.
    The caller wipes `material`.

    `wrappable`: an ESP32-classic flash key that may be wrapped out to memory per use, only
    where the policy allows `export.esp32_classic_stored_transient`.

    Raises:
        InputError: material that does not fit the type; PolicyRefused: wrappable not allowed;
        TokenError: the name is taken, or the token refuses the import.
    """
    flags = check_type_usage(key_type, usage)

    def check() -> None:
        if wrappable:
            st.policy.check_export("esp32_classic_stored_transient")

    detail: dict[str, Any] = {"type": key_type, "usage": list(flags)}
    if wrappable:
        detail["wrappable"] = True
    with st.use("keys.import", subject={"name": name}, key_name=name, detail=detail,
                check=check) as out:
        info = import_key(st.session, name, key_type, material, flags, source=source,
                          wrappable=wrappable).describe()
        out.update({k: v for k, v in info.items() if k in _LOGGED})
    return info


def create_policy_keys(st: Station) -> list[dict[str, Any]]:
    """Create every key the policy declares that the token lacks (idempotent): one row per
    key, its description and `action` (`created` or `exists`)."""
    results = []
    for spec in st.policy.keys.values():
        if key_exists(st.session, spec.name):
            results.append({**st.key(spec.name).describe(), "action": "exists"})
            continue
        info = generate(st, spec.name, spec.type, spec.usage, policy=st.policy.name)
        results.append({**info, "action": "created"})
    return results
