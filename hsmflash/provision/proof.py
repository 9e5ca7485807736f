"""Every input proven before the first burn: where each image goes, what it is, who signed it.

Provisioning and re-flashing call `prove_images` before any eFuse is burned or flash byte
written. Each image is classified from the partition table being written (or the device's own,
for `flash`) and the chip's flash map:

- at the chip's bootloader address: a bootloader (esptool's image rules, RAM segments only);
- at 0x8000: a partition table (magic, MD5 row, no overlaps, inside the flash);
- at the start of an app partition (or, with no table in the plan, any other address): an app;
- at the start of an encrypted data partition: data (never over the NVS regions the plan
  writes itself; `flash` never writes nvs/nvs_keys/the table unless asked by name).

Bootloaders and apps must carry a Secure Boot signature that verifies against a key the
policy names for the chip (SBv2 block; SBv1 app signature, the SBv1 bootloader being covered by
the per-device digest); a development profile may list kinds in `unsigned_images`.
Hardening entries are checked against espefuse's own tables for the chip's revision.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from hsmflash.chips import SBV1, SBV2, Chip
from hsmflash.errors import Error, InputError, PolicyRefused
from hsmflash.formats import partitions, secureboot
from hsmflash.formats.images import ESP_IMAGE_MAGIC, inspect_image
from hsmflash.policy import ChipProfile, Policy

BOOTLOADER = "bootloader"
TABLE = "partition table"
APP = "app"
DATA = "data"
# data partitions `flash` leaves alone unless an explicit option names them
PROTECTED_SUBTYPES = {partitions.SUBTYPE_NVS: "nvs", partitions.SUBTYPE_NVS_KEYS: "nvs_keys"}
# eFuses the plan itself burns (keys, purposes, counters): not for a `harden` entry
_PLAN_OWNED = ("KEY_PURPOSE_", "BLOCK", "MAC", "SPI_BOOT_CRYPT_CNT", "FLASH_CRYPT_CNT",
               "SECURE_BOOT_EN", "ABS_DONE_", "SECURE_BOOT_KEY_REVOKE", "FLASH_CRYPT_CONFIG",
               "WR_DIS", "RD_DIS")


@dataclass(frozen=True)
class Region:
    """Flash the plan writes itself (credentials NVS), that no image may cover."""

    name: str
    start: int
    size: int


@dataclass(frozen=True)
class Proven:
    address: int
    path: str
    kind: str
    partition: str = ""
    signed_by: str = ""  # key name, "unsigned (policy allows)" or "" (not code)


class Verifier:
    """Who may have signed code: the policy's keys for the chip, optionally only those whose
    digests a device holds (re-flash). A chip that keeps only part of a digest in eFuse
    (ESP32-C2: its first 128 bits) holds `held_bytes` of each."""

    def __init__(self, scheme: str, keys: dict[str, Any], *, held: set[bytes] | None = None,
                 held_bytes: int = 32):
        self.scheme = scheme
        self.keys = keys  # name -> public key
        self.held = held
        self.held_bytes = held_bytes

    def check(self, data: bytes, path: str) -> str:
        """The name of the key whose signature verifies; raises PolicyRefused otherwise."""
        problems: list[str] = []
        for name, pub in self.keys.items():
            if self.held is not None and self.scheme == SBV2 and \
                    secureboot.sbv2_public_key_digest(pub)[:self.held_bytes] not in self.held:
                problems.append(f"{name}: digest not on the device (or revoked)")
                continue
            try:
                if self.scheme == SBV2:
                    secureboot.verify_sbv2(data, pub, path)
                else:
                    secureboot.verify_sbv1(data, pub, path)
                return name
            except Error as e:
                problems.append(e.diagnostics())
        held = " whose digest the device holds" if self.held is not None else ""
        raise PolicyRefused(
            f"{path!r} is not signed for Secure Boot {self.scheme} by a key of the policy"
            f"{held} ({', '.join(self.keys) or 'none'}); sign it with `hsmflash sign`"
        )


def check_addresses(images: Sequence[Any], flash_size: int, regions: Sequence[Region]) -> None:
    """Negative, unaligned, overlapping, outside the flash, or over a region the plan writes.

    Raises:
        InputError: naming the image and the address.
    """
    for img in images:
        end = img.address + len(img.data)
        if img.address < 0:
            raise InputError(f"image {img.path!r}: address {img.address:#x} is negative")
        if img.address % 0x1000:
            raise InputError(f"image {img.path!r}: address {img.address:#x} is not 4 KiB "
                             "aligned")
        if end > flash_size:
            raise InputError(f"image {img.path!r} at {img.address:#x} (+{len(img.data):#x}) "
                             f"runs past the end of the {flash_size // 1024} KiB flash")
        for r in regions:
            if img.address < r.start + r.size and r.start < end:
                raise InputError(f"image {img.path!r} at {img.address:#x} (+{len(img.data):#x}) "
                                 f"overlaps the {r.name} region {r.start:#x}+{r.size:#x} that "
                                 "provisioning writes itself")
    for a, b in itertools.pairwise(sorted(images, key=lambda i: i.address)):
        if a.address + len(a.data) > b.address:
            raise InputError(f"images {a.path!r} at {a.address:#x} and {b.path!r} at "
                             f"{b.address:#x} overlap")


def table_of(images: Sequence[Any], flash_size: int) -> list[partitions.Partition] | None:
    """The partition table the plan writes (checked), or None when it writes none."""
    for img in images:
        if img.address == partitions.TABLE_ADDRESS:
            return partitions.parse_checked(img.data, flash_size, f"partition table {img.path!r}")
    return None


def check_regions_in_table(table: list[partitions.Partition], regions: Sequence[Region],
                           where: str) -> None:
    """The NVS regions the plan writes must be partitions of that name in the table."""
    subtypes = {"nvs": partitions.SUBTYPE_NVS, "nvs_keys": partitions.SUBTYPE_NVS_KEYS}
    for r in regions:
        hit = [p for p in table if p.offset == r.start and p.type == partitions.TYPE_DATA
               and p.subtype == subtypes.get(r.name.split()[0], -1) and p.size >= r.size]
        if not hit:
            raise InputError(f"{where} has no {r.name.split()[0]} partition at {r.start:#x} "
                             f"(size >= {r.size:#x}) where the policy's [credentials] puts it")


def classify(img: Any, chip: Chip, table: list[partitions.Partition] | None, *,
             table_pending: bool = False, table_name: str = "the partition table",
             reflash: bool = False, allow_rewrite: Sequence[str] = ()) -> tuple[str, str]:
    """(kind, partition label) for one image, or InputError/PolicyRefused naming it.

    `table_pending`: the table is not known yet (re-flash, before the device is read);
    data placement is then decided later, code is still proven now. `reflash`: the
    partition table, nvs and nvs_keys are written only when `allow_rewrite` names them.
    """
    addr = img.address
    if addr == chip.bootloader_address:
        return BOOTLOADER, ""
    if addr == partitions.TABLE_ADDRESS:
        if reflash and "table" not in allow_rewrite:
            raise PolicyRefused(f"image {img.path!r} at {addr:#x} would replace the device's "
                                "partition table; pass --allow-rewrite table to do that")
        return TABLE, ""
    if addr < partitions.TABLE_REGION_END:
        raise InputError(f"image {img.path!r} at {addr:#x}: the region below "
                         f"{partitions.TABLE_REGION_END:#x} holds only the bootloader (at "
                         f"{chip.bootloader_address:#x}) and the partition table (at "
                         f"{partitions.TABLE_ADDRESS:#x})")
    if table is None:
        if table_pending:
            return "pending", ""
        # no table in the plan: only apps can be placed (the device gets its table later)
        if not img.data or img.data[0] != ESP_IMAGE_MAGIC:
            raise InputError(f"image {img.path!r} at {addr:#x} is not an ESP app image, and "
                             "no partition table is in the plan to place data; give "
                             "--image 0x8000=partitions.bin")
        if addr % partitions.APP_ALIGN:
            raise InputError(f"image {img.path!r} at {addr:#x}: apps start at a 64 KiB "
                             "boundary")
        return APP, ""
    part = next((p for p in table if p.offset == addr), None)
    if part is None:
        inside = next((p for p in table if p.contains(addr, 1)), None)
        where = (f"inside partition {inside.label!r} ({inside.offset:#x}), not at its start"
                 if inside else "outside every partition")
        raise InputError(f"image {img.path!r} at {addr:#x} is {where} of {table_name}")
    if len(img.data) > part.size:
        raise InputError(f"image {img.path!r} at {addr:#x} ({len(img.data):#x} bytes) does not "
                         f"fit partition {part.label!r} ({part.size:#x} bytes) of {table_name}")
    if part.type == partitions.TYPE_APP:
        return APP, part.label
    protected = PROTECTED_SUBTYPES.get(part.subtype) if part.type == partitions.TYPE_DATA \
        else None
    if reflash and protected and protected not in allow_rewrite:
        raise PolicyRefused(f"image {img.path!r} at {addr:#x} would replace the device's "
                            f"{protected} partition {part.label!r}; pass --allow-rewrite "
                            f"{protected} to do that")
    if not part.encrypted:
        raise InputError(f"image {img.path!r} at {addr:#x}: partition {part.label!r} of "
                         f"{table_name} is not flagged encrypted, and hsmflash writes every "
                         "image flash-encrypted; flag it `encrypted`")
    if img.data[:1] == bytes([ESP_IMAGE_MAGIC]):
        try:
            inspect_image(img.data, chip, img.path)
        except InputError:
            pass  # data that happens to start with 0xE9
        else:
            raise InputError(f"image {img.path!r} is an ESP image, but partition "
                             f"{part.label!r} at {addr:#x} is a data partition; apps go in "
                             "app partitions")
    return DATA, part.label


def prove_code(img: Any, kind: str, chip: Chip, profile: ChipProfile,
               verifier: Verifier | None) -> str:
    """Image rules for `kind` on `chip`, then a verifying signature (or a named exemption).

    Returns the signer's key name (or a note). Raises InputError (not a valid image of that
    kind) or PolicyRefused (not signed by a key the policy names).
    """
    info = inspect_image(img.data, chip, img.path)
    if info.kind != kind:
        raise InputError(f"image {img.path!r} at {img.address:#x} is an ESP {info.kind} "
                         f"image, but a {kind} belongs there")
    if kind == BOOTLOADER and img.address + len(img.data) > partitions.TABLE_ADDRESS:
        raise InputError(f"bootloader {img.path!r} at {img.address:#x} ({len(img.data):#x} "
                         f"bytes) runs into the partition table at {partitions.TABLE_ADDRESS:#x}")
    sb = profile.secure_boot
    signed = info.sbv2_signed or info.sbv1_signed
    if sb is not None and sb.scheme == SBV1 and kind == BOOTLOADER:
        return "SBv1 bootloader digest (per device)"
    if kind in profile.unsigned_images and not signed:
        return "unsigned (policy allows)"
    if sb is None or verifier is None:
        raise PolicyRefused(f"{kind} image {img.path!r}: the {chip.name} profile has no Secure "
                            "Boot key to verify it and does not list it in unsigned_images")
    if not signed:
        raise PolicyRefused(
            f"{kind} image {img.path!r} is not signed for Secure Boot {sb.scheme} by a key of "
            f"the policy ({', '.join(sb.keys)}); sign it with `hsmflash sign`")
    return verifier.check(img.data, img.path)


def prove_images(images: Sequence[Any], chip: Chip, profile: ChipProfile,
                 verifier: Verifier | None, regions: Sequence[Region], *,
                 table: list[partitions.Partition] | None = None, table_pending: bool = False,
                 table_name: str = "the partition table", reflash: bool = False,
                 allow_rewrite: Sequence[str] = ()) -> list[Proven]:
    """Check addresses, classify and prove every image (see the module doc).

    `table`: the device's table (re-flash); otherwise the table the plan writes, if any.

    Raises:
        InputError, PolicyRefused: naming the image at fault.
    """
    check_addresses(images, profile.flash_size, regions)
    written = table_of(images, profile.flash_size)
    if table is None and not table_pending:
        table = written
        table_name = "the partition table in the plan"
    if written is not None and regions:
        check_regions_in_table(written, regions, "the partition table in the plan")
    out = []
    for img in images:
        kind, label = classify(img, chip, table, table_pending=table_pending,
                               table_name=table_name, reflash=reflash,
                               allow_rewrite=allow_rewrite)
        signer = ""
        if kind in (BOOTLOADER, APP):
            signer = prove_code(img, kind, chip, profile, verifier)
        out.append(Proven(img.address, img.path, kind, label, signer))
    return out


def check_harden(policy: Policy, chip: Chip, profile: ChipProfile,
                 specs: Callable[[str, int | None], dict[str, tuple[int, str]]],
                 major: int | None = None) -> None:
    """Every `harden` entry names a writable eFuse of the chip (for that revision's table)
    with a value that fits it.

    Raises:
        InputError: naming the policy field and the entry.
    """
    where = f"{policy.path}: chips.{chip.name}.harden"
    table = specs(chip.name, major)
    rev = f" v{major}.x" if major is not None else ""
    for item in profile.harden:
        name, sep, text = item.partition("=")
        if name.startswith(_PLAN_OWNED) or name not in table:
            what = "is burned by the plan itself" if name in table else \
                f"is not an eFuse of {chip.name}{rev}"
            raise InputError(f"{where}: {name!r} {what}")
        bits, kind = table[name]
        if not (kind == "bool" or kind.startswith("uint")):
            raise InputError(f"{where}: {name!r} is a {kind} field, not a flag or counter")
        try:
            value = int(text, 0) if sep else 1
        except ValueError:
            raise InputError(f"{where}: value of {name} ({text!r}) is not a number") from None
        if not 0 < value < (1 << bits):
            raise InputError(f"{where}: value of {name} ({text}) does not fit its {bits} "
                             f"bit(s) (1..{(1 << bits) - 1})")


def check_policy_efuses(policy: Policy) -> None:
    """Check every `harden` entry of every chip profile against espefuse's tables for that
    chip (each revision the profile covers; ESP32-P4 v3.x has its own map): names, values.

    Raises:
        InputError: naming the policy field (`chips.CHIP.harden`) and the entry.
    """
    from hsmflash.chips import get_chip
    from hsmflash.device.base import efuse_field_specs

    def specs(chip: str, major: int | None) -> dict[str, tuple[int, str]]:
        return efuse_field_specs(chip, major, cached=True)

    for chip_name, prof in policy.chips.items():
        chip = get_chip(chip_name)
        majors: list[int | None] = [*sorted(set(prof.revisions))] or [None]
        for major in majors:
            check_harden(policy, chip, prof, specs, major)
