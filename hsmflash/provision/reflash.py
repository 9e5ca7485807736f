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

import csv
import json
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from hsmflash.device.base import Device, check_unique_mac
from hsmflash.encrypt import PURPOSE_FOR_SCHEME
from hsmflash.errors import DeviceError, InputError, PolicyRefused, UsageError
from hsmflash.formats import kdf, partitions
from hsmflash.formats.images import ESP_IMAGE_MAGIC, app_secure_version
from hsmflash.hazmat import efuse as hz
from hsmflash.provision import proof
from hsmflash.provision.provisioner import DeviceResult, Plan, Provisioner

PARTITION_TABLE = partitions.TABLE_ADDRESS
# espefuse's KEY_PURPOSE numbers, as GET_SECURITY_INFO reports them
KEY_PURPOSE_ID = {"XTS_AES_256_KEY_1": 2, "XTS_AES_256_KEY_2": 3, "XTS_AES_128_KEY": 4}
SDM_NOTE = ("Secure Download Mode: written, but nothing can be read back (no MD5, no eFuse "
            "or flash reads): not verified")


class Reflasher(Provisioner):
    """Writes new images to devices provisioned under the same policy."""

    audit_prefix = "flash"

    def __init__(self, *args: Any, allow_rewrite: Sequence[str] = (), **kwargs: Any) -> None:
        # set before Provisioner.__init__, whose static checks read it
        self.allow_rewrite = tuple(allow_rewrite)
        super().__init__(*args, **kwargs)

    @property
    def _credentials(self) -> Any:
        return None  # credentials are issued at provisioning, not on re-flash

    def _proof_options(self) -> dict[str, Any]:
        # the device's own table decides data placement once the device is read
        return {"table_pending": True, "reflash": True, "allow_rewrite": self.allow_rewrite}

    def _check_exports(self) -> None:
        for reason in self._crypt_exports:  # re-flash burns nothing: only the encryption's
            self.policy.check_export(reason)

    def _held_digests(self, state: hz.EfuseState) -> set[bytes]:
        """The Secure Boot V2 key digests the device holds and has not revoked (ESP32-C2: the
        first 128 bits each, all its half block holds)."""
        held = set()
        revoked = state.secure_boot_key_revoked
        for blk in state.key_blocks.values():
            if blk.purpose and blk.purpose.startswith("SECURE_BOOT_DIGEST"):
                slot = int(blk.purpose[-1])
                if not (slot < len(revoked) and revoked[slot]):
                    held.add(bytes(blk.data))
        if self.chip.name in hz.HALF_BLOCK_CHIPS:
            held.add(bytes(state.key_blocks["BLOCK_KEY0_HI_128"].data))
        return held

    def _place_credentials(self, found: Any) -> None:
        return None  # nor is the table the images carry used: the device's own table is

    def _resolve(self, table: list[partitions.Partition]) -> None:
        """Images that fill a partition (`--app`) take its address from the device's table.

        Raises:
            InputError: the device's table has no such partition, or the image is larger.
        """
        resolved = []
        for img in self.images:
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
        self.images = sorted(resolved, key=lambda i: i.address)

    def _decrypt(self, mac: bytes, address: int, data: bytes) -> bytes:
        (plain,) = self.device_crypt(mac, [(address, data)], decrypt=True,
                                     why="reading the device's flash")
        return plain

    def _check_device_key(self, device: Device, mac: bytes, state: hz.EfuseState) -> str:
        scheme = self.profile.flash_encryption
        purpose = PURPOSE_FOR_SCHEME[scheme]
        if not state.flash_encryption_enabled:
            raise DeviceError("flash encryption is not enabled on this device: it was never "
                              "provisioned; run `hsmflash provision` first")
        derived = self._derive(mac, purpose, "check")
        try:
            kcv = derived.kcv
            status = self._key_state(device, state, self._fe_blocks(scheme), purpose, derived)
        except DeviceError:
            raise DeviceError("the device's flash-encryption key is not the one this policy's "
                              f"master ({self.profile.derive_master!r}) derives for "
                              f"{kdf.format_mac(mac)}: it was provisioned under another master "
                              "key or policy; use that policy") from None
        finally:
            derived.destroy()
        if status == "burn":
            raise DeviceError("the device has no flash-encryption key: run `hsmflash "
                              "provision` first")
        if status == "in-place-unverified":
            boot = self.chip.bootloader_address
            head = self._decrypt(mac, boot, device.read_flash(boot, 32))
            if head[0] != ESP_IMAGE_MAGIC:
                raise DeviceError(
                    f"the bootloader at {boot:#x} does not decrypt with the key this policy "
                    f"derives for {kdf.format_mac(mac)}: the device was provisioned under "
                    "another master key or policy; use that policy")
        return kcv

    def _device_partitions(self, device: Device, mac: bytes) -> list[partitions.Partition]:
        raw = device.read_flash(PARTITION_TABLE, partitions.TABLE_SIZE)
        try:
            return partitions.parse(self._decrypt(mac, PARTITION_TABLE, raw),
                                    f"partition table at {PARTITION_TABLE:#x}")
        except InputError as e:
            raise DeviceError(f"{e.diagnostics()}: the device has no readable partition table, "
                              "so image addresses cannot be checked") from None

    def _check_addresses(self, table: list[partitions.Partition], plan: Plan) -> None:
        boot = self.chip.bootloader_address
        for write in plan.flash:
            if write.address in (boot, 0x0) and write.address < PARTITION_TABLE:
                continue  # the bootloader region (SBv1: the digest image at 0x0)
            if write.address == PARTITION_TABLE:
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

    def _check_rollback(self, device_version: int | None) -> None:
        """Refuse an app whose secure_version is below the policy's or the device's minimum."""
        floor = self.profile.min_secure_version
        for img in self.images:
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
        mac, revision = self.identify(device)
        if device_mac is not None and kdf.parse_mac(device_mac) != mac:
            raise DeviceError(f"the device reports MAC {kdf.format_mac(mac)}, not "
                              f"{device_mac} (--device)")
        mac_text = kdf.format_mac(mac)
        subject = {"device": mac_text, "chip": self.chip.name, "revision": revision}
        scheme = self.profile.flash_encryption
        plan = Plan(self.chip.name, revision, mac_text, self.policy.name, scheme,
                    PURPOSE_FOR_SCHEME[scheme], self._fe_blocks(scheme))
        self.progress(f"{mac_text}: checking")
        with self._step("check", subject, {"policy": self.policy.name, "dry_run": dry_run},
                        key_used=True, exports=self._crypt_exports) as out:
            state = hz.read_state(device)
            plan.fe_kcv = self._check_device_key(device, mac, state)
            self._check_rollback(_device_secure_version(state))
            table = self._device_partitions(device, mac)
            self._resolve(table)
            self._plan_flash(plan, mac)
            # every image again, now against the device's table and the digests it holds
            proof.prove_images(self.images, self.chip, self.profile,
                               self._verifier(self._held_digests(state)), [], table=table,
                               table_name="the device's partition table", reflash=True,
                               allow_rewrite=self.allow_rewrite)
            self._check_addresses(table, plan)
            out["allow_rewrite"] = list(self.allow_rewrite)
            out["fe_kcv"] = plan.fe_kcv
        result = DeviceResult(mac_text, self.chip.name, revision, "planned", fe_kcv=plan.fe_kcv,
                              plan=plan.describe())
        result.images = [{"address": f"{w.address:#x}", "source": w.source,
                          "sha256": w.plaintext_sha256} for w in plan.flash]
        if dry_run:
            result.seconds = time.monotonic() - started
            return result
        self._write_flash(device, mac, plan, subject)
        self._verify(device, mac, plan, subject)
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
        if device_mac is None:
            raise UsageError(f"{getattr(device, 'port', 'the device')} is in Secure Download "
                             "Mode, so its MAC cannot be read: name it with --device MAC "
                             "(from the provisioning manifest or the label)")
        mac = kdf.parse_mac(device_mac)
        check_unique_mac(mac)
        mac_text = kdf.format_mac(mac)
        revision = "unknown"
        subject = {"device": mac_text, "chip": self.chip.name, "revision": revision,
                   "secure_download_mode": True}
        scheme = self.profile.flash_encryption
        plan = Plan(self.chip.name, revision, mac_text, self.policy.name, scheme,
                    PURPOSE_FOR_SCHEME[scheme], self._fe_blocks(scheme))
        notes = [SDM_NOTE, "Secure Boot digests cannot be read: images were checked against "
                 "the policy's signing keys"]
        self.progress(f"{mac_text}: checking (secure download mode)")
        info = device.security_info()
        self._check_security_info(info, plan)
        row = _manifest_row(manifest, mac_text, self.chip.name)
        if row is None:
            notes.append("the MAC was not checked against a provisioning manifest")
        with self._step("check", subject, {"policy": self.policy.name, "dry_run": dry_run,
                                           "secure_download_mode": True},
                        key_used=True, exports=self._crypt_exports) as out:
            derived = self._derive(mac, plan.fe_purpose, "check")
            try:
                plan.fe_kcv = derived.kcv
            finally:
                derived.destroy()
            if row is not None and row.get("fe_kcv") and row["fe_kcv"] != plan.fe_kcv:
                raise DeviceError(f"{manifest}: {mac_text} was provisioned with key check "
                                  f"value {row['fe_kcv']}, not the {plan.fe_kcv} this policy "
                                  "derives: another master key or policy")
            self._check_rollback(None)
            self._plan_flash(plan, mac)
            self._check_addresses(self._table_for_sdm(), plan)
            out["fe_kcv"] = plan.fe_kcv
        result = DeviceResult(mac_text, self.chip.name, revision, "planned", fe_kcv=plan.fe_kcv,
                              plan=plan.describe(), verified=False, notes=notes)
        result.images = [{"address": f"{w.address:#x}", "source": w.source,
                          "sha256": w.plaintext_sha256} for w in plan.flash]
        if dry_run:
            result.seconds = time.monotonic() - started
            return result
        self._prepare_flash(mac, plan, subject)
        for write in plan.flash:  # whole regions, every time: nothing tells what is in place
            self.progress(f"{mac_text}: writing {write.source} at {write.address:#x}")
            with self._step("write-flash", subject, {"address": f"{write.address:#x}",
                                                     "source": write.source,
                                                     "length": len(write.ciphertext),
                                                     "ciphertext_md5": write.md5,
                                                     "verified": False}):
                device.write_flash(write.address, write.ciphertext)
            write.status = "written"
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
        sb = self.profile.secure_boot
        if sb is not None and not info.get("parsed_flags", {}).get("SECURE_BOOT_EN", False):
            raise DeviceError("the chip reports Secure Boot off, but the policy enables it")

    def _table_for_sdm(self) -> list[partitions.Partition]:
        """The partition table being written, else the policy's image at the table address."""
        for img in self.images:
            if img.address == PARTITION_TABLE:
                return partitions.parse(img.data, img.path)
        name = self.profile.images.get(f"{PARTITION_TABLE:#x}")
        if name is not None:
            path = Path(self.policy.path).parent / name
            try:
                return partitions.parse(path.read_bytes(), str(path))
            except OSError as e:
                raise InputError(f"{path}: cannot read the policy's partition table "
                                 f"({e.strerror})") from None
        raise InputError("the chip is in Secure Download Mode, so its partition table cannot be "
                         f"read: include it (--image {PARTITION_TABLE:#x}=partitions.bin) so "
                         "image addresses can be checked")


