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
from typing import Any, cast

import pkcs11.exceptions as p11x
import pkcs11.types as p11t
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass

from hsmflash.errors import InputError, TokenError
from hsmflash.formats.primitives import PublicKey, fingerprint
from hsmflash.keytypes import check_type_usage
from hsmflash.token.session import wrap_pkcs11

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
# The attribute values hsmflash puts in templates (flags, sizes, labels, IDs, key values;
# ObjectClass and KeyType are ints); python-pkcs11 takes dict[Attribute, Any].
AttributeTemplate = dict[Attribute, bool | int | str | bytes]


@dataclass
class TokenKey:
    """A named hsmflash key as found in the token (one or two objects, or a key pair)."""

    name: str
    type: str  # a KeyTypeName, or what a foreign key is (rsa-2048, aes-unknown ...)
    objects: list[p11t.Key] = field(repr=False)
    public: p11t.PublicKey | None = field(default=None, repr=False)

    @property
    def primary(self) -> p11t.Key:
        """The secret or private object.

        Raises:
            TokenError: only the public half is visible (not logged in, or no private key).
        """
        if not self.objects:
            raise TokenError(f"key {self.name!r}: the private key is not available "
                             "(log in with the PIN, or the token holds only the public key)")
        return self.objects[0]

    def attr(self, attribute: Attribute, obj: p11t.Object | None = None) -> Any:
        """An attribute, or None where the token does not have or show it."""
        target = obj or (self.objects[0] if self.objects else self.public)
        # a TokenKey holds its secret/private objects or its public one
        return read_attr(cast(p11t.Object, target), attribute)

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
        """"generated" only where the token says CKA_LOCAL; "imported" where the key was not
        always sensitive; else "unknown": NSS reports CKA_LOCAL=false for keys it generated,
        so CKA_LOCAL=false alone proves nothing."""
        if not self.objects:
            return "unknown"
        if all(self.attr(Attribute.LOCAL, o) is True for o in self.objects):
            return "generated"
        if any(self.attr(Attribute.ALWAYS_SENSITIVE, o) is False for o in self.objects):
            return "imported"
        return "unknown"

    def kcv(self) -> str:
        """AES: the check value(s) as hex, two joined by '/' for an XTS pair.

        CKA_CHECK_VALUE where the token gives one; otherwise computed as AES-ECB_K(0^16)[:3]
        where the key may encrypt; "n/a" where it can do neither (never a guess).
        """
        return "/".join(object_kcv(o) for o in self.objects) if self.objects else "n/a"

    def public_key(self) -> PublicKey:
        """The public half as a cryptography object (read from the token once: hsmflash's
        keys are CKA_MODIFIABLE=false).

        Raises:
            InputError: this is a secret key, with no public half.
            TokenError: the public object is missing.
        """
        if self.type not in _CURVES and self.type != "rsa-3072":
            raise InputError(f"key {self.name!r} is a secret key ({self.type}): no public key")
        if self.public is None:
            raise TokenError(f"key {self.name!r}: public key object missing from the token")
        return self._public_key

    @functools.cached_property
    def _public_key(self) -> PublicKey:
        # public_key() has checked that the public object is there
        return public_from_object(cast(p11t.PublicKey, self.public), self.type)

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


def read_attr(obj: p11t.Object, attribute: Attribute) -> Any:
    """An attribute's value, or None where the token lacks it, hides it or cannot read it."""
    try:
        return obj[attribute]
    except (p11x.AttributeSensitive, p11x.AttributeTypeInvalid, p11x.FunctionFailed,
            p11x.GeneralError):
        return None


def object_kcv(obj: p11t.Key) -> str:
    """The KCV of one AES object: CKA_CHECK_VALUE, else computed with CKA_ENCRYPT, else n/a."""
    value = read_attr(obj, Attribute.CHECK_VALUE)
    if value:
        return bytes(value)[:3].hex()
    if read_attr(obj, Attribute.ENCRYPT):
        try:
            # CKA_ENCRYPT is set, so python-pkcs11 gave the object its EncryptMixin; bytes in,
            # bytes out (its stub also allows an iterator)
            out = cast(p11t.EncryptMixin, obj).encrypt(bytes(16), mechanism=Mechanism.AES_ECB)
            return bytes(cast(bytes, out))[:3].hex()
        except p11x.PKCS11Error:
            pass
    return "n/a"


