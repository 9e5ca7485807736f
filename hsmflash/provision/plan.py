"""The plan: everything provisioning will do to one device, decided before anything is done.

Pure. `plan_provision` takes what the device's eFuses hold (an `EfuseState`) and what the token
derives for this device (`Expected`: key check values only, never keys) and returns a `Plan`:
the key blocks to burn, the images to write where, the eFuses to enable and those burned last.
It refuses a device that contradicts the policy (another key, purpose or protection). Nothing
here touches a token or a device, so every decision is testable with a virtual chip alone; the
executor (`hsmflash.provision.execute`) derives, encrypts, burns and writes.

For a provisioned device's field update, `reflash_key_state` holds the device's key to this
policy's, and `plan_reflash` plans the writes: every image signed by a key whose digest the
device holds, every address in an encrypted partition of the device's own table. Nothing here
plans an eFuse write for re-flash.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from hsmflash.chips import (
    PURPOSE_FOR_SCHEME,
    SBV1,
    XTS_AES_128,
    XTS_AES_128_FROM_128,
    Chip,
)
from hsmflash.errors import DeviceError, InputError, PolicyRefused
from hsmflash.formats import kdf, partitions, secureboot
from hsmflash.formats.images import app_secure_version
from hsmflash.hazmat.efuse import HALF_BLOCK_CHIPS
from hsmflash.policy import ChipProfile, Policy
from hsmflash.provision import proof
from hsmflash.provision.inputs import SECTOR, CredentialPlacement, ImageSpec

if TYPE_CHECKING:
    from hsmflash.formats.primitives import PublicKey
    from hsmflash.hazmat.efuse import EfuseState

# eFuses that close download mode: always burned in the very last step.
DOWNLOAD_MODE_FIELDS = ("ENABLE_SECURITY_DOWNLOAD", "DIS_DOWNLOAD_MODE", "UART_DOWNLOAD_DIS",
                        "DIS_USB_SERIAL_JTAG_DOWNLOAD_MODE", "DIS_USB_OTG_DOWNLOAD_MODE")
# eFuses that cut a native-USB chip's USB-Serial-JTAG link (the port provisioning talks over):
# burned with the download-mode eFuses, in the very last step, never before. DIS_USB_JTAG only
# disables the JTAG function of that peripheral; the serial link stays.
USB_LINK_FIELDS = ("DIS_USB_SERIAL_JTAG", "USB_PHY_SEL", "USB_EXCHG_PINS", "USB_EXT_PHY_ENABLE",
                   "DIS_USB_DEVICE")
LAST_STEP_FIELDS = DOWNLOAD_MODE_FIELDS + USB_LINK_FIELDS
SBV1_DIGEST_ADDRESS = 0x0
# (block, purpose, data as the block holds it) -> the key in key-file order (espefuse's rule)
KeyOrder = Callable[[str, str | None, bytes], bytes]


@dataclass
class FlashWrite:
    address: int
    source: str
    plaintext_sha256: str
    length: int
    ciphertext: bytes = field(repr=False, default=b"")
    md5: str = ""
    status: str = "pending"  # pending | written | in-place


@dataclass
class Plan:
    """Everything provisioning will do to one device, computed before anything is touched."""

    chip: str
    revision: str
    mac: str
    policy: str
    flash_encryption: str
    fe_purpose: str
    fe_blocks: list[tuple[str, str | None]]  # (block, purpose)
    fe_kcv: str = ""
    fe_state: str = "burn"  # burn | in-place | in-place-unverified
    secure_boot: str = "none"
    # (block, purpose, what)
    sb_burns: list[tuple[str, str | None, str]] = field(default_factory=list)
    sb_digests: dict[str, bytes] = field(default_factory=dict)  # block -> SBv2 digest to burn
    sb_kcv: str = ""
    # NVS keys the ESP-IDF 6 way: the HMAC_UP key block to burn (None: nothing to burn)
    hmac_burn: str | None = None
    hmac_kcv: str = ""
    read_protect_keys: bool = True
    flash: list[FlashWrite] = field(default_factory=list)
    enable_fields: dict[str, int] = field(default_factory=dict)
    enable_write_protect: list[str] = field(default_factory=list)
    final_fields: dict[str, int] = field(default_factory=dict)
    # a read-protected key: flash already written must decrypt with it, (address, image,
    # chip id of its header) per ESP image; checked by the executor, in the token
    flash_key_checks: list[tuple[int, str, bytes]] = field(default_factory=list)
    done: bool = False
    issued_cert: tuple[str, str] = ("", "")  # (serial, sha256): filled by the executor

    def describe(self) -> dict[str, Any]:
        return {
            "chip": self.chip, "revision": self.revision, "mac": self.mac, "policy": self.policy,
            "flash_encryption": self.flash_encryption, "fe_purpose": self.fe_purpose,
            "fe_blocks": [{"block": b, "purpose": p} for b, p in self.fe_blocks],
            "fe_kcv": self.fe_kcv, "fe_state": self.fe_state, "secure_boot": self.secure_boot,
            "sb_blocks": [{"block": b, "purpose": p, "what": w} for b, p, w in self.sb_burns],
            "read_protect_keys": self.read_protect_keys,
            "hmac_up": {"block": self.hmac_burn, "kcv": self.hmac_kcv} if self.hmac_kcv else None,
            "flash": [{"address": f"{w.address:#x}", "source": w.source, "length": w.length,
                       "plaintext_sha256": w.plaintext_sha256, "status": w.status}
                      for w in self.flash],
            "enable": self.enable_fields, "write_protect": self.enable_write_protect,
            "last": self.final_fields, "already_provisioned": self.done,
        }


@dataclass
class DeviceResult:
    mac: str
    chip: str
    revision: str
    # provisioned | already-provisioned | planned | failed; re-flash: flashed | up-to-date |
    # written-unverified (Secure Download Mode)
    result: str
    fe_kcv: str = ""
    sb_kcv: str = ""
    images: list[dict[str, str]] = field(default_factory=list)
    burned: list[str] = field(default_factory=list)
    seconds: float = 0.0
    error: str = ""
    plan: dict[str, Any] = field(default_factory=dict)
    cert_serial: str = ""  # credentials kind x509: the device certificate written to NVS
    cert_sha256: str = ""
    verified: bool = True  # False: written in Secure Download Mode, nothing could be read back
    notes: list[str] = field(default_factory=list)  # e.g. a baud fallback

    def manifest_row(self) -> dict[str, Any]:
        return {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "mac": self.mac,
                "chip": self.chip, "revision": self.revision, "fe_kcv": self.fe_kcv,
                "sb_kcv": self.sb_kcv, "images": self.images, "result": self.result,
                "error": self.error, "seconds": round(self.seconds, 3),
                "cert_serial": self.cert_serial, "cert_sha256": self.cert_sha256}


def sw_kcv(key: bytes) -> str:
    """KCV of key bytes read back from a readable eFuse block (already outside the token)."""
    enc = Cipher(algorithms.AES(key), modes.ECB()).encryptor()  # noqa: S305 - KCV definition
    return (enc.update(bytes(16)) + enc.finalize())[:3].hex()


def _halves(key: bytes, purpose: str) -> list[bytes]:
    return [key[:len(key) // 2], key[len(key) // 2:]] if purpose.startswith("XTS") else [key]


def pad(data: bytes, unit: int) -> bytes:
    return data + b"\xff" * (-len(data) % unit)


def sbv1_iv(mac: bytes, bootloader: bytes) -> bytes:
    """A deterministic 128-byte IV for the SBv1 digest, so a re-run writes the same bytes."""
    seed = hashlib.sha512(b"hsmflash/sbv1-iv\x00" + mac + hashlib.sha256(bootloader).digest())
    return seed.digest() + hashlib.sha512(seed.digest()).digest()



# ---------------------------------------------------------------------------------------
# What the plan is made from
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    """What devices are provisioned (or re-flashed) to, proven once before any device."""

    policy: Policy
    chip: Chip
    profile: ChipProfile
    images: tuple[ImageSpec, ...]
    sb_public: tuple[PublicKey, ...] = ()  # the profile's Secure Boot keys, in policy order
    placement: CredentialPlacement | None = None  # where credentials go (None: none written)
    needs_sha384: bool = False  # a P-384 Secure Boot key: SECURE_BOOT_SHA384_EN, chip v3.0+
    # how this token encrypts with the per-device key (`hsmflash.encrypt.derived_path`) and
    # what that takes out of the token (ESP32 classic without XOR derivation, ESP32-C2)
    crypt_path: str = ""  # set by `execute.prepare_target` from the token's profile
    crypt_exports: tuple[str, ...] = ()

    @property
    def fe_purpose(self) -> str:
        return PURPOSE_FOR_SCHEME[self.profile.flash_encryption]

    def fe_blocks(self) -> list[tuple[str, str | None]]:
        """(key block, key purpose) of the flash-encryption key; ESP32: no purpose field."""
        scheme = self.profile.flash_encryption
        if self.chip.is_esp32_classic:
            return [("BLOCK1", None)]
        if scheme == XTS_AES_128_FROM_128:  # ESP32-C2: the low half of its one key block
            return [("BLOCK_KEY0_LOW_128", PURPOSE_FOR_SCHEME[scheme])]
        first = self.profile.key_block or "BLOCK_KEY0"
        index = self.chip.key_blocks.index(first)
        if scheme == XTS_AES_128:
            return [(first, "XTS_AES_128_KEY")]
        return [(first, "XTS_AES_256_KEY_1"), (self.chip.key_blocks[index + 1],
                                               "XTS_AES_256_KEY_2")]

    def is_sbv1_bootloader(self, img: ImageSpec) -> bool:
        sb = self.profile.secure_boot
        return sb is not None and sb.scheme == SBV1 and img.address == self.chip.bootloader_address

    def digest_slot(self, free: Sequence[str], index: int) -> tuple[str, str, bytes]:
        """(block, purpose, bytes to burn) of the `index`-th Secure Boot V2 key digest."""
        digest = secureboot.sbv2_public_key_digest(self.sb_public[index])
        if self.chip.name in HALF_BLOCK_CHIPS:  # ESP32-C2: the digest's first 128 bits
            return "BLOCK_KEY0_HI_128", "SECURE_BOOT_DIGEST", digest[:16]
        return free[index], f"SECURE_BOOT_DIGEST{index}", digest

    def verifier(self, held: set[bytes] | None = None) -> proof.Verifier | None:
        """Who may have signed code: the policy's keys (re-flash: only those the device holds)."""
        sb = self.profile.secure_boot
        if sb is None:
            return None
        return proof.Verifier(sb.scheme, dict(zip(sb.keys, self.sb_public, strict=True)),
                              held=held, held_bytes=16 if self.chip.name in HALF_BLOCK_CHIPS
                              else 32)


