"""The device CA: its key stays in the token, every signature goes through `Station.use`.

The CA certificate is kept in the token as a CKO_CERTIFICATE object labelled like the CA key,
so later commands find it. Issued certificates are recorded in `<ca dir>/index.jsonl` (serial,
device, fingerprints); the current CRL is `<ca dir>/crl.der`, and it is also the revocation
state: a revocation reads it, verifies it with the CA key's public half, adds the serials and
signs the next CRL number.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pkcs11.exceptions as p11x
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from pkcs11 import Attribute, CertificateType, ObjectClass

from hsmflash.errors import InputError, PolicyRefused, TokenError, VerificationFailed
from hsmflash.fileio import atomic_write, locked_directory
from hsmflash.formats import kdf
from hsmflash.formats import x509 as fx
from hsmflash.formats.primitives import PublicKey, fingerprint, public_key_der
from hsmflash.keyuse import KeyUse, Station
from hsmflash.policy import CaRules
from hsmflash.token.keys import TokenKey
from hsmflash.token.session import wrap_pkcs11

INDEX = "index.jsonl"
CRL_FILE = "crl.der"
DEVICE_KEY_TYPE = "ec-p256"


def settings_of(st: Station) -> CaRules:
    """The policy's `[ca]` table, or the defaults."""
    return st.policy.ca or CaRules()


class CaSigner:
    """Signs TBS bytes with the CA key (SHA-256; ECDSA as DER, RSA PKCS#1 v1.5), through the
    handle of the `Station.use(...)` this module opened for it."""

    def __init__(self, use: KeyUse) -> None:
        self._signer = use.signer(rsa_padding="pkcs1v15")

    def __call__(self, tbs: bytes) -> bytes:
        raw = self._signer.sign_digest(hashlib.sha256(tbs).digest())
        return fx.ecdsa_der(raw) if self._signer.algorithm == "ec-p256" else raw


def ca_key(st: Station, name: str | None = None) -> TokenKey:
    """The CA key by name (default: the policy's), checked for type and usage.

    Raises:
        PolicyRefused: the policy names another CA key.
        TokenError: no such key, or not ec-p256/rsa-3072 with usage sign.
    """
    rules = settings_of(st)
    name = name or rules.key
    if st.policy.ca is not None and name != st.policy.ca.key:
        raise PolicyRefused(f"policy {st.policy.name!r}: the device CA key is "
                            f"{st.policy.ca.key!r}, not {name!r}")
    key = st.key(name)
    if key.type not in fx.CA_KEY_TYPES or "sign" not in key.usage:
        raise TokenError(f"CA key {name!r} must be ec-p256 or rsa-3072 with usage sign (it is "
                         f"{key.type}, usage {', '.join(key.usage) or 'none'})")
    return key


# -- the CA certificate in the token ------------------------------------------------------------

def _cert_objects(st: Station, key: TokenKey) -> list[Any]:
    try:
        return list(st.session.get_objects({Attribute.CLASS: ObjectClass.CERTIFICATE,
                                             Attribute.LABEL: key.name}))
    except p11x.PKCS11Error as e:
        raise wrap_pkcs11(e, "reading certificates from the token") from e


def stored_certificate(st: Station, key: TokenKey) -> x509.Certificate | None:
    """The CA certificate kept in the token for `key`, if any."""
    objs = _cert_objects(st, key)
    if not objs:
        return None
    return fx.load_certificate(bytes(objs[-1][Attribute.VALUE]), f"in token for {key.name!r}")


def require_certificate(st: Station, key: TokenKey) -> x509.Certificate:
    """The CA certificate, or TokenError telling the user how to make one."""
    cert = stored_certificate(st, key)
    if cert is None:
        raise TokenError(f"no CA certificate for key {key.name!r} in the token yet: run "
                         f"`hsmflash ca init --key {key.name}` or `ca import-cert`")
    return cert


def _store_certificate(st: Station, key: TokenKey, cert: x509.Certificate) -> None:
    old = _cert_objects(st, key)
    der = cert.public_bytes(Encoding.DER)
    try:
        st.session.create_object({
            Attribute.CLASS: ObjectClass.CERTIFICATE,
            Attribute.CERTIFICATE_TYPE: CertificateType.X_509,
            Attribute.TOKEN: True, Attribute.PRIVATE: False, Attribute.LABEL: key.name,
            Attribute.ID: key.attr(Attribute.ID) or b"",
            Attribute.SUBJECT: cert.subject.public_bytes(),
            Attribute.VALUE: der,
        })
        for obj in old:
            obj.destroy()
    except p11x.PKCS11Error as e:
        raise wrap_pkcs11(e, "storing the CA certificate in the token") from e


