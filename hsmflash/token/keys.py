"""Keys in the token: generate, import (migration from espsecure key files), list, public.

Every key hsmflash makes is `CKA_SENSITIVE=true`, `CKA_EXTRACTABLE=false` and carries only the
usage flags it needs (invariant 1). An XTS key (`xts-aes-128`/`-256`, one espsecure key file of
32/64 bytes) is held as two AES objects labelled `NAME.k1` (data key) and `NAME.k2` (tweak key).
Secret bytes handed to `import_key` are never copied into messages.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field
from typing import Any

import pkcs11.exceptions as p11x
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass

from hsmflash.errors import InputError, TokenError
from hsmflash.formats.primitives import PublicKey, fingerprint
from hsmflash.token.session import wrap_pkcs11

KEY_TYPES: dict[str, str] = {
    "aes-128": "AES-128 secret key",
    "aes-256": "AES-256 secret key (master keys, SBv1 bootloader key, ESP32 flash key)",
    "xts-aes-128": "XTS-AES-128 flash-encryption key (32-byte espsecure file; two AES-128 objects)",
    "xts-aes-256": "XTS-AES-256 flash-encryption key (64-byte espsecure file; two AES-256 objects)",
    "rsa-3072": "RSA-3072 Secure Boot V2 signing key",
    "ec-p256": "ECDSA P-256 signing key (SBv1, SBv2 ECDSA, audit checkpoints)",
    "ec-p384": "ECDSA P-384 Secure Boot V2 signing key",
}
USAGES = ("sign", "derive", "encrypt", "wrap")
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
_CURVES: dict[str, tuple[str, ec.EllipticCurve]] = {
    "ec-p256": ("secp256r1", ec.SECP256R1()),
    "ec-p384": ("secp384r1", ec.SECP384R1()),
}
# DER-encoded ECParameters (namedCurve OIDs), as CKA_EC_PARAMS holds them
_EC_PARAMS = {
    "secp256r1": bytes.fromhex("06082a8648ce3d030107"),  # 1.2.840.10045.3.1.7
    "secp384r1": bytes.fromhex("06052b81040022"),  # 1.3.132.0.34
}


def encode_named_curve_parameters(curve: str) -> bytes:
    return _EC_PARAMS[curve]


_AES_BITS = {"aes-128": 128, "aes-256": 256, "xts-aes-128": 128, "xts-aes-256": 256}
XTS_PARTS = (".k1", ".k2")
AUDIT_HEAD_LABEL = "hsmflash-audit-head"

_SECRET_FLAGS = {
    "derive": (Attribute.DERIVE,),
    "encrypt": (Attribute.ENCRYPT, Attribute.DECRYPT),
    "wrap": (Attribute.WRAP, Attribute.UNWRAP),
}
_ALL_SECRET_FLAGS = (
    Attribute.DERIVE, Attribute.ENCRYPT, Attribute.DECRYPT, Attribute.WRAP, Attribute.UNWRAP,
    Attribute.SIGN, Attribute.VERIFY,
)


def check_type_usage(key_type: str, usage: tuple[str, ...] | list[str] | None) -> tuple[str, ...]:
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


@dataclass
class TokenKey:
    """A named hsmflash key as found in the token (one or two objects, or a key pair)."""

    name: str
    type: str
    objects: list[Any] = field(repr=False)
    public: Any = field(default=None, repr=False)

    @property
    def primary(self) -> Any:
        """The secret or private object.

        Raises:
            TokenError: only the public half is visible (not logged in, or no private key).
        """
        if not self.objects:
            raise TokenError(f"key {self.name!r}: the private key is not available "
                             "(log in with the PIN, or the token holds only the public key)")
        return self.objects[0]

    def attr(self, attribute: Attribute, obj: Any = None) -> Any:
        try:
            return (obj or (self.objects[0] if self.objects else self.public))[attribute]
        except (p11x.AttributeSensitive, p11x.AttributeTypeInvalid):
            return None

    @functools.cached_property
    def usage(self) -> tuple[str, ...]:
        """Usage flags, read once: hsmflash's keys are CKA_MODIFIABLE=false."""
        if self.type in _CURVES or self.type == "rsa-3072":
            return ("sign",) if self.attr(Attribute.SIGN) else ()
        out = [u for u, flags in _SECRET_FLAGS.items() if self.attr(flags[0])]
        return tuple(out)

    @property
    def sensitive(self) -> bool:
        return all(bool(self.attr(Attribute.SENSITIVE, o)) for o in self.objects)

    @property
    def extractable(self) -> bool:
        return any(bool(self.attr(Attribute.EXTRACTABLE, o)) for o in self.objects)

    @property
    def origin(self) -> str:
        local = all(self.attr(Attribute.LOCAL, o) for o in self.objects)
        return "generated" if local else "imported"

    def kcv(self) -> str:
        """AES: the check value(s) as hex, two joined by '/' for an XTS pair."""
        parts = []
        for o in self.objects:
            value = self.attr(Attribute.CHECK_VALUE, o)
            parts.append(bytes(value).hex() if value else "?")
        return "/".join(parts)

    def public_key(self) -> PublicKey:
        """The public half as a cryptography object (read from the token once: hsmflash's
        keys are CKA_MODIFIABLE=false).

        Raises:
            InputError: this is a secret key, with no public half.
            TokenError: the public object is missing.
        """
        if self.type not in _CURVES and self.type != "rsa-3072":
            raise InputError(f"key {self.name!r} is a {self.type} secret key; it has no public key")
        if self.public is None:
            raise TokenError(f"key {self.name!r}: public key object missing from the token")
        return self._public_key

    @functools.cached_property
    def _public_key(self) -> PublicKey:
        return public_from_object(self.public, self.type)

    def fingerprint(self) -> str:
        """`sha256:` + hex SHA-256 of the DER SubjectPublicKeyInfo."""
        return fingerprint(self.public_key())

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "name": self.name,
            "type": self.type,
            "usage": list(self.usage),
            "sensitive": self.sensitive,
            "extractable": self.extractable,
            "origin": self.origin,
        }
        if self.type in _AES_BITS:
            info["kcv"] = self.kcv()
        else:
            info["fingerprint"] = self.fingerprint()
        return info