@dataclass(frozen=True)
class Expected:
    """What the token derives for one device, as key check values (never the keys)."""

    fe_kcvs: tuple[str, ...]  # the flash-encryption key, one per half (XTS: K1, K2)
    sbv1_kcvs: tuple[str, ...] = ()  # the Secure Boot V1 key, where the policy has one
    hmac_kcv: str = ""  # the NVS HMAC_UP key, where the policy has one

    @property
    def fe_kcv(self) -> str:
        return "/".join(self.fe_kcvs)


# ---------------------------------------------------------------------------------------
# Provisioning
# ---------------------------------------------------------------------------------------

def plan_provision(target: Target, mac: bytes, revision: str, state: EfuseState,
                   expected: Expected, key_order: KeyOrder) -> Plan:
    """Compute the plan and check the device against it; nothing is burned or written.

    Raises:
        DeviceError: the eFuses contradict the policy (another key, purpose, a locked
            block, Secure Boot already enabled with other keys).
        InputError: the policy names an eFuse or a key block the chip does not have.
    """
    prof = target.profile
    purpose = target.fe_purpose
    plan = Plan(target.chip.name, revision, kdf.format_mac(mac), target.policy.name,
                prof.flash_encryption, purpose, target.fe_blocks(),
                read_protect_keys=not prof.readable_keys)
    plan.fe_kcv = expected.fe_kcv
    plan.fe_state = key_state(target, state, plan.fe_blocks, purpose, expected.fe_kcvs,
                              key_order)
    if any(state.key_blocks[b].read_protected for b, _ in plan.fe_blocks):
        # what is in flash must decrypt with this device's key, or another master wrote it
        # and re-writing the flash would leave a device that cannot boot
        plan.flash_key_checks = [(img.address, img.path, img.data[12:14])
                                 for img in target.images if img.is_esp_image]
    sb = prof.secure_boot
    if sb is not None:
        plan.secure_boot = sb.scheme
        if sb.scheme == SBV1:
            plan.sb_kcv = "/".join(expected.sbv1_kcvs)
            if key_state(target, state, [("BLOCK2", None)], "SECURE_BOOT_V1",
                         expected.sbv1_kcvs, key_order) == "burn":
                plan.sb_burns.append(("BLOCK2", None, "Secure Boot V1 key (derived)"))
        else:
            used = {b for b, _ in plan.fe_blocks}
            free = [b for b in target.chip.key_blocks if b not in used]
            for i in range(len(target.sb_public)):
                block, dpurpose, digest = target.digest_slot(free, i)
                blk = state.key_blocks[block]
                if blk.used and (blk.purpose not in (dpurpose, "USER", None)
                                 or (any(blk.data) and blk.data != digest)):
                    raise DeviceError(
                        f"{block} already holds {blk.purpose or 'data'} that is not the "
                        f"digest of {sb.keys[i]!r}: device was provisioned under "
                        "another policy")
                if not (blk.purpose in (dpurpose, None) and blk.data == digest
                        and blk.write_protected
                        and (blk.purpose_write_protected or blk.purpose is None)):
                    # blank, or killed inside the burn: burning again adds what is missing
                    plan.sb_burns.append((block, dpurpose, f"SBv2 digest of {sb.keys[i]}"))
                    plan.sb_digests[block] = digest
            plan.sb_kcv = ",".join(secureboot.sbv2_public_key_digest(p).hex()[:16]
                                   for p in target.sb_public)
    if prof.nvs_encryption == "hmac":
        _plan_hmac_key(target, state, plan, expected.hmac_kcv, key_order)
    plan.flash = flash_writes(target, target.images)
    _plan_fields(target, plan, state)
    return plan


