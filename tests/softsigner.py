"""A software DigestSigner / BlockCipher for the pure-format unit tests (never for real keys)."""

from __future__ import annotations

from pathlib import Path

import espsecure
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from hsmflash.formats.primitives import PublicKey, SignatureAlgorithm


class SoftwareSigner:
    """DigestSigner over a cryptography private key, with the token's raw output layouts."""

    def __init__(self, private_key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> None:
        self._key = private_key
        self.algorithm: SignatureAlgorithm
        if isinstance(private_key, rsa.RSAPrivateKey):
            self.algorithm = "rsa-3072"
        elif isinstance(private_key.curve, ec.SECP384R1):
            self.algorithm = "ec-p384"
        else:
            self.algorithm = "ec-p256"

    @classmethod
    def generate(cls, algorithm: SignatureAlgorithm) -> SoftwareSigner:
        if algorithm == "rsa-3072":
            return cls(rsa.generate_private_key(public_exponent=65537, key_size=3072))
        curve = ec.SECP384R1() if algorithm == "ec-p384" else ec.SECP256R1()
        return cls(ec.generate_private_key(curve))

    @property
    def private_key(self) -> rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey:
        return self._key

    def public_key(self) -> PublicKey:
        return self._key.public_key()

    def sign_digest(self, digest: bytes) -> bytes:
        if isinstance(self._key, rsa.RSAPrivateKey):
            return self._key.sign(
                digest,
                padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32),
                utils.Prehashed(hashes.SHA256()),
            )
        hash_algorithm: hashes.HashAlgorithm = (
            hashes.SHA384() if self.algorithm == "ec-p384" else hashes.SHA256()
        )
        der = self._key.sign(digest, ec.ECDSA(utils.Prehashed(hash_algorithm)))
        r, s = utils.decode_dss_signature(der)
        width = self._key.curve.key_size // 8
        return r.to_bytes(width, "big") + s.to_bytes(width, "big")


class SoftwareCipher:
    """BlockCipher over a key in memory; counts calls so tests can check bulk use."""

    def __init__(self, key: bytes) -> None:
        self._cipher = Cipher(algorithms.AES(key), modes.ECB())  # noqa: S305 - the BlockCipher protocol is ECB
        self.calls = 0

    def encrypt_ecb(self, data: bytes) -> bytes:
        self.calls += 1
        encryptor = self._cipher.encryptor()
        return encryptor.update(data) + encryptor.finalize()

    def decrypt_ecb(self, data: bytes) -> bytes:
        self.calls += 1
        decryptor = self._cipher.decryptor()
        return decryptor.update(data) + decryptor.finalize()


def espsecure_key(path: Path, version: str, scheme: str | None) -> SoftwareSigner:
    """Have espsecure generate a signing key file at `path`; return a signer over it."""
    espsecure.generate_signing_key(version, scheme, str(path))
    private_key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert isinstance(private_key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey)
    return SoftwareSigner(private_key)


def public_pem(signer: SoftwareSigner) -> bytes:
    """The signer's public key as PEM (what `hsmflash keys public` exports)."""
    return signer.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
