"""The one choke point for key use: policy check -> audit intent -> token operation -> outcome.

A `Station` is one command's access to the token: a logged-in session, the policy and the audit
log. It has no key operations of its own: `Station.use(...)` checks the policy (and every key
export the use declares), writes a durable intent record, and yields a `KeyUse`, the only handle
through which a key signs (`signer`), encrypts (`cipher`), derives per-device keys (`derive`) or
is exported (`export`); the handle stops working when the use ends and its outcome is recorded.
When a command that used a key ends, `Station.open` appends a checkpoint signed by the token's
audit key and stores the log head in the token.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import socket
import sys
from collections.abc import Callable, Iterable, Iterator, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import pkcs11.exceptions as p11x
from pkcs11 import MGF, Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass

from hsmflash.audit import Anchor, AuditLog
from hsmflash.errors import CHECKPOINT_FAILED, Error, InputError, InternalError, TokenError
from hsmflash.formats import kdf
from hsmflash.formats.primitives import PSS_SALT_LEN, PublicKey, SignatureAlgorithm
from hsmflash.policy import Policy
from hsmflash.token.keys import AUDIT_HEAD_LABEL, TokenKey, find_key, generate_key, key_exists
from hsmflash.token.session import KeyRef, TokenConfig, open_session, supports, wrap_pkcs11

if TYPE_CHECKING:
    import pkcs11.types as p11t

    from hsmflash.token.profile import Profile


class TokenCipher:
    """AES-ECB through the token (CKM_AES_ECB), one bulk call per request."""

    def __init__(self, obj: p11t.Key) -> None:
        self._obj = obj

    # The object has CKA_ENCRYPT/CKA_DECRYPT, so python-pkcs11 built it with those mixins;
    # bytes in, bytes out (its stub also allows an iterator).
    def encrypt_ecb(self, data: bytes) -> bytes:
        try:
            out = cast("p11t.EncryptMixin", self._obj).encrypt(data, mechanism=Mechanism.AES_ECB)
            return bytes(cast(bytes, out))
        except p11x.PKCS11Error as e:
            raise wrap_pkcs11(e, "AES-ECB encrypt") from e

    def decrypt_ecb(self, data: bytes) -> bytes:
        try:
            out = cast("p11t.DecryptMixin", self._obj).decrypt(data, mechanism=Mechanism.AES_ECB)
            return bytes(cast(bytes, out))
        except p11x.PKCS11Error as e:
            raise wrap_pkcs11(e, "AES-ECB decrypt") from e


_HASH_MECH = {32: Mechanism.SHA256, 48: Mechanism.SHA384}
_MGF = {32: MGF.SHA256, 48: MGF.SHA384}


class TokenSigner:
    """Signs host-computed digests with raw mechanisms: CKM_ECDSA (r||s), and for RSA
    CKM_RSA_PKCS_PSS (salt 32; Secure Boot, audit) or, with `rsa_padding="pkcs1v15"`,
    CKM_RSA_PKCS over the DigestInfo (X.509 sha256WithRSAEncryption)."""

    def __init__(self, key: TokenKey, rsa_padding: str = "pss") -> None:
        if key.type not in ("rsa-3072", "ec-p256", "ec-p384"):
            raise InputError(f"key {key.name!r} is {key.type}, not a signing key")
        if rsa_padding not in ("pss", "pkcs1v15"):
            raise InternalError(f"unknown RSA padding {rsa_padding!r}")
        self.algorithm: SignatureAlgorithm = key.type  # type: ignore[assignment]  # checked above
        self._key = key
        self._rsa_padding = rsa_padding

    def public_key(self) -> PublicKey:
        return self._key.public_key()

    def sign_digest(self, digest: bytes) -> bytes:
        private = cast("p11t.SignMixin", self._key.primary)  # a signing key: CKA_SIGN
        try:
            if self.algorithm == "rsa-3072" and self._rsa_padding == "pkcs1v15":
                return bytes(private.sign(_DIGEST_INFO[len(digest)] + digest,
                                          mechanism=Mechanism.RSA_PKCS))
            if self.algorithm == "rsa-3072":
                return bytes(private.sign(
                    digest, mechanism=Mechanism.RSA_PKCS_PSS,
                    mechanism_param=(_HASH_MECH[len(digest)], _MGF[len(digest)],
                                     PSS_SALT_LEN),
                ))
            return bytes(private.sign(digest, mechanism=Mechanism.ECDSA))
        except p11x.PKCS11Error as e:
            raise wrap_pkcs11(e, f"signing with key {self._key.name!r}") from e


# DER DigestInfo prefixes (RFC 8017, 9.2 note 1) for PKCS#1 v1.5 signatures
_DIGEST_INFO = {
    32: bytes.fromhex("3031300d060960864801650304020105000420"),  # SHA-256
    48: bytes.fromhex("3041300d060960864801650304020205000430"),  # SHA-384
}


@dataclass
class DerivedKey:
    """A per-device key K_D held in the token as session objects (never token objects)."""

    device: bytes
    purpose: str
    objects: list[p11t.SecretKey] = field(repr=False)

    def kcvs(self) -> list[str]:
        """KCVs computed as AES-ECB_K(0^16)[:3] with the derived object itself: SoftHSM 2.6
        reports a wrong CKA_CHECK_VALUE for keys made by C_DeriveKey."""
        try:
            outs = [cast("p11t.EncryptMixin", o).encrypt(bytes(16), mechanism=Mechanism.AES_ECB)
                    for o in self.objects]  # derived with CKA_ENCRYPT; bytes in, bytes out
            return [bytes(cast(bytes, out))[:3].hex() for out in outs]
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


def _store_no_usage_key(session: p11t.Session, label: str, ident: bytes) -> None:
    """A token object that holds `ident` in its CKA_ID: a small AES key with no usage at all,
    for tokens that refuse data objects (NSS)."""
    from hsmflash.token.profile import session_secret_template

    template = {**session_secret_template(), Attribute.TOKEN: True, Attribute.PRIVATE: True}
    for flag in (Attribute.ENCRYPT, Attribute.DECRYPT, Attribute.SIGN, Attribute.VERIFY,
                 Attribute.WRAP, Attribute.UNWRAP, Attribute.DERIVE):
        template[flag] = False
    session.generate_key(KeyType.AES, 128, label=label, id=ident, store=True,
                         capabilities=MechanismFlag(0), template=template)


class _HeadObjects:
    """The audit log head (seq, hash) kept in token objects labelled per log (named by its
    genesis). Tokens may refuse to modify attributes, so each head is a new object and older
    ones are destroyed afterwards; a crash in between leaves two, and the higher seq wins."""

    object_class: ObjectClass

    def __init__(self, session: p11t.Session, log_id: str) -> None:
        self._session = session
        self._label = f"{AUDIT_HEAD_LABEL}:{log_id}"

    def _decode(self, obj: p11t.Object) -> tuple[int, str]:
        raise NotImplementedError

    def _objects(self) -> list[tuple[int, str, p11t.Object]]:
        found = [(*self._decode(obj), obj) for obj in self._session.get_objects({
            Attribute.CLASS: self.object_class, Attribute.LABEL: self._label})]
        return sorted(found, key=lambda t: t[0])

    def read(self) -> tuple[int, str] | None:
        try:
            objs = self._objects()
        except (p11x.PKCS11Error, ValueError, KeyError) as e:
            raise TokenError(f"reading the audit head from the token: {type(e).__name__}") from e
        return (objs[-1][0], objs[-1][1]) if objs else None


class TokenHeadStore(_HeadObjects):
    """The audit head in CKO_DATA objects (where the token allows them)."""

    object_class = ObjectClass.DATA

    def _decode(self, obj: p11t.Object) -> tuple[int, str]:
        head = json.loads(bytes(obj[Attribute.VALUE]).decode())
        return int(head["seq"]), str(head["hash"])

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


class TokenLogBinding:
    """Which log the token keeps for one audit log path, named after the path (its real path's
    SHA-256) and holding the log's id: a CKO_DATA object, or on tokens that refuse data objects
    (`form="key-id"`, NSS) the CKA_ID of a small AES key object with no usage. Bound at the
    path's first checkpoint, so a log replaced by another one (or deleted) is refused before
    any key use. Either form is read."""

    def __init__(self, session: p11t.Session, audit_path: str | Path,
                 form: str = "data-object") -> None:
        self._session = session
        self._form = form
        real = os.path.realpath(os.fsencode(audit_path))
        self._label = f"{AUDIT_PATH_LABEL}:{hashlib.sha256(real).hexdigest()[:32]}"

    def read(self) -> str | None:
        try:
            for obj in self._session.get_objects({
                Attribute.CLASS: ObjectClass.DATA, Attribute.LABEL: self._label,
            }):
                return str(json.loads(bytes(obj[Attribute.VALUE]).decode())["log"])
            for obj in self._session.get_objects({
                Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: self._label,
            }):
                return bytes(obj[Attribute.ID]).hex()
        except (p11x.PKCS11Error, ValueError, KeyError) as e:
            raise TokenError(f"reading the audit log binding from the token: "
                             f"{type(e).__name__}") from e
        return None

    def write(self, log_id: str) -> None:
        try:
            if self._form == "key-id":
                _store_no_usage_key(self._session, self._label, bytes.fromhex(log_id))
                return
            self._session.create_object({
                Attribute.CLASS: ObjectClass.DATA, Attribute.LABEL: self._label,
                Attribute.APPLICATION: "hsmflash", Attribute.TOKEN: True,
                Attribute.PRIVATE: True, Attribute.VALUE: json.dumps({"log": log_id}).encode(),
            })
        except p11x.PKCS11Error as e:
            raise wrap_pkcs11(e, "storing the audit log binding in the token") from e


AUDIT_PATH_LABEL = "hsmflash-audit-path"


class KeyIdHeadStore(_HeadObjects):
    """The audit head on tokens that refuse data objects (NSS): in the CKA_ID of a small AES
    secret key object with no usage at all, labelled per log. CKA_ID = uint64_be(seq) ||
    SHA-256 bytes. Like `TokenHeadStore`, each head is a new object and the older ones are
    destroyed afterwards; the highest seq wins. A rolled-back or cut log no longer holds the
    record at that seq with that hash, which is what the checkpoint and `audit verify` check.
    """

    object_class = ObjectClass.SECRET_KEY

    def _decode(self, obj: p11t.Object) -> tuple[int, str]:
        ident = bytes(obj[Attribute.ID])
        if len(ident) != 40:
            raise ValueError("audit head key object has a malformed CKA_ID")
        return int.from_bytes(ident[:8], "big"), ident[8:].hex()

    def write(self, seq: int, hash: str) -> None:

        try:
            old = self._objects()
            _store_no_usage_key(self._session, self._label,
                                seq.to_bytes(8, "big") + bytes.fromhex(hash))
            for _, _, obj in old:
                obj.destroy()
        except (p11x.PKCS11Error, ValueError) as e:
            if isinstance(e, p11x.PKCS11Error):
                raise wrap_pkcs11(e, "storing the audit head in the token (key object)") from e
            raise TokenError(f"storing the audit head: {type(e).__name__}") from e


HEAD_STORES: dict[str, type[TokenHeadStore] | type[KeyIdHeadStore]] = {
    "data-object": TokenHeadStore, "key-id": KeyIdHeadStore,
}


def find_head_store(session: p11t.Session, log_id: str,
                    preferred: str = "data-object") -> TokenHeadStore | KeyIdHeadStore:
    """The head store that holds this log's head (either form), else the `preferred` form.

    Raises:
        TokenError: the token cannot be read.
    """
    stores = [HEAD_STORES[preferred](session, log_id)]
    stores += [cls(session, log_id) for name, cls in HEAD_STORES.items() if name != preferred]
    for store in stores:
        try:
            if store.read() is not None:
                return store
        except TokenError:
            continue  # a token without that object class reads as empty elsewhere
    return stores[0]


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


class KeyUse(MutableMapping[str, Any]):
    """The one handle through which a key signs, encrypts, derives or is exported.

    Only `Station.use(...)` makes one, after the policy check and the durable intent record,
    and it stops working when the `with` block ends (the outcome is recorded then). As a
    mapping it is the outcome's detail: the caller adds what happened (never secrets); exports
    record themselves there as they happen, so a step that fails later still shows them.
    """

    def __init__(self, station: Station, key: TokenKey | None, outcome: dict[str, Any],
                 exports: frozenset[str]) -> None:
        self._station = station
        self._key = key
        self._outcome = outcome
        self._exports = exports
        self._open = True

    # -- the outcome mapping ------------------------------------------------------------------
    def __getitem__(self, name: str) -> Any:
        return self._outcome[name]

    def __setitem__(self, name: str, value: Any) -> None:
        self._outcome[name] = value

    def __delitem__(self, name: str) -> None:
        del self._outcome[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._outcome)

    def __len__(self) -> int:
        return len(self._outcome)

    def _close(self) -> None:
        self._open = False

    def _live_key(self, what: str) -> TokenKey:
        if not self._open:
            raise InternalError(f"{what} after its audited use ended")
        if self._key is None:
            raise InternalError(f"{what} in a use that names no key")
        return self._key

    # -- key operations -----------------------------------------------------------------------
    def signer(self, rsa_padding: str = "pss") -> TokenSigner:
        """The key as a digest signer (raw ECDSA; RSA-PSS, or PKCS#1 v1.5 for X.509)."""
        return TokenSigner(self._live_key("signing"), rsa_padding)

    def cipher(self, part: int = 0) -> TokenCipher:
        """AES-ECB with the key (`part` 1 is an XTS key's tweak half)."""
        return TokenCipher(self._live_key("encryption").objects[part])

    def raw_object(self) -> p11t.Key:
        """The key's PKCS#11 object, for the C-API batch derivation path (`token.rawderive`)."""
        return self._live_key("raw derivation").primary

    def derive(self, device: bytes, purpose: str, *, exportable: bool = False,
               derive_further: bool = False) -> DerivedKey:
        """Derive K_D for a device and purpose inside the token (session objects); the use's
        key is the master.

        `exportable` makes the session objects extractable, for `export` only (invariant 3).
        `derive_further` gives the objects CKA_DERIVE, for the ESP32-classic per-block keys
        (CKM_XOR_BASE_AND_DATA).

        Raises:
            InputError: bad device id or purpose, or a master of the wrong type.
            TokenError: the master lacks CKA_DERIVE or the token lacks the mechanism.
        """
        master = self._live_key("derivation")
        blocks = kdf.derivation_blocks(device, purpose)
        check_master(master)
        template = {
            Attribute.TOKEN: False,
            Attribute.SENSITIVE: not exportable,
            Attribute.EXTRACTABLE: exportable,
            Attribute.ENCRYPT: True,
            Attribute.DECRYPT: True,
            Attribute.DERIVE: derive_further,
            Attribute.WRAP: False,
            Attribute.UNWRAP: False,
            Attribute.SIGN: False,
            Attribute.VERIFY: False,
        }
        objects: list[p11t.SecretKey] = []
        base = cast("p11t.DeriveMixin", master.primary)  # check_master: CKA_DERIVE
        i = 0
        try:
            for n in kdf.split_for_purpose(purpose):
                data = b"".join(blocks[i:i + n])
                i += n
                objects.append(base.derive_key(
                    KeyType.AES, len(data) * 8, mechanism=Mechanism.AES_ECB_ENCRYPT_DATA,
                    mechanism_param=data, template=template,
                ))
        except p11x.MechanismInvalid as e:
            for o in objects:
                o.destroy()
            from hsmflash.token.profile import capability_refusal

            raise capability_refusal(self._station.config.label, "in_token_derivation",
                                     "aes-ecb-v1 per-device key derivation") from e
        except p11x.PKCS11Error as e:
            for o in objects:
                o.destroy()
            raise wrap_pkcs11(e, f"deriving {purpose} from {master.name!r}") from e
        return DerivedKey(device, purpose, objects)

    def derived_hmac_sha256(self, device: bytes, purpose: str, messages: list[bytes],
                            reason: str) -> list[bytearray]:
        """HMAC-SHA256 of each message under the device's derived key K_D, in the token; the
        use's key is the master. The results leave the token (they are keys the chip derives
        itself, e.g. ESP-IDF's NVS keys from an HMAC_UP eFuse key), so `reason` must be an
        export declared to `use(...)`; the outcome records K_D's KCV. The caller wipes them.

        K_D (aes-ecb-v1, as `derive`) becomes a CKK_GENERIC_SECRET session object that can
        only sign (CKM_SHA256_HMAC) and is destroyed at once.

        Raises:
            InternalError: an export not declared to `use(...)`.
            InputError, TokenError: as `derive`; TokenError when the token refuses the
                generic-secret derivation or CKM_SHA256_HMAC.
        """
        master = self._live_key("HMAC derivation")
        if reason not in self._exports:
            raise InternalError(f"export for {reason!r} was not declared to use()")
        check_master(master)
        check = self.derive(device, purpose)
        try:
            kcv = check.kcv
        finally:
            check.destroy()
        blocks = kdf.derivation_blocks(device, purpose)
        template = {
            Attribute.TOKEN: False, Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
            Attribute.SIGN: True, Attribute.VERIFY: False, Attribute.ENCRYPT: False,
            Attribute.DECRYPT: False, Attribute.DERIVE: False, Attribute.WRAP: False,
            Attribute.UNWRAP: False,
        }
        data = b"".join(blocks)
        try:
            obj = cast("p11t.DeriveMixin", master.primary).derive_key(  # check_master: CKA_DERIVE
                KeyType.GENERIC_SECRET, len(data) * 8, mechanism=Mechanism.AES_ECB_ENCRYPT_DATA,
                mechanism_param=data, template=template)
        except p11x.PKCS11Error as e:
            raise wrap_pkcs11(e, f"deriving the {purpose} HMAC key from {master.name!r}") from e
        no_core_dumps()
        self._outcome.setdefault("exported", []).append(
            {"purpose": purpose, "kcv": kcv, "why": reason, "what": "HMAC-SHA256 outputs"})
        try:
            hmac_key = cast("p11t.SignMixin", obj)  # derived with CKA_SIGN
            return [bytearray(hmac_key.sign(m, mechanism=Mechanism.SHA256_HMAC))
                    for m in messages]
        except p11x.PKCS11Error as e:
            raise wrap_pkcs11(e, f"HMAC-SHA256 with the derived {purpose} key") from e
        finally:
            try:
                obj.destroy()
            except p11x.PKCS11Error:
                pass

    def export(self, derived: DerivedKey, reason: str) -> bytearray:
        """Read a derived key's bytes into memory (invariant 3); the caller must `wipe` it.

        `reason` must be one of the exports declared to `use(...)` (checked against the policy
        there). The export is recorded in the outcome at once, with the key's KCV.

        Raises:
            InternalError: an export not declared to `use(...)`.
            TokenError: the token refuses to reveal the value.
        """
        self._live_key("export")
        if reason not in self._exports:
            raise InternalError(f"export for {reason!r} was not declared to use()")
        no_core_dumps()  # from the first export on: key bytes could be in a dump
        record = {"purpose": derived.purpose, "kcv": derived.kcv, "why": reason}
        out = bytearray()
        try:
            for o in derived.objects:
                out += bytes(o[Attribute.VALUE])
        except p11x.PKCS11Error as e:
            wipe(out)
            raise wrap_pkcs11(e, f"exporting the {derived.purpose} key for {reason}") from e
        self._outcome.setdefault("exported", []).append(record)
        return out


    def export_stored(self, reason: str) -> bytearray:
        """Wrap a stored, wrappable (CKA_EXTRACTABLE) secret key out to memory under a
        throwaway session key known to this process, and unwrap it here. The caller must wipe
        it. `reason` must be declared to `use(...)`; the export is recorded in the outcome with
        the key's KCV.

        Raises:
            TokenError: the key is not wrappable, or the token refuses every wrap mechanism.
        """
        key = self._live_key("export")
        if reason not in self._exports:
            raise InternalError(f"export for {reason!r} was not declared to use()")
        if not key.extractable:
            raise TokenError(f"key {key.name!r} is not wrappable (CKA_EXTRACTABLE is false); "
                             "only a key imported with --wrappable can leave the token")
        no_core_dumps()
        record = {"purpose": "stored", "key": key.name, "kcv": key.kcv(), "why": reason}
        self._outcome.setdefault("exported", []).append(record)  # before the bytes leave
        secret = self._wrap_out(key, reason)
        if record["kcv"] == "n/a":  # a derive-only key: its KCV from the bytes just wrapped out
            from hsmflash.formats.flashcrypt import SoftwareAes

            record["kcv"] = SoftwareAes(secret).encrypt_ecb(bytes(16))[:3].hex()
        return secret

    def _wrap_out(self, key: TokenKey, reason: str) -> bytearray:
        import secrets

        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
        from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap

        from hsmflash.token.profile import session_secret_template

        kek = bytearray(secrets.token_bytes(32))
        wrapping = None
        try:
            wrapping = self._station.session.create_object({
                Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES,
                Attribute.VALUE: bytes(kek),
                **session_secret_template(Attribute.WRAP),
            })
            last: Exception | None = None
            for mech in (Mechanism.AES_KEY_WRAP, Mechanism.AES_ECB):
                try:
                    wrapped = bytes(cast("p11t.WrapMixin", wrapping).wrap_key(  # CKA_WRAP
                        key.primary, mechanism=mech))
                except p11x.PKCS11Error as e:
                    last = e
                    continue
                if mech == Mechanism.AES_KEY_WRAP:
                    try:
                        return bytearray(aes_key_unwrap(bytes(kek), wrapped))
                    except InvalidUnwrap as e:
                        raise TokenError(f"unwrapping key {key.name!r}: integrity check "
                                         "failed") from e
                dec = Cipher(algorithms.AES(bytes(kek)), modes.ECB()).decryptor()  # noqa: S305
                return bytearray(dec.update(wrapped) + dec.finalize())
            raise TokenError(
                f"token {self._station.config.label!r} cannot wrap key {key.name!r} out for "
                f"{reason} "
                f"(CKM_AES_KEY_WRAP and CKM_AES_ECB refused: {type(last).__name__}); use a "
                "token with CKM_XOR_BASE_AND_DATA (capability xor_derivation) for this key")
        except p11x.PKCS11Error as e:
            raise wrap_pkcs11(e, f"wrapping key {key.name!r} out for {reason}") from e
        finally:
            wipe(kek)
            if wrapping is not None:
                try:
                    wrapping.destroy()
                except p11x.PKCS11Error:
                    pass

def check_master(master: TokenKey) -> None:
    """The one check that a key can be an `aes-ecb-v1` derivation master (run where the key
    derives, inside its use; whether the policy names it is `Policy.check_master`, before).

    Raises:
        InputError: not an aes-256 key; TokenError: CKA_DERIVE is false.
    """
    if master.type != "aes-256":
        raise InputError(f"master key {master.name!r} is {master.type}; aes-ecb-v1 needs an "
                         "aes-256 master")
    if "derive" not in master.usage:
        raise TokenError(f"master key {master.name!r} does not allow derivation "
                         "(CKA_DERIVE is false)")




class Station:
    """One command's access to keys. Open with `Station.open(...)` (a context manager)."""

    def __init__(self, config: TokenConfig, policy: Policy, session: p11t.Session,
                 audit: AuditLog) -> None:
        self.config = config
        self.policy = policy
        self.session = session
        self.audit = audit
        self.used_keys = False
        self._anchored = False
        self._keys: dict[str, TokenKey] = {}
        self._profile: Profile | None = None

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
            except BaseException as e:
                # the command's own error comes first; a failed checkpoint is a second line
                if st.used_keys:
                    try:
                        st.checkpoint()
                    except Error as ce:
                        e.add_note(f"{CHECKPOINT_FAILED}{ce.diagnostics()}")
                raise
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
            key_name: str | None = None,
            exports: Iterable[str] = ()) -> Iterator[KeyUse]:
        """The choke point: policy check, durable intent, the caller's token work, outcome.

        Yields the only handle through which `key` signs, encrypts, derives or is exported
        (`KeyUse`); it is also the mapping the caller adds outcome details to (never secrets).
        `key_name` names a key that does not exist yet (generate, import). `exports` declares
        every reason a per-device key may leave the token in this use (`efuse_burn`,
        `esp32_classic_transient`, `device_secrets`): each is checked against the policy before
        the intent is written, and the handle refuses any other.

        Raises:
            PolicyRefused: from `check` or an export the policy forbids, before anything is
                written or used.
            whatever the block raises, after the error outcome is recorded.
        """
        declared = frozenset(exports)
        for reason in sorted(declared):
            self.policy.check_export(reason)
        if check is not None:
            check()
        ids = self.key_id_fields(key) if key is not None else {}
        uri = self.uri(key) if key else (self.uri(key_name) if key_name else None)
        self._anchor_audit()
        with self.audit.use(op, key=uri, subject=subject or {},
                            detail=detail or {}, **ids) as outcome:
            self.used_keys = True  # the intent is written: the command ends with a checkpoint
            handle = KeyUse(self, key, outcome, declared)
            try:
                yield handle
            finally:
                handle._close()

    def _anchor_audit(self) -> None:
        """Before the first key use: tie the audit log to the token, so its tail is checked
        against the token's head (refusing a cut, rolled-back, replaced or foreign-appended
        log) and every record this command writes is tagged by the audit key."""
        if self._anchored:
            return
        session = self.session
        self.audit.anchor(Anchor(self.audit_signer(),
                                 lambda ident: find_head_store(session, ident,
                                                               self.profile().audit_head_store),
                                 TokenLogBinding(session, self.audit.path,
                                                 self.profile().audit_head_store)))
        self._anchored = True

    def supports(self, mechanism: str) -> bool:
        return supports(self.config, mechanism)

    # -- audit checkpoint -------------------------------------------------------------------
    def profile(self) -> Profile:
        """The token's probed capability profile (cached per token)."""
        if self._profile is None:
            from hsmflash.token.profile import load_profile

            self._profile = load_profile(self.config, self.session)
        return self._profile

    def audit_signer(self) -> TokenSigner:
        """The token's audit key; generated in the token on first need, sign only: ECDSA P-256
        where the token makes it, else RSA-3072 (PSS)."""
        name = self.policy.audit_key
        if not key_exists(self.session, name):
            key_type = self.profile().audit_key_type
            return TokenSigner(generate_key(self.session, name, key_type, ("sign",)))
        key = self.key(name)
        if key.type not in ("ec-p256", "rsa-3072"):
            raise TokenError(f"the audit key {name!r} is {key.type}; it must be ec-p256 or "
                             "rsa-3072 (policy [audit] key): no key is used without an audit "
                             "anchor")
        return TokenSigner(key)

    def head_store(self) -> TokenHeadStore | KeyIdHeadStore:
        ident = log_id(self.audit.path)
        if ident is None:
            raise InputError(f"audit log {self.audit.path} is empty")
        return find_head_store(self.session, ident, self.profile().audit_head_store)

    def checkpoint(self) -> None:
        """Append a checkpoint signed by the audit key and store the head in the token; the
        first checkpoint of a log also binds its path to it in the token.

        Raises:
            VerificationFailed: the log's tail is not what this command verified and wrote.
        """
        head_store = self.head_store()
        self.audit.checkpoint(self.audit_signer(), head_store,
                              key=self.uri(self.policy.audit_key))
        binding = TokenLogBinding(self.session, self.audit.path,
                                  self.profile().audit_head_store)
        ident = log_id(self.audit.path)
        if ident is not None and binding.read() is None:
            binding.write(ident)


def no_core_dumps() -> None:
    """Keep exported key material out of core dumps for the rest of this process:
    RLIMIT_CORE 0 and, on Linux, PR_SET_DUMPABLE 0 (also keeps other users' ptrace out).

    Raises:
        InternalError: the process cannot turn core dumps off.
    """
    import resource

    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ValueError, OSError) as e:
        raise InternalError(f"cannot turn core dumps off before a key export: {e}") from e
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_dumpable = 4
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(pr_set_dumpable, 0, 0, 0, 0) != 0:
            raise InternalError("cannot turn core dumps off before a key export: prctl "
                                f"errno {ctypes.get_errno()}")


def wipe(buf: bytearray) -> None:
    """Overwrite a key buffer in place (best effort in Python: the one copy we control)."""
    for i in range(len(buf)):
        buf[i] = 0