def key_state(target: Target, state: EfuseState, blocks: list[tuple[str, str | None]],
              purpose: str, kcvs: Sequence[str], key_order: KeyOrder) -> str:
    """burn | in-place | in-place-unverified; DeviceError when another key is there.

    "burn" also when this device's key is there but its purpose or protection bits are
    not (a run killed inside the burn): burning again adds only what is missing.
    """
    protect = not target.profile.readable_keys
    found = []
    for i, (block, bpurpose) in enumerate(blocks):
        blk = state.key_blocks[block]
        if not blk.used and not blk.read_protected:
            found.append("empty")
            continue
        if bpurpose is not None and blk.purpose not in (bpurpose, "USER", None):
            raise DeviceError(f"{block} has key purpose {blk.purpose}, policy needs "
                              f"{bpurpose}: device was provisioned differently")
        if blk.read_protected and not protect:
            raise DeviceError(f"{block} is read-protected, policy {target.policy.name!r} "
                              "keeps keys readable: device was provisioned differently")
        complete = (blk.write_protected and blk.read_protected == protect
                    and (bpurpose is None or blk.purpose is None  # no purpose field
                         or (blk.purpose == bpurpose and blk.purpose_write_protected)))
        if blk.read_protected:
            found.append("unverified" if complete else "partial")
            continue
        if not any(blk.data):
            found.append("partial")  # purpose or protection burned before the data
            continue
        key = key_order(block, bpurpose, bytes(blk.data))
        want = list(kcvs) if len(blocks) == 1 else [kcvs[i]]
        parts = _halves(key, purpose) if len(want) == 2 else [key]
        if [sw_kcv(p) for p in parts] != want:
            raise DeviceError(f"{block} already holds a different key: device was "
                              "provisioned with another master key or policy")
        found.append("ok" if complete else "partial")
    if "empty" in found or "partial" in found:
        return "burn"  # blank, or partially burned (killed mid-burn, XTS-256 pair): finish
    if all(f == "ok" for f in found):
        return "in-place"
    return "in-place-unverified"


