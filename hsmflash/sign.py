"""Release signing through the token: Secure Boot V2/V1 images, SBv1 bootloader digests.

Every input is checked (image parser, chip, scheme, key type, policy) before the key is used;
each signature goes through `Station.use`, audited with the image SHA-256, key fingerprint,
chip and scheme.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any

from hsmflash.chips import SBV1, SBV2, Chip
from hsmflash.errors import InputError
from hsmflash.formats import secureboot
from hsmflash.formats.images import inspect_image
from hsmflash.keyuse import Station
from hsmflash.token.keys import TokenKey

SCHEMES = (SBV2, SBV1)


@dataclass
class SignResult:
    output: bytes
    scheme: str
    chip: str
    key: str
    fingerprint: str
    input_sha256: str
    output_sha256: str
    signatures: int

    def summary(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "output"}


def default_scheme(chip: Chip) -> str:
    return SBV1 if chip.name == "esp32" else SBV2


def sign_image(st: Station, image: bytes, chip: Chip, key: TokenKey, scheme: str | None,
               *, append: bool = False, name: str = "image") -> SignResult:
    """Sign `image` for `chip` with a token key.

    Raises:
        InputError: not an image for the chip, already signed, wrong key type for the scheme.
        PolicyRefused: the policy does not allow this key for this chip and scheme.
        TokenError / VerificationFailed: from the token or the post-sign check.
    """
    scheme = scheme or default_scheme(chip)
    if scheme not in SCHEMES:
        raise InputError(f"unknown scheme {scheme!r} (sbv2 or sbv1)")
    if scheme == SBV1:
        if not chip.sbv1:
            raise InputError(f"{chip.name} has no Secure Boot V1; use --scheme sbv2")
        if key.type != "ec-p256":
            raise InputError(f"key {key.name!r} is {key.type}; Secure Boot V1 needs ec-p256")
        if append:
            raise InputError("--append is for Secure Boot V2 signature sectors")
    elif key.type not in chip.sbv2_algorithms:
        raise InputError(f"key {key.name!r} is {key.type}; {chip.name} Secure Boot V2 takes "
                         f"{', '.join(chip.sbv2_algorithms)}")
    info = inspect_image(image, chip, name)  # before any key use
    fp = key.fingerprint()
    policy = st.policy

    def check() -> None:
        if policy.chips:
            policy.check_sign(key.name, chip.name, scheme)

    with st.use("sign", key, subject={"image_sha256": info.sha256, "image": name},
                detail={"chip": chip.name, "scheme": scheme, "append": append},
                check=check) as outcome:
        signer = outcome.signer()
        if scheme == SBV2:
            out = secureboot.sign_sbv2(image, signer, chip, append=append, name=name, info=info)
            count = len(info.sbv2_blocks) + 1
        else:
            out = secureboot.sign_sbv1(image, signer, name=name)
            count = 1
        out_sha = hashlib.sha256(out).hexdigest()
        outcome.update({"output_sha256": out_sha, "signatures": count})
    return SignResult(out, scheme, chip.name, key.name, fp, info.sha256, out_sha, count)


def key_digest(key: TokenKey, chip: Chip) -> dict[str, Any]:
    """The value to burn into eFuse for a signing key: SBv2 public-key digest, or for SBv1
    the raw public key the bootloader build embeds.

    Raises:
        InputError: the key does not fit the chip's schemes.
    """
    pub = key.public_key()
    if key.type in chip.sbv2_algorithms:
        digest = secureboot.sbv2_public_key_digest(pub)
        return {"scheme": SBV2, "chip": chip.name, "key": key.name, "digest": digest.hex(),
                "bytes": digest, "what": "SHA-256 of the public key material: burn into a "
                "SECURE_BOOT_DIGESTn key block (espefuse burn-key-digest takes the PEM)"}
    if chip.sbv1 and key.type == "ec-p256":
        raw = secureboot.sbv1_public_key_bytes(pub)
        return {"scheme": SBV1, "chip": chip.name, "key": key.name, "digest": raw.hex(),
                "bytes": raw, "what": "raw public key for the SBv1 bootloader build "
                "(signature_verification_key.bin)"}
    raise InputError(f"key {key.name!r} ({key.type}) fits no Secure Boot scheme of {chip.name}")


def bootloader_digest(st: Station, bootloader: bytes, cipher_key: TokenKey | None,
                      *, master: TokenKey | None = None, device: bytes | None = None,
                      iv: bytes | None = None, name: str = "bootloader") -> tuple[bytes, str]:
    """SBv1 bootloader digest image (as `espsecure digest-secure-bootloader`), AES in the token.

    The key is a token AES-256 key (`cipher_key`) or the device's `SECURE_BOOT_V1` key derived
    from `master` for `device`. Returns (output, kcv).

    Raises:
        InputError: bad bootloader, IV or key type.
    """
    from hsmflash.chips import CHIPS

    info = inspect_image(bootloader, CHIPS["esp32"], name)
    iv = iv if iv is not None else os.urandom(secureboot.SBV1_IV_LEN)
    if len(iv) != secureboot.SBV1_IV_LEN:
        raise InputError(f"IV is {len(iv)} bytes; Secure Boot V1 needs 128")
    if cipher_key is not None:
        if cipher_key.type != "aes-256" or "encrypt" not in cipher_key.usage:
            raise InputError(f"key {cipher_key.name!r} must be aes-256 with usage encrypt")
        with st.use("sbv1.digest", cipher_key, subject={"image_sha256": info.sha256},
                    detail={"chip": "esp32"}) as outcome:
            out = secureboot.sbv1_bootloader_digest(bootloader, outcome.cipher(), iv, name)
            outcome["output_sha256"] = hashlib.sha256(out).hexdigest()
        return out, cipher_key.kcv()
    if master is None or device is None:
        raise InputError("give --key NAME, or --master NAME with --device MAC")
    from hsmflash.formats.kdf import format_mac

    st.policy.check_master(master.name, "esp32")
    with st.use("sbv1.digest", master, subject={"device": format_mac(device),
                                                "image_sha256": info.sha256},
                detail={"chip": "esp32", "purpose": "SECURE_BOOT_V1"}) as outcome:
        derived = outcome.derive(device, "SECURE_BOOT_V1")
        try:
            out = secureboot.sbv1_bootloader_digest(bootloader, derived.ciphers()[0], iv, name)
            kcv = derived.kcv
        finally:
            derived.destroy()
        outcome.update({"device_kcv": kcv, "output_sha256": hashlib.sha256(out).hexdigest()})
    return out, kcv