def _same_key(a: PublicKey, b: PublicKey) -> bool:
    return public_key_der(a) == public_key_der(b)


def init(st: Station, key: TokenKey, subject: x509.Name, days: int) -> x509.Certificate:
    """Make the self-signed CA certificate for `key` and keep it in the token.

    Raises:
        InputError: the key already has a certificate, or `days` is out of range.
    """
    if not 1 <= days <= 36500:
        raise InputError(f"--days {days}: must be 1 to 36500")
    if stored_certificate(st, key) is not None:
        raise InputError(f"key {key.name!r} already has a CA certificate in the token "
                         "(`hsmflash ca show`)")
    with st.use("ca.init", key, subject={"ca": subject.rfc4514_string()},
                detail={"days": days}) as outcome:
        der = fx.root_certificate(subject, key.public_key(), key.type, days, CaSigner(outcome))
        cert = x509.load_der_x509_certificate(der)
        cert.verify_directly_issued_by(cert)
        _store_certificate(st, key, cert)
        outcome.update(_cert_facts(cert))
    return cert


def csr(st: Station, key: TokenKey, subject: x509.Name) -> bytes:
    """A CSR (DER) for `key` as a subordinate CA, signed in the token."""
    with st.use("ca.csr", key, subject={"ca": subject.rfc4514_string()}) as outcome:
        der = fx.ca_csr(subject, key.public_key(), key.type, CaSigner(outcome))
        req = x509.load_der_x509_csr(der)
        if not req.is_signature_valid:
            raise VerificationFailed("the CSR made in the token does not verify")
        outcome["csr_sha256"] = hashlib.sha256(der).hexdigest()
    return der


def import_cert(st: Station, key: TokenKey, data: bytes, source: str) -> x509.Certificate:
    """Keep a certificate issued for `key` elsewhere (e.g. by the company root) in the token.

    Raises:
        InputError: not a certificate, or not a CA certificate.
        VerificationFailed: its public key is not the token key's.
    """
    cert = fx.load_certificate(data, source)
    if not _same_key(cert.public_key(), key.public_key()):  # type: ignore[arg-type]
        raise VerificationFailed(f"certificate {source} is for another key, not the token's "
                                 f"{key.name!r} ({key.fingerprint()[:23]}...)")
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is None or not bc.ca:
        raise InputError(f"certificate {source} is not a CA certificate (basicConstraints "
                         "CA:TRUE missing)")
    with st.use("ca.import-cert", key, subject={"ca": cert.subject.rfc4514_string()},
                detail={"source": source}) as outcome:
        _store_certificate(st, key, cert)
        outcome.update(_cert_facts(cert))
    return cert


def _cert_facts(cert: x509.Certificate) -> dict[str, Any]:
    return {
        "subject": cert.subject.rfc4514_string(), "issuer": cert.issuer.rfc4514_string(),
        "serial": f"{cert.serial_number:x}",
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "sha256": hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest(),
    }


def show(st: Station, key: TokenKey) -> dict[str, Any]:
    """Public facts about the CA (no key use)."""
    cert = require_certificate(st, key)
    return {"key": key.name, "type": key.type, "key_fp": key.fingerprint(),
            "self_signed": cert.issuer == cert.subject, **_cert_facts(cert)}


# -- device certificates ------------------------------------------------------------------------

@dataclass(frozen=True)
class IssuedCert:
    der: bytes
    serial: int
    device: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.der).hexdigest()


def _ca_dir(rules: CaRules, ca_dir: Path | None) -> Path:
    return ca_dir if ca_dir is not None else Path(rules.dir)


def check_ca_dir(directory: Path) -> None:
    """Make sure the CA directory exists and can be written, before the CA key is used.

    Raises:
        InputError: it cannot be created or written.
    """
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"CA directory {str(directory)!r}: {e.strerror}") from None
    if not os.access(directory, os.W_OK):
        raise InputError(f"CA directory {str(directory)!r}: not writable")


def _locked(directory: Path) -> contextlib.AbstractContextManager[None]:
    return locked_directory(directory, "CA directory", create=True)


