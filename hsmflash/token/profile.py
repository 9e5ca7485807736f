"""What a token can do for hsmflash, found by trying each path once, not by reading its lists.

Mechanism lists are wrong in both directions (NSS derives with mechanisms its key slot does not
list; a p11-kit client lists what its server filters), so every capability is probed by doing
the operation on throwaway session objects (`CKA_TOKEN=false`) and checking the result against a
host computation where the key is known. The one token object a probe makes (the data-object
probe) is destroyed at once. Results are cached per token (module, label, serial, firmware) in a
JSON file, so the probe runs once per token; `token info --refresh` probes again.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import pkcs11.exceptions as p11x
from pkcs11 import MGF, Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11.constants import DEFAULT

from hsmflash.errors import Error, TokenError
from hsmflash.fileio import atomic_write

if TYPE_CHECKING:
    import pkcs11.types as p11t

    from hsmflash.formats.primitives import PublicKey
    from hsmflash.token.session import TokenConfig

PROFILE_VERSION = 1

# name -> (what it enables, what to do where the token lacks it)
CAPABILITIES: dict[str, tuple[str, str]] = {
    "aes_generate": (
        "generate AES keys in the token (masters, stored XTS keys)",
        "import espsecure key files (`keys import`) or use a token that makes AES keys"),
    "aes_import": (
        "import AES keys (migrating espsecure key files)",
        "generate the keys in the token instead"),
    "in_token_xts": (
        "XTS-AES flash encryption with the keys inside the token (CKM_AES_ECB)",
        "use a token with AES (SoftHSM2, NSS, openCryptoki, most HSMs)"),
    "in_token_derivation": (
        "aes-ecb-v1 per-device keys derived inside the token (CKM_AES_ECB_ENCRYPT_DATA)",
        "use stored per-device keys (`keys import`), or a token that derives (SoftHSM2, NSS)"),
    "xor_derivation": (
        "ESP32-classic per-block keys inside the token (CKM_XOR_BASE_AND_DATA)",
        "allow the audited transient export (policy export.esp32_classic_transient) or use "
        "a token with CKM_XOR_BASE_AND_DATA (NSS)"),
    "rsa_3072_generate": (
        "generate RSA-3072 Secure Boot V2 keys in the token",
        "import the key (`keys import --type rsa-3072`)"),
    "rsa_pss": (
        "Secure Boot V2 RSA-PSS signatures on host digests (CKM_RSA_PKCS_PSS)",
        "use a token with raw RSA-PSS"),
    "ec_p256_generate": (
        "generate ECDSA P-256 keys (SBv1, SBv2 ECDSA, audit key)",
        "use RSA-3072 (the audit key falls back to it by itself)"),
    "ecdsa_p256": (
        "ECDSA P-256 signatures on host digests (CKM_ECDSA)",
        "use RSA-3072 Secure Boot V2 signatures"),
    "ec_p384_generate": (
        "generate ECDSA P-384 keys (SBv2 ECDSA on newer chips)",
        "use RSA-3072 Secure Boot V2 signatures"),
    "ecdsa_p384": (
        "ECDSA P-384 signatures on host digests (CKM_ECDSA)",
        "use RSA-3072 Secure Boot V2 signatures"),
    "data_objects": (
        "token data objects (CKO_DATA) for the audit head",
        "none needed: the audit head is kept in the CKA_ID of a usage-less key object"),
}

_EC_PARAMS = {
    "p256": bytes.fromhex("06082a8648ce3d030107"),
    "p384": bytes.fromhex("06052b81040022"),
}


class _DerivationString(ctypes.Structure):
    """CK_KEY_DERIVATION_STRING_DATA { CK_BYTE_PTR pData; CK_ULONG ulLen; }"""

    _fields_ = (("data", ctypes.c_void_p), ("length", ctypes.c_ulong))


def xor_derive(base: p11t.DeriveMixin, data: bytes, template: dict[Attribute, bool],
               bits: int = 256) -> p11t.SecretKey:
    """`C_DeriveKey(base, CKM_XOR_BASE_AND_DATA, data)`: a new session key `base XOR data`.

    python-pkcs11 builds the CK_KEY_DERIVATION_STRING_DATA struct only for
    CKM_AES_ECB_ENCRYPT_DATA and passes any other parameter through as the struct's bytes, so
    the struct is built here (pointer + length) and its bytes handed over; the buffer it points
    to lives until the call returns.

    Raises:
        pkcs11.PKCS11Error: the token refuses.
    """
    buf = ctypes.create_string_buffer(data, len(data))
    param = _DerivationString(ctypes.cast(buf, ctypes.c_void_p), len(data))
    try:
        return base.derive_key(
            KeyType.AES, bits, mechanism=Mechanism.XOR_BASE_AND_DATA,
            mechanism_param=bytes(param), template=template,
        )
    finally:
        ctypes.memset(buf, 0, len(data))
        del buf


def session_secret_template(*flags: Attribute) -> dict[Attribute, bool]:
    """A throwaway AES session key template that sets only what must be set."""
    tpl: dict[Attribute, bool] = {Attribute.TOKEN: False, Attribute.SENSITIVE: True,
                                  Attribute.EXTRACTABLE: False}
    for f in flags:
        tpl[f] = True
    return tpl


@dataclass
class Profile:
    """The probed capabilities of one token."""

    token: dict[str, str]
    results: dict[str, bool]
    notes: dict[str, str] = field(default_factory=dict)
    probed_at: str = ""
    cached: bool = False

    def has(self, capability: str) -> bool:
        return bool(self.results.get(capability, False))

    def require(self, capability: str, purpose: str) -> None:
        """Raise TokenError naming the missing capability and what to do instead."""
        if not self.has(capability):
            raise capability_refusal(self.token.get("label", "?"), capability, purpose)

    @property
    def audit_key_type(self) -> str:
        """The audit key's type: ECDSA P-256 where the token makes it, else RSA-3072-PSS."""
        if self.has("ec_p256_generate") and self.has("ecdsa_p256"):
            return "ec-p256"
        return "rsa-3072"

    @property
    def audit_head_store(self) -> str:
        """Where the audit head lives: a CKO_DATA object, else a key object's CKA_ID."""
        return "data-object" if self.has("data_objects") else "key-id"

    def to_json(self) -> dict[str, Any]:
        return {"version": PROFILE_VERSION, "token": self.token, "results": self.results,
                "notes": self.notes, "probed_at": self.probed_at,
                "audit_key_type": self.audit_key_type,
                "audit_head_store": self.audit_head_store}