def public_from_object(obj: p11t.PublicKey, key_type: str) -> PublicKey:
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


def _type_of(obj: p11t.Key, label: str) -> str:
    kt = obj[Attribute.KEY_TYPE]
    if kt == KeyType.AES:
        length = read_attr(obj, Attribute.VALUE_LEN)  # openCryptoki: absent on imported keys
        if length is None:
            return "aes-unknown"
        bits = int(length) * 8
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


def _objects_by_label(session: p11t.Session) -> dict[str, list[p11t.Key]]:
    out: dict[str, list[p11t.Key]] = {}
    for cls in (ObjectClass.SECRET_KEY, ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY):
        for obj in session.get_objects({Attribute.CLASS: cls, Attribute.TOKEN: True}):
            # python-pkcs11 makes key classes' objects p11t.Key instances: always true here
            if isinstance(obj, p11t.Key):
                out.setdefault(str(obj[Attribute.LABEL]), []).append(obj)
    return out


def _assemble(name: str, objs: dict[str, list[p11t.Key]]) -> TokenKey | None:
    if name + ".k1" in objs and name + ".k2" in objs:
        k1, k2 = objs[name + ".k1"][0], objs[name + ".k2"][0]
        return TokenKey(name, _type_of(k1, name + ".k1"), [k1, k2])
    found = objs.get(name)
    if not found:
        return None
    # (python-pkcs11's classes for CKO_SECRET_KEY etc. are these p11t classes' subclasses)
    secret = [o for o in found if isinstance(o, p11t.SecretKey)]
    if secret:
        return TokenKey(name, _type_of(secret[0], name), [secret[0]])
    private = [o for o in found if isinstance(o, p11t.PrivateKey)]
    public = [o for o in found if isinstance(o, p11t.PublicKey)]
    if private:
        pub = public[0] if public else None
        return TokenKey(name, _type_of(private[0], name), [private[0]], pub)
    if public:
        return TokenKey(name, _type_of(public[0], name), [], public[0])
    return None


def find_key(session: p11t.Session, name: str, token_label: str = "", *,
             public_only: bool = False) -> TokenKey:
    """Find the key called `name`. `public_only`: the session is not logged in, so only
    public halves are visible (and the error says so).

    Raises:
        TokenError: no such key (exit 4), naming the key and the token.
    """
    objs: dict[str, list[p11t.Key]] = {}
    for label in (name, name + ".k1", name + ".k2"):
        for obj in session.get_objects({Attribute.LABEL: label, Attribute.TOKEN: True}):
            # secret, private and public keys: python-pkcs11's p11t.Key subclasses
            if isinstance(obj, p11t.Key):
                objs.setdefault(label, []).append(obj)
    key = _assemble(name, objs)
    if key is None or (not key.objects and key.public is None):
        where = f" in token {token_label!r}" if token_label else ""
        if public_only:
            raise TokenError(f"no public key {name!r}{where}: no key of that name, or a secret "
                             "key (aes, xts-aes), which has no public half; this command reads "
                             "public halves without the PIN (see `hsmflash keys list`)")
        raise TokenError(f"no key {name!r}{where} (see `hsmflash keys list`)")
    return key


def list_keys(session: p11t.Session) -> list[TokenKey]:
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


def key_exists(session: p11t.Session, name: str) -> bool:
    for label in (name, name + ".k1", name + ".k2"):
        if next(iter(session.get_objects({Attribute.LABEL: label, Attribute.TOKEN: True})), None):
            return True
    return False


def _secret_template(usage: tuple[str, ...]) -> AttributeTemplate:
    template: AttributeTemplate = {a: False for a in _ALL_SECRET_FLAGS}
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


def _private_template() -> AttributeTemplate:
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


def _public_template() -> AttributeTemplate:
    return {
        Attribute.TOKEN: True,
        Attribute.PRIVATE: False,
        Attribute.VERIFY: True,
        Attribute.ENCRYPT: False,
        Attribute.WRAP: False,
        Attribute.MODIFIABLE: False,
    }


def _refuse_existing(session: p11t.Session, name: str) -> None:
    if key_exists(session, name):
        raise InputError(f"a key named {name!r} already exists in the token")