def _plan_hmac_key(target: Target, state: EfuseState, plan: Plan, kcv: str,
                   key_order: KeyOrder) -> None:
    """The NVS HMAC_UP key (always read-protected): burn it unless it is complete."""
    block = target.profile.nvs_hmac_key_block
    if block in {b for b, _ in plan.fe_blocks} | {b for b, _, _ in plan.sb_burns}:
        raise InputError(f"policy {target.policy.name!r}: nvs_hmac_key_block {block} is "
                         "also used for flash encryption or Secure Boot")
    plan.hmac_kcv = kcv
    blk = state.key_blocks[block]
    if blk.used and blk.purpose not in ("HMAC_UP", "USER"):
        raise DeviceError(f"{block} has key purpose {blk.purpose}, policy needs HMAC_UP "
                          "for NVS: device was provisioned differently")
    if not blk.read_protected and any(blk.data):
        if sw_kcv(key_order(block, "HMAC_UP", bytes(blk.data))) != kcv:
            raise DeviceError(f"{block} already holds a different HMAC key: device was "
                              "provisioned with another master key or policy")
    if not (blk.purpose == "HMAC_UP" and blk.read_protected and blk.write_protected
            and blk.purpose_write_protected):
        plan.hmac_burn = block


def flash_writes(target: Target, images: Sequence[ImageSpec]) -> list[FlashWrite]:
    """One write per image (SBv1: the bootloader's digest image at 0x0), then the
    credentials' nvs and nvs_keys where the target writes credentials (in that order: the
    executor fills them last)."""
    unit = 32 if target.chip.is_esp32_classic else 16
    writes = []
    for img in images:
        if target.is_sbv1_bootloader(img):
            writes.append(FlashWrite(SBV1_DIGEST_ADDRESS, img.path + " (SBv1 digest)",
                                     img.sha256, SECTOR + len(pad(img.data, 128))))
        else:
            writes.append(FlashWrite(img.address, img.path, img.sha256,
                                     len(pad(img.data, unit))))
    cred = target.placement
    if cred is not None:
        writes.append(FlashWrite(cred.nvs_address, "nvs (credentials)", "", cred.nvs_size))
        if cred.nvs_keys_address is not None:  # None: the chip derives its NVS keys (HMAC)
            writes.append(FlashWrite(cred.nvs_keys_address, "nvs_keys", "", 0x1000))
    return writes


