"""Provisioning: one blank chip in, one locked, encrypted, signed device out.

For each device: identify it (type, revision, base MAC) and check it against the policy's chip
profile; read its eFuses; compute the whole plan (per-device keys, key blocks and purposes,
Secure Boot digest or V1 key, images to encrypt and where, hardening eFuses in a safe order with
download mode closed last); refuse anything that contradicts the policy before the first burn;
then execute, read back and verify.

Every step is idempotent, so a re-run after an interruption (power, cable, SIGKILL) finishes the
job: keys are re-derived (aes-ecb-v1 is deterministic), burns skip what is in place, a flash
region is rewritten only when its MD5 differs. A finished device is reported as such with
nothing burned or written.

Order of irreversible steps:
  1. key blocks (flash-encryption key, Secure Boot V1 key or V2 digests), protected as the
     profile says;
  2. flash: images encrypted for this device and address (SBv1: the bootloader digest image);
  3. read back: flash MD5s, key-block KCVs where readable;
  4. enable: crypt counter, FLASH_CRYPT_CONFIG, Secure Boot enable, revocations, hardening;
  5. last: the eFuses that close download mode or cut the USB-Serial-JTAG link.
"""

from __future__ import annotations

import hashlib
import itertools
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from hsmflash.chips import ESP32_AES256, SBV1, SBV2, XTS_AES_128, XTS_AES_128_FROM_128, Chip
from hsmflash.device.base import Device, efuse_field_specs
from hsmflash.encrypt import PURPOSE_FOR_SCHEME
from hsmflash.errors import DeviceError, Error, InputError, InternalError, PolicyRefused
from hsmflash.formats import flashcrypt, kdf, partitions, secureboot, vfs
from hsmflash.formats.appimage import parse_app_image, verify_app_image
from hsmflash.formats.images import ESP_IMAGE_MAGIC
from hsmflash.hazmat import efuse as hz
from hsmflash.keyuse import DerivedKey, KeyUse, Station, wipe
from hsmflash.policy import ChipProfile, Policy
from hsmflash.provision import proof

# eFuses that close download mode: always burned in the very last step.
DOWNLOAD_MODE_FIELDS = ("ENABLE_SECURITY_DOWNLOAD", "DIS_DOWNLOAD_MODE", "UART_DOWNLOAD_DIS",
                        "DIS_USB_SERIAL_JTAG_DOWNLOAD_MODE", "DIS_USB_OTG_DOWNLOAD_MODE")
# eFuses that cut a native-USB chip's USB-Serial-JTAG link (the port provisioning talks over):
# burned with the download-mode eFuses, in the very last step, never before. DIS_USB_JTAG only
# disables the JTAG function of that peripheral; the serial link stays.
USB_LINK_FIELDS = ("DIS_USB_SERIAL_JTAG", "USB_PHY_SEL", "USB_EXCHG_PINS", "USB_EXT_PHY_ENABLE",
                   "DIS_USB_DEVICE")
LAST_STEP_FIELDS = DOWNLOAD_MODE_FIELDS + USB_LINK_FIELDS
SECTOR = 0x1000
SBV1_DIGEST_ADDRESS = 0x0
Progress = Callable[[str], None]


@dataclass(frozen=True)
class ImageSpec:
    """One file to write at one flash address (plaintext, as the user gave it)."""

    address: int  # -1: the start of `partition` in the device's own table (re-flash)
    path: str
    data: bytes = field(repr=False)
    partition: str = ""  # the table partition this image fills (romfs, vfs), if any

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def is_esp_image(self) -> bool:
        return bool(self.data) and self.data[0] == ESP_IMAGE_MAGIC


def parse_image_args(args: list[str], read: Callable[[str], bytes]) -> list[ImageSpec]:
    """Parse `ADDR=FILE` arguments.

    Raises:
        InputError: malformed argument, unaligned address, unreadable file, overlaps.
    """
    specs = []
    for arg in args:
        addr_text, sep, path = arg.partition("=")
        if not sep or not path:
            raise InputError(f"--image {arg!r}: expected ADDR=FILE, e.g. 0x10000=app.bin")
        try:
            address = int(addr_text, 0)
        except ValueError:
            raise InputError(f"--image {arg!r}: address {addr_text!r} is not a number") from None
        if address < 0:
            raise InputError(f"--image {arg!r}: address {address:#x} is negative")
        if address % SECTOR:
            raise InputError(f"--image {arg!r}: address {address:#x} is not 4 KiB aligned")
        data = read(path)
        if not data:
            raise InputError(f"image {path!r} is empty")
        specs.append(ImageSpec(address, path, data))
    specs.sort(key=lambda s: s.address)
    for a, b in itertools.pairwise(specs):
        if a.address + len(a.data) > b.address:
            raise InputError(f"images {a.path!r} at {a.address:#x} and {b.path!r} at "
                             f"{b.address:#x} overlap")
    return specs


def table_of(images: list[ImageSpec]) -> tuple[ImageSpec, list[partitions.Partition]] | None:
    """The partition table the images write to the device (the image at 0x8000), parsed.

    Raises:
        InputError: the image at 0x8000 is not a partition table.
    """
    spec = next((i for i in images if i.address == partitions.TABLE_ADDRESS), None)
    if spec is None:
        return None
    return spec, partitions.parse(spec.data, f"partition table {spec.path!r}")


