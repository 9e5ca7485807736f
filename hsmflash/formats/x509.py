"""X.509 certificates, CRLs and CSRs whose signature is made elsewhere (in a token).

cryptography's builders need a private key object to sign. Here each builder signs with a
throwaway key of the CA key's type (never used for anything else), the to-be-signed part
(`tbs_certificate_bytes`, `tbs_certlist_bytes`, `tbs_certrequest_bytes`) is then signed by the
caller's `sign` function (the token), and the DER is reassembled:

    Certificate | CertificateList | CertificationRequest ::=
        SEQUENCE { tbs, signatureAlgorithm, signature BIT STRING }

The throwaway key has the same type and hash as the real one, so the algorithm identifier inside
the TBS and outside it are already the right ones. Pure and token-free.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal, get_args

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa, utils
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hsmflash.errors import InputError
from hsmflash.formats.primitives import PublicKey
from hsmflash.formats.primitives import der_tlv as _der

CaKeyType = Literal["ec-p256", "rsa-3072"]
CA_KEY_TYPES: tuple[str, ...] = get_args(CaKeyType)
# `sign(tbs) -> signature` as it goes into the BIT STRING: ECDSA as DER Ecdsa-Sig-Value,
# RSA as the PKCS#1 v1.5 signature (SHA-256)
TbsSigner = Callable[[bytes], bytes]

_NAME_ATTRS = {
    "CN": NameOID.COMMON_NAME, "O": NameOID.ORGANIZATION_NAME,
    "OU": NameOID.ORGANIZATIONAL_UNIT_NAME, "C": NameOID.COUNTRY_NAME,
    "ST": NameOID.STATE_OR_PROVINCE_NAME, "L": NameOID.LOCALITY_NAME,
    "SERIALNUMBER": NameOID.SERIAL_NUMBER, "DC": NameOID.DOMAIN_COMPONENT,
}
# SHA-256 DigestInfo prefix (RFC 8017 9.2): what CKM_RSA_PKCS signs for RSASSA-PKCS1-v1_5


def parse_name(text: str, source: str = "subject") -> x509.Name:
    """"CN=device 1,O=Example" -> x509.Name (attributes in the order given).

    Commas inside a value are written `\\,`. Known attributes: CN O OU C ST L SERIALNUMBER DC.

    Raises:
        InputError: empty, an unknown attribute, an empty value or a bad country code.
    """
    parts: list[str] = []
    cur = ""
    escaped = False
    for ch in text:
        if escaped:
            cur += ch
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == ",":
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    attrs = []
    for part in parts:
        name, sep, value = part.partition("=")
        name, value = name.strip().upper(), value.strip()
        if not sep or name not in _NAME_ATTRS:
            raise InputError(f"{source} {text!r}: {part.strip()!r} is not ATTR=value with ATTR "
                             f"one of {', '.join(_NAME_ATTRS)}")
        if not value:
            raise InputError(f"{source} {text!r}: {name} is empty")
        if name == "C" and len(value) != 2:
            raise InputError(f"{source} {text!r}: C must be a two-letter country code")
        attrs.append(x509.NameAttribute(_NAME_ATTRS[name], value))
    return x509.Name(attrs)


def render_name(template: str, values: dict[str, str], source: str = "subject") -> x509.Name:
    """A subject template ("CN={mac},O=Example") filled with `values`, then parsed."""
    text = template
    for k, v in values.items():
        text = text.replace("{" + k + "}", v.replace(",", "\\,"))
    if "{" in text:
        raise InputError(f"{source} template {template!r} has an unknown placeholder "
                         f"(known: {', '.join('{' + k + '}' for k in values)})")
    return parse_name(text, source)


# -- DER --------------------------------------------------------------------------------------

def _tlv_end(der: bytes, pos: int) -> tuple[int, int]:
    """(start of content, end of element) for the TLV at `pos`."""
    first = der[pos + 1]
    if first < 0x80:
        return pos + 2, pos + 2 + first
    n = first & 0x7F
    length = int.from_bytes(der[pos + 2:pos + 2 + n], "big")
    return pos + 2 + n, pos + 2 + n + length


def sequence_elements(der: bytes) -> list[bytes]:
    """The raw TLVs inside the outer SEQUENCE of `der` (a well-formed DER element)."""
    if not der or der[0] != 0x30:
        raise ValueError("not a DER SEQUENCE")
    start, end = _tlv_end(der, 0)
    out = []
    pos = start
    while pos < end:
        _, nxt = _tlv_end(der, pos)
        out.append(der[pos:nxt])
        pos = nxt
    return out


def ecdsa_der(raw: bytes) -> bytes:
    """A raw r || s signature (as PKCS#11 CKM_ECDSA returns it) as DER Ecdsa-Sig-Value."""
    half = len(raw) // 2
    return utils.encode_dss_signature(int.from_bytes(raw[:half], "big"),
                                      int.from_bytes(raw[half:], "big"))


def reassemble(throwaway_signed: bytes, tbs: bytes, signature: bytes) -> bytes:
    """SEQUENCE { tbs, the algorithm of `throwaway_signed`, BIT STRING signature }."""
    algorithm = sequence_elements(throwaway_signed)[1]
    return _der(0x30, tbs + algorithm + _der(0x03, b"\x00" + signature))


@functools.cache
def _throwaway(key_type: str) -> ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey:
    # signs only what is thrown away at once; one per process and type (RSA keygen is slow)
    if key_type == "ec-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa-3072":
        return rsa.generate_private_key(65537, 3072)
    raise InputError(f"a CA key must be one of {', '.join(CA_KEY_TYPES)}, not {key_type}")


def key_type_of(public_key: PublicKey) -> str:
    if isinstance(public_key, ec.EllipticCurvePublicKey) and \
            isinstance(public_key.curve, ec.SECP256R1):
        return "ec-p256"
    if isinstance(public_key, rsa.RSAPublicKey) and public_key.key_size == 3072:
        return "rsa-3072"
    return "other"


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def random_serial() -> int:
    """A random positive 128-bit serial number (never zero)."""
    return int.from_bytes(os.urandom(16), "big") or 1


def _ski(public_key: PublicKey) -> x509.SubjectKeyIdentifier:
    return x509.SubjectKeyIdentifier.from_public_key(public_key)


def _aki_from(ca: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(
            ca.public_key())  # type: ignore[arg-type]


# -- builders -----------------------------------------------------------------------------------

def root_certificate(subject: x509.Name, public_key: PublicKey, key_type: str, days: int,
                     sign: TbsSigner) -> bytes:
    """A self-signed CA certificate (DER): CA:TRUE pathlen 0, keyCertSign|cRLSign, SKI = AKI."""
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject).public_key(public_key)
        .serial_number(random_serial())
        .not_valid_before(now).not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(_ski(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            public_key), critical=False)
    )
    cert = builder.sign(_throwaway(key_type), hashes.SHA256())
    tbs = cert.tbs_certificate_bytes
    return reassemble(cert.public_bytes(Encoding.DER), tbs, sign(tbs))


