"""The two shapes every key operation takes, whatever holds the key.

The formats (flash encryption, Secure Boot blocks, audit checkpoints) are written against these
protocols; `hsmflash.keyuse` supplies token-backed implementations, tests may supply software
ones for the pure-format unit tests.
"""

from __future__ import annotations

import hashlib
from typing import Any, Literal, Protocol

from cryptography.hazmat.primitives.asymmetric import ec, rsa

from hsmflash.errors import InputError

SignatureAlgorithm = Literal["rsa-3072", "ec-p256", "ec-p384"]
PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey


class BlockCipher(Protocol):
    """AES in ECB mode with a key the caller never sees; inputs are multiples of 16 bytes."""

    def encrypt_ecb(self, data: bytes) -> bytes:
        """Encrypt `data` block by block in one bulk call."""
        ...

    def decrypt_ecb(self, data: bytes) -> bytes:
        """Decrypt `data` block by block in one bulk call."""
        ...


class DigestSigner(Protocol):
    """Signs a digest computed on the host (raw mechanisms: CKM_RSA_PKCS_PSS, CKM_ECDSA).

    `sign_digest` returns the raw signature: for RSA the big-endian PSS signature (salt length
    32, MGF1 with the digest's hash); for ECDSA r || s, each big-endian, fixed width.
    """

    algorithm: SignatureAlgorithm

    def public_key(self) -> PublicKey:
        """The public half, as a cryptography object."""
        ...

    def sign_digest(self, digest: bytes) -> bytes:
        """Sign an already computed SHA-256 (RSA, P-256) or SHA-384 (P-384) digest."""
        ...


# DER AlgorithmIdentifiers of SubjectPublicKeyInfo (RFC 3279, RFC 5480)
PSS_SALT_LEN = 32  # RSA-PSS salt, as Secure Boot V2 (and espsecure) use it
_RSA_ALGORITHM = bytes.fromhex("300d06092a864886f70d0101010500")  # rsaEncryption, NULL
_EC_ALGORITHMS = {  # id-ecPublicKey, named curve
    "secp256r1": bytes.fromhex("301306072a8648ce3d020106082a8648ce3d030107"),
    "secp384r1": bytes.fromhex("301006072a8648ce3d020106052b81040022"),
}


def der_tlv(tag: int, body: bytes) -> bytes:
    """One DER TLV (definite length), as public-key and X.509 encodings need."""
    n = len(body)
    if n < 0x80:
        return bytes((tag, n)) + body
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(size))) + size + body


def _der_uint(value: int) -> bytes:
    return der_tlv(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def public_key_der(public_key: PublicKey) -> bytes:
    """The DER SubjectPublicKeyInfo of an RSA or P-256/P-384 key.

    Equal to cryptography's `public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)`
    (tests/unit/test_primitives.py); written out because importing cryptography's
    serialization package costs every command about 6 ms.
    """
    if isinstance(public_key, rsa.RSAPublicKey):
        numbers = public_key.public_numbers()
        body = der_tlv(0x30, _der_uint(numbers.n) + _der_uint(numbers.e))
        return der_tlv(0x30, _RSA_ALGORITHM + der_tlv(0x03, b"\x00" + body))
    algorithm = _EC_ALGORITHMS.get(public_key.curve.name)
    if algorithm is None:
        raise ValueError(f"unsupported curve {public_key.curve.name}")
    width = (public_key.curve.key_size + 7) // 8
    point = public_key.public_numbers()
    encoded = b"\x04" + point.x.to_bytes(width, "big") + point.y.to_bytes(width, "big")
    return der_tlv(0x30, algorithm + der_tlv(0x03, b"\x00" + encoded))


def fingerprint(public_key: PublicKey) -> str:
    """How hsmflash names an asymmetric key: `sha256:` + SHA-256 (hex) of its DER
    SubjectPublicKeyInfo (`openssl pkey -pubin -outform DER | sha256sum`)."""
    return "sha256:" + hashlib.sha256(public_key_der(public_key)).hexdigest()


def load_public_key(data: bytes, name: str) -> PublicKey:
    """A verification key from a PEM public key, a PEM private key (as espsecure accepts), or
    espsecure's raw 64-byte SBv1 public key (`extract-public-key --version 1`).

    Raises:
        InputError: none of those, or not RSA/EC.
    """
    from cryptography.hazmat.primitives import serialization

    key: Any = None
    if len(data) == 64 and not data.startswith(b"-----"):
        try:
            key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + data)
        except ValueError:
            key = None
    else:
        for loader in (serialization.load_pem_public_key,
                       lambda d: serialization.load_pem_private_key(d, None).public_key()):
            try:
                key = loader(data)
                break
            except (ValueError, TypeError):
                continue
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        raise InputError(f"public key {name!r} is not a PEM key or a raw SBv1 public key")
    return key


def verify_digest_signature(public_key: PublicKey, signature: bytes, digest: bytes) -> bool:
    """Does a raw signature, as a token returns it, verify over a host-computed digest?

    RSA: PKCS#1 v2.1 PSS with MGF1 and a 32-byte salt; ECDSA: r||s, each as wide as the curve.
    The hash is SHA-256 for a 32-byte digest, SHA-384 for a 48-byte one. This is the one place
    hsmflash checks a token's signature (Secure Boot blocks, audit checkpoints and tags,
    revocation lists, capability probes).
    """
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding, utils

    algorithm: hashes.HashAlgorithm
    if len(digest) == 32:
        algorithm = hashes.SHA256()
    elif len(digest) == 48:
        algorithm = hashes.SHA384()
    else:
        return False
    try:
        if isinstance(public_key, rsa.RSAPublicKey):
            public_key.verify(signature, digest,
                              padding.PSS(mgf=padding.MGF1(algorithm), salt_length=PSS_SALT_LEN),
                              utils.Prehashed(algorithm))
            return True
        width = (public_key.curve.key_size + 7) // 8
        if len(signature) != 2 * width:
            return False
        der = utils.encode_dss_signature(int.from_bytes(signature[:width], "big"),
                                         int.from_bytes(signature[width:], "big"))
        public_key.verify(der, digest, ec.ECDSA(utils.Prehashed(algorithm)))
    except (InvalidSignature, ValueError):
        return False
    return True
