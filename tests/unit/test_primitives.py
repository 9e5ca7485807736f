"""Key fingerprints: the hand-written DER SubjectPublicKeyInfo equals cryptography's encoder."""

from __future__ import annotations

import hashlib

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from hsmflash.formats.primitives import fingerprint, public_key_der

KEYS = [
    ("rsa-3072", lambda: rsa.generate_private_key(65537, 3072)),
    ("rsa-2048 e=3", lambda: rsa.generate_private_key(3, 2048)),
    ("rsa-4096", lambda: rsa.generate_private_key(65537, 4096)),
    # DER lengths of 128-255 bytes (the one-byte long form); not a key anyone should sign with
    ("rsa-1024", lambda: rsa.generate_private_key(65537, 1024)),  # noqa: S505
    ("ec-p256", lambda: ec.generate_private_key(ec.SECP256R1())),
    ("ec-p384", lambda: ec.generate_private_key(ec.SECP384R1())),
]


@pytest.mark.parametrize("make", [m for _, m in KEYS], ids=[n for n, _ in KEYS])
@pytest.mark.parametrize("attempt", range(4))  # several keys: leading-zero and length cases
def test_der_is_cryptographys(make, attempt: int) -> None:  # type: ignore[no-untyped-def]
    public = make().public_key()
    expected = public.public_bytes(serialization.Encoding.DER,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)
    assert public_key_der(public) == expected
    assert fingerprint(public) == "sha256:" + hashlib.sha256(expected).hexdigest()


def test_other_curves_are_refused() -> None:
    with pytest.raises(ValueError, match="secp521r1"):
        public_key_der(ec.generate_private_key(ec.SECP521R1()).public_key())
