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

import time
from collections.abc import Sequence
from typing import Any

from hsmflash.chips import Chip
from hsmflash.device.base import Device
from hsmflash.errors import DeviceError
from hsmflash.formats import kdf
from hsmflash.hazmat import efuse as hz
from hsmflash.keyuse import Station, wipe
from hsmflash.policy import Policy
from hsmflash.provision.execute import Executor, Progress, prepare_target, subject_of
from hsmflash.provision.inputs import ImageSpec
from hsmflash.provision.plan import DeviceResult, Plan, already, efuses_done, plan_provision


class Provisioner:
    """Provisions devices for one chip profile of one policy, keys through a Station."""

    def __init__(self, st: Station, policy: Policy, chip: Chip, images: Sequence[ImageSpec],
                 progress: Progress | None = None) -> None:
        self.target = prepare_target(st, policy, chip, images)
        self.run = Executor(st, self.target, audit_prefix="provision", progress=progress)
        self.progress = self.run.progress

    def plan(self, device: Device, mac: bytes, revision: str) -> Plan:
        """Read the device, derive its check values and plan (in the running audited step).

        Raises:
            DeviceError: the eFuses or the flash contradict the policy.
            InputError: the policy names an eFuse or key block the chip lacks (a harden
                entry, an nvs_hmac_key_block shared with another key).
        """
        state = hz.read_state(device)
        expected = self.run.expected_for_plan(mac)
        plan = plan_provision(self.target, mac, revision, state, expected,
                              self.run.key_order(device))
        if plan.flash_key_checks:
            self.run.check_flash_decrypts(device, mac, plan.flash_key_checks)
        return plan

    def provision(self, device: Device, *, dry_run: bool = False) -> DeviceResult:
        """Plan, check, execute, verify one device (see the module doc for the order).

        Raises:
            DeviceError, PolicyRefused, InputError, TokenError: before or during; every step
            is idempotent, so re-running finishes an interrupted device.
        """
        started = time.monotonic()
        run, target = self.run, self.target
        mac, revision = run.identify(device)
        mac_text = kdf.format_mac(mac)
        subject = subject_of(mac, target.chip, revision)
        self.progress(f"{mac_text}: planning")
        with run.step("plan", subject, {"policy": target.policy.name, "dry_run": dry_run},
                      key_used=True, exports=target.crypt_exports) as out:
            plan = self.plan(device, mac, revision)
            out.update({"fe_kcv": plan.fe_kcv, "already_provisioned": plan.done})
        result = DeviceResult(mac_text, target.chip.name, revision, "planned",
                              fe_kcv=plan.fe_kcv, sb_kcv=plan.sb_kcv, plan=plan.describe())
        result.images = [{"address": f"{w.address:#x}", "source": w.source,
                          "sha256": w.plaintext_sha256} for w in plan.flash]
        if dry_run:
            result.seconds = time.monotonic() - started
            return result
        if efuses_done(plan):
            run.encrypt(mac, target.images, plan, subject)
            plan.done = run.in_place(device, plan)
        if plan.done:
            result.result = "already-provisioned"
            result.seconds = time.monotonic() - started
            self.progress(f"{mac_text}: already provisioned")
            return result

        self._burn_keys(device, mac, plan, subject, result)
        run.encrypt(mac, target.images, plan, subject)  # once: a no-op if done above
        run.write(device, plan, subject)
        result.cert_serial, result.cert_sha256 = plan.issued_cert
        run.verify(device, plan)
        self._enable(device, plan, subject, result)
        self._final_check(device, plan)
        result.result = "provisioned"
        result.seconds = time.monotonic() - started
        self.progress(f"{mac_text}: done")
        return result

    def _burn_keys(self, device: Device, mac: bytes, plan: Plan, subject: dict[str, Any],
                   result: DeviceResult) -> None:
        """Key blocks first: the flash-encryption key (exported from the token only to the
        burn, wiped after), the Secure Boot V1 key or V2 digests, the NVS HMAC key."""
        run = self.run
        rp = plan.read_protect_keys
        need_fe = plan.fe_state == "burn"
        need_sbv1 = any(p is None and b == "BLOCK2" for b, p, _ in plan.sb_burns)
        if not need_fe and not plan.sb_burns and not plan.hmac_burn:
            return
        burns: list[hz.KeyBurn] = []
        secrets: list[bytearray] = []
        self.progress(f"{plan.mac}: burning keys")
        blocks = ([b for b, _ in plan.fe_blocks] + [b for b, _, _ in plan.sb_burns]
                  + ([plan.hmac_burn] if plan.hmac_burn else []))
        with run.step("burn-keys", subject, {"blocks": blocks}, key_used=True,
                      exports=["efuse_burn"] if need_fe or need_sbv1 or plan.hmac_burn
                      else []) as out:

            def exported(purpose: str) -> bytearray:
                d = run.derive(mac, purpose, "burn", exportable=True)
                try:
                    key = out.export(d, "efuse_burn")
                    secrets.append(key)
                    return key
                finally:
                    d.destroy()

            try:
                if need_fe:
                    key = exported(plan.fe_purpose)
                    if len(plan.fe_blocks) == 1:
                        block, purpose = plan.fe_blocks[0]
                        burns.append(hz.KeyBurn(block, bytes(key), purpose, rp))
                    else:
                        for i, (block, purpose) in enumerate(plan.fe_blocks):
                            burns.append(hz.KeyBurn(block, bytes(key[32 * i:32 * (i + 1)]),
                                                    purpose, rp))
                for block, purpose, _what in plan.sb_burns:
                    digest = plan.sb_digests.get(block)
                    if digest is None:  # Secure Boot V1: the key derived for this device
                        burns.append(hz.KeyBurn(block, bytes(exported("SECURE_BOOT_V1")), None,
                                                rp))
                    else:
                        burns.append(hz.KeyBurn(block, digest, purpose, False, True,
                                                digest=True))
                if plan.hmac_burn:
                    burns.append(hz.KeyBurn(plan.hmac_burn, bytes(exported("NVS_HMAC_UP")),
                                            "HMAC_UP", True))
                report = hz.burn(device, keys=burns, confirm=True)
            finally:
                for s in secrets:
                    wipe(s)
            out.update({"burned": list(report.burned), "already": list(report.already)})
            result.burned += list(report.burned)

    def _enable(self, device: Device, plan: Plan, subject: dict[str, Any],
                result: DeviceResult) -> None:
        """Crypt counter, Secure Boot, revocations, hardening; then, last, download mode."""
        run = self.run
        if plan.enable_fields or plan.enable_write_protect:
            self.progress(f"{plan.mac}: enabling flash encryption, Secure Boot, hardening")
            with run.step("enable", subject, {"fields": plan.enable_fields,
                                              "write_protect": plan.enable_write_protect}) as out:
                report = hz.burn_fields(device, plan.enable_fields,
                                        write_protect=plan.enable_write_protect, confirm=True)
                out["burned"] = list(report.burned)
                result.burned += list(report.burned)
        if plan.final_fields:
            self.progress(f"{plan.mac}: closing download mode")
            with run.step("close-download", subject, {"fields": plan.final_fields}) as out:
                report = hz.burn_fields(device, plan.final_fields, confirm=True)
                out["burned"] = list(report.burned)
                result.burned += list(report.burned)

    @staticmethod
    def _final_check(device: Device, plan: Plan) -> None:
        device.reload_efuses()
        state = hz.read_state(device)
        for name, value in {**plan.enable_fields, **plan.final_fields}.items():
            if not already(state, name, value):
                raise DeviceError(f"eFuse {name} reads back {state.field(name)!r} after "
                                  f"burning {value}")
        if not state.flash_encryption_enabled:
            raise DeviceError("flash encryption is not enabled after provisioning")
