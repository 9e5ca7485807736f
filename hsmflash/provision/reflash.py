"""Re-flash a provisioned device: field updates over serial and RMA, no key files anywhere.

The device's flash-encryption key is re-derived in the token from the MAC the chip reports.
Before anything is written: the device must have been provisioned under this policy (the
re-derived key's KCV matches a readable key block, or, for a read-protected key, the
bootloader in flash decrypts with it); each ESP image must be signed by a key whose digest the
device holds (SBv2) or by the policy's SBv1 key; each address must lie in an encrypted region
of the device's own partition table. eFuses are never written.

Writes are verified by MD5; a region already holding the right ciphertext is skipped, so a
re-run after an interrupted write completes the image.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

from hsmflash.chips import SBV2
from hsmflash.device.base import Device
from hsmflash.encrypt import PURPOSE_FOR_SCHEME
from hsmflash.errors import DeviceError, InputError, PolicyRefused
from hsmflash.formats import kdf, partitions
from hsmflash.formats.images import ESP_IMAGE_MAGIC, read_signature_blocks
from hsmflash.hazmat import efuse as hz
from hsmflash.provision.provisioner import DeviceResult, Plan, Provisioner

PARTITION_TABLE = partitions.TABLE_ADDRESS


class Reflasher(Provisioner):
    """Writes new images to devices provisioned under the same policy."""

    audit_prefix = "flash"

    @property
    def _credentials(self) -> Any:
        return None  # credentials are issued at provisioning, not on re-flash

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

    def _check_device_digests(self, state: hz.EfuseState) -> None:
        sb = self.profile.secure_boot
        if sb is None or sb.scheme != SBV2:
            return
        held = set()
        revoked = state.secure_boot_key_revoked
        for blk in state.key_blocks.values():
            if blk.purpose and blk.purpose.startswith("SECURE_BOOT_DIGEST"):
                slot = int(blk.purpose[-1])
                if not (slot < len(revoked) and revoked[slot]):
                    held.add(bytes(blk.data))
        half = self.chip.name in hz.HALF_BLOCK_CHIPS  # ESP32-C2: the digest's first 128 bits
        if half:
            held.add(bytes(state.key_blocks["BLOCK_KEY0_HI_128"].data))
        for img in self.images:
            if not img.is_esp_image:
                continue
            digests = {b.key_digest[:16] if half else b.key_digest
                       for b in read_signature_blocks(img.data)}
            if not digests & held:
                raise PolicyRefused(
                    f"{img.path!r} is not signed by a key whose digest the device holds "
                    "(or that key is revoked); sign it with one of the device's Secure Boot "
                    "keys")

    def reflash(self, device: Device, *, dry_run: bool = False) -> DeviceResult:
        """Check the device, then encrypt, write and verify the images (no eFuse writes).

        Raises:
            DeviceError: not provisioned, or under another master key/policy; no partition
                table; write/verify failures.
            InputError: an address outside the device's encrypted partitions.
            PolicyRefused: an image not signed by a key the device trusts.
        """
        started = time.monotonic()
        mac, revision = self.identify(device)
        mac_text = kdf.format_mac(mac)
        subject = {"device": mac_text, "chip": self.chip.name, "revision": revision}
        scheme = self.profile.flash_encryption
        plan = Plan(self.chip.name, revision, mac_text, self.policy.name, scheme,
                    PURPOSE_FOR_SCHEME[scheme], self._fe_blocks(scheme))
        self.progress(f"{mac_text}: checking")
        with self.st.use("flash.check", self.master, subject=subject,
                         detail={"policy": self.policy.name, "dry_run": dry_run}) as out:
            state = hz.read_state(device)
            plan.fe_kcv = self._check_device_key(device, mac, state)
            self._check_device_digests(state)
            table = self._device_partitions(device, mac)
            self._resolve(table)
            self._plan_flash(plan, mac)
            self._check_addresses(table, plan)
            out["fe_kcv"] = plan.fe_kcv
            out.update(self._take_exports())
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