@dataclass(frozen=True)
class DeviceCertRequest:
    """What goes into a device certificate besides the issuer."""

    subject: x509.Name
    public_key: PublicKey
    days: int
    serial: int


def device_certificate(ca: x509.Certificate, ca_key_type: str, req: DeviceCertRequest,
                       sign: TbsSigner) -> bytes:
    """A device (TLS client) certificate (DER) issued by `ca`.

    CA:FALSE (critical), digitalSignature (critical), clientAuth, SKI, AKI from the CA's SKI.
    """
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(req.subject).issuer_name(ca.subject).public_key(req.public_key)
        .serial_number(req.serial)
        .not_valid_before(now).not_valid_after(now + timedelta(days=req.days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(_ski(req.public_key), critical=False)
        .add_extension(_aki_from(ca), critical=False)
    )
    cert = builder.sign(_throwaway(ca_key_type), hashes.SHA256())
    tbs = cert.tbs_certificate_bytes
    return reassemble(cert.public_bytes(Encoding.DER), tbs, sign(tbs))


@dataclass(frozen=True)
class Revoked:
    serial: int
    revoked_at: datetime


def crl(ca: x509.Certificate, ca_key_type: str, revoked: list[Revoked], number: int, days: int,
        sign: TbsSigner) -> bytes:
    """An X.509 v2 CRL (DER) by `ca`: CRL number, AKI, thisUpdate now, nextUpdate now + days."""
    now = _now()
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.subject).last_update(now).next_update(now + timedelta(days=days))
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(_aki_from(ca), critical=False)
    )
    for r in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(r.serial)
            .revocation_date(r.revoked_at).build())
    signed = builder.sign(_throwaway(ca_key_type), hashes.SHA256())
    tbs = signed.tbs_certlist_bytes
    return reassemble(signed.public_bytes(Encoding.DER), tbs, sign(tbs))


def ca_csr(subject: x509.Name, public_key: PublicKey, key_type: str, sign: TbsSigner) -> bytes:
    """A CSR (DER) for a subordinate CA: the token key's public half, CA:TRUE requested."""
    builder = (
        x509.CertificateSigningRequestBuilder().subject_name(subject)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
    )
    throwaway = _throwaway(key_type)
    signed = builder.sign(throwaway, hashes.SHA256())
    # the CSR carries the throwaway's public key: rebuild the info with the real one
    info = _replace_spki(signed.tbs_certrequest_bytes, public_key)
    return reassemble(signed.public_bytes(Encoding.DER), info, sign(info))


def _replace_spki(info: bytes, public_key: PublicKey) -> bytes:
    from hsmflash.formats.primitives import public_key_der

    version, subject, _spki, attributes = sequence_elements(info)
    return _der(0x30, version + subject + public_key_der(public_key) + attributes)


def load_certificate(data: bytes, source: str) -> x509.Certificate:
    """A PEM or DER certificate.

    Raises:
        InputError: neither.
    """
    pem = data.lstrip().startswith(b"-----BEGIN")
    try:
        return x509.load_pem_x509_certificate(data) if pem else x509.load_der_x509_certificate(data)
    except ValueError:
        raise InputError(f"certificate {source}: not a PEM or DER X.509 certificate") from None


def load_csr(data: bytes, source: str) -> x509.CertificateSigningRequest:
    """A PEM or DER CSR.

    Raises:
        InputError: neither.
    """
    pem = data.lstrip().startswith(b"-----BEGIN")
    try:
        return x509.load_pem_x509_csr(data) if pem else x509.load_der_x509_csr(data)
    except ValueError:
        raise InputError(f"CSR {source}: not a PEM or DER certificate request") from None


def pem(der: bytes, label: str) -> bytes:
    """DER as PEM with `label` (CERTIFICATE, X509 CRL, CERTIFICATE REQUEST)."""
    import base64

    b64 = base64.encodebytes(der).replace(b"\n", b"")
    lines = [b64[i:i + 64] for i in range(0, len(b64), 64)]
    return (f"-----BEGIN {label}-----\n".encode() + b"\n".join(lines)
            + f"\n-----END {label}-----\n".encode())