def add_partition_images(images: list[ImageSpec], *, app: tuple[str, bytes] | None = None,
                         vfs_dir: Path | None = None) -> list[ImageSpec]:
    """Place the app image at the `romfs` partition and a formatted LittleFS (the blocks in
    use, from `vfs_dir` if given) at the `vfs` partition of the table the images write.

    Every address comes from that table, never from a default.

    Raises:
        InputError: no table among the images, no romfs/vfs partition, an app image that is
            not one or is larger than its partition, files that do not fit the vfs.
    """
    found = table_of(images)
    if found is None:
        if app is not None or vfs_dir is not None:
            raise InputError("--app and --vfs-dir go to partitions of the table written to the "
                             "device: give it with --image 0x8000=TABLE.bin")
        return images
    table_spec, table = found
    out = list(images)
    if app is not None:
        path, data = app
        romfs = partitions.find_romfs(table)
        if romfs is None:
            raise InputError(f"partition table {table_spec.path!r} has no romfs partition "
                             "(data, subtype 0x8f) for the app image")
        parse_app_image(data, path)
        if len(data) > romfs.size:
            raise InputError(f"app image {path!r} is {len(data)} bytes, larger than the romfs "
                             f"partition ({romfs.size} bytes at {romfs.offset:#x})")
        out.append(ImageSpec(romfs.offset, path, data, "romfs"))
    vfs_part = partitions.find(table, "vfs")
    if vfs_dir is not None and vfs_part is None:
        raise InputError(f"--vfs-dir: partition table {table_spec.path!r} has no vfs partition")
    if vfs_part is not None and vfs_part.type == partitions.TYPE_DATA:
        image = vfs.build(vfs_part.size, vfs_dir)
        what = f"vfs (LittleFS{', ' + str(vfs_dir) if vfs_dir else ''})"
        for offset, data in image.regions():
            out.append(ImageSpec(vfs_part.offset + offset, f"{what} +{offset:#x}", data, "vfs"))
    out.sort(key=lambda s: s.address)
    for a, b in itertools.pairwise(out):
        if a.address + len(a.data) > b.address:
            raise InputError(f"images {a.path!r} at {a.address:#x} and {b.path!r} at "
                             f"{b.address:#x} overlap")
    return out


@dataclass(frozen=True)
class CredentialPlacement:
    """Where provisioning writes a device's credentials: from the table, never defaults."""

    nvs_address: int
    nvs_size: int
    nvs_keys_address: int | None  # None: NVS keys from an HMAC_UP eFuse key (no nvs_keys)


def credentials_asked(policy: Policy) -> bool:
    """Whether provisioning writes per-device credentials under this policy."""
    cred = policy.credentials
    return cred is not None and (cred.provision or cred.nvs_address is not None
                                 or cred.nvs_keys_address is not None)


def credential_placement(policy: Policy, found: tuple[ImageSpec, list[partitions.Partition]]
                         | None, *, hmac_nvs: bool = False) -> CredentialPlacement | None:
    """The nvs and nvs_keys partitions of the table written to the device.

    Raises:
        InputError: credentials are asked for but no table is written, or the policy's
            (legacy) addresses disagree with the table.
        PolicyRefused: the table lacks an nvs or an encrypted nvs_keys partition.
    """
    if not credentials_asked(policy):
        return None
    cred = policy.credentials
    assert cred is not None  # noqa: S101 - credentials_asked checked
    if found is None:
        raise InputError(f"policy {policy.name!r} writes credentials into the device's nvs and "
                         "nvs_keys partitions: give the partition table written to the device "
                         "with --image 0x8000=TABLE.bin (addresses never come from defaults)")
    spec, table = found
    nvs, keys = partitions.find_nvs(table), partitions.find_nvs_keys(table)
    if hmac_nvs and nvs is not None:  # the chip derives its NVS keys: no nvs_keys partition
        if cred.nvs_address is not None and cred.nvs_address != nvs.offset:
            raise InputError(f"policy {policy.name!r}: credentials.nvs_address "
                             f"{cred.nvs_address:#x} disagrees with partition table "
                             f"{spec.path!r} ({nvs.offset:#x}); the table decides: drop the "
                             "address from the policy")
        return CredentialPlacement(nvs.offset, nvs.size, None)
    if nvs is None or keys is None or not keys.encrypted:
        problems = partitions.protection_problems(table, credentials=True)
        raise PolicyRefused(f"partition table {spec.path!r}: {problems[0]}")
    for what, want, got in (("nvs_address", cred.nvs_address, nvs.offset),
                            ("nvs_keys_address", cred.nvs_keys_address, keys.offset)):
        if want is not None and want != got:
            raise InputError(f"policy {policy.name!r}: credentials.{what} {want:#x} disagrees "
                             f"with partition table {spec.path!r} ({got:#x}); the table "
                             "decides: drop the address from the policy")
    return CredentialPlacement(nvs.offset, nvs.size, keys.offset)


# ---------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------