def _plan_fields(target: Target, plan: Plan, state: EfuseState) -> None:
    prof = target.profile
    release = prof.release_mode
    enable: dict[str, int] = {}
    protect: list[str] = []
    if target.chip.is_esp32_classic:
        enable["FLASH_CRYPT_CONFIG"] = prof.flash_crypt_config
        if state.flash_crypt_cnt == 0:
            enable["FLASH_CRYPT_CNT"] = 1
        if release:
            protect.append("FLASH_CRYPT_CNT")
        if prof.secure_boot is not None and prof.secure_boot.scheme == SBV1:
            enable["ABS_DONE_0"] = 1
    else:
        enable["SPI_BOOT_CRYPT_CNT"] = 7 if release else max(state.flash_crypt_cnt, 1)
        if prof.secure_boot is not None:
            enable["SECURE_BOOT_EN"] = 1
            if target.needs_sha384:  # the ROM verifies P-384 blocks only with this set
                enable["SECURE_BOOT_SHA384_EN"] = 1
            if release and target.chip.sbv2_max_signatures > 1:
                for i in range(len(target.sb_public), 3):
                    enable[f"SECURE_BOOT_KEY_REVOKE{i}"] = 1
    final: dict[str, int] = {}
    for item in prof.harden:
        name, sep, value = item.partition("=")
        val = int(value, 0) if sep else 1
        (final if name in LAST_STEP_FIELDS else enable)[name] = val
    for name in list(enable) + list(final):
        try:
            state.field(name)
        except InputError:
            raise InputError(f"policy {target.policy.name!r}: eFuse {name!r} does not exist "
                             f"on {target.chip.name}") from None
    plan.enable_fields = {k: v for k, v in enable.items() if not already(state, k, v)}
    plan.enable_write_protect = [p for p in protect if not state.is_write_protected(p)]
    plan.final_fields = {k: v for k, v in final.items() if not already(state, k, v)}


