"""The one choke point for key use: policy check -> audit intent -> token operation -> outcome.

A `Station` is one command's access to the token: a logged-in session, the policy and the audit
log. Token-backed primitives (`TokenCipher`, `TokenSigner`) and derived per-device keys are only
handed out inside `Station.use(...)`, which writes a durable intent record first and the outcome
after; nothing in hsmflash touches a key any other way. When a command that used a key ends,
`Station.close` appends a checkpoint signed by the token's audit key and stores the log head in
the token.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pkcs11.exceptions as p11x
from pkcs11 import MGF, Attribute, KeyType, Mechanism, ObjectClass

from hsmflash.audit import AuditLog
from hsmflash.errors import InputError, TokenError
from hsmflash.formats import kdf
from hsmflash.formats.primitives import PublicKey, SignatureAlgorithm
from hsmflash.policy import Policy
from hsmflash.token.keys import AUDIT_HEAD_LABEL, TokenKey, find_key, generate_key, key_exists
from hsmflash.token.session import KeyRef, TokenConfig, open_session, supports, wrap_pkcs11


class TokenCipher:
    """AES-ECB through the token (CKM_AES_ECB), one bulk call per request."""

    def __init__(self, obj: Any) -> None:
        self._obj = obj

    def encrypt_ecb(self, data: bytes) -> bytes:
        try:
            return bytes(self._obj.encrypt(data, mechanism=Mechanism.AES_ECB))
        except p11x.PKCS11Error as e:
            raise wrap_pkcs11(e, "AES-ECB encrypt") from e

    def decrypt_ecb(self, data: bytes) -> bytes:
        try:
            return bytes(self._obj.decrypt(data, mechanism=Mechanism.AES_ECB))
        except p11x.PKCS11Error as e:
            raise wrap_pkcs11(e, "AES-ECB decrypt") from e


_HASH_MECH = {32: Mechanism.SHA256, 48: Mechanism.SHA384}
_MGF = {32: MGF.SHA256, 48: MGF.SHA384}


class TokenSigner:
    """Signs host-computed digests with raw mechanisms (CKM_RSA_PKCS_PSS, CKM_ECDSA)."""

    def __init__(self, key: TokenKey) -> None:
        if key.type not in ("rsa-3072", "ec-p256", "ec-p384"):
            raise InputError(f"key {key.name!r} is {key.type}, not a signing key")
        self.algorithm: SignatureAlgorithm = key.type  # type: ignore[assignment]
        self._key = key

    def public_key(self) -> PublicKey:
        return self._key.public_key()

    def sign_digest(self, digest: bytes) -> bytes:
        try:
            if self.algorithm == "rsa-3072":
                return bytes(self._key.primary.sign(
                    digest, mechanism=Mechanism.RSA_PKCS_PSS,
                    mechanism_param=(_HASH_MECH[len(digest)], _MGF[len(digest)], 32),
                ))
            return bytes(self._key.primary.sign(digest, mechanism=Mechanism.ECDSA))
        except p11x.PKCS11Error as e:
            raise wrap_pkcs11(e, f"signing with key {self._key.name!r}") from e


@dataclass
class DerivedKey:
    """A per-device key K_D held in the token as session objects (never token objects)."""

    device: bytes
    purpose: str
    objects: list[Any] = field(repr=False)

    def kcvs(self) -> list[str]:
        """KCVs computed as AES-ECB_K(0^16)[:3] with the derived object itself: SoftHSM 2.6
        reports a wrong CKA_CHECK_VALUE for keys made by C_DeriveKey."""
        try:
            return [bytes(o.encrypt(bytes(16), mechanism=Mechanism.AES_ECB))[:3].hex()
                    for o in self.objects]
        except p11x.PKCS11Error as e:
            raise wrap_pkcs11(e, f"computing the KCV of a derived {self.purpose} key") from e

    @property
    def kcv(self) -> str:
        return "/".join(self.kcvs())

    def ciphers(self) -> list[TokenCipher]:
        return [TokenCipher(o) for o in self.objects]

    def destroy(self) -> None:
        for o in self.objects:
            try:
                o.destroy()
            except p11x.PKCS11Error:
                pass
        self.objects = []


def split_for_purpose(purpose: str) -> list[int]:
    """How many X_i blocks go into each token object for a purpose."""
    n = kdf.key_length(purpose) // 16
    if purpose in ("XTS_AES_128_KEY", "XTS_AES_256_KEY", "NVS_KEYS"):
        return [n // 2, n // 2]  # K1 (data/first half) and K2 (tweak/second half)
    return [n]


class TokenHeadStore:
    """The audit log head (seq, hash) in CKO_DATA objects, one per log (named by its genesis).

    Tokens may refuse to modify CKA_VALUE, so each head is a new object and older ones are
    destroyed afterwards; a crash in between leaves two, and the higher seq wins.
    """

    def __init__(self, session: Any, log_id: str) -> None:
        self._session = session
        self._label = f"{AUDIT_HEAD_LABEL}:{log_id}"

    def _objects(self) -> list[tuple[int, str, Any]]:
        found = []
        for obj in self._session.get_objects({
            Attribute.CLASS: ObjectClass.DATA, Attribute.LABEL: self._label,
        }):
            head = json.loads(bytes(obj[Attribute.VALUE]).decode())
            found.append((int(head["seq"]), str(head["hash"]), obj))
        return sorted(found, key=lambda t: t[0])

    def read(self) -> tuple[int, str] | None:
        try:
            objs = self._objects()
        except (p11x.PKCS11Error, ValueError, KeyError) as e:
            raise TokenError(f"reading the audit head from the token: {type(e).__name__}") from e
        return (objs[-1][0], objs[-1][1]) if objs else None

    def write(self, seq: int, hash: str) -> None:
        value = json.dumps({"seq": seq, "hash": hash}).encode()
        try:
            old = self._objects()
            self._session.create_object({
                Attribute.CLASS: ObjectClass.DATA, Attribute.LABEL: self._label,
                Attribute.APPLICATION: "hsmflash", Attribute.TOKEN: True,
                Attribute.PRIVATE: True, Attribute.VALUE: value,
            })
            for _, _, obj in old:
                obj.destroy()
        except p11x.PKCS11Error as e:
            raise wrap_pkcs11(e, "storing the audit head in the token") from e


def log_id(audit_path: str | Path) -> str | None:
    """A log's identity: the first 16 hex digits of its first record's hash."""
    try:
        with open(audit_path, encoding="utf-8") as f:
            first = f.readline()
        return str(json.loads(first)["hash"])[:16] if first.strip() else None
    except (OSError, ValueError, KeyError):
        return None


def default_station() -> str:
    return os.environ.get("HSMFLASH_STATION") or socket.gethostname()


def default_actor() -> str:
    try:
        return os.environ.get("HSMFLASH_ACTOR") or getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


class Station:
    """One command's access to keys. Open with `Station.open(...)` (a context manager)."""

    def __init__(self, config: TokenConfig, policy: Policy, session: Any, audit: AuditLog) -> None:
        self.config = config
        self.policy = policy
        self.session = session
        self.audit = audit
        self.used_keys = False
        self._keys: dict[str, TokenKey] = {}

    @classmethod
    @contextmanager
    def open(cls, config: TokenConfig, policy: Policy, audit_path: str | Path,
             *, station: str | None = None, actor: str | None = None) -> Iterator[Station]:
        """Open a session and the audit log; on a clean or failed exit, checkpoint if used.

        Raises:
            TokenError: module, token or PIN problems.
        """
        audit = AuditLog(audit_path, station=station or default_station(),
                         actor=actor or default_actor())
        with open_session(config, rw=True) as session:
            st = cls(config, policy, session, audit)
            try:
                yield st
            finally:
                if st.used_keys:
                    st.checkpoint()

    # -- keys ---------------------------------------------------------------------------
    def key(self, ref: str) -> TokenKey:
        """Find a key by label or RFC 7512 URI (cached for this command).

        Raises:
            InputError: malformed reference; TokenError: no such key or wrong token.
        """
        parsed = KeyRef.parse(ref)
        if parsed.token and parsed.token != self.config.label:
            raise TokenError(f"key {ref!r} names token {parsed.token!r}, but the open token is "
                             f"{self.config.label!r} (use --token)")
        if parsed.label not in self._keys:
            self._keys[parsed.label] = find_key(self.session, parsed.label, self.config.label)
        return self._keys[parsed.label]

    def uri(self, key: TokenKey | str) -> str:
        name = key if isinstance(key, str) else key.name
        return KeyRef(name).uri(self.config.label)

    @staticmethod
    def key_id_fields(key: TokenKey) -> dict[str, str]:
        if key.type.startswith(("aes", "xts")):
            return {"kcv": key.kcv()}
        return {"key_fp": key.fingerprint()}

    @contextmanager
    def use(self, op: str, key: TokenKey | None = None, *, subject: dict[str, Any] | None = None,
            detail: dict[str, Any] | None = None,
            check: Callable[[], None] | None = None,
            key_name: str | None = None) -> Iterator[dict[str, Any]]:
        """The choke point: policy check, durable intent, the caller's token work, outcome.

        Yields a dict the caller may add outcome details to (never secrets). `key_name` names
        a key that does not exist yet (generate, import).

        Raises:
            PolicyRefused: from `check`, before anything is written or used.
            whatever the block raises, after the error outcome is recorded.
        """
        if check is not None:
            check()
        ids = self.key_id_fields(key) if key is not None else {}
        self.used_keys = True
        uri = self.uri(key) if key else (self.uri(key_name) if key_name else None)
        with self.audit.use(op, key=uri, subject=subject or {},
                            detail=detail or {}, **ids) as outcome:
            yield outcome

    def signer(self, key: TokenKey) -> TokenSigner:
        return TokenSigner(key)

    def cipher(self, key: TokenKey, part: int = 0) -> TokenCipher:
        return TokenCipher(key.objects[part])

    # -- per-device keys ------------------------------------------------------------------
    def derive(self, master: TokenKey, device: bytes, purpose: str,
               *, exportable: bool = False) -> DerivedKey:
        """Derive K_D for a device and purpose inside the token (session objects).

        Call inside `use(...)`. `exportable` makes the session objects extractable, for the
        audited transient-export path only (invariant 3).

        Raises:
            InputError: bad device id or purpose, or a master of the wrong type.
            TokenError: the master lacks CKA_DERIVE or the token lacks the mechanism.
        """
        blocks = kdf.derivation_blocks(device, purpose)
        if master.type != "aes-256":
            raise InputError(f"master key {master.name!r} is {master.type}; aes-ecb-v1 needs "
                             "an aes-256 master")
        if "derive" not in master.usage:
            raise TokenError(f"master key {master.name!r} does not allow derivation "
                             "(CKA_DERIVE is false)")
        template = {
            Attribute.TOKEN: False,
            Attribute.SENSITIVE: not exportable,
            Attribute.EXTRACTABLE: exportable,
            Attribute.ENCRYPT: True,
            Attribute.DECRYPT: True,
            Attribute.DERIVE: False,
            Attribute.WRAP: False,
            Attribute.UNWRAP: False,
            Attribute.SIGN: False,
            Attribute.VERIFY: False,
        }
        objects = []
        i = 0
        try:
            for n in split_for_purpose(purpose):
                data = b"".join(blocks[i:i + n])
                i += n
                objects.append(master.primary.derive_key(
                    KeyType.AES, len(data) * 8, mechanism=Mechanism.AES_ECB_ENCRYPT_DATA,
                    mechanism_param=data, template=template,
                ))
        except p11x.MechanismInvalid as e:
            for o in objects:
                o.destroy()
            raise TokenError(f"token {self.config.label!r} lacks CKM_AES_ECB_ENCRYPT_DATA, "
                             "needed for aes-ecb-v1 per-device key derivation") from e
        except p11x.PKCS11Error as e:
            for o in objects:
                o.destroy()
            raise wrap_pkcs11(e, f"deriving {purpose} from {master.name!r}") from e
        return DerivedKey(device, purpose, objects)

    def derived_hmac_sha256(self, master: TokenKey, device: bytes, purpose: str,
                            messages: list[bytes]) -> list[bytearray]:
        """HMAC-SHA256 of each message under the device's derived key K_D, in the token.

        K_D (aes-ecb-v1, as `derive`) becomes a CKK_GENERIC_SECRET session object that can
        only sign (CKM_SHA256_HMAC) and is destroyed at once. Call inside `use(...)`; the
        caller wipes the results.

        Raises:
            InputError, TokenError: as `derive`; TokenError when the token refuses the
                generic-secret derivation or CKM_SHA256_HMAC.
        """
        blocks = kdf.derivation_blocks(device, purpose)
        if master.type != "aes-256" or "derive" not in master.usage:
            raise TokenError(f"master key {master.name!r} must be aes-256 with usage derive")
        template = {
            Attribute.TOKEN: False, Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
            Attribute.SIGN: True, Attribute.VERIFY: False, Attribute.ENCRYPT: False,
            Attribute.DECRYPT: False, Attribute.DERIVE: False, Attribute.WRAP: False,
            Attribute.UNWRAP: False,
        }
        data = b"".join(blocks)
        try:
            obj = master.primary.derive_key(
                KeyType.GENERIC_SECRET, len(data) * 8, mechanism=Mechanism.AES_ECB_ENCRYPT_DATA,
                mechanism_param=data, template=template)
        except p11x.PKCS11Error as e:
            raise wrap_pkcs11(e, f"deriving the {purpose} HMAC key from {master.name!r}") from e
        try:
            return [bytearray(obj.sign(m, mechanism=Mechanism.SHA256_HMAC)) for m in messages]
        except p11x.PKCS11Error as e:
            raise wrap_pkcs11(e, f"HMAC-SHA256 with the derived {purpose} key") from e
        finally:
            try:
                obj.destroy()
            except p11x.PKCS11Error:
                pass

    def export(self, derived: DerivedKey, reason: str) -> bytearray:
        """Read a derived key's bytes into memory (invariant 3). The caller must wipe it.

        Only for DerivedKey objects made with `exportable=True`; the policy check and audit
        record (with KCV) belong to the enclosing `use(...)`, whose detail gets `exported`.

        Raises:
            TokenError: the token refuses to reveal the value.
        """
        out = bytearray()
        try:
            for o in derived.objects:
                out += bytes(o[Attribute.VALUE])
        except p11x.PKCS11Error as e:
            wipe(out)
            raise wrap_pkcs11(e, f"exporting the {derived.purpose} key for {reason}") from e
        return out

    def supports(self, mechanism: str) -> bool:
        return supports(self.config, mechanism)

    # -- audit checkpoint -------------------------------------------------------------------
    def audit_signer(self) -> TokenSigner:
        """The token's audit key; generated in the token on first need (ec-p256, sign only)."""
        name = self.policy.audit_key
        if not key_exists(self.session, name):
            return TokenSigner(generate_key(self.session, name, "ec-p256", ("sign",)))
        return TokenSigner(self.key(name))

    def head_store(self) -> TokenHeadStore:
        ident = log_id(self.audit.path)
        if ident is None:
            raise InputError(f"audit log {self.audit.path} is empty")
        return TokenHeadStore(self.session, ident)

    def checkpoint(self) -> None:
        """Append a checkpoint signed by the audit key and store the head in the token."""
        self.audit.checkpoint(self.audit_signer(), self.head_store(),
                              key=self.uri(self.policy.audit_key))


def wipe(buf: bytearray) -> None:
    """Overwrite a key buffer in place (best effort in Python: the one copy we control)."""
    for i in range(len(buf)):
        buf[i] = 0


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