@dataclass
class FlashWrite:
    address: int
    source: str
    plaintext_sha256: str
    length: int
    ciphertext: bytes = field(repr=False, default=b"")
    md5: str = ""
    status: str = "pending"  # pending | write | in-place


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
    sb_kcv: str = ""
    # NVS keys the ESP-IDF 6 way: the HMAC_UP key block to burn (None: nothing to burn)
    hmac_burn: str | None = None
    hmac_kcv: str = ""
    read_protect_keys: bool = True
    flash: list[FlashWrite] = field(default_factory=list)
    enable_fields: dict[str, int] = field(default_factory=dict)
    enable_write_protect: list[str] = field(default_factory=list)
    final_fields: dict[str, int] = field(default_factory=dict)
    done: bool = False

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
    result: str  # provisioned | already-provisioned | planned | failed
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


def _sw_kcv(key: bytes) -> str:
    """KCV of key bytes read back from a readable eFuse block (already outside the token)."""
    enc = Cipher(algorithms.AES(key), modes.ECB()).encryptor()  # noqa: S305 - KCV definition
    return (enc.update(bytes(16)) + enc.finalize())[:3].hex()


def _halves(key: bytes, purpose: str) -> list[bytes]:
    return [key[:len(key) // 2], key[len(key) // 2:]] if purpose.startswith("XTS") else [key]


def _pad(data: bytes, unit: int) -> bytes:
    return data + b"\xff" * (-len(data) % unit)


def sbv1_iv(mac: bytes, bootloader: bytes) -> bytes:
    """A deterministic 128-byte IV for the SBv1 digest, so a re-run writes the same bytes."""
    seed = hashlib.sha512(b"hsmflash/sbv1-iv\x00" + mac + hashlib.sha256(bootloader).digest())
    return seed.digest() + hashlib.sha512(seed.digest()).digest()


class Provisioner:
    """Provisions devices for one chip profile of one policy, keys through a Station."""

    audit_prefix = "provision"

    def __init__(self, st: Station, policy: Policy, chip: Chip, images: list[ImageSpec],
                 progress: Progress | None = None) -> None:
        self.st = st
        self.policy = policy
        self.chip = chip
        self.profile: ChipProfile = policy.profile(chip.name)
        self.images = images
        self.progress = progress or (lambda _msg: None)
        self.issued_certs: dict[str, tuple[str, str]] = {}  # mac -> (serial, cert sha256)
        self.master = st.key(self.profile.derive_master)
        self._handle: KeyUse | None = None  # the open audited step's key handle
        self._check_static()

    # -- checks that need no device ---------------------------------------------------------
    def _check_static(self) -> None:
        """Images, signatures, addresses, hardening, exports: refused before any device is
        touched (see hsmflash.provision.proof)."""
        prof = self.profile
        if prof.secure_boot is not None and prof.secure_boot.scheme == SBV2 and \
                self.chip.is_esp32_classic:
            raise PolicyRefused("provisioning ESP32 classic with Secure Boot V2 is not "
                                "supported yet; use sbv1 for ESP32 rev0-1")
        if not self.images:
            raise InputError(f"no images to write: give --image ADDR=FILE or list them under "
                             f"[chips.{self.chip.name}.images] in the policy")
        self.sb_public = []
        if prof.secure_boot is not None:
            self.sb_public = [self.st.key(k).public_key() for k in prof.secure_boot.keys]
        proof.check_harden(self.policy, self.chip, prof, efuse_field_specs)
        self._check_exports()
        for img in self.images:
            if img.partition == "romfs":
                self._check_app(img)
        # images that fill a table partition (the romfs app, the vfs filesystem) are placed
        # by the table itself; `_check_table` holds them to it
        self.proven = proof.prove_images(
            [img for img in self.images if img.address >= 0 and not img.partition], self.chip, prof,
            self._verifier(), self._own_regions(), **self._proof_options())
        self._check_table()  # the table's protection and the credentials' places in it

    def _verifier(self, held: set[bytes] | None = None) -> proof.Verifier | None:
        sb = self.profile.secure_boot
        if sb is None:
            return None
        return proof.Verifier(sb.scheme, dict(zip(sb.keys, self.sb_public, strict=True)),
                              held=held,
                              held_bytes=16 if self.chip.name in hz.HALF_BLOCK_CHIPS else 32)

    def _own_regions(self) -> list[proof.Region]:
        """Flash regions the plan writes itself (credentials), kept clear of images: the
        table's nvs/nvs_keys, or the policy's own addresses while the table is still to be
        checked (`_check_table` refuses a plan without one)."""
        try:
            placed = self._place_credentials(table_of(self.images))
        except Error:
            placed = None
        cred = self.policy.credentials
        if placed is not None:
            nvs, size, keys = placed.nvs_address, placed.nvs_size, placed.nvs_keys_address
        elif cred is not None and cred.nvs_address is not None:
            nvs, size, keys = cred.nvs_address, cred.nvs_size, cred.nvs_keys_address
        else:
            return []
        regions = [proof.Region("nvs (credentials)", nvs, size)]
        if keys is not None:
            regions.append(proof.Region("nvs_keys", keys, 0x1000))
        return regions

    def _proof_options(self) -> dict[str, Any]:
        return {}

    def _check_exports(self) -> None:
        """Every key export the plan will need, against the policy, before the first burn."""
        self.policy.check_export("efuse_burn")
        for reason in self._crypt_exports:
            self.policy.check_export(reason)
        if credentials_asked(self.policy):
            self.policy.check_export("device_secrets")

    def _check_table(self) -> None:
        """The table written to the device protects code and secrets (DESIGN: partition
        tables are the map); credential addresses come from it."""
        found = table_of(self.images)
        self._placement = self._place_credentials(found)
        if found is None:
            return
        spec, table = found
        problems = partitions.protection_problems(table, credentials=self._placement is not None)
        if problems:
            raise PolicyRefused(f"partition table {spec.path!r}: {problems[0]}; "
                                "see `hsmflash partitions template`")
        end = max(p.offset + p.size for p in table)
        if end > self.profile.flash_size:
            raise InputError(f"partition table {spec.path!r} ends at {end:#x}, past the "
                             f"{self.profile.flash_size // 1024} KiB flash")

    def _place_credentials(self, found: tuple[ImageSpec, list[partitions.Partition]] | None
                           ) -> CredentialPlacement | None:
        return credential_placement(self.policy, found,
                                    hmac_nvs=self.profile.nvs_encryption == "hmac")

    def _check_app(self, img: ImageSpec) -> None:
        """An app image is signed by a Secure Boot key the policy names, before any burn."""
        sb = self.profile.secure_boot
        if sb is None or sb.scheme != SBV2 or not self.sb_public:
            raise PolicyRefused(f"app image {img.path!r}: policy {self.policy.name!r} names no "
                                f"Secure Boot V2 key for {self.chip.name} to verify it against")
        problems = []
        for name, pub in zip(sb.keys, self.sb_public, strict=True):
            try:
                verify_app_image(img.data, pub, name=img.path)
                return
            except Exception as e:
                problems.append(f"{name}: {e}")
        raise PolicyRefused(f"app image {img.path!r} is not signed by a key of policy "
                            f"{self.policy.name!r} ({'; '.join(problems)})")

    def _is_sbv1_bootloader(self, img: ImageSpec) -> bool:
        prof = self.profile
        return (prof.secure_boot is not None and prof.secure_boot.scheme == SBV1
                and img.address == self.chip.bootloader_address)

    # -- identification ---------------------------------------------------------------------
    def identify(self, device: Device) -> tuple[bytes, str]:
        """Check the chip against the profile; return (mac, revision text).

        Raises:
            DeviceError: wrong chip, non-unique MAC.
            PolicyRefused: a revision outside the profile.
        """
        if device.chip.name != self.chip.name:
            raise DeviceError(f"device is {device.chip.name}, not {self.chip.name}")
        ident = device.identify()
        rev = ident.revision
        if self.profile.revisions and rev.major not in self.profile.revisions:
            raise PolicyRefused(f"{self.chip.name} {rev} is not covered by policy "
                                f"{self.policy.name!r} (revisions {list(self.profile.revisions)})")
        if self._needs_sha384 and rev.major < self.chip.sha384_min_revision:
            raise PolicyRefused(f"{self.chip.name} {rev}: P-384 Secure Boot needs chip "
                                f"v{self.chip.sha384_min_revision}.0 or later")
        # the eFuse table of this revision (ESP32-P4 v3.x has its own map)
        proof.check_harden(self.policy, self.chip, self.profile, efuse_field_specs, rev.major)
        return ident.mac, str(rev)  # device.identify refused non-unique MACs

    @property
    def _needs_sha384(self) -> bool:
        sb = self.profile.secure_boot
        return sb is not None and any(self.st.key(k).type == "ec-p384" for k in sb.keys)

    # -- planning ---------------------------------------------------------------------------
    def _fe_blocks(self, scheme: str) -> list[tuple[str, str | None]]:
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

    def plan(self, device: Device, mac: bytes, revision: str) -> Plan:
        """Compute the plan and check the device against it; nothing is burned or written.

        Raises:
            DeviceError: the eFuses contradict the policy (another key, purpose, a locked
                block, Secure Boot already enabled with other keys).
        """
        prof = self.profile
        scheme = prof.flash_encryption
        purpose = PURPOSE_FOR_SCHEME[scheme]
        release = prof.release_mode
        plan = Plan(self.chip.name, revision, kdf.format_mac(mac), self.policy.name, scheme,
                    purpose, self._fe_blocks(scheme), read_protect_keys=not prof.readable_keys)
        state = hz.read_state(device)
        derived = self._derive(mac, purpose, "plan")
        try:
            plan.fe_kcv = derived.kcv
            plan.fe_state = self._key_state(device, state, plan.fe_blocks, purpose, derived)
            if any(state.key_blocks[b].read_protected for b, _ in plan.fe_blocks):
                self._known_plaintext_check(device, mac, derived, scheme)
        finally:
            derived.destroy()

        sb = prof.secure_boot
        if sb is not None:
            plan.secure_boot = sb.scheme
            if sb.scheme == SBV1:
                sbk = self._derive(mac, "SECURE_BOOT_V1", "plan")
                try:
                    plan.sb_kcv = sbk.kcv
                    st = self._key_state(device, state, [("BLOCK2", None)], "SECURE_BOOT_V1", sbk)
                finally:
                    sbk.destroy()
                if st == "burn":
                    plan.sb_burns.append(("BLOCK2", None, "Secure Boot V1 key (derived)"))
            else:
                used = {b for b, _ in plan.fe_blocks}
                free = [b for b in self.chip.key_blocks if b not in used]
                for i, pub in enumerate(self.sb_public):
                    block, dpurpose, digest = self._digest_slot(free, i, pub)
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
                plan.sb_kcv = ",".join(secureboot.sbv2_public_key_digest(p).hex()[:16]
                                       for p in self.sb_public)

        if prof.nvs_encryption == "hmac":
            self._plan_hmac_key(device, state, plan, mac)
        self._plan_flash(plan, mac)
        self._plan_fields(plan, state, release)
        return plan

    def _plan_hmac_key(self, device: Device, state: hz.EfuseState, plan: Plan,
                       mac: bytes) -> None:
        """The NVS HMAC_UP key (always read-protected): burn it unless it is complete."""
        block = self.profile.nvs_hmac_key_block
        if block in {b for b, _ in plan.fe_blocks} | {b for b, _, _ in plan.sb_burns}:
            raise InputError(f"policy {self.policy.name!r}: nvs_hmac_key_block {block} is "
                             "also used for flash encryption or Secure Boot")
        d = self._derive(mac, "NVS_HMAC_UP", "plan")
        try:
            plan.hmac_kcv = d.kcv
        finally:
            d.destroy()
        blk = state.key_blocks[block]
        if blk.used and blk.purpose not in ("HMAC_UP", "USER"):
            raise DeviceError(f"{block} has key purpose {blk.purpose}, policy needs HMAC_UP "
                              "for NVS: device was provisioned differently")
        if not blk.read_protected and any(blk.data):
            key = hz.stored_key_order(device, block, "HMAC_UP", bytes(blk.data))
            if _sw_kcv(key) != plan.hmac_kcv:
                raise DeviceError(f"{block} already holds a different HMAC key: device was "
                                  "provisioned with another master key or policy")
        if not (blk.purpose == "HMAC_UP" and blk.read_protected and blk.write_protected
                and blk.purpose_write_protected):
            plan.hmac_burn = block

    def _digest_slot(self, free: list[str], index: int, pub: Any) -> tuple[str, str, bytes]:
        """(block, purpose, bytes to burn) of the `index`-th Secure Boot V2 key digest."""
        digest = secureboot.sbv2_public_key_digest(pub)
        if self.chip.name in hz.HALF_BLOCK_CHIPS:  # ESP32-C2: the digest's first 128 bits
            return "BLOCK_KEY0_HI_128", "SECURE_BOOT_DIGEST", digest[:16]
        return free[index], f"SECURE_BOOT_DIGEST{index}", digest

    def _derive(self, mac: bytes, purpose: str, why: str, *,
                exportable: bool = False) -> DerivedKey:
        return self._live(why).derive(mac, purpose, exportable=exportable)

    def _live(self, why: str) -> KeyUse:
        """The key handle of the audited step that is running (keys are used only in one)."""
        if self._handle is None:
            raise InternalError(f"key use for {why} outside an audited step")
        return self._handle

    @property
    def _crypt_exports(self) -> list[str]:
        """What encrypting for this chip takes out of the token: ESP32 classic's key on a
        token without XOR derivation, ESP32-C2's 128-bit key for its SHA-256 expansion (both
        in memory, wiped after use)."""
        return {ESP32_AES256: ["esp32_classic_transient"],
                XTS_AES_128_FROM_128: ["efuse128_transient"]}.get(
                    self.profile.flash_encryption, [])

    def _key_state(self, device: Device, state: hz.EfuseState,
                   blocks: list[tuple[str, str | None]], purpose: str,
                   derived: DerivedKey) -> str:
        """burn | in-place | in-place-unverified; DeviceError when another key is there.

        "burn" also when this device's key is there but its purpose or protection bits are
        not (a run killed inside the burn): burning again adds only what is missing.
        """
        kcvs = derived.kcvs()
        protect = not self.profile.readable_keys
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
                raise DeviceError(f"{block} is read-protected, policy {self.policy.name!r} "
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
            key = hz.stored_key_order(device, block, bpurpose, bytes(blk.data))
            want = kcvs if len(blocks) == 1 else [kcvs[i]]
            parts = _halves(key, purpose) if len(want) == 2 else [key]
            if [_sw_kcv(p) for p in parts] != want:
                raise DeviceError(f"{block} already holds a different key: device was "
                                  "provisioned with another master key or policy")
            found.append("ok" if complete else "partial")
        if "empty" in found or "partial" in found:
            return "burn"  # blank, or partially burned (killed mid-burn, XTS-256 pair): finish
        if all(f == "ok" for f in found):
            return "in-place"
        return "in-place-unverified"

    def _known_plaintext_check(self, device: Device, mac: bytes, derived: DerivedKey,
                               scheme: str) -> None:
        """A read-protected key: what is in flash must decrypt with this device's key.

        Every ESP image already written (not erased) must decrypt to a header for this chip
        (magic and chip id, 2^-24 by chance); otherwise another master key wrote it, and
        re-writing the flash would leave a device that cannot boot.
        """
        heads = []
        for img in self.images:
            if not img.is_esp_image:
                continue
            # SBv1: the bootloader itself sits at its address inside the digest image
            head = device.read_flash(img.address, 32)
            if head != b"\xff" * 32:  # erased: not written yet (interrupted before flash)
                heads.append((img, head))
        if not heads:
            return
        plains = self.device_crypt(mac, [(img.address, head) for img, head in heads],
                                   decrypt=True, why="checking the flash of a device with a "
                                   "protected key")
        for (img, _head), plain in zip(heads, plains, strict=True):
            if plain[0] != ESP_IMAGE_MAGIC or plain[12:14] != img.data[12:14]:
                raise DeviceError(f"flash at {img.address:#x} does not decrypt with this "
                                  "device's key: it was provisioned with another master key")

    @property
    def _credentials(self) -> Any:
        """Where the policy's credentials go (the table's nvs/nvs_keys), when it asks for them."""
        return self._placement

    def _plan_flash(self, plan: Plan, mac: bytes) -> None:
        unit = 32 if self.chip.is_esp32_classic else 16
        for img in self.images:
            if self._is_sbv1_bootloader(img):
                plan.flash.append(FlashWrite(SBV1_DIGEST_ADDRESS, img.path + " (SBv1 digest)",
                                             img.sha256, SECTOR + len(_pad(img.data, 128))))
            else:
                plan.flash.append(FlashWrite(img.address, img.path, img.sha256,
                                             len(_pad(img.data, unit))))
        cred = self._credentials  # after the images: _prepare_flash relies on the order
        if cred is not None:
            plan.flash.append(FlashWrite(cred.nvs_address, "nvs (credentials)", "",
                                         cred.nvs_size))
            if self.profile.nvs_encryption != "hmac":  # hmac: the chip derives its NVS keys
                plan.flash.append(FlashWrite(cred.nvs_keys_address, "nvs_keys", "", 0x1000))

    def _plan_fields(self, plan: Plan, state: hz.EfuseState, release: bool) -> None:
        prof = self.profile
        enable: dict[str, int] = {}
        protect: list[str] = []
        if self.chip.is_esp32_classic:
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
                if self._needs_sha384:  # the ROM verifies P-384 blocks only with this set
                    enable["SECURE_BOOT_SHA384_EN"] = 1
                if release and self.chip.sbv2_max_signatures > 1:
                    for i in range(len(self.sb_public), 3):
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
                raise InputError(f"policy {self.policy.name!r}: eFuse {name!r} does not exist "
                                 f"on {self.chip.name}") from None
        plan.enable_fields = {k: v for k, v in enable.items() if not _already(state, k, v)}
        plan.enable_write_protect = [p for p in protect if not state.is_write_protected(p)]
        plan.final_fields = {k: v for k, v in final.items() if not _already(state, k, v)}

    # -- execution --------------------------------------------------------------------------
    def provision(self, device: Device, *, dry_run: bool = False) -> DeviceResult:
        """Plan, check, execute, verify one device (see the module doc for the order).

        Raises:
            DeviceError, PolicyRefused, InputError, TokenError: before or during; every step
            is idempotent, so re-running finishes an interrupted device.
        """
        started = time.monotonic()
        mac, revision = self.identify(device)
        mac_text = kdf.format_mac(mac)
        subject = {"device": mac_text, "chip": self.chip.name, "revision": revision}
        self.progress(f"{mac_text}: planning")
        with self._step("plan", subject, {"policy": self.policy.name, "dry_run": dry_run},
                        key_used=True, exports=self._crypt_exports) as out:
            plan = self.plan(device, mac, revision)
            out.update({"fe_kcv": plan.fe_kcv, "already_provisioned": plan.done})
        result = DeviceResult(mac_text, self.chip.name, revision, "planned",
                              fe_kcv=plan.fe_kcv, sb_kcv=plan.sb_kcv, plan=plan.describe())
        result.images = [{"address": f"{w.address:#x}", "source": w.source,
                          "sha256": w.plaintext_sha256} for w in plan.flash]
        if dry_run:
            result.seconds = time.monotonic() - started
            return result
        efuses_done = (plan.fe_state != "burn" and not plan.sb_burns and not plan.enable_fields
                       and not plan.final_fields and not plan.enable_write_protect)
        if efuses_done:
            self._prepare_flash(mac, plan, subject)
            plan.done = all(device.flash_md5(w.address, len(w.ciphertext)) == w.md5
                            for w in plan.flash)
        if plan.done:
            result.result = "already-provisioned"
            result.seconds = time.monotonic() - started
            self.progress(f"{mac_text}: already provisioned")
            return result

        self._burn_keys(device, mac, plan, subject, result)
        self._write_flash(device, mac, plan, subject)
        result.cert_serial, result.cert_sha256 = self.issued_certs.pop(mac_text, ("", ""))
        self._verify(device, mac, plan, subject)
        self._enable(device, plan, subject, result)
        self._final_check(device, plan)
        result.result = "provisioned"
        result.seconds = time.monotonic() - started
        self.progress(f"{mac_text}: done")
        return result

    @contextmanager
    def _step(self, name: str, subject: dict[str, Any], detail: dict[str, Any],
              key_used: bool = False, exports: list[str] | None = None) -> Iterator[KeyUse]:
        """One audited step; while it runs, its handle is the only way to the master key."""
        with self.st.use(f"{self.audit_prefix}.{name}", self.master if key_used else None,
                         subject=subject, detail=detail, exports=exports or ()) as out:
            previous, self._handle = self._handle, out
            try:
                yield out
            finally:
                self._handle = previous

    def _burn_keys(self, device: Device, mac: bytes, plan: Plan, subject: dict[str, Any],
                   result: DeviceResult) -> None:
        burns: list[hz.KeyBurn] = []
        secrets: list[bytearray] = []
        rp = plan.read_protect_keys
        if plan.fe_state == "in-place-unverified" and not plan.sb_burns and not plan.hmac_burn:
            return
        need_fe = plan.fe_state == "burn"
        need_sbv1 = any(p is None and b == "BLOCK2" for b, p, _ in plan.sb_burns)
        if not need_fe and not plan.sb_burns and not plan.hmac_burn:
            return
        self.progress(f"{plan.mac}: burning keys")
        with self._step("burn-keys", subject, {"blocks": [b for b, _ in plan.fe_blocks]
                                                + [b for b, _, _ in plan.sb_burns]
                                                + ([plan.hmac_burn] if plan.hmac_burn else [])},
                        key_used=True,
                        exports=["efuse_burn"] if need_fe or need_sbv1 or plan.hmac_burn
                        else []) as out:
            try:
                if need_fe:
                    d = self._derive(mac, plan.fe_purpose, "burn", exportable=True)
                    try:
                        key = out.export(d, "efuse_burn")
                        secrets.append(key)
                    finally:
                        d.destroy()
                    if len(plan.fe_blocks) == 1:
                        block, purpose = plan.fe_blocks[0]
                        burns.append(hz.KeyBurn(block, bytes(key), purpose, rp))
                    else:
                        for i, (block, purpose) in enumerate(plan.fe_blocks):
                            burns.append(hz.KeyBurn(block, bytes(key[32 * i:32 * (i + 1)]),
                                                    purpose, rp))
                for block, purpose, _what in plan.sb_burns:
                    if need_sbv1 and purpose is None:
                        d = self._derive(mac, "SECURE_BOOT_V1", "burn", exportable=True)
                        try:
                            sbkey = out.export(d, "efuse_burn")
                            secrets.append(sbkey)
                        finally:
                            d.destroy()
                        burns.append(hz.KeyBurn(block, bytes(sbkey), None, rp))
                    else:
                        index = int(str(purpose)[-1]) if str(purpose)[-1].isdigit() else 0
                        _b, _p, digest = self._digest_slot([block], index,
                                                           self.sb_public[index])
                        burns.append(hz.KeyBurn(block, digest, purpose, False, True, digest=True))
                if plan.hmac_burn:
                    d = self._derive(mac, "NVS_HMAC_UP", "burn", exportable=True)
                    try:
                        hkey = out.export(d, "efuse_burn")
                        secrets.append(hkey)
                    finally:
                        d.destroy()
                    burns.append(hz.KeyBurn(plan.hmac_burn, bytes(hkey), "HMAC_UP", True))
                report = hz.burn(device, keys=burns, confirm=True)
            finally:
                for s in secrets:
                    wipe(s)
            out.update({"burned": list(report.burned), "already": list(report.already)})
            result.burned += list(report.burned)

    def _ciphertext(self, mac: bytes, img: ImageSpec, write: FlashWrite) -> bytes:
        """Encrypt one image for this device and address, keys in the token."""
        if write.address == SBV1_DIGEST_ADDRESS and self._is_sbv1_bootloader(img):
            sbk = self._derive(mac, "SECURE_BOOT_V1", "digest")
            try:
                plain = secureboot.sbv1_bootloader_digest(img.data, sbk.ciphers()[0],
                                                       sbv1_iv(mac, img.data), img.path)
            finally:
                sbk.destroy()
        else:
            plain = img.data
        plain = _pad(plain, 32 if self.chip.is_esp32_classic else 16)
        (out,) = self.device_crypt(mac, [(write.address, plain)], decrypt=False,
                                   why="ESP32-classic flash encryption")
        return out

    def device_crypt(self, mac: bytes, regions: list[tuple[int, bytes]], *, decrypt: bool,
                     why: str) -> list[bytes]:
        """Flash-encrypt (or decrypt) regions as this device's chip does, keys in the token.

        XTS: K1/K2 derived as session objects. ESP32 classic on a token without
        CKM_XOR_BASE_AND_DATA: the derived key is exported to memory (policy
        `esp32_classic_transient`; recorded in the enclosing audit step) and wiped.

        Raises:
            PolicyRefused: the export is not allowed.
        """
        scheme = self.profile.flash_encryption
        if scheme == XTS_AES_128_FROM_128:
            from hsmflash.encrypt import efuse128_crypt

            d = self._derive(mac, PURPOSE_FOR_SCHEME[scheme], why, exportable=True)
            try:
                return efuse128_crypt(self._live(why), d, regions, decrypt)
            finally:
                d.destroy()
        if scheme == ESP32_AES256:
            d = self._derive(mac, "FLASH_ENCRYPTION", why, exportable=True)
            try:
                key = self._live(why).export(d, "esp32_classic_transient")
                try:
                    fn32 = flashcrypt.esp32_decrypt if decrypt else flashcrypt.esp32_encrypt
                    return [fn32(data, address, key, self.profile.flash_crypt_config)
                            for address, data in regions]
                finally:
                    wipe(key)
            finally:
                d.destroy()
        d = self._derive(mac, PURPOSE_FOR_SCHEME[scheme], why)
        try:
            k1, k2 = d.ciphers()
            fn = flashcrypt.xts_decrypt if decrypt else flashcrypt.xts_encrypt
            return [fn(data, address, k1, k2) for address, data in regions]
        finally:
            d.destroy()

    def _prepare_flash(self, mac: bytes, plan: Plan, subject: dict[str, Any]) -> None:
        if all(w.ciphertext for w in plan.flash):
            return
        path = ("transient-export" if self.profile.flash_encryption == ESP32_AES256
                else "in-token")
        cred = self._credentials
        if cred is not None:
            from hsmflash.credentials import build_device_partitions

            parts = build_device_partitions(
                self.st, self.chip.name, mac, nvs_size=cred.nvs_size,
                nvs_keys_address=cred.nvs_keys_address, nvs_address=cred.nvs_address)
            if parts.nvs_keys:
                plan.flash[-2].ciphertext = parts.nvs
                plan.flash[-1].ciphertext = parts.nvs_keys
            else:
                plan.flash[-1].ciphertext = parts.nvs
            self.issued_certs[kdf.format_mac(mac)] = (parts.info.get("serial", ""),
                                                      parts.info.get("cert_sha256", ""))
        with self._step("encrypt", subject, {"images": len(self.images), "path": path},
                        key_used=True, exports=self._crypt_exports) as out:
            for img, write in zip(self.images, plan.flash, strict=False):
                write.ciphertext = self._ciphertext(mac, img, write)
            for write in plan.flash:
                write.md5 = hashlib.md5(write.ciphertext).hexdigest()  # noqa: S324 - esptool's
            out["ciphertext_md5"] = [w.md5 for w in plan.flash]

    def _write_flash(self, device: Device, mac: bytes, plan: Plan,
                     subject: dict[str, Any]) -> None:
        self._prepare_flash(mac, plan, subject)
        for write in plan.flash:
            if device.flash_md5(write.address, len(write.ciphertext)) == write.md5:
                write.status = "in-place"
                continue
            self.progress(f"{plan.mac}: writing {write.source} at {write.address:#x}")
            with self._step("write-flash", subject, {"address": f"{write.address:#x}",
                                                     "source": write.source,
                                                     "length": len(write.ciphertext),
                                                     "ciphertext_md5": write.md5}):
                device.write_flash(write.address, write.ciphertext)
            write.status = "written"

    def _verify(self, device: Device, mac: bytes, plan: Plan, subject: dict[str, Any]) -> None:
        for write in plan.flash:
            got = device.flash_md5(write.address, len(write.ciphertext))
            if got != write.md5:
                raise DeviceError(f"flash at {write.address:#x} reads back with MD5 {got}, "
                                  f"expected {write.md5}: write failed")

    def _enable(self, device: Device, plan: Plan, subject: dict[str, Any],
                result: DeviceResult) -> None:
        if plan.enable_fields or plan.enable_write_protect:
            self.progress(f"{plan.mac}: enabling flash encryption, Secure Boot, hardening")
            with self._step("enable", subject, {"fields": plan.enable_fields,
                                                "write_protect": plan.enable_write_protect}) as out:
                report = hz.burn_fields(device, plan.enable_fields,
                                        write_protect=plan.enable_write_protect, confirm=True)
                out["burned"] = list(report.burned)
                result.burned += list(report.burned)
        if plan.final_fields:
            self.progress(f"{plan.mac}: closing download mode")
            with self._step("close-download", subject, {"fields": plan.final_fields}) as out:
                report = hz.burn_fields(device, plan.final_fields, confirm=True)
                out["burned"] = list(report.burned)
                result.burned += list(report.burned)

    def _final_check(self, device: Device, plan: Plan) -> None:
        device.reload_efuses()
        state = hz.read_state(device)
        for name, value in {**plan.enable_fields, **plan.final_fields}.items():
            if not _already(state, name, value):
                raise DeviceError(f"eFuse {name} reads back {state.field(name)!r} after "
                                  f"burning {value}")
        if not state.flash_encryption_enabled:
            raise DeviceError("flash encryption is not enabled after provisioning")


def _already(state: hz.EfuseState, name: str, value: int) -> bool:
    current = state.field(name)
    if isinstance(current, bool):
        return current == bool(value)
    if isinstance(current, bytes):
        return False
    return int(current) == int(value) or (int(current) & int(value)) == int(value)
