"""Independent implementation of DESIGN.md's `aes-ecb-v1` derivation, from the spec text only,
with cryptography's AES on known (test-only) master key bytes. Writes kdf-aes-ecb-v1.json.

    H   = SHA-256( b"hsmflash/kdf/aes-ecb-v1\\x00" || P || b"\\x00" || D || uint16_be(L) )
    X_i = H[0:15] || uint8(i)                       for i = 1 .. L/16
    K_D = AES-ECB_M(X_1) || AES-ECB_M(X_2) || ... || AES-ECB_M(X_{L/16})

Run: python tests/vectors/make_kdf_vectors.py
"""

import hashlib
import json
from pathlib import Path

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

MASTERS = [
    bytes(range(32)),
    bytes.fromhex("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4"),
]
DEVICES = ["24:0a:c4:01:02:03", "7c:df:a1:ff:00:10", "30:ae:a4:c0:ff:ee"]
LENGTHS = {"XTS_AES_128_KEY": 32, "XTS_AES_256_KEY": 64, "FLASH_ENCRYPTION": 32,
           "SECURE_BOOT_V1": 32}


def ecb(key: bytes, data: bytes) -> bytes:
    e = Cipher(algorithms.AES(key), modes.ECB()).encryptor()  # noqa: S305
    return e.update(data) + e.finalize()


def derive(master: bytes, mac: str, purpose: str, length: int) -> bytes:
    device = bytes.fromhex(mac.replace(":", ""))
    h = hashlib.sha256(b"hsmflash/kdf/aes-ecb-v1\x00" + purpose.encode() + b"\x00" + device
                       + length.to_bytes(2, "big")).digest()
    return b"".join(ecb(master, h[:15] + bytes([i])) for i in range(1, length // 16 + 1))


def kcv(key: bytes) -> str:
    return ecb(key, bytes(16))[:3].hex()


def main() -> None:
    vectors = []
    for master in MASTERS:
        for mac in DEVICES:
            for purpose, length in LENGTHS.items():
                k = derive(master, mac, purpose, length)
                halves = [k[: length // 2], k[length // 2 :]] if purpose.startswith("XTS") else [k]
                vectors.append({"master": master.hex(), "device": mac, "purpose": purpose,
                                "key": k.hex(), "kcv": "/".join(kcv(h) for h in halves)})
    out = Path(__file__).with_name("kdf-aes-ecb-v1.json")
    out.write_text(json.dumps(vectors, indent=1) + "\n")


if __name__ == "__main__":
    main()