def public_from_object(obj: Any, key_type: str) -> PublicKey:
    """Build a cryptography public key from a PKCS#11 public key object."""
    if key_type == "rsa-3072":
        n = int.from_bytes(obj[Attribute.MODULUS], "big")
        e = int.from_bytes(obj[Attribute.PUBLIC_EXPONENT], "big")
        return rsa.RSAPublicNumbers(e, n).public_key()
    point = bytes(obj[Attribute.EC_POINT])
    # EC_POINT is a DER OCTET STRING around the uncompressed point (some tokens send it raw)
    if point[0] == 0x04 and len(point) > 2 and point[1] + 2 == len(point):
        point = point[2:]
    elif point[0] == 0x04 and point[1] == 0x81:
        point = point[3:]
    return ec.EllipticCurvePublicKey.from_encoded_point(_CURVES[key_type][1], point)


def _type_of(obj: Any, label: str) -> str:
    kt = obj[Attribute.KEY_TYPE]
    if kt == KeyType.AES:
        bits = int(obj[Attribute.VALUE_LEN]) * 8
        if label.endswith(XTS_PARTS):
            return f"xts-aes-{bits}"
        return f"aes-{bits}"
    if kt == KeyType.RSA:
        return f"rsa-{len(bytes(obj[Attribute.MODULUS]).lstrip(bytes(1))) * 8}"
    if kt == KeyType.EC:
        params = bytes(obj[Attribute.EC_PARAMS])
        for name, (curve, _) in _CURVES.items():
            if params == encode_named_curve_parameters(curve):
                return name
        return "ec-unknown"
    return f"unknown-{kt}"


def _objects_by_label(session: Any) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for cls in (ObjectClass.SECRET_KEY, ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY):
        for obj in session.get_objects({Attribute.CLASS: cls, Attribute.TOKEN: True}):
            out.setdefault(str(obj[Attribute.LABEL]), []).append(obj)
    return out


def _assemble(name: str, objs: dict[str, list[Any]]) -> TokenKey | None:
    if name + ".k1" in objs and name + ".k2" in objs:
        k1, k2 = objs[name + ".k1"][0], objs[name + ".k2"][0]
        return TokenKey(name, _type_of(k1, name + ".k1"), [k1, k2])
    found = objs.get(name)
    if not found:
        return None
    secret = [o for o in found if o.object_class == ObjectClass.SECRET_KEY]
    if secret:
        return TokenKey(name, _type_of(secret[0], name), [secret[0]])
    private = [o for o in found if o.object_class == ObjectClass.PRIVATE_KEY]
    public = [o for o in found if o.object_class == ObjectClass.PUBLIC_KEY]
    if private:
        pub = public[0] if public else None
        return TokenKey(name, _type_of(private[0], name), [private[0]], pub)
    if public:
        return TokenKey(name, _type_of(public[0], name), [], public[0])
    return None


