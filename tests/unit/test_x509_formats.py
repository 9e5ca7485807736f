"""hsmflash.formats.x509 with software keys standing in for the token (pure, no token).

The `sign` callables here sign the TBS bytes with a cryptography key the test holds, the way
hsmflash.ca signs them in the token; cryptography reads the result back.
"""

from __future__ import annotations

import hashlib

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils

from hsmflash.errors import InputError
from hsmflash.formats import x509 as fx
from hsmflash.policy import parse_policy


def ec_signer(key: ec.EllipticCurvePrivateKey):  # type: ignore[no-untyped-def]
    def sign(tbs: bytes) -> bytes:
        # like the token: raw r||s over a host digest, then DER
        der = key.sign(hashlib.sha256(tbs).digest(), ec.ECDSA(utils.Prehashed(hashes.SHA256())))
        r, s = utils.decode_dss_signature(der)
        return fx.ecdsa_der(r.to_bytes(32, "big") + s.to_bytes(32, "big"))
    return sign


def rsa_signer(key: rsa.RSAPrivateKey):  # type: ignore[no-untyped-def]
    def sign(tbs: bytes) -> bytes:
        return key.sign(tbs, padding.PKCS1v15(), hashes.SHA256())
    return sign


@pytest.fixture(scope="module")
def ca_keys():  # type: ignore[no-untyped-def]
    return {"ec-p256": (k := ec.generate_private_key(ec.SECP256R1()), ec_signer(k)),
            "rsa-3072": (r := rsa.generate_private_key(65537, 3072), rsa_signer(r))}


@pytest.mark.parametrize("key_type", ["ec-p256", "rsa-3072"])
def test_root_device_certificate_and_crl_verify(ca_keys, key_type):  # type: ignore[no-untyped-def]
    key, sign = ca_keys[key_type]
    subject = fx.parse_name("CN=Unit CA,O=Example")
    ca = x509.load_der_x509_certificate(
        fx.root_certificate(subject, key.public_key(), key_type, 10, sign))
    ca.verify_directly_issued_by(ca)
    dev = ec.generate_private_key(ec.SECP256R1())
    req = fx.DeviceCertRequest(fx.parse_name("CN=aa:bb"), dev.public_key(), 5, 12345)
    cert = x509.load_der_x509_certificate(fx.device_certificate(ca, key_type, req, sign))
    cert.verify_directly_issued_by(ca)
    assert cert.serial_number == 12345 and cert.issuer == ca.subject
    crl = x509.load_der_x509_crl(fx.crl(ca, key_type, [fx.Revoked(12345, ca.not_valid_before_utc)],
                                        7, 30, sign))
    assert crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    assert crl.get_revoked_certificate_by_serial_number(12345) is not None
    csr = x509.load_der_x509_csr(fx.ca_csr(subject, key.public_key(), key_type, sign))
    assert csr.is_signature_valid
    assert csr.public_key() == key.public_key()


def test_a_wrong_signature_is_caught_by_the_reader(ca_keys):  # type: ignore[no-untyped-def]
    key, _ = ca_keys["ec-p256"]
    subject = fx.parse_name("CN=x")
    der = fx.root_certificate(subject, key.public_key(), "ec-p256",
                              1, ec_signer(ec.generate_private_key(ec.SECP256R1())))
    cert = x509.load_der_x509_certificate(der)
    with pytest.raises(Exception):  # noqa: B017 - cryptography's InvalidSignature
        cert.verify_directly_issued_by(cert)


@pytest.mark.parametrize(("text", "why"), [
    ("", "is not ATTR=value"),
    ("CN", "is not ATTR=value"),
    ("XX=1", "is not ATTR=value"),
    ("CN=", "CN is empty"),
    ("C=USA", "two-letter"),
])
def test_bad_subjects_name_the_problem(text, why):  # type: ignore[no-untyped-def]
    with pytest.raises(InputError, match=why):
        fx.parse_name(text, "--subject")


def test_subject_escapes_and_templates():  # type: ignore[no-untyped-def]
    name = fx.parse_name(r"CN=a\,b,O=Example")
    assert name.rfc4514_string() == r"O=Example,CN=a\,b"
    assert fx.render_name("CN={mac}", {"mac": "aa:bb"}).rfc4514_string() == "CN=aa:bb"
    with pytest.raises(InputError, match="unknown placeholder"):
        fx.render_name("CN={serial}", {"mac": "aa"})


def test_serials_are_positive_128_bit():  # type: ignore[no-untyped-def]
    serials = {fx.random_serial() for _ in range(200)}
    assert len(serials) == 200
    assert all(0 < s < 2**128 for s in serials)


def _policy(ca: dict[str, object], key_type: str = "ec-p256") -> None:
    parse_policy({"keys": {"device-ca": {"type": key_type, "usage": ["sign"]},
                           "aes": {"type": "aes-256", "usage": ["derive"]}},
                  "ca": ca}, "p.toml")


def test_policy_knows_the_same_subject_attributes():  # type: ignore[no-untyped-def]
    from hsmflash.policy import SUBJECT_ATTRIBUTES

    assert set(SUBJECT_ATTRIBUTES) == set(fx._NAME_ATTRS)


def test_policy_ca_table_is_validated():  # type: ignore[no-untyped-def]
    _policy({"key": "device-ca"})
    _policy({"key": "device-ca"}, "rsa-3072")
    with pytest.raises(InputError, match=r"ca\.key: key 'aes' is aes-256"):
        _policy({"key": "aes"})
    with pytest.raises(InputError, match=r"ca\.key: key 'nope' is not declared"):
        _policy({"key": "nope"})
    with pytest.raises(InputError, match=r"ca\.days"):
        _policy({"key": "device-ca", "days": 0})
    with pytest.raises(InputError, match=r"ca\.colour: unknown field"):
        _policy({"key": "device-ca", "colour": "red"})
    with pytest.raises(InputError, match=r"ca\.subject: .*unknown placeholder"):
        _policy({"key": "device-ca", "subject": "CN={serial}"})
    with pytest.raises(InputError, match=r"ca\.subject: .*not ATTR=value"):
        _policy({"key": "device-ca", "subject": "CN={mac},Example"})
    _policy({"key": "device-ca", "subject": "CN={mac},O=Example\\, Inc."})