def object_id(label: str) -> bytes:
    """A CKA_ID unique to each object label (the XTS halves get different ones: NSS merges
    objects that share a CKA_ID). A key pair's two halves share their label, hence their ID."""
    return hashlib.sha256(label.encode()).digest()[:16]


# Usage flags a signing private key must not have (invariant 1); checked after generation on
# tokens that get only the minimal template.
_PRIVATE_FORBIDDEN = (Attribute.DECRYPT, Attribute.UNWRAP, Attribute.DERIVE)
_TEMPLATE_REFUSALS = (p11x.AttributeValueInvalid, p11x.TemplateInconsistent,
                      p11x.AttributeTypeInvalid)


def _generate_keypair(session: p11t.Session, name: str, key_type: str) -> None:
    """The strict template first (every usage flag explicit); tokens that check templates
    against their own view (tpm2-pkcs11 rejects explicit false flags) get the minimal one,
    and the key is then read back: one with a forbidden usage is destroyed and refused."""
    from pkcs11.constants import DEFAULT

    if key_type == "rsa-3072":
        kind, bits, mech = KeyType.RSA, 3072, None
        extra = {Attribute.PUBLIC_EXPONENT: b"\x01\x00\x01"}
    else:
        kind, bits, mech = KeyType.EC, None, Mechanism.EC_KEY_PAIR_GEN
        extra = {Attribute.EC_PARAMS: encode_named_curve_parameters(_CURVES[key_type][0])}
    strict = ({**_public_template(), **extra}, _private_template())
    minimal = (
        {Attribute.TOKEN: True, Attribute.VERIFY: DEFAULT, Attribute.ENCRYPT: DEFAULT,
         Attribute.WRAP: DEFAULT, **extra},
        {Attribute.TOKEN: True, Attribute.PRIVATE: True, Attribute.SENSITIVE: True,
         Attribute.EXTRACTABLE: False, Attribute.SIGN: True, Attribute.DECRYPT: DEFAULT,
         Attribute.UNWRAP: DEFAULT, Attribute.DERIVE: DEFAULT},
    )
    candidates = (strict, (minimal[0], strict[1]), minimal)
    for i, (pub_tpl, priv_tpl) in enumerate(candidates):
        try:
            _pub, priv = session.generate_keypair(
                kind, bits, label=name, id=object_id(name), store=True,
                capabilities=MechanismFlag(0), mechanism=mech,
                public_template=pub_tpl, private_template=priv_tpl)
        except (*_TEMPLATE_REFUSALS, p11x.GeneralError):  # tpm2: "attr mismatch"
            if i == len(candidates) - 1:
                raise
            continue
        bad = [a.name for a in _PRIVATE_FORBIDDEN if read_attr(priv, a)]
        leaky = read_attr(priv, Attribute.EXTRACTABLE) or (
            read_attr(priv, Attribute.SENSITIVE) is False)
        if bad or leaky:
            for obj in (_pub, priv):
                obj.destroy()
            raise TokenError(
                f"generating {key_type} key {name!r}: the token gives the private key usages "
                f"it must not have ({', '.join(bad) or 'extractable or not sensitive'}); "
                "refused (invariant 1)")
        return


def generate_key(session: p11t.Session, name: str, key_type: str,
                 usage: tuple[str, ...] = ()) -> TokenKey:
    """Generate a key inside the token (sensitive, non-extractable, only `usage`).

    Raises:
        InputError: bad name/type/usage, or the name is taken.
        TokenError: the token refuses (missing mechanism, read-only, ...).
    """
    usage = check_type_usage(key_type, usage)
    _refuse_existing(session, name)
    try:
        if key_type in ("aes-128", "aes-256"):
            session.generate_key(
                KeyType.AES, _AES_BITS[key_type], label=name, id=object_id(name), store=True,
                capabilities=MechanismFlag(0), template=_secret_template(usage),
            )
        elif key_type.startswith("xts-"):
            for part in XTS_PARTS:
                session.generate_key(
                    KeyType.AES, _AES_BITS[key_type], label=name + part,
                    id=object_id(name + part), store=True,
                    capabilities=MechanismFlag(0), template=_secret_template(usage),
                )
        else:
            _generate_keypair(session, name, key_type)
    except p11x.FunctionNotSupported as e:
        raise TokenError(
            f"generating {key_type} key {name!r}: the token cannot generate this key type "
            "(missing capability aes_generate; see `hsmflash token info`); import it instead"
        ) from e
    except p11x.MechanismInvalid as e:
        cap = {"rsa-3072": "rsa_3072_generate", "ec-p256": "ec_p256_generate",
               "ec-p384": "ec_p384_generate"}.get(key_type, "aes_generate")
        raise TokenError(
            f"generating {key_type} key {name!r}: the token lacks the mechanism (missing "
            f"capability {cap}; see `hsmflash token info`)") from e
    except p11x.PKCS11Error as e:
        raise wrap_pkcs11(e, f"generating {key_type} key {name!r}") from e
    return find_key(session, name)