def _device_secure_version(state: hz.EfuseState) -> int | None:
    """The device's anti-rollback floor from its SECURE_VERSION eFuse (bits set), if it has one."""
    try:
        value = state.field("SECURE_VERSION")
    except InputError:
        return None
    if isinstance(value, bool | bytes):
        return None
    return bin(int(value)).count("1")


def _manifest_row(manifest: str | None, mac: str, chip: str) -> dict[str, Any] | None:
    """The latest successful provisioning row for `mac` in a manifest (CSV or JSON Lines).

    Raises:
        DeviceError: the manifest exists but has no successful row for this MAC and chip.
        InputError: the manifest cannot be read.
    """
    if manifest is None or not Path(manifest).exists():
        return None
    try:
        text = Path(manifest).read_text(encoding="utf-8")
    except OSError as e:
        raise InputError(f"{manifest}: cannot read the manifest ({e.strerror})") from None
    if manifest.endswith(".csv"):
        rows = list(csv.DictReader(text.splitlines()))
    else:
        try:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        except ValueError as e:
            raise InputError(f"{manifest}: not JSON Lines ({e})") from None
    done = [r for r in rows if str(r.get("mac", "")).lower() == mac and r.get("chip") == chip
            and r.get("result") in ("provisioned", "already-provisioned")]
    if not done:
        raise DeviceError(f"{mac} is not a provisioned {chip} in {manifest}: check --device")
    return done[-1]