def read_index(directory: Path) -> list[dict[str, Any]]:
    """The issued-certificate records (oldest first)."""
    path = directory / INDEX
    if not path.exists():
        return []
    try:
        return [json.loads(line) for line in path.read_text("utf-8").splitlines() if line]
    except (OSError, ValueError) as e:
        raise InputError(f"CA index {path}: unreadable ({type(e).__name__})") from None


def _append_index(directory: Path, record: dict[str, Any]) -> None:
    line = json.dumps(record, sort_keys=True, separators=(",", ":")) + "\n"
    fd = os.open(directory / INDEX, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def subject_for(rules: CaRules, device: bytes) -> x509.Name:
    return fx.render_name(rules.subject, {"mac": kdf.format_mac(device),
                                          "device_id": device.hex()}, "ca.subject")


def issue_device_cert(st: Station, device: bytes, public_key: PublicKey, *,
                      ca_dir: Path | None = None, detail: dict[str, Any] | None = None,
                      subject: x509.Name | None = None) -> IssuedCert:
    """Sign a device certificate for `public_key` with the CA key (audited as `cert.issue`).

    Raises:
        TokenError: no CA key or certificate. InputError: bad MAC or subject template.
    """
    kdf.check_device_id(device)
    rules = settings_of(st)
    key = ca_key(st)
    ca = require_certificate(st, key)
    subject = subject or subject_for(rules, device)
    mac = kdf.format_mac(device)
    directory = _ca_dir(rules, ca_dir)
    check_ca_dir(directory)
    req = fx.DeviceCertRequest(subject, public_key, rules.days, fx.random_serial())
    with st.use("cert.issue", key, subject={"device": mac, "serial": f"{req.serial:x}"},
                detail={"cert_subject": subject.rfc4514_string(), "days": rules.days,
                        "device_key_fp": fingerprint(public_key), **(detail or {})}) as outcome:
        der = fx.device_certificate(ca, key.type, req, CaSigner(outcome))
        cert = x509.load_der_x509_certificate(der)
        try:
            cert.verify_directly_issued_by(ca)
        except (InvalidSignature, ValueError) as e:
            raise VerificationFailed("the device certificate made in the token does not "
                                     "verify with the CA certificate (is the CA certificate "
                                     "for this key?)") from e
        issued = IssuedCert(der, req.serial, mac)
        outcome["cert_sha256"] = issued.sha256
    with _locked(directory):
        _append_index(directory, {
            "serial": f"{req.serial:x}", "device": mac, "subject": subject.rfc4514_string(),
            "not_after": cert.not_valid_after_utc.isoformat(), "cert_sha256": issued.sha256,
            "key_fp": fingerprint(public_key), "issued": _now(),
        })
    return issued


def sign_csr(st: Station, device: bytes, data: bytes, source: str, *,
             ca_dir: Path | None = None) -> IssuedCert:
    """Issue a certificate for a CSR made on the device, after checking it against the policy.

    Raises:
        VerificationFailed: the CSR's signature does not verify.
        PolicyRefused: its key is not EC P-256, or its subject is not the policy's for `device`.
    """
    kdf.check_device_id(device)
    req = fx.load_csr(data, source)
    if not req.is_signature_valid:
        raise VerificationFailed(f"CSR {source}: its signature does not verify")
    public_key = req.public_key()
    if fx.key_type_of(public_key) != DEVICE_KEY_TYPE:  # type: ignore[arg-type]
        raise PolicyRefused(f"CSR {source}: device keys must be EC P-256")
    want = subject_for(settings_of(st), device)
    if req.subject != want:
        raise PolicyRefused(f"CSR {source}: subject {req.subject.rfc4514_string()!r} is not "
                            f"the policy's {want.rfc4514_string()!r} for this device")
    assert isinstance(public_key, ec.EllipticCurvePublicKey)  # noqa: S101 - checked above
    return issue_device_cert(st, device, public_key, ca_dir=ca_dir,
                             detail={"csr_sha256": hashlib.sha256(data).hexdigest()})


# -- revocation (CRL) --------------------------------------------------------------------------

def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def load_crl(directory: Path, ca: x509.Certificate) -> x509.CertificateRevocationList | None:
    """The current CRL, verified with the CA certificate's key (None before the first).

    Raises:
        VerificationFailed: unparseable, another issuer, or a bad signature.
    """
    path = directory / CRL_FILE
    if not path.exists():
        return None
    try:
        current = x509.load_der_x509_crl(path.read_bytes())
    except ValueError:
        raise VerificationFailed(f"CRL {path} is not a DER CRL (damaged or edited)") from None
    if current.issuer != ca.subject or \
            not current.is_signature_valid(ca.public_key()):  # type: ignore[arg-type]
        raise VerificationFailed(f"CRL {path}: signature does not verify with the CA "
                                 "certificate (edited or from another CA)")
    return current


def _crl_number(current: x509.CertificateRevocationList | None) -> int:
    if current is None:
        return 0
    return int(current.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number)


def _sign_crl(st: Station, key: TokenKey, ca: x509.Certificate, directory: Path,
              revoked: list[fx.Revoked], number: int, op: str, subject: dict[str, Any],
              detail: dict[str, Any]) -> bytes:
    rules = settings_of(st)
    with st.use(op, key, subject=subject, detail={**detail, "crl_number": number}) as outcome:
        der = fx.crl(ca, key.type, revoked, number, rules.crl_days, CaSigner(outcome))
        if not x509.load_der_x509_crl(der).is_signature_valid(
                ca.public_key()):  # type: ignore[arg-type]
            raise VerificationFailed("the CRL made in the token does not verify")
        atomic_write(directory / CRL_FILE, der)
        outcome["revoked_count"] = len(revoked)
    return der


def _entries(current: x509.CertificateRevocationList | None) -> list[fx.Revoked]:
    if current is None:
        return []
    return [fx.Revoked(r.serial_number, r.revocation_date_utc) for r in current]


def revoke(st: Station, *, device: bytes | None = None, serial: int | None = None,
           ca_dir: Path | None = None, reason: str = "",
           only_serials: list[int] | None = None) -> dict[str, Any]:
    """Revoke a device's certificates (or one serial) in a new CRL signed by the CA key.

    Raises:
        InputError: an unknown device or serial, or everything asked is already revoked.
        VerificationFailed: the current CRL does not verify.
        TokenError: no CA key or certificate.
    """
    rules = settings_of(st)
    key = ca_key(st)
    ca = require_certificate(st, key)
    directory = _ca_dir(rules, ca_dir)
    with _locked(directory):
        index = read_index(directory)
        if serial is not None:
            records = [r for r in index if int(r["serial"], 16) == serial]
            what = f"serial {serial:x}"
        else:
            assert device is not None  # noqa: S101 - one of the two is given
            mac = kdf.format_mac(device)
            records = [r for r in index if r["device"] == mac]
            what = f"device {mac}"
        if only_serials is not None:
            records = [r for r in records if int(r["serial"], 16) in only_serials]
        if not records:
            raise InputError(f"{what}: no certificate issued by this CA (index "
                             f"{directory / INDEX})")
        current = load_crl(directory, ca)
        entries = _entries(current)
        already = {e.serial for e in entries}
        new = [int(r["serial"], 16) for r in records if int(r["serial"], 16) not in already]
        if not new:
            if only_serials is not None:  # superseded certificates already revoked: nothing to do
                return {"revoked": [], "crl_number": _crl_number(current),
                        "revoked_count": len(entries), "crl": str(directory / CRL_FILE)}
            raise InputError(f"{what}: already revoked")
        now = datetime.now(UTC).replace(microsecond=0)
        entries += [fx.Revoked(s, now) for s in new]
        number = _crl_number(current) + 1
        _sign_crl(st, key, ca, directory, entries, number, "cert.revoke",
                  {"device": records[0]["device"], "serials": [f"{s:x}" for s in new]},
                  {"reason": reason})
    return {"revoked": [f"{s:x}" for s in new], "crl_number": number,
            "revoked_count": len(entries), "crl": str(directory / CRL_FILE)}


def publish_crl(st: Station, *, ca_dir: Path | None = None) -> bytes:
    """A fresh CRL (next number, nextUpdate from the policy) with the current revocations.

    Raises:
        VerificationFailed: the current CRL does not verify. TokenError: no CA.
    """
    rules = settings_of(st)
    key = ca_key(st)
    ca = require_certificate(st, key)
    directory = _ca_dir(rules, ca_dir)
    with _locked(directory):
        current = load_crl(directory, ca)
        number = _crl_number(current) + 1
        return _sign_crl(st, key, ca, directory, _entries(current), number, "crl.publish", {},
                         {})