def find_key(session: Any, name: str, token_label: str = "") -> TokenKey:
    """Find the key called `name`.

    Raises:
        TokenError: no such key (exit 4), naming the key and the token.
    """
    objs: dict[str, list[Any]] = {}
    for label in (name, name + ".k1", name + ".k2"):
        for obj in session.get_objects({Attribute.LABEL: label, Attribute.TOKEN: True}):
            if obj.object_class in (
                ObjectClass.SECRET_KEY, ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY
            ):
                objs.setdefault(label, []).append(obj)
    key = _assemble(name, objs)
    if key is None or (not key.objects and key.public is None):
        where = f" in token {token_label!r}" if token_label else ""
        raise TokenError(f"no key {name!r}{where} (see `hsmflash keys list`)")
    return key


def list_keys(session: Any) -> list[TokenKey]:
    """Every hsmflash-shaped key in the token, sorted by name."""
    objs = _objects_by_label(session)
    names = set()
    for label in objs:
        base = label[:-3] if label.endswith(XTS_PARTS) else label
        names.add(base)
    keys = []
    for name in sorted(names):
        key = _assemble(name, objs)
        if key is not None:
            keys.append(key)
    return keys


def key_exists(session: Any, name: str) -> bool:
    for label in (name, name + ".k1", name + ".k2"):
        if next(iter(session.get_objects({Attribute.LABEL: label, Attribute.TOKEN: True})), None):
            return True
    return False


def _secret_template(usage: tuple[str, ...]) -> dict[Attribute, Any]:
    template: dict[Attribute, Any] = {a: False for a in _ALL_SECRET_FLAGS}
    for u in usage:
        for a in _SECRET_FLAGS[u]:
            template[a] = True
    template.update({
        Attribute.TOKEN: True,
        Attribute.PRIVATE: True,
        Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: False,
        Attribute.MODIFIABLE: False,
    })
    return template


def _private_template() -> dict[Attribute, Any]:
    return {
        Attribute.TOKEN: True,
        Attribute.PRIVATE: True,
        Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: False,
        Attribute.SIGN: True,
        Attribute.DECRYPT: False,
        Attribute.UNWRAP: False,
        Attribute.DERIVE: False,
        Attribute.MODIFIABLE: False,
    }


def _public_template() -> dict[Attribute, Any]:
    return {
        Attribute.TOKEN: True,
        Attribute.PRIVATE: False,
        Attribute.VERIFY: True,
        Attribute.ENCRYPT: False,
        Attribute.WRAP: False,
        Attribute.MODIFIABLE: False,
    }


def _refuse_existing(session: Any, name: str) -> None:
    if key_exists(session, name):
        raise InputError(f"a key named {name!r} already exists in the token")


def generate_key(session: Any, name: str, key_type: str, usage: tuple[str, ...] = ()) -> TokenKey:
    """Generate a key inside the token (sensitive, non-extractable, only `usage`).

    Raises:
        InputError: bad name/type/usage, or the name is taken.
        TokenError: the token refuses (missing mechanism, read-only, ...).
    """
    usage = check_type_usage(key_type, usage)
    _refuse_existing(session, name)
    key_id = hashlib.sha256(name.encode()).digest()[:16]
    try:
        if key_type in ("aes-128", "aes-256"):
            session.generate_key(
                KeyType.AES, _AES_BITS[key_type], label=name, id=key_id, store=True,
                capabilities=MechanismFlag(0), template=_secret_template(usage),
            )
        elif key_type.startswith("xts-"):
            for part in XTS_PARTS:
                session.generate_key(
                    KeyType.AES, _AES_BITS[key_type], label=name + part, id=key_id, store=True,
                    capabilities=MechanismFlag(0), template=_secret_template(usage),
                )
        elif key_type == "rsa-3072":
            session.generate_keypair(
                KeyType.RSA, 3072, label=name, id=key_id, store=True,
                capabilities=MechanismFlag.SIGN | MechanismFlag.VERIFY,
                public_template={**_public_template(), Attribute.PUBLIC_EXPONENT: b"\x01\x00\x01"},
                private_template=_private_template(),
            )
        else:
            params = encode_named_curve_parameters(_CURVES[key_type][0])
            session.generate_keypair(
                KeyType.EC, label=name, id=key_id, store=True,
                capabilities=MechanismFlag.SIGN | MechanismFlag.VERIFY,
                public_template={**_public_template(), Attribute.EC_PARAMS: params},
                private_template=_private_template(),
                mechanism=Mechanism.EC_KEY_PAIR_GEN,
            )
    except p11x.PKCS11Error as e:
        raise wrap_pkcs11(e, f"generating {key_type} key {name!r}") from e
    return find_key(session, name)