def capability_refusal(label: str, capability: str, purpose: str,
                       instead: str | None = None) -> TokenError:
    """The one refusal for a missing capability: names it, what needs it, what to do instead."""
    what, default_instead = CAPABILITIES[capability]
    return TokenError(
        f"token {label!r} cannot do {purpose}: missing capability {capability} ({what}); "
        f"instead: {instead or default_instead} (see `hsmflash token info`)")


def token_identity(config: TokenConfig) -> dict[str, str]:
    """Module path, label, serial, manufacturer, model, firmware: the cache key's parts."""
    token = config.token()
    slot = token.slot
    fw = getattr(slot, "firmware_version", None)
    try:
        info_fw = token.firmware_version  # python-pkcs11 exposes it on some versions
    except AttributeError:
        info_fw = None
    serial = token.serial
    return {
        "module": str(Path(config.module_path).resolve()),
        "label": str(token.label),
        "serial": serial.decode(errors="replace") if isinstance(serial, bytes) else str(serial),
        "manufacturer": str(token.manufacturer_id),
        "model": str(token.model),
        "firmware": str(info_fw or fw or ""),
    }


def _cache_key(ident: dict[str, str]) -> str:
    text = "\x00".join(ident[k] for k in sorted(ident))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def default_cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "hsmflash" / "token-profiles.json"


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def load_profile(config: TokenConfig, session: p11t.Session, *, cache: Path | None = None,
                 refresh: bool = False) -> Profile:
    """The token's profile: from the cache, else probed now (logged-in session) and cached.

    Raises:
        TokenError: the token cannot be reached.
    """
    ident = token_identity(config)
    path = cache or default_cache_path()
    key = _cache_key(ident)
    entries = _read_cache(path)
    entry = entries.get(key)
    if not refresh and isinstance(entry, dict) and entry.get("version") == PROFILE_VERSION:
        return Profile(ident, dict(entry["results"]), dict(entry.get("notes", {})),
                       str(entry.get("probed_at", "")), cached=True)
    profile = probe(session, ident)
    entries[key] = profile.to_json()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(entries, indent=1, sort_keys=True).encode(), mode=0o600)
    except (OSError, Error):  # a cache that cannot be written is no error
        pass
    return profile


def cached_profile(config: TokenConfig, *, cache: Path | None = None) -> Profile | None:
    """The cached profile, if any, without logging in (for `token info` with no PIN)."""
    ident = token_identity(config)
    entry = _read_cache(cache or default_cache_path()).get(_cache_key(ident))
    if isinstance(entry, dict) and entry.get("version") == PROFILE_VERSION:
        return Profile(ident, dict(entry["results"]), dict(entry.get("notes", {})),
                       str(entry.get("probed_at", "")), cached=True)
    return None


