"""The two shapes every key operation takes, whatever holds the key.

The formats (flash encryption, Secure Boot blocks, audit checkpoints) are written against these
protocols; `hsmflash.keyuse` supplies token-backed implementations, tests may supply software
ones for the pure-format unit tests.
"""

from __future__ import annotations

from typing import Literal, Protocol

from cryptography.hazmat.primitives.asymmetric import ec, rsa

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
