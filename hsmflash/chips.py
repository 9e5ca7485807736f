"""Per-chip facts: flash-encryption scheme, Secure Boot schemes, eFuse key blocks.

Checked against espsecure/espefuse 5.x. Names are esptool's chip names (`esp32s3`).
"""

from __future__ import annotations

from dataclasses import dataclass

from hsmflash.errors import InputError

# Flash-encryption schemes
ESP32_AES256 = "esp32-aes-256"  # ESP32 classic: per-32-byte tweaked key, FLASH_CRYPT_CONFIG
XTS_AES_128 = "xts-aes-128"
XTS_AES_256 = "xts-aes-256"

# Secure Boot schemes
SBV1 = "sbv1"
SBV2 = "sbv2"


@dataclass(frozen=True)
class Chip:
    """What hsmflash needs to know about one chip family."""

    name: str
    description: str
    flash_encryption: tuple[str, ...]
    # signature algorithms Secure Boot V2 accepts on this chip (hsmflash key types)
    sbv2_algorithms: tuple[str, ...]
    sbv2_max_signatures: int
    # ESP32 classic only: Secure Boot V1 exists on rev0-1 (and still on rev3)
    sbv1: bool = False
    bootloader_address: int = 0x0
    key_blocks: tuple[str, ...] = ()

    @property
    def is_esp32_classic(self) -> bool:
        return self.name == "esp32"

    def check_flash_encryption(self, scheme: str) -> None:
        """Raise InputError when this chip does not support `scheme`."""
        if scheme not in self.flash_encryption:
            raise InputError(
                f"chip {self.name} does not support flash encryption {scheme!r} "
                f"(supported: {', '.join(self.flash_encryption)})"
            )

    def default_flash_encryption(self) -> str:
        return self.flash_encryption[0]


_KEY_BLOCKS_6 = tuple(f"BLOCK_KEY{i}" for i in range(6))

CHIPS: dict[str, Chip] = {
    c.name: c
    for c in (
        Chip(
            "esp32",
            "ESP32 (classic; rev0-1 Secure Boot V1, rev3 also V2; Pycom FiPy/LoPy)",
            (ESP32_AES256,),
            ("rsa-3072",),
            1,
            sbv1=True,
            bootloader_address=0x1000,
            key_blocks=("BLOCK1", "BLOCK2", "BLOCK3"),
        ),
        Chip("esp32s2", "ESP32-S2", (XTS_AES_128, XTS_AES_256), ("rsa-3072",), 3,
             bootloader_address=0x1000, key_blocks=_KEY_BLOCKS_6),
        Chip("esp32s3", "ESP32-S3", (XTS_AES_128, XTS_AES_256), ("rsa-3072",), 3,
             key_blocks=_KEY_BLOCKS_6),
        Chip("esp32c3", "ESP32-C3", (XTS_AES_128,), ("rsa-3072",), 3, key_blocks=_KEY_BLOCKS_6),
        Chip("esp32c6", "ESP32-C6", (XTS_AES_128,), ("rsa-3072", "ec-p256"), 3,
             key_blocks=_KEY_BLOCKS_6),
        Chip("esp32h2", "ESP32-H2", (XTS_AES_128,), ("rsa-3072", "ec-p256"), 3,
             key_blocks=_KEY_BLOCKS_6),
        Chip("esp32c5", "ESP32-C5", (XTS_AES_128, XTS_AES_256), ("rsa-3072", "ec-p256", "ec-p384"),
             3, bootloader_address=0x2000, key_blocks=_KEY_BLOCKS_6),
        Chip("esp32p4", "ESP32-P4", (XTS_AES_128, XTS_AES_256), ("rsa-3072", "ec-p256", "ec-p384"),
             3, bootloader_address=0x2000, key_blocks=_KEY_BLOCKS_6),
    )
}


def get_chip(name: str) -> Chip:
    """Look up a chip by esptool name (case-insensitive, '-' and '_' ignored).

    Raises:
        InputError: the chip is unknown; the message lists the known ones.
    """
    key = name.lower().replace("-", "").replace("_", "")
    chip = CHIPS.get(key)
    if chip is None:
        raise InputError(f"unknown chip {name!r} (known: {', '.join(CHIPS)})")
    return chip