# -- the probes -------------------------------------------------------------------------------
def verify_digest(public: PublicKey, signature: bytes, digest: bytes) -> bool:
    """Check a raw token signature (RSA-PSS salt 32, or ECDSA r||s) over a host digest."""
    from hsmflash.formats.primitives import verify_digest_signature

    return verify_digest_signature(public, signature, digest)


class _Wrong(Exception):
    """The token answered, but not with the right bytes."""


def _aes_ecb(key: bytes, data: bytes) -> bytes:
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    enc = Cipher(algorithms.AES(key), modes.ECB()).encryptor()  # noqa: S305 - a KAT
    return enc.update(data) + enc.finalize()


def probe(session: p11t.Session, ident: dict[str, str]) -> Profile:
    """Try every path on throwaway session objects; nothing is left in the token."""
    results: dict[str, bool] = {}
    notes: dict[str, str] = {}
    made: list[p11t.Object] = []

    def attempt(name: str, fn: Callable[[], None]) -> bool:
        try:
            fn()
            results[name] = True
        except _Wrong as e:
            results[name] = False
            notes[name] = f"wrong result: {e}"
        except p11x.PKCS11Error as e:
            results[name] = False
            notes[name] = type(e).__name__
        except (NotImplementedError, ValueError, TypeError, AttributeError) as e:
            results[name] = False
            notes[name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        return results[name]

    known = secrets.token_bytes(32)
    keys: dict[str, p11t.Object] = {}

    def gen_aes() -> None:
        keys["gen"] = session.generate_key(
            KeyType.AES, 256, store=False, capabilities=MechanismFlag(0),
            template=session_secret_template(Attribute.ENCRYPT, Attribute.DERIVE))
        made.append(keys["gen"])

    def import_aes() -> None:
        keys["known"] = session.create_object({
            Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES,
            Attribute.VALUE: known, **session_secret_template(Attribute.ENCRYPT, Attribute.DERIVE),
        })
        made.append(keys["known"])

    try:
        attempt("aes_generate", gen_aes)
        attempt("aes_import", import_aes)
        base = keys.get("known") or keys.get("gen")
        value = known if "known" in keys else None
        block = secrets.token_bytes(32)

        def xts() -> None:
            if base is None:
                raise _Wrong("no AES key could be made (generate and import both refused)")
            # made with CKA_ENCRYPT and CKA_DERIVE, so python-pkcs11 built it with those
            # mixins; bytes in, bytes out (its stub also allows an iterator)
            enc = cast("p11t.EncryptMixin", base).encrypt(block, mechanism=Mechanism.AES_ECB)
            out = bytes(cast(bytes, enc))
            if value is not None and out != _aes_ecb(value, block):
                raise _Wrong("AES-ECB output differs from the reference")

        def check_derived(obj: p11t.SecretKey, expected_key: bytes | None) -> None:
            made.append(obj)
            enc = cast("p11t.EncryptMixin", obj).encrypt(  # derived with CKA_ENCRYPT
                bytes(16), mechanism=Mechanism.AES_ECB)
            out = bytes(cast(bytes, enc))
            if expected_key is not None and out != _aes_ecb(expected_key, bytes(16)):
                raise _Wrong("derived key differs from the reference")

        def derive_ecb() -> None:
            if base is None:
                raise _Wrong("no AES key could be made")
            obj = cast("p11t.DeriveMixin", base).derive_key(
                KeyType.AES, 256, mechanism=Mechanism.AES_ECB_ENCRYPT_DATA,
                mechanism_param=block, template=session_secret_template(Attribute.ENCRYPT))
            check_derived(obj, _aes_ecb(value, block) if value is not None else None)

        def derive_xor() -> None:
            if base is None:
                raise _Wrong("no AES key could be made")
            obj = xor_derive(cast("p11t.DeriveMixin", base), block,
                             session_secret_template(Attribute.ENCRYPT))
            expected = bytes(a ^ b for a, b in zip(value, block, strict=True)) if value else None
            check_derived(obj, expected)

        attempt("in_token_xts", xts)
        attempt("in_token_derivation", derive_ecb)
        attempt("xor_derivation", derive_xor)
    finally:
        for obj in made:
            try:
                obj.destroy()
            except p11x.PKCS11Error:
                pass
        made.clear()

    digest32 = hashlib.sha256(b"hsmflash probe").digest()
    digest48 = hashlib.sha384(b"hsmflash probe").digest()
    pairs: dict[str, tuple[p11t.PublicKey, p11t.PrivateKey]] = {}
    _GENERATE = {"rsa": "rsa_3072_generate", "p256": "ec_p256_generate",  # noqa: N806
                 "p384": "ec_p384_generate"}

    def keypair(name: str, key_type: KeyType, bits: int, params: bytes | None) -> None:
        pub_tpl: dict[Attribute, object] = dict(KEYPAIR_PUBLIC_MINIMAL)
        if params is not None:
            pub_tpl[Attribute.EC_PARAMS] = params
        else:
            pub_tpl[Attribute.PUBLIC_EXPONENT] = b"\x01\x00\x01"
        # tpm2-pkcs11 makes key pairs only as token objects: then one is made and destroyed
        for store in (False, True):
            try:
                pub, priv = session.generate_keypair(
                    key_type, bits if params is None else None, store=store,
                    label="hsmflash-probe", capabilities=MechanismFlag(0),
                    mechanism=Mechanism.EC_KEY_PAIR_GEN if params is not None else None,
                    public_template=pub_tpl, private_template=dict(KEYPAIR_PRIVATE_MINIMAL))
            except (p11x.AttributeValueInvalid, p11x.TemplateInconsistent):
                if store:
                    raise
                continue
            made.extend([pub, priv])
            pairs[name] = (pub, priv)
            if store:
                notes[_GENERATE[name]] = "key pairs only as token objects (made, then destroyed)"
            return

    def sign(name: str, key_type: str, digest: bytes) -> Callable[[], None]:
        def run() -> None:
            if name not in pairs:
                raise _Wrong("no key pair could be generated")
            from hsmflash.token.keys import public_from_object

            pub, pair_private = pairs[name]
            priv = cast("p11t.SignMixin", pair_private)  # made with CKA_SIGN
            if key_type == "rsa-3072":
                sig = bytes(priv.sign(digest, mechanism=Mechanism.RSA_PKCS_PSS,
                                      mechanism_param=(Mechanism.SHA256, MGF.SHA256, 32)))
            else:
                sig = bytes(priv.sign(digest, mechanism=Mechanism.ECDSA))
            if not verify_digest(public_from_object(pub, key_type), sig, digest):
                raise _Wrong("signature does not verify")
        return run

    try:
        attempt("rsa_3072_generate", lambda: keypair("rsa", KeyType.RSA, 3072, None))
        attempt("rsa_pss", sign("rsa", "rsa-3072", digest32))
        attempt("ec_p256_generate", lambda: keypair("p256", KeyType.EC, 0, _EC_PARAMS["p256"]))
        attempt("ecdsa_p256", sign("p256", "ec-p256", digest32))
        attempt("ec_p384_generate", lambda: keypair("p384", KeyType.EC, 0, _EC_PARAMS["p384"]))
        attempt("ecdsa_p384", sign("p384", "ec-p384", digest48))
    finally:
        for obj in made:
            try:
                obj.destroy()
            except p11x.PKCS11Error:
                pass

    def data_object() -> None:
        value = secrets.token_bytes(16)
        obj = session.create_object({
            Attribute.CLASS: ObjectClass.DATA, Attribute.TOKEN: True, Attribute.PRIVATE: True,
            Attribute.LABEL: "hsmflash-probe", Attribute.APPLICATION: "hsmflash",
            Attribute.VALUE: value,
        })
        try:
            if bytes(obj[Attribute.VALUE]) != value:
                raise _Wrong("data object reads back different bytes")
        finally:
            obj.destroy()

    attempt("data_objects", data_object)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return Profile(ident, results, notes, stamp)


# Key-pair templates that set only what must be set: tpm2-pkcs11 checks a template against the
# TPM's own view of the key and rejects explicit false usage flags ("attr mismatch").
# (a public template with CKA_VERIFY=true even gives the private key CKA_DECRYPT=true there).
# (values: True or python-pkcs11's DEFAULT sentinel, which its constants type as object)
KEYPAIR_PUBLIC_MINIMAL: dict[Attribute, object] = {
    Attribute.VERIFY: DEFAULT, Attribute.ENCRYPT: DEFAULT, Attribute.WRAP: DEFAULT,
}
KEYPAIR_PRIVATE_MINIMAL: dict[Attribute, object] = {
    Attribute.SIGN: True, Attribute.DECRYPT: DEFAULT, Attribute.UNWRAP: DEFAULT,
    Attribute.DERIVE: DEFAULT,
}