def import_key(
    session: Any, name: str, key_type: str, material: bytes | bytearray,
    usage: tuple[str, ...] = (), *, source: str = "key file",
) -> TokenKey:
    """Import an espsecure key file (raw AES bytes, or a PEM private key) into the token.

    The imported key becomes sensitive and non-extractable. The caller should tell the user to
    destroy the source file.

    Raises:
        InputError: the material does not fit `key_type` (message names `source`, never bytes).
        TokenError: the token refuses.
    """
    usage = check_type_usage(key_type, usage)
    _refuse_existing(session, name)
    key_id = hashlib.sha256(name.encode()).digest()[:16]
    try:
        if key_type in _AES_BITS:
            size = _AES_BITS[key_type] // 8
            parts = 2 if key_type.startswith("xts-") else 1
            if len(material) != size * parts:
                raise InputError(
                    f"{source}: a {key_type} key file holds {size * parts} raw bytes, "
                    f"this one has {len(material)}"
                )
            labels = [name + p for p in XTS_PARTS] if parts == 2 else [name]
            for i, label in enumerate(labels):
                session.create_object({
                    Attribute.CLASS: ObjectClass.SECRET_KEY,
                    Attribute.KEY_TYPE: KeyType.AES,
                    Attribute.LABEL: label,
                    Attribute.ID: key_id,
                    Attribute.VALUE: bytes(material[i * size:(i + 1) * size]),
                    **_secret_template(usage),
                })
        else:
            private = _load_private_pem(material, key_type, source)
            _create_private(session, name, key_id, key_type, private)
    except p11x.PKCS11Error as e:
        raise wrap_pkcs11(e, f"importing {key_type} key {name!r}") from e
    return find_key(session, name)


def _load_private_pem(material: bytes | bytearray, key_type: str, source: str) -> Any:
    from cryptography.hazmat.primitives import serialization

    try:
        private = serialization.load_pem_private_key(bytes(material), password=None)
    except (ValueError, TypeError):
        raise InputError(
            f"{source}: not an unencrypted PEM private key (espsecure generate-signing-key format)"
        ) from None
    if key_type == "rsa-3072":
        if not isinstance(private, rsa.RSAPrivateKey) or private.key_size != 3072:
            raise InputError(f"{source}: not an RSA-3072 private key")
    else:
        curve = _CURVES[key_type][1]
        if not isinstance(private, ec.EllipticCurvePrivateKey) or private.curve.name != curve.name:
            raise InputError(f"{source}: not a {key_type} (curve {curve.name}) private key")
    return private


def _create_private(session: Any, name: str, key_id: bytes, key_type: str, private: Any) -> None:
    def be(v: int) -> bytes:
        return v.to_bytes((v.bit_length() + 7) // 8 or 1, "big")

    common = {Attribute.LABEL: name, Attribute.ID: key_id}
    if key_type == "rsa-3072":
        pn = private.private_numbers()
        pub = pn.public_numbers
        session.create_object({
            Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.KEY_TYPE: KeyType.RSA,
            Attribute.MODULUS: be(pub.n), Attribute.PUBLIC_EXPONENT: be(pub.e),
            Attribute.PRIVATE_EXPONENT: be(pn.d), Attribute.PRIME_1: be(pn.p),
            Attribute.PRIME_2: be(pn.q), Attribute.EXPONENT_1: be(pn.dmp1),
            Attribute.EXPONENT_2: be(pn.dmq1), Attribute.COEFFICIENT: be(pn.iqmp),
            **common, **_private_template(),
        })
        session.create_object({
            Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.KEY_TYPE: KeyType.RSA,
            Attribute.MODULUS: be(pub.n), Attribute.PUBLIC_EXPONENT: be(pub.e),
            **common, **_public_template(),
        })
    else:
        params = encode_named_curve_parameters(_CURVES[key_type][0])
        size = (private.curve.key_size + 7) // 8
        numbers = private.public_key().public_numbers()
        point = b"\x04" + numbers.x.to_bytes(size, "big") + numbers.y.to_bytes(size, "big")
        session.create_object({
            Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.KEY_TYPE: KeyType.EC,
            Attribute.EC_PARAMS: params,
            Attribute.VALUE: private.private_numbers().private_value.to_bytes(size, "big"),
            **common, **_private_template(),
        })
        session.create_object({
            Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.KEY_TYPE: KeyType.EC,
            Attribute.EC_PARAMS: params,
            Attribute.EC_POINT: bytes([0x04, len(point)]) + point,
            **common, **_public_template(),
        })
