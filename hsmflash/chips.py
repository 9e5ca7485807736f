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
# ESP32-C2: a 128-bit eFuse key (low half of BLOCK_KEY0), which the chip expands with SHA-256
# into the XTS-AES-128 key pair (espsecure does the same for 16-byte key files)
XTS_AES_128_FROM_128 = "xts-aes-128-from-128"
# The KDF purpose (formats/kdf.py) of each scheme's per-device key
PURPOSE_FOR_SCHEME = {
    XTS_AES_128: "XTS_AES_128_KEY",
    XTS_AES_256: "XTS_AES_256_KEY",
    ESP32_AES256: "FLASH_ENCRYPTION",
    XTS_AES_128_FROM_128: "XTS_AES_128_KEY_DERIVED_FROM_128_EFUSE_BITS",
}

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
    # the image header's chip id, and the flash-mapped code and data windows (esptool's
    # IMAGE_CHIP_ID, IROM_MAP_* and DROM_MAP_*): a segment loaded there makes an app
    image_chip_id: int = 0
    flash_maps: tuple[tuple[int, int], ...] = ()
    # key blocks that cannot hold a flash-encryption (XTS) key (espefuse refuses the burn)
    no_xts_key_blocks: tuple[str, ...] = ()
    # Espressif marks ECDSA Secure Boot V2 insecure on this chip (ESP-IDF security notes:
    # "not functional for certain input vectors"); refused unless a policy overrides it
    ecdsa_sbv2_insecure: bool = False
    # the first major revision whose eFuses have SECURE_BOOT_SHA384_EN (P-384 Secure Boot)
    sha384_min_revision: int = 0

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
            image_chip_id=0,
            flash_maps=((0x400D0000, 0x40400000), (0x3F400000, 0x3F800000)),
        ),
        Chip("esp32s2", "ESP32-S2", (XTS_AES_128, XTS_AES_256), ("rsa-3072",), 3,
             bootloader_address=0x1000, key_blocks=_KEY_BLOCKS_6, image_chip_id=2,
             flash_maps=((0x40080000, 0x40B80000), (0x3F000000, 0x3F3F0000))),
        Chip("esp32s3", "ESP32-S3", (XTS_AES_128, XTS_AES_256), ("rsa-3072",), 3,
             key_blocks=_KEY_BLOCKS_6, image_chip_id=9,
             flash_maps=((0x42000000, 0x44000000), (0x3C000000, 0x3E000000))),
        Chip("esp32c3", "ESP32-C3", (XTS_AES_128,), ("rsa-3072",), 3, key_blocks=_KEY_BLOCKS_6,
             image_chip_id=5, flash_maps=((0x42000000, 0x42800000), (0x3C000000, 0x3C800000))),
        Chip("esp32c2", "ESP32-C2 (ESP8684): 128-bit flash-encryption key, SBv2 ECDSA P-256",
             (XTS_AES_128_FROM_128,), ("ec-p256",), 1,
             # its one key block in halves: the 128-bit flash key, the SBv2 digest's first half
             key_blocks=("BLOCK_KEY0_LOW_128", "BLOCK_KEY0_HI_128"),
             image_chip_id=12, flash_maps=((0x42000000, 0x42400000), (0x3C000000, 0x3C400000))),
        Chip("esp32c6", "ESP32-C6", (XTS_AES_128,), ("rsa-3072", "ec-p256"), 3,
             key_blocks=_KEY_BLOCKS_6, image_chip_id=13,
             flash_maps=((0x42000000, 0x42800000), (0x42800000, 0x43000000))),
        Chip("esp32h2", "ESP32-H2", (XTS_AES_128,), ("rsa-3072", "ec-p256"), 3,
             key_blocks=_KEY_BLOCKS_6, image_chip_id=16,
             flash_maps=((0x42000000, 0x42800000), (0x42800000, 0x43000000)),
             ecdsa_sbv2_insecure=True),
        # ESP32-C5: no XTS-AES-256 key purpose in eFuse (espefuse 5.x esp32c5/fields.py
        # KEY_PURPOSES), and BLOCK_KEY5 cannot hold an XTS key (ESP-IDF's C5 security notes)
        Chip("esp32c5", "ESP32-C5", (XTS_AES_128,), ("rsa-3072", "ec-p256", "ec-p384"),
             3, bootloader_address=0x2000, key_blocks=_KEY_BLOCKS_6, image_chip_id=23,
             flash_maps=((0x42000000, 0x44000000),), no_xts_key_blocks=("BLOCK_KEY5",),
             ecdsa_sbv2_insecure=True),
        # ESP32-P4: v3.x has its own eFuse map (espefuse's esp32p4_v3.0.yaml), the only one
        # with SECURE_BOOT_SHA384_EN
        Chip("esp32p4", "ESP32-P4", (XTS_AES_128, XTS_AES_256), ("rsa-3072", "ec-p256", "ec-p384"),
             3, bootloader_address=0x2000, key_blocks=_KEY_BLOCKS_6, image_chip_id=18,
             flash_maps=((0x40000000, 0x4C000000),), ecdsa_sbv2_insecure=True,
             sha384_min_revision=3),
    )
}

# Every chip id an ESP image header may carry (esptool's IMAGE_CHIP_ID), so an image for a
# chip hsmflash does not provision is still named in the error.
IMAGE_CHIP_NAMES: dict[int, str] = {
    0: "esp32", 2: "esp32s2", 5: "esp32c3", 9: "esp32s3", 12: "esp32c2", 13: "esp32c6",
    16: "esp32h2", 18: "esp32p4", 20: "esp32c61", 23: "esp32c5", 25: "esp32h21", 28: "esp32h4",
    31: "esp32e22", 32: "esp32s31",
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