def efuses_done(plan: Plan) -> bool:
    """Nothing left to burn: the device may be finished (its flash decides)."""
    return (plan.fe_state != "burn" and not plan.sb_burns and not plan.enable_fields
            and not plan.final_fields and not plan.enable_write_protect)


def already(state: EfuseState, name: str, value: int) -> bool:
    """eFuse `name` already holds `value` (for a counter: at least its bits)."""
    current = state.field(name)
    if isinstance(current, bool):
        return current == bool(value)
    if isinstance(current, bytes):
        return False
    return int(current) == int(value) or (int(current) & int(value)) == int(value)


# ---------------------------------------------------------------------------------------
# Re-flash
# ---------------------------------------------------------------------------------------

def reflash_key_state(target: Target, mac: bytes, state: EfuseState, expected: Expected,
                      key_order: KeyOrder) -> str:
    """in-place | in-place-unverified (read-protected: re-flash then checks that the
    bootloader in flash decrypts with this device's key).

    Raises:
        DeviceError: flash encryption off, no key, or another master's key.
    """
    if not state.flash_encryption_enabled:
        raise DeviceError("flash encryption is not enabled on this device: it was never "
                          "provisioned; run `hsmflash provision` first")
    try:
        status = key_state(target, state, target.fe_blocks(), target.fe_purpose,
                           expected.fe_kcvs, key_order)
    except DeviceError:
        raise DeviceError("the device's flash-encryption key is not the one this policy's "
                          f"master ({target.profile.derive_master!r}) derives for "
                          f"{kdf.format_mac(mac)}: it was provisioned under another master "
                          "key or policy; use that policy") from None
    if status == "burn":
        raise DeviceError("the device has no flash-encryption key: run `hsmflash "
                          "provision` first")
    return status


def plan_reflash(target: Target, mac: bytes, revision: str, expected: Expected,
                 table: list[partitions.Partition], held: set[bytes] | None, *,
                 allow_rewrite: Sequence[str] = ()) -> tuple[Plan, list[ImageSpec]]:
    """The writes of a field update, checked against the device's own partition table and,
    where the device's digests can be read (`held`), the Secure Boot keys it trusts.

    Returns the plan and the images with addresses resolved from the device's table.

    Raises:
        InputError: an image bigger than its partition, an address outside the device's
            encrypted partitions, a partition the table lacks.
        PolicyRefused: an image not signed by a key the device trusts; a protected region
            not named in `allow_rewrite`.
    """
    images = resolve_images(target.images, table)
    plan = Plan(target.chip.name, revision, kdf.format_mac(mac), target.policy.name,
                target.profile.flash_encryption, target.fe_purpose, target.fe_blocks())
    plan.fe_kcv = expected.fe_kcv
    plan.flash = flash_writes(target, images)
    # every image again, now against the device's table and the digests it holds
    proof.prove_images(images, target.chip, target.profile, target.verifier(held), [],
                       table=table, table_name="the device's partition table", reflash=True,
                       allow_rewrite=allow_rewrite)
    check_in_encrypted(target.chip, table, plan)
    return plan, images


