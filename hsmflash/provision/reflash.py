"""Re-flash a provisioned device: field updates over serial and RMA, no key files anywhere.

The device's flash-encryption key is re-derived in the token from the MAC the chip reports.
Before anything is written: the device must have been provisioned under this policy (the
re-derived key's KCV matches a readable key block, or, for a read-protected key, the
bootloader in flash decrypts with it); each ESP image must be signed by a key whose digest the
device holds (SBv2) or by the policy's SBv1 key; each address must lie in an encrypted region
of the device's own partition table. eFuses are never written.

Writes are verified by MD5; a region already holding the right ciphertext is skipped, so a
re-run after an interrupted write completes the image.

Anti-rollback: an app image's `secure_version` (ESP-IDF's esp_app_desc_t) below the policy's
`min_secure_version`, or below the device's SECURE_VERSION eFuse where it can be read, is refused.

Secure Download Mode (`reflash_secure_download`): the ROM then takes flash writes only - no
eFuse, MAC, MD5 or flash reads. The device is named by the user (`--device MAC`) and checked
against the provisioning manifest where there is one (the row's key check value must be the
one this policy derives for that MAC); GET_SECURITY_INFO shows flash encryption and the key
purpose; addresses are checked against the partition table being written, or the policy's; every
region is rewritten whole (so a re-run after an interruption completes it) and the result says
it could not be verified.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hsmflash.chips import Chip
from hsmflash.device.base import Device, check_unique_mac
from hsmflash.errors import DeviceError, InputError, UsageError
from hsmflash.formats import kdf, partitions
from hsmflash.formats.images import ESP_IMAGE_MAGIC
from hsmflash.hazmat import efuse as hz
from hsmflash.keyuse import Station
from hsmflash.policy import Policy
from hsmflash.provision import proof
from hsmflash.provision.execute import Executor, Progress, prepare_target, subject_of
from hsmflash.provision.inputs import ImageSpec
from hsmflash.provision.manifest import manifest_row
from hsmflash.provision.plan import (
    DeviceResult,
    Plan,
    check_in_encrypted,
    check_rollback,
    device_secure_version,
    flash_writes,
    held_digests,
    plan_reflash,
    reflash_key_state,
    resolve_images,
)

PARTITION_TABLE = partitions.TABLE_ADDRESS
# espefuse's KEY_PURPOSE numbers, as GET_SECURITY_INFO reports them
KEY_PURPOSE_ID = {"XTS_AES_256_KEY_1": 2, "XTS_AES_256_KEY_2": 3, "XTS_AES_128_KEY": 4}
SDM_NOTE = ("Secure Download Mode: written, but nothing can be read back (no MD5, no eFuse "
            "or flash reads): not verified")


class Reflasher:
    """Writes new images to devices provisioned under the same policy (no eFuse writes)."""

    def __init__(self, st: Station, policy: Policy, chip: Chip, images: Sequence[ImageSpec],
                 progress: Progress | None = None, *, allow_rewrite: Sequence[str] = ()) -> None:
        self.allow_rewrite = tuple(allow_rewrite)
        self.target = prepare_target(st, policy, chip, images, reflash=True,
                                     allow_rewrite=self.allow_rewrite)
        self.run = Executor(st, self.target, audit_prefix="flash", progress=progress)
        self.progress = self.run.progress

    def _decrypt(self, mac: bytes, address: int, data: bytes) -> bytes:
        (plain,) = self.run.crypt(mac, [(address, data)], decrypt=True,
                                  why="reading the device's flash")
        return plain

    def _check_bootloader(self, device: Device, mac: bytes) -> None:
        """A read-protected key: the bootloader in flash must decrypt with it."""
        boot = self.target.chip.bootloader_address
        head = self._decrypt(mac, boot, device.read_flash(boot, 32))
        if head[0] != ESP_IMAGE_MAGIC:
            raise DeviceError(
                f"the bootloader at {boot:#x} does not decrypt with the key this policy "
                f"derives for {kdf.format_mac(mac)}: the device was provisioned under "
                "another master key or policy; use that policy")

    def _device_partitions(self, device: Device, mac: bytes) -> list[partitions.Partition]:
        raw = device.read_flash(PARTITION_TABLE, partitions.TABLE_SIZE)
        try:
            return partitions.parse(self._decrypt(mac, PARTITION_TABLE, raw),
                                    f"partition table at {PARTITION_TABLE:#x}")
        except InputError as e:
            raise DeviceError(f"{e.diagnostics()}: the device has no readable partition table, "
                              "so image addresses cannot be checked") from None

    def reflash(self, device: Device, *, dry_run: bool = False, device_mac: str | None = None,
                manifest: str | None = None) -> DeviceResult:
        """Check the device, then encrypt, write and verify the images (no eFuse writes).

        A chip in Secure Download Mode goes to `reflash_secure_download`. `device_mac`, when
        given for a readable chip, must be the MAC it reports.

        Raises:
            DeviceError: not provisioned, or under another master key/policy; no partition
                table; write/verify failures; not the device named.
            InputError: an address outside the device's encrypted partitions.
            PolicyRefused: an image not signed by a key the device trusts, or a rollback.
        """
        if getattr(device, "secure_download_mode", False):
            return self.reflash_secure_download(device, device_mac, manifest, dry_run=dry_run)
        started = time.monotonic()
        run, target = self.run, self.target
        mac, revision = run.identify(device)
        if device_mac is not None and kdf.parse_mac(device_mac) != mac:
            raise DeviceError(f"the device reports MAC {kdf.format_mac(mac)}, not "
                              f"{device_mac} (--device)")
        mac_text = kdf.format_mac(mac)
        subject = subject_of(mac, target.chip, revision)
        self.progress(f"{mac_text}: checking")
        with run.step("check", subject, {"policy": target.policy.name, "dry_run": dry_run},
                      key_used=True, exports=target.crypt_exports) as out:
            state = hz.read_state(device)
            expected = run.expected(mac)
            if reflash_key_state(target, mac, state, expected,
                                 run.key_order(device)) == "in-place-unverified":
                self._check_bootloader(device, mac)
            check_rollback(target, device_secure_version(state))
            table = self._device_partitions(device, mac)
            plan, images = plan_reflash(target, mac, revision, expected, table,
                                        held_digests(target.chip, state),
                                        allow_rewrite=self.allow_rewrite)
            out["allow_rewrite"] = list(self.allow_rewrite)
            out["fe_kcv"] = plan.fe_kcv
        result = _result(plan)
        if dry_run:
            result.seconds = time.monotonic() - started
            return result
        run.encrypt(mac, images, plan, subject)
        run.write(device, plan, subject)
        run.verify(device, plan)
        result.result = ("up-to-date" if all(w.status == "in-place" for w in plan.flash)
                         else "flashed")
        result.seconds = time.monotonic() - started
        self.progress(f"{mac_text}: {result.result}")
        return result

    # -- Secure Download Mode -----------------------------------------------------------------
    def reflash_secure_download(self, device: Any, device_mac: str | None,
                                manifest: str | None, *, dry_run: bool = False) -> DeviceResult:
        """Re-flash a chip whose ROM is in Secure Download Mode: write-only, unverifiable.

        Raises:
            UsageError: no --device MAC.
            DeviceError: the MAC is not in the manifest (or its KCV is not this policy's), the
                chip shows no flash encryption or another key purpose, a write failed.
            InputError: no partition table to check addresses against, or an address outside
                its encrypted partitions.
            PolicyRefused: an image below the policy's min_secure_version.
        """
        started = time.monotonic()
        run, target = self.run, self.target
        if device_mac is None:
            raise UsageError(f"{getattr(device, 'port', 'the device')} is in Secure Download "
                             "Mode, so its MAC cannot be read: name it with --device MAC "
                             "(from the provisioning manifest or the label)")
        mac = kdf.parse_mac(device_mac)
        check_unique_mac(mac)
        mac_text = kdf.format_mac(mac)
        revision = "unknown"
        subject = {**subject_of(mac, target.chip, revision), "secure_download_mode": True}
        plan = Plan(target.chip.name, revision, mac_text, target.policy.name,
                    target.profile.flash_encryption, target.fe_purpose, target.fe_blocks())
        notes = [SDM_NOTE, "Secure Boot digests cannot be read: images were checked against "
                 "the policy's signing keys"]
        self.progress(f"{mac_text}: checking (secure download mode)")
        info = device.security_info()
        self._check_security_info(info, plan)
        row = manifest_row(manifest, mac_text, target.chip.name)
        if row is None:
            notes.append("the MAC was not checked against a provisioning manifest")
        # every image against the table being written and the policy's keys (the device's
        # table and digests cannot be read), before any key use
        table = self._table_for_sdm()
        images = resolve_images(target.images, table)  # --app: the table's romfs
        proof.prove_images(images, target.chip, target.profile, target.verifier(), [],
                           table=table, table_name="the partition table being written",
                           reflash=True, allow_rewrite=self.allow_rewrite)
        with run.step("check", subject, {"policy": target.policy.name, "dry_run": dry_run,
                                         "secure_download_mode": True},
                      key_used=True, exports=target.crypt_exports) as out:
            plan.fe_kcv = run.expected(mac).fe_kcv
            if row is not None and row.get("fe_kcv") and row["fe_kcv"] != plan.fe_kcv:
                raise DeviceError(f"{manifest}: {mac_text} was provisioned with key check "
                                  f"value {row['fe_kcv']}, not the {plan.fe_kcv} this policy "
                                  "derives: another master key or policy")
            check_rollback(target, None)
            plan.flash = flash_writes(target, images)
            check_in_encrypted(target.chip, table, plan)
            out["fe_kcv"] = plan.fe_kcv
        result = _result(plan, verified=False, notes=notes)
        if dry_run:
            result.seconds = time.monotonic() - started
            return result
        run.encrypt(mac, images, plan, subject)
        # whole regions, every time: nothing tells what is in place
        run.write(device, plan, subject, skip_in_place=False, verified=False)
        result.result = "written-unverified"
        result.plan = plan.describe()
        result.seconds = time.monotonic() - started
        self.progress(f"{mac_text}: {result.result}")
        return result

    def _check_security_info(self, info: dict[str, Any], plan: Plan) -> None:
        crypt_cnt = int(info.get("flash_crypt_cnt", 0))
        if bin(crypt_cnt).count("1") % 2 == 0:
            raise DeviceError("the chip reports flash encryption off (SPI_BOOT_CRYPT_CNT "
                              f"{crypt_cnt:#x}): it was never provisioned")
        purposes = set(info.get("key_purposes", []))
        wanted = {KEY_PURPOSE_ID[p] for _, p in plan.fe_blocks if p in KEY_PURPOSE_ID}
        if wanted and not wanted <= purposes:
            raise DeviceError(f"the chip holds no {plan.fe_purpose} key (key purposes "
                              f"{sorted(purposes)}): it was provisioned under another scheme")
        sb = self.target.profile.secure_boot
        if sb is not None and not info.get("parsed_flags", {}).get("SECURE_BOOT_EN", False):
            raise DeviceError("the chip reports Secure Boot off, but the policy enables it")

    def _table_for_sdm(self) -> list[partitions.Partition]:
        """The partition table being written, else the policy's image at the table address."""
        for img in self.target.images:
            if img.address == PARTITION_TABLE:
                return partitions.parse(img.data, img.path)
        policy = self.target.policy
        name = self.target.profile.images.get(f"{PARTITION_TABLE:#x}")
        if name is not None:
            path = Path(policy.path).parent / name
            try:
                return partitions.parse(path.read_bytes(), str(path))
            except OSError as e:
                raise InputError(f"{path}: cannot read the policy's partition table "
                                 f"({e.strerror})") from None
        raise InputError("the chip is in Secure Download Mode, so its partition table cannot be "
                         f"read: include it (--image {PARTITION_TABLE:#x}=partitions.bin) so "
                         "image addresses can be checked")


def _result(plan: Plan, *, verified: bool = True, notes: list[str] | None = None
            ) -> DeviceResult:
    result = DeviceResult(plan.mac, plan.chip, plan.revision, "planned", fe_kcv=plan.fe_kcv,
                          plan=plan.describe(), verified=verified, notes=notes or [])
    result.images = [{"address": f"{w.address:#x}", "source": w.source,
                      "sha256": w.plaintext_sha256} for w in plan.flash]
    return result
