"""The executor: carries out plans on devices, every key use in an audited step.

Provisioning and re-flash both hold one `Executor` (composition): it proves the inputs once
(`prepare_target`), identifies each device, derives the check values the planner compares
(`expected`), encrypts images for the device and address with keys in the token, writes
flash and verifies it by MD5. What to do is decided by the pure planner
(`hsmflash.provision.plan`); eFuse burns are provisioning's own (`provisioner.py`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

from hsmflash.chips import SBV1, SBV2, Chip
from hsmflash.device.base import Device, efuse_field_specs
from hsmflash.encrypt import PATH_EXPORTS, crypt_derived, derive_for, derived_path
from hsmflash.errors import DeviceError, Error, InputError, InternalError, PolicyRefused
from hsmflash.formats import kdf, partitions, secureboot
from hsmflash.formats.appimage import verify_app_image
from hsmflash.formats.images import ESP_IMAGE_MAGIC
from hsmflash.hazmat import efuse as hz
from hsmflash.keyuse import DerivedKey, KeyUse, Station
from hsmflash.policy import Policy
from hsmflash.provision import proof
from hsmflash.provision.inputs import (
    CredentialPlacement,
    ImageSpec,
    credential_placement,
    credentials_asked,
    table_of,
)
from hsmflash.provision.plan import (
    SBV1_DIGEST_ADDRESS,
    Expected,
    FlashWrite,
    KeyOrder,
    Plan,
    Target,
    pad,
    sbv1_iv,
)

Progress = Callable[[str], None]


# ---------------------------------------------------------------------------------------
# Inputs proven once, before any device
# ---------------------------------------------------------------------------------------

def prepare_target(st: Station, policy: Policy, chip: Chip, images: Sequence[ImageSpec], *,
                   reflash: bool = False, allow_rewrite: Sequence[str] = ()) -> Target:
    """Images, signatures, addresses, hardening, exports: refused before any device is
    touched (see hsmflash.provision.proof).

    `reflash`: nothing is burned and no credentials are written; data placement waits for
    the device's own table.

    Raises:
        InputError, PolicyRefused: naming the input at fault.
        TokenError: a Secure Boot key the policy names is not in the token.
    """
    prof = policy.profile(chip.name)
    if prof.secure_boot is not None and prof.secure_boot.scheme == SBV2 and \
            chip.is_esp32_classic:
        raise PolicyRefused("provisioning ESP32 classic with Secure Boot V2 is not "
                            "supported yet; use sbv1 for ESP32 rev0-1")
    if not images:
        raise InputError(f"no images to write: give --image ADDR=FILE or list them under "
                         f"[chips.{chip.name}.images] in the policy")
    sb_keys = [st.key(k) for k in prof.secure_boot.keys] if prof.secure_boot else []
    path = derived_path(st, prof.flash_encryption)
    target = Target(policy, chip, prof, tuple(images),
                    sb_public=tuple(k.public_key() for k in sb_keys),
                    needs_sha384=any(k.type == "ec-p384" for k in sb_keys),
                    crypt_path=path, crypt_exports=tuple(PATH_EXPORTS.get(path, [])))
    proof.check_harden(policy, chip, prof, efuse_field_specs)
    if not reflash:
        policy.check_export("efuse_burn")
    for reason in target.crypt_exports:
        policy.check_export(reason)
    if not reflash and credentials_asked(policy):
        policy.check_export("device_secrets")
    for img in images:
        if img.partition == "romfs":
            _check_app(target, img)
    # images that fill a table partition (the romfs app, the vfs filesystem) are placed by
    # the table itself; the table check below holds them to it. Re-flash: the device's own
    # table decides data placement once the device is read.
    proof.prove_images([img for img in images if img.address >= 0 and not img.partition],
                       chip, prof, target.verifier(), _own_regions(target, reflash),
                       table_pending=reflash, reflash=reflash, allow_rewrite=allow_rewrite)
    # the table's protection, and the credentials' places in it
    return replace(target, placement=_check_table(target, reflash))


def _placement(target: Target, found: tuple[ImageSpec, list[partitions.Partition]] | None,
               reflash: bool) -> CredentialPlacement | None:
    """Where credentials go; re-flash writes none (they are issued at provisioning)."""
    if reflash:
        return None
    return credential_placement(target.policy, found,
                                hmac_nvs=target.profile.nvs_encryption == "hmac")


def _own_regions(target: Target, reflash: bool) -> list[proof.Region]:
    """Flash regions the plan writes itself (credentials), kept clear of images: the
    table's nvs/nvs_keys, or the policy's own addresses while the table is still to be
    checked (`_check_table` refuses a plan without one)."""
    try:
        placed = _placement(target, table_of(list(target.images)), reflash)
    except Error:
        placed = None
    cred = target.policy.credentials
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


def _check_table(target: Target, reflash: bool) -> CredentialPlacement | None:
    """The table written to the device protects code and secrets (DESIGN: partition
    tables are the map); credential addresses come from it."""
    found = table_of(list(target.images))
    placement = _placement(target, found, reflash)
    if found is None:
        return placement
    spec, table = found
    problems = partitions.protection_problems(table, credentials=placement is not None)
    if problems:
        raise PolicyRefused(f"partition table {spec.path!r}: {problems[0]}; "
                            "see `hsmflash partitions template`")
    end = max(p.offset + p.size for p in table)
    if end > target.profile.flash_size:
        raise InputError(f"partition table {spec.path!r} ends at {end:#x}, past the "
                         f"{target.profile.flash_size // 1024} KiB flash")
    return placement


def _check_app(target: Target, img: ImageSpec) -> None:
    """An app image is signed by a Secure Boot key the policy names, before any burn."""
    sb = target.profile.secure_boot
    if sb is None or sb.scheme != SBV2 or not target.sb_public:
        raise PolicyRefused(f"app image {img.path!r}: policy {target.policy.name!r} names no "
                            f"Secure Boot V2 key for {target.chip.name} to verify it against")
    problems = []
    for name, pub in zip(sb.keys, target.sb_public, strict=True):
        try:
            verify_app_image(img.data, pub, name=img.path)
            return
        except Exception as e:
            problems.append(f"{name}: {e}")
    raise PolicyRefused(f"app image {img.path!r} is not signed by a key of policy "
                        f"{target.policy.name!r} ({'; '.join(problems)})")


# ---------------------------------------------------------------------------------------
# The executor
# ---------------------------------------------------------------------------------------

class Executor:
    """Runs the steps of plans for one target, keys through a Station."""

    def __init__(self, st: Station, target: Target, *, audit_prefix: str,
                 progress: Progress | None = None) -> None:
        self.st = st
        self.target = target
        self.audit_prefix = audit_prefix
        self.progress = progress or (lambda _msg: None)
        self.master = st.key(target.profile.derive_master)
        self._handle: KeyUse | None = None  # the open audited step's key handle

    @contextmanager
    def step(self, name: str, subject: dict[str, Any], detail: dict[str, Any],
             key_used: bool = False, exports: Sequence[str] = ()) -> Iterator[KeyUse]:
        """One audited step; while it runs, its handle is the only way to the master key."""
        with self.st.use(f"{self.audit_prefix}.{name}", self.master if key_used else None,
                         subject=subject, detail=detail, exports=exports) as out:
            previous, self._handle = self._handle, out
            try:
                yield out
            finally:
                self._handle = previous

    def live(self, why: str) -> KeyUse:
        """The key handle of the audited step that is running (keys are used only in one)."""
        if self._handle is None:
            raise InternalError(f"key use for {why} outside an audited step")
        return self._handle

    def derive(self, mac: bytes, purpose: str, why: str, *,
               exportable: bool = False) -> DerivedKey:
        return self.live(why).derive(mac, purpose, exportable=exportable)

    # -- the device -------------------------------------------------------------------------
    def identify(self, device: Device) -> tuple[bytes, str]:
        """Check the chip against the profile; return (mac, revision text).

        Raises:
            DeviceError: wrong chip, non-unique MAC.
            PolicyRefused: a revision outside the profile.
        """
        t = self.target
        if device.chip.name != t.chip.name:
            raise DeviceError(f"device is {device.chip.name}, not {t.chip.name}")
        ident = device.identify()
        rev = ident.revision
        if t.profile.revisions and rev.major not in t.profile.revisions:
            raise PolicyRefused(f"{t.chip.name} {rev} is not covered by policy "
                                f"{t.policy.name!r} (revisions {list(t.profile.revisions)})")
        if t.needs_sha384 and rev.major < t.chip.sha384_min_revision:
            raise PolicyRefused(f"{t.chip.name} {rev}: P-384 Secure Boot needs chip "
                                f"v{t.chip.sha384_min_revision}.0 or later")
        # the eFuse table of this revision (ESP32-P4 v3.x has its own map)
        proof.check_harden(t.policy, t.chip, t.profile, efuse_field_specs, rev.major)
        return ident.mac, str(rev)  # device.identify refused non-unique MACs

    @staticmethod
    def key_order(device: Device) -> KeyOrder:
        """The device's rule for key bytes in its blocks (espefuse's)."""
        return lambda block, purpose, data: hz.stored_key_order(device, block, purpose, data)

    def expected(self, mac: bytes, *, sbv1: bool = False, hmac: bool = False) -> Expected:
        """The check values of the keys the token derives for this device (in a step)."""
        def kcvs(purpose: str) -> tuple[str, ...]:
            d = self.derive(mac, purpose, "plan")
            try:
                return tuple(d.kcvs())
            finally:
                d.destroy()

        return Expected(kcvs(self.target.fe_purpose),
                        sbv1_kcvs=kcvs("SECURE_BOOT_V1") if sbv1 else (),
                        hmac_kcv="/".join(kcvs("NVS_HMAC_UP")) if hmac else "")

    def expected_for_plan(self, mac: bytes) -> Expected:
        """Every check value the provisioning planner compares, for this target's policy."""
        sb = self.target.profile.secure_boot
        return self.expected(mac, sbv1=sb is not None and sb.scheme == SBV1,
                             hmac=self.target.profile.nvs_encryption == "hmac")

    def check_flash_decrypts(self, device: Device, mac: bytes,
                             checks: Sequence[tuple[int, str, bytes]]) -> None:
        """A read-protected key: every ESP image already written (not erased) must decrypt
        to a header for this chip (magic and chip id, 2^-24 by chance) with this device's key.

        Raises:
            DeviceError: another master key wrote the flash; re-writing it would leave a
                device that cannot boot.
        """
        heads = []
        for address, path, chip_id in checks:
            head = device.read_flash(address, 32)
            if head != b"\xff" * 32:  # erased: not written yet (interrupted before flash)
                heads.append((address, path, chip_id, head))
        if not heads:
            return
        plains = self.crypt(mac, [(a, head) for a, _p, _c, head in heads], decrypt=True,
                            why="checking the flash of a device with a protected key")
        for (address, _path, chip_id, _head), plain in zip(heads, plains, strict=True):
            if plain[0] != ESP_IMAGE_MAGIC or plain[12:14] != chip_id:
                raise DeviceError(f"flash at {address:#x} does not decrypt with this "
                                  "device's key: it was provisioned with another master key")

    # -- flash encryption -------------------------------------------------------------------
    def crypt(self, mac: bytes, regions: list[tuple[int, bytes]], *, decrypt: bool,
              why: str) -> list[bytes]:
        """Flash-encrypt (or decrypt) regions as this device's chip does, keys in the token
        (the one path: `hsmflash.encrypt.crypt_derived`, by the target's `crypt_path`; an
        export is recorded in the enclosing audited step, which declared it).

        Raises:
            TokenError: the token refuses a derivation or an operation.
        """
        t = self.target
        d = derive_for(self.live(why), mac, t.profile.flash_encryption, t.crypt_path)
        try:
            return crypt_derived(self.st, self.live(why), d, t.profile.flash_encryption,
                                 t.crypt_path, regions, decrypt=decrypt,
                                 crypt_config=t.profile.flash_crypt_config)
        finally:
            d.destroy()

    def _ciphertext(self, mac: bytes, img: ImageSpec, write: FlashWrite) -> bytes:
        """Encrypt one image for this device and address, keys in the token."""
        if write.address == SBV1_DIGEST_ADDRESS and self.target.is_sbv1_bootloader(img):
            sbk = self.derive(mac, "SECURE_BOOT_V1", "digest")
            try:
                plain = secureboot.sbv1_bootloader_digest(img.data, sbk.ciphers()[0],
                                                       sbv1_iv(mac, img.data), img.path)
            finally:
                sbk.destroy()
        else:
            plain = img.data
        plain = pad(plain, 32 if self.target.chip.is_esp32_classic else 16)
        (out,) = self.crypt(mac, [(write.address, plain)], decrypt=False,
                            why="ESP32-classic flash encryption")
        return out

    def encrypt(self, mac: bytes, images: Sequence[ImageSpec], plan: Plan,
                subject: dict[str, Any]) -> None:
        """Fill each write's ciphertext and MD5, once: the images, then the credentials
        where the target writes them (the certificate issued goes in `plan.issued_cert`)."""
        if all(w.ciphertext for w in plan.flash):
            return
        t = self.target
        cred = t.placement
        if cred is not None:
            from hsmflash.credentials import build_device_partitions

            parts = build_device_partitions(
                self.st, t.chip.name, mac, nvs_size=cred.nvs_size,
                nvs_keys_address=cred.nvs_keys_address, nvs_address=cred.nvs_address)
            if parts.nvs_keys:
                plan.flash[-2].ciphertext = parts.nvs
                plan.flash[-1].ciphertext = parts.nvs_keys
            else:
                plan.flash[-1].ciphertext = parts.nvs
            plan.issued_cert = (parts.info.get("serial", ""), parts.info.get("cert_sha256", ""))
        with self.step("encrypt", subject, {"images": len(images), "path": t.crypt_path},
                       key_used=True, exports=t.crypt_exports) as out:
            for img, write in zip(images, plan.flash, strict=False):
                write.ciphertext = self._ciphertext(mac, img, write)
            for write in plan.flash:
                write.md5 = hashlib.md5(write.ciphertext).hexdigest()  # noqa: S324 - esptool's
            out["ciphertext_md5"] = [w.md5 for w in plan.flash]

    # -- flash ------------------------------------------------------------------------------
    def in_place(self, device: Device, plan: Plan) -> bool:
        """Every write's ciphertext is already in the device's flash."""
        return all(device.flash_md5(w.address, len(w.ciphertext)) == w.md5 for w in plan.flash)

    def write(self, device: Device, plan: Plan, subject: dict[str, Any], *,
              skip_in_place: bool = True, verified: bool = True) -> None:
        """Write each region (skipping those whose MD5 already matches), one audited step
        each. `skip_in_place=False`: rewrite every region (nothing can be read back)."""
        for w in plan.flash:
            if skip_in_place and device.flash_md5(w.address, len(w.ciphertext)) == w.md5:
                w.status = "in-place"
                continue
            self.progress(f"{plan.mac}: writing {w.source} at {w.address:#x}")
            detail: dict[str, Any] = {"address": f"{w.address:#x}", "source": w.source,
                                      "length": len(w.ciphertext), "ciphertext_md5": w.md5}
            if not verified:
                detail["verified"] = False
            with self.step("write-flash", subject, detail):
                device.write_flash(w.address, w.ciphertext)
            w.status = "written"

    @staticmethod
    def verify(device: Device, plan: Plan) -> None:
        """Each region reads back with its ciphertext's MD5.

        Raises:
            DeviceError: naming the address.
        """
        for w in plan.flash:
            got = device.flash_md5(w.address, len(w.ciphertext))
            if got != w.md5:
                raise DeviceError(f"flash at {w.address:#x} reads back with MD5 {got}, "
                                  f"expected {w.md5}: write failed")


def subject_of(mac: bytes, chip: Chip, revision: str) -> dict[str, Any]:
    """The audit subject of one device."""
    return {"device": kdf.format_mac(mac), "chip": chip.name, "revision": revision}