def resolve_images(images: Sequence[ImageSpec], table: list[partitions.Partition]
                   ) -> list[ImageSpec]:
    """Images that fill a partition (`--app`) take its address from the device's table.

    Raises:
        InputError: the device's table has no such partition, or the image is larger.
    """
    resolved = []
    for img in images:
        if img.address == -1:
            part = (partitions.find_romfs(table) if img.partition == "romfs"
                    else partitions.find(table, img.partition))
            if part is None:
                raise InputError(f"{img.path}: the device's partition table has no "
                                 f"{img.partition} partition")
            if len(img.data) > part.size:
                raise InputError(f"{img.path} is {len(img.data)} bytes, larger than the "
                                 f"device's {part.label} partition ({part.size} bytes)")
            img = replace(img, address=part.offset)
        resolved.append(img)
    return sorted(resolved, key=lambda i: i.address)


def check_in_encrypted(chip: Chip, table: list[partitions.Partition], plan: Plan) -> None:
    """Every write lies in an encrypted partition of the device's table (or is the
    bootloader region or the table itself).

    Raises:
        InputError: naming the write and the encrypted partitions.
    """
    boot = chip.bootloader_address
    for write in plan.flash:
        if write.address in (boot, 0x0) and write.address < partitions.TABLE_ADDRESS:
            continue  # the bootloader region (SBv1: the digest image at 0x0)
        if write.address == partitions.TABLE_ADDRESS:
            continue
        hits = [p for p in table if p.contains(write.address, write.length)]
        if not hits or not hits[0].encrypted:
            where = (f"partition {hits[0].label!r}, which is not encrypted" if hits
                     else "no partition")
            raise InputError(
                f"{write.source} at {write.address:#x} (+{write.length:#x}) falls in "
                f"{where} of the device's table; encrypted partitions: "
                + ", ".join(f"{p.label} {p.offset:#x}+{p.size:#x}" for p in table
                            if p.encrypted))


def held_digests(chip: Chip, state: EfuseState) -> set[bytes]:
    """The Secure Boot V2 key digests the device holds and has not revoked (ESP32-C2: the
    first 128 bits each, all its half block holds)."""
    held = set()
    revoked = state.secure_boot_key_revoked
    for blk in state.key_blocks.values():
        if blk.purpose and blk.purpose.startswith("SECURE_BOOT_DIGEST"):
            slot = int(blk.purpose[-1])
            if not (slot < len(revoked) and revoked[slot]):
                held.add(bytes(blk.data))
    if chip.name in HALF_BLOCK_CHIPS:
        held.add(bytes(state.key_blocks["BLOCK_KEY0_HI_128"].data))
    return held


def check_rollback(target: Target, device_version: int | None) -> None:
    """Refuse an app whose secure_version is below the policy's or the device's minimum.

    Raises:
        PolicyRefused: naming the image and both versions.
    """
    floor = target.profile.min_secure_version
    for img in target.images:
        version = app_secure_version(img.data)
        if version is None:
            continue
        if version < floor:
            raise PolicyRefused(
                f"{img.path!r} has secure_version {version}, below the policy's "
                f"min_secure_version {floor} (anti-rollback)")
        if device_version is not None and version < device_version:
            raise PolicyRefused(
                f"{img.path!r} has secure_version {version}, below the device's "
                f"{device_version} (SECURE_VERSION eFuse): the bootloader would refuse it")


def device_secure_version(state: EfuseState) -> int | None:
    """The device's anti-rollback floor from its SECURE_VERSION eFuse (bits set), if it has one."""
    try:
        value = state.field("SECURE_VERSION")
    except InputError:
        return None
    if isinstance(value, bool | bytes):
        return None
    return bin(int(value)).count("1")