def import_key(
    session: p11t.Session, name: str, key_type: str, material: bytes | bytearray,
    usage: tuple[str, ...] = (), *, source: str = "key file", wrappable: bool = False,
) -> TokenKey:
    """Import an espsecure key file (raw AES bytes, or a PEM private key) into the token.

    The imported key becomes sensitive and non-extractable; `wrappable` (aes-256 only, for a
    migrated ESP32-classic key on a token without XOR derivation, where the policy allows it)
    keeps it sensitive but lets it be wrapped out (`CKA_EXTRACTABLE=true`). The caller should
    tell the user to destroy the source file.

    Raises:
        InputError: the material does not fit `key_type` (message names `source`, never bytes).
        TokenError: the token refuses.
    """
    usage = check_type_usage(key_type, usage)
    if wrappable and key_type != "aes-256":
        raise InputError(f"only an aes-256 key (an ESP32-classic flash key) can be imported "
                         f"wrappable, not {key_type}")
    _refuse_existing(session, name)
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
                template = _secret_template(usage)
                if wrappable:
                    template[Attribute.EXTRACTABLE] = True
                _create_secret(session, label, bytes(material[i * size:(i + 1) * size]), usage,
                               template)
        else:
            private = _load_private_pem(material, key_type, source)
            _create_private(session, name, object_id(name), key_type, private)
    except (p11x.AttributeValueInvalid, p11x.TemplateInconsistent,
            p11x.FunctionNotSupported) as e:
        if key_type not in _AES_BITS:
            raise wrap_pkcs11(e, f"importing {key_type} key {name!r}") from e
        raise TokenError(
            f"importing {key_type} key {name!r}: the token refuses secret-key import "
            f"({type(e).__name__}; missing capability aes_import, see `hsmflash token info`); "
            "use a token that imports AES keys for this key") from e
    except p11x.PKCS11Error as e:
        raise wrap_pkcs11(e, f"importing {key_type} key {name!r}") from e
    return find_key(session, name)


def _create_secret(session: p11t.Session, label: str, value: bytes, usage: tuple[str, ...],
                   template: AttributeTemplate | None = None) -> p11t.Object:
    """One AES key object from raw bytes. CKA_VALUE_LEN is given where the token takes it
    (openCryptoki does not derive it from the value, and the key's size is read from it)."""
    base = {
        Attribute.CLASS: ObjectClass.SECRET_KEY,
        Attribute.KEY_TYPE: KeyType.AES,
        Attribute.LABEL: label,
        Attribute.ID: object_id(label),
        Attribute.VALUE: value,
        **(template if template is not None else _secret_template(usage)),
    }
    try:
        return session.create_object({**base, Attribute.VALUE_LEN: len(value)})
    except (*_TEMPLATE_REFUSALS, p11x.AttributeReadOnly):  # SoftHSM: read-only
        return session.create_object(base)


def _load_private_pem(material: bytes | bytearray, key_type: str,
                      source: str) -> rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey:
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


def _create_private(session: p11t.Session, name: str, key_id: bytes, key_type: str,
                    private: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> None:
    def be(v: int) -> bytes:
        return v.to_bytes((v.bit_length() + 7) // 8 or 1, "big")

    common = {Attribute.LABEL: name, Attribute.ID: key_id}
    if isinstance(private, rsa.RSAPrivateKey):  # key_type "rsa-3072" (_load_private_pem)
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
