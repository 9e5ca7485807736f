"""The pure planner, without a token: a virtual chip's eFuses and key check values in, a plan out.

The chips' eFuses are set by espefuse's own CLI (`burn-key`, `burn-key-digest`) on virtual
eFuse files, so the planner is checked against what the reference tool burns: a key burned by
espefuse from a key file must be recognised by its check value (AES-ECB of a zero block,
computed here with plain `cryptography`), a digest burned from a PEM must be recognised as that
key's, and anything else must be refused before a single step runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from conftest import ROOT
from hsmflash.chips import get_chip
from hsmflash.device.base import Device
from hsmflash.device.virtual import create_virtual_chip, open_virtual
from hsmflash.errors import DeviceError, InputError
from hsmflash.formats.primitives import PublicKey
from hsmflash.hazmat import efuse as hz
from hsmflash.policy import Policy, load_policy
from hsmflash.provision.inputs import ImageSpec
from hsmflash.provision.plan import Expected, Plan, Target, plan_provision
from imagebuilder import build_app, build_bootloader

MAC = bytes.fromhex("7cdfa1000042")
KEY = bytes(range(32))  # the flash-encryption key file espefuse burns
OTHER_KEY = bytes(range(100, 132))


def kcv(key: bytes) -> str:
    enc = Cipher(algorithms.AES(key), modes.ECB()).encryptor()  # noqa: S305 - KCV definition
    return (enc.update(bytes(16)) + enc.finalize())[:3].hex()


def up(n: int, unit: int) -> int:
    return -(-n // unit) * unit


def espefuse(efuse_file: Path, chip: str, *args: str) -> None:
    cmd = [sys.executable, "-m", "espefuse", "--virt", "--path-efuse-file", str(efuse_file),
           "--chip", chip, "--do-not-confirm", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def policy(tmp: Path, *, production: bool = False, extra: str = "") -> Policy:
    text = (ROOT / "policies" / "dev.toml").read_text()
    if production:
        text = text.replace("readable_keys = true", "readable_keys = false")
        text = text.replace("release_mode = false", "release_mode = true")
        text = text.replace('harden = ["DIS_PAD_JTAG"]',
                            'harden = ["DIS_PAD_JTAG", "ENABLE_SECURITY_DOWNLOAD"]')
    path = tmp / f"policy-{os.urandom(3).hex()}.toml"
    path.write_text(text + extra)
    return load_policy(path)


def rsa_public(tmp: Path, name: str) -> tuple[PublicKey, Path]:
    private = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    pem = tmp / f"{name}.pem"
    pem.write_bytes(private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return private.public_key(), pem


@pytest.fixture(scope="module")
def sb_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[PublicKey, Path]:
    return rsa_public(tmp_path_factory.mktemp("sb"), "sb-release")


def images(chip: str) -> tuple[ImageSpec, ...]:
    boot = build_bootloader(chip, 20 * 1024)
    app = build_app(chip, 64 * 1024)
    return (ImageSpec(get_chip(chip).bootloader_address, "bootloader.bin", boot),
            ImageSpec(0x10000, "app.bin", app))


def target(pol: Policy, chip: str, sb_public: tuple[PublicKey, ...] = ()) -> Target:
    return Target(pol, get_chip(chip), pol.profile(chip), images(chip), sb_public=sb_public)


@contextmanager
def chip_file(tmp: Path, chip: str, revision: tuple[int, int] = (0, 2)) -> Iterator[Path]:
    efuse = tmp / f"{chip}-{os.urandom(3).hex()}.efuse"
    create_virtual_chip(chip, efuse, MAC, revision)
    yield efuse


def plan_for(t: Target, efuse: Path, expected: Expected) -> Plan:
    """Read the virtual chip as the executor does, then plan (nothing is written)."""
    before = efuse.read_bytes()
    with open_virtual(t.chip.name, efuse, efuse.with_suffix(".flash")) as device:
        state = hz.read_state(device)
        dev: Device = device
        plan = plan_provision(t, MAC, "v0.2", state, expected,
                              lambda b, p, d: hz.stored_key_order(dev, b, p, d))
    assert efuse.read_bytes() == before  # planning never burns
    return plan


S3_EXPECTED = Expected((kcv(KEY[:16]), kcv(KEY[16:])))


def test_blank_chip_plans_every_burn_with_download_mode_last(
        tmp_path: Path, sb_key: tuple[PublicKey, Path]) -> None:
    t = target(policy(tmp_path, production=True), "esp32s3", (sb_key[0],))
    with chip_file(tmp_path, "esp32s3") as efuse:
        plan = plan_for(t, efuse, S3_EXPECTED)
    assert plan.fe_state == "burn"
    assert plan.fe_blocks == [("BLOCK_KEY0", "XTS_AES_128_KEY")]
    assert plan.fe_kcv == f"{kcv(KEY[:16])}/{kcv(KEY[16:])}"
    assert [(b, p) for b, p, _ in plan.sb_burns] == [("BLOCK_KEY1", "SECURE_BOOT_DIGEST0")]
    assert plan.read_protect_keys
    assert plan.enable_fields["SPI_BOOT_CRYPT_CNT"] == 7  # release: the counter is locked
    assert plan.enable_fields["SECURE_BOOT_EN"] == 1
    # the unused digest slots are revoked so no other key can be added later
    assert plan.enable_fields["SECURE_BOOT_KEY_REVOKE1"] == 1
    assert plan.enable_fields["SECURE_BOOT_KEY_REVOKE2"] == 1
    assert plan.enable_fields["DIS_PAD_JTAG"] == 1
    assert "ENABLE_SECURITY_DOWNLOAD" not in plan.enable_fields
    assert plan.final_fields == {"ENABLE_SECURITY_DOWNLOAD": 1}
    # each image padded to the 16-byte XTS unit, at its own address
    assert [(w.address, w.length) for w in plan.flash] == [
        (img.address, up(len(img.data), 16)) for img in t.images]
    assert plan.flash_key_checks == []


def test_key_espefuse_burned_is_recognised_and_another_is_refused(
        tmp_path: Path, sb_key: tuple[PublicKey, Path]) -> None:
    t = target(policy(tmp_path), "esp32s3", (sb_key[0],))
    with chip_file(tmp_path, "esp32s3") as efuse:
        keyfile = tmp_path / "key.bin"
        keyfile.write_bytes(KEY)
        espefuse(efuse, "esp32s3", "burn-key", "BLOCK_KEY0", str(keyfile), "XTS_AES_128_KEY",
                 "--no-read-protect")
        plan = plan_for(t, efuse, S3_EXPECTED)
        assert plan.fe_state == "in-place"  # nothing to burn for the key
        with pytest.raises(DeviceError, match="BLOCK_KEY0 already holds a different key"):
            plan_for(t, efuse, Expected((kcv(OTHER_KEY[:16]), kcv(OTHER_KEY[16:]))))


def test_read_protected_key_makes_the_executor_check_the_flash(
        tmp_path: Path, sb_key: tuple[PublicKey, Path]) -> None:
    prod = target(policy(tmp_path, production=True), "esp32s3", (sb_key[0],))
    with chip_file(tmp_path, "esp32s3") as efuse:
        keyfile = tmp_path / "key.bin"
        keyfile.write_bytes(OTHER_KEY)
        espefuse(efuse, "esp32s3", "burn-key", "BLOCK_KEY0", str(keyfile), "XTS_AES_128_KEY")
        plan = plan_for(prod, efuse, S3_EXPECTED)
        # the key cannot be compared: every ESP image already written must decrypt with it
        assert plan.fe_state == "in-place-unverified"
        chip_id = get_chip("esp32s3").image_chip_id.to_bytes(2, "little")
        assert plan.flash_key_checks == [(0x0, "bootloader.bin", chip_id),
                                         (0x10000, "app.bin", chip_id)]
        dev = target(policy(tmp_path), "esp32s3", (sb_key[0],))
        with pytest.raises(DeviceError, match="read-protected, policy 'dev' keeps keys"):
            plan_for(dev, efuse, S3_EXPECTED)


def test_secure_boot_digest_of_another_key_is_refused(
        tmp_path: Path, sb_key: tuple[PublicKey, Path]) -> None:
    t = target(policy(tmp_path), "esp32s3", (sb_key[0],))
    _other, other_pem = rsa_public(tmp_path, "other")
    with chip_file(tmp_path, "esp32s3") as efuse:
        espefuse(efuse, "esp32s3", "burn-key-digest", "BLOCK_KEY1", str(other_pem),
                 "SECURE_BOOT_DIGEST0")
        with pytest.raises(DeviceError, match="BLOCK_KEY1 already holds SECURE_BOOT_DIGEST0 "
                                              "that is not the digest of 'sb-release'"):
            plan_for(t, efuse, S3_EXPECTED)
    with chip_file(tmp_path, "esp32s3") as efuse:
        espefuse(efuse, "esp32s3", "burn-key-digest", "BLOCK_KEY1", str(sb_key[1]),
                 "SECURE_BOOT_DIGEST0")
        assert plan_for(t, efuse, S3_EXPECTED).sb_burns == []  # espefuse's digest is ours


def test_esp32_classic_plans_sbv1_and_the_digest_image(tmp_path: Path) -> None:
    pol = policy(tmp_path)
    t = target(pol, "esp32")
    sbv1 = bytes(range(50, 82))
    expected = Expected((kcv(KEY),), sbv1_kcvs=(kcv(sbv1),))
    with chip_file(tmp_path, "esp32", (1, 0)) as efuse:
        plan = plan_for(t, efuse, expected)
    assert plan.fe_blocks == [("BLOCK1", None)]
    assert [(b, p) for b, p, _ in plan.sb_burns] == [("BLOCK2", None)]
    assert plan.sb_kcv == kcv(sbv1)
    assert plan.enable_fields == {"FLASH_CRYPT_CONFIG": 0xF, "FLASH_CRYPT_CNT": 1,
                                  "ABS_DONE_0": 1, "JTAG_DISABLE": 1}
    boot = t.images[0]
    assert boot.address == 0x1000
    # SBv1: the bootloader goes to 0x0 as its digest image (0x1000 of IV and digest, then
    # the bootloader padded to 128 bytes); the app is padded to ESP32's 32-byte unit
    app = t.images[1]
    assert [(w.address, w.length) for w in plan.flash] == [
        (0x0, 0x1000 + up(len(boot.data), 128)), (0x10000, up(len(app.data), 32))]


def test_unknown_harden_efuse_and_shared_hmac_block_are_input_errors(
        tmp_path: Path, sb_key: tuple[PublicKey, Path]) -> None:
    pol = policy(tmp_path)
    t = target(pol, "esp32s3", (sb_key[0],))
    bad = replace(t, profile=replace(t.profile, harden=("NOT_AN_EFUSE",)))
    with chip_file(tmp_path, "esp32s3") as efuse:
        with pytest.raises(InputError, match="eFuse 'NOT_AN_EFUSE' does not exist on esp32s3"):
            plan_for(bad, efuse, S3_EXPECTED)
        shared = replace(t, profile=replace(t.profile, nvs_encryption="hmac",
                                            nvs_hmac_key_block="BLOCK_KEY1"))
        with pytest.raises(InputError, match="nvs_hmac_key_block BLOCK_KEY1 is also used"):
            plan_for(shared, efuse, replace(S3_EXPECTED, hmac_kcv=kcv(OTHER_KEY)))


def test_the_planner_loads_no_token_code() -> None:
    code = ("import sys, hsmflash.provision.plan, hsmflash.provision.inputs; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('pkcs11', 'hsmflash') "
            "and m.startswith(('pkcs11', 'hsmflash.token', 'hsmflash.keyuse'))))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "[]"
