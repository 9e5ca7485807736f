"""The device revocation list: a JSON document signed (ECDSA P-256 over SHA-256 of its
canonical JSON) by the policy's revocation key in the token. Pure: parsing and verifying need
only the public key, so any server or auditor checks a list without a token.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from hsmflash.errors import InputError, VerificationFailed
from hsmflash.fileio import read_input
from hsmflash.formats import kdf, primitives
from hsmflash.formats.primitives import PublicKey, fingerprint

LIST_VERSION = 1
SIGNATURE_ALGORITHM = "ecdsa-p256-sha256"


def canonical_json(doc: dict[str, Any]) -> bytes:
    """Sorted keys, no spaces, UTF-8: the bytes the list's signature covers."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass(frozen=True)
class RevocationList:
    """A parsed revocation list document (verify it before trusting it)."""

    doc: dict[str, Any]
    source: str

    @property
    def sequence(self) -> int:
        return int(self.doc["sequence"])

    @property
    def signer_fingerprint(self) -> str:
        return str(self.doc["signer"]["key_fp"])

    @property
    def revoked(self) -> list[dict[str, Any]]:
        return list(self.doc["revoked"])

    def entry(self, device: bytes) -> dict[str, Any] | None:
        mac = kdf.format_mac(device)
        return next((e for e in self.doc["revoked"] if e["device"] == mac), None)

    def verify(self, public_key: PublicKey, *, min_sequence: int | None = None) -> None:
        """Check the signer and signature (and that the list is not older than `min_sequence`).

        Raises:
            VerificationFailed: another signer, a bad signature, or an older list.
        """
        if not isinstance(public_key, ec.EllipticCurvePublicKey) or \
                not isinstance(public_key.curve, ec.SECP256R1):
            raise VerificationFailed(f"revocation list {self.source}: the public key is not "
                                     "EC P-256")
        if self.signer_fingerprint != fingerprint(public_key):
            raise VerificationFailed(f"revocation list {self.source} was signed by another key "
                                     f"({self.signer_fingerprint[:23]}...)")
        sig = self.doc["signature"]
        raw = bytes.fromhex(sig["value"])
        body = {k: v for k, v in self.doc.items() if k != "signature"}
        digest = hashlib.sha256(canonical_json(body)).digest()
        if not primitives.verify_digest_signature(public_key, raw, digest):
            raise VerificationFailed(f"revocation list {self.source}: signature does not "
                                     "verify (edited or not from this key)")
        if min_sequence is not None and self.sequence < min_sequence:
            raise VerificationFailed(f"revocation list {self.source} has sequence "
                                     f"{self.sequence}, older than {min_sequence} (rolled back)")


def parse_revocation_list(data: bytes, source: str) -> RevocationList:
    """Parse a revocation list's structure (not its signature: see `RevocationList.verify`).

    Raises:
        VerificationFailed: not JSON, or not shaped like a signed revocation list.
    """
    def bad(why: str) -> VerificationFailed:
        return VerificationFailed(f"revocation list {source} is not a valid signed list: {why}")

    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise bad("not JSON") from None
    if not isinstance(doc, dict):
        raise bad("not a JSON object")
    expected = {"version", "sequence", "issued", "revoked", "signer", "signature"}
    if set(doc) != expected:
        raise bad(f"fields {sorted(set(doc) ^ expected)} missing or unexpected")
    if doc["version"] != LIST_VERSION:
        raise bad(f"version {doc['version']!r} (expected {LIST_VERSION})")
    if not isinstance(doc["sequence"], int) or isinstance(doc["sequence"], bool) \
            or doc["sequence"] < 1:
        raise bad("sequence is not a positive integer")
    signer, sig, revoked = doc["signer"], doc["signature"], doc["revoked"]
    if not isinstance(signer, dict) or not isinstance(signer.get("key_fp"), str):
        raise bad("signer.key_fp missing")
    if not isinstance(sig, dict) or sig.get("algorithm") != SIGNATURE_ALGORITHM or \
            not isinstance(sig.get("value"), str) or \
            not re.fullmatch(r"[0-9a-f]{128}", sig["value"]):
        raise bad(f"signature is not {SIGNATURE_ALGORITHM} r||s hex")
    if not isinstance(revoked, list) or not all(
            isinstance(e, dict) and isinstance(e.get("device"), str) for e in revoked):
        raise bad("revoked is not a list of device entries")
    return RevocationList(doc, source)


def load_revocation_list(path: str | Path) -> RevocationList:
    """Read and parse a revocation list file.

    Raises:
        InputError: missing or unreadable. VerificationFailed: malformed.
    """
    return parse_revocation_list(read_input(path, "revocation list"), str(path))


def sign_list(body: dict[str, Any], sign_digest: Callable[[bytes], bytes]) -> dict[str, Any]:
    """Add the signature over the canonical JSON of `body` (which names its signer)."""
    raw = sign_digest(hashlib.sha256(canonical_json(body)).digest())
    return {**body, "signature": {"algorithm": SIGNATURE_ALGORITHM, "value": raw.hex()}}


def load_revocation_key(path: str | Path) -> PublicKey:
    """The revocation list's EC public key, a PEM file (as `hsmflash keys public` writes it).

    Raises:
        InputError: missing file, not a PEM public key, or not EC.
    """
    key = primitives.load_public_key(read_input(path, "public key"), str(path))
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise InputError(f"public key {str(path)!r} is not an EC key")
    return key
