"""Virtual chips, the device layer and irreversible eFuse writes, checked against espefuse.

espefuse is the independent reference: its CLI (`summary --format json`, `burn-key`,
`burn-key-digest`) runs in a subprocess on the same virtual eFuse files.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from hsmflash.device import open_device
from hsmflash.device.base import check_unique_mac
from hsmflash.device.virtual import create_virtual_chip, open_virtual
from hsmflash.errors import DeviceError, InputError, UsageError
from hsmflash.hazmat import efuse as hz

MAC = bytes.fromhex("240ac4a1b2c3")
MAC_TEXT = "24:0a:c4:a1:b2:c3"


def espefuse(efuse_file: Path, chip: str, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "espefuse", "--virt", "--path-efuse-file", str(efuse_file),
           "--chip", chip, "--do-not-confirm", *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


def summary(efuse_file: Path, chip: str, tmp_path: Path) -> dict[str, Any]:
    out = tmp_path / f"summary-{os.urandom(4).hex()}.json"
    result = espefuse(efuse_file, chip, "summary", "--format", "json", "--file", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    data: dict[str, Any] = json.loads(out.read_text())
    return data


@pytest.fixture
def make_chip(tmp_path: Path) -> Any:
    def make(chip: str, revision: tuple[int, int] = (0, 0), mac: bytes = MAC) -> Path:
        efuse_file = tmp_path / f"{chip}-{os.urandom(4).hex()}.efuse"
        create_virtual_chip(chip, efuse_file, mac, revision)
        return efuse_file

    return make


def open_chip(chip: str, efuse_file: Path) -> Any:
    return open_virtual(chip, efuse_file, efuse_file.with_suffix(".flash"))


# -- identity ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("chip", "revision"),
    [("esp32", (1, 0)), ("esp32", (3, 0)), ("esp32s3", (0, 2)), ("esp32c3", (0, 4))],
)
def test_virtual_chip_has_the_given_mac_and_revision(
    make_chip: Any, tmp_path: Path, chip: str, revision: tuple[int, int]
) -> None:
    efuse_file = make_chip(chip, revision)
    with open_chip(chip, efuse_file) as device:
        identity = device.identify()
    assert identity.chip.name == chip
    assert identity.mac == MAC
    assert (identity.revision.major, identity.revision.minor) == revision

    ref = summary(efuse_file, chip, tmp_path)
    assert ref["MAC"]["value"].startswith(MAC_TEXT)
    if chip == "esp32":
        assert "CRC" in ref["MAC"]["value"] and "OK" in ref["MAC"]["value"]
        assert ref["CHIP_VER_REV1"]["value"] is True
        assert ref["CHIP_VER_REV2"]["value"] is (revision[0] == 3)
    else:
        assert ref["WAFER_VERSION_MAJOR"]["value"] == revision[0]
        assert ref["WAFER_VERSION_MINOR"]["value"] == revision[1]


@pytest.mark.parametrize(
    ("mac", "reason"),
    [(bytes(6), "all-zero"), (bytes.fromhex("ffffffffffff"), "all-ones"),
     (bytes.fromhex("010203040506"), "multicast")],
)
def test_shared_or_multicast_mac_is_refused(make_chip: Any, mac: bytes, reason: str) -> None:
    efuse_file = make_chip("esp32s3", mac=mac)
    with open_chip("esp32s3", efuse_file) as device, pytest.raises(DeviceError, match=reason):
        device.identify()
    with pytest.raises(DeviceError, match=reason):
        check_unique_mac(mac)


def test_fresh_espefuse_file_is_refused_for_its_zero_mac(tmp_path: Path) -> None:
    efuse_file = tmp_path / "blank.efuse"
    summary(efuse_file, "esp32c3", tmp_path)  # espefuse creates a blank virtual chip
    with open_chip("esp32c3", efuse_file) as device:
        with pytest.raises(DeviceError, match="00:00:00:00:00:00 is all-zero"):
            device.identify()


def test_create_refuses_to_overwrite_and_unrepresentable_revision(make_chip: Any) -> None:
    efuse_file = make_chip("esp32")
    before = efuse_file.read_bytes()
    with pytest.raises(InputError, match="already exists"):
        create_virtual_chip("esp32", efuse_file, MAC, (1, 0))
    assert efuse_file.read_bytes() == before
    with pytest.raises(InputError, match=r"v2\.0"):
        create_virtual_chip("esp32", efuse_file.with_name("rev2.efuse"), MAC, (2, 0))


def test_open_device_needs_exactly_one_kind(tmp_path: Path, make_chip: Any) -> None:
    efuse_file = make_chip("esp32c3")
    with pytest.raises(InputError, match="not both"):
        with open_device("esp32c3", port="/dev/null", efuse_file=efuse_file,
                         flash_file=tmp_path / "f"):
            pass
    with pytest.raises(InputError, match="no device"):
        with open_device("esp32c3"):
            pass
    with pytest.raises(InputError, match="does not exist"):
        with open_device("esp32c3", efuse_file=tmp_path / "missing", flash_file=tmp_path / "f"):
            pass


# -- flash ---------------------------------------------------------------------------------


def test_flash_write_is_durable_in_the_file(make_chip: Any) -> None:
    efuse_file = make_chip("esp32s3")
    flash_file = efuse_file.with_suffix(".flash")
    data = os.urandom(5000)
    with open_device("esp32s3", efuse_file=efuse_file, flash_file=flash_file) as device:
        device.write_flash(0x10000, data)
    raw = flash_file.read_bytes()
    assert len(raw) == 4 * 1024 * 1024
    assert raw[0x10000 : 0x10000 + len(data)] == data
    assert set(raw[:0x10000]) == {0xFF} and set(raw[0x10000 + len(data) :]) == {0xFF}
    with open_device("esp32s3", efuse_file=efuse_file, flash_file=flash_file) as device:
        assert device.read_flash(0x10000, len(data)) == data
        assert device.flash_md5(0x10000, len(data)) == hashlib.md5(data).hexdigest()  # noqa: S324
        with pytest.raises(InputError, match="outside"):
            device.write_flash(4 * 1024 * 1024 - 10, data)
        with pytest.raises(InputError, match="outside"):
            device.read_flash(4 * 1024 * 1024, 1)


# -- keys ----------------------------------------------------------------------------------


@pytest.mark.parametrize("chip", ["esp32s3", "esp32c3"])
def test_xts_key_burn_matches_espefuse_and_is_read_protected(
    make_chip: Any, tmp_path: Path, chip: str
) -> None:
    key = os.urandom(32)
    key_file = tmp_path / "key.bin"
    key_file.write_bytes(key)
    ours = make_chip(chip)
    reference = tmp_path / "reference.efuse"
    shutil.copy(ours, reference)

    with open_chip(chip, ours) as device:
        report = hz.burn_key(device, "BLOCK_KEY2", key, "XTS_AES_128_KEY", read_protect=True,
                             confirm=True)
        assert report.changed
        state = hz.read_state(device)
    block = state.key_blocks["BLOCK_KEY2"]
    assert block.purpose == "XTS_AES_128_KEY" and block.read_protected and block.write_protected
    assert block.data == bytes(32)  # a read-protected key reads back as zeros

    ref = summary(ours, chip, tmp_path)
    assert ref["KEY_PURPOSE_2"]["value"] == "XTS_AES_128_KEY"
    assert ref["BLOCK_KEY2"]["readable"] is False
    assert ref["BLOCK_KEY2"]["writeable"] is False

    result = espefuse(reference, chip, "burn-key", "BLOCK_KEY2", str(key_file), "XTS_AES_128_KEY")
    assert result.returncode == 0, result.stdout
    assert ours.read_bytes() == reference.read_bytes()


def test_readable_xts_key_reads_back_as_key_file(make_chip: Any, tmp_path: Path) -> None:
    key = os.urandom(32)
    key_file = tmp_path / "key.bin"
    key_file.write_bytes(key)
    ours = make_chip("esp32s3")
    reference = tmp_path / "reference.efuse"
    shutil.copy(ours, reference)
    with open_chip("esp32s3", ours) as device:
        hz.burn_key(device, "BLOCK_KEY0", key, "XTS_AES_128_KEY", read_protect=False,
                    confirm=True)
        block = hz.read_state(device).key_blocks["BLOCK_KEY0"]
        assert not block.read_protected
        assert hz.stored_key_order(device, "BLOCK_KEY0", block.purpose, block.data) == key
    result = espefuse(reference, "esp32s3", "burn-key", "BLOCK_KEY0", str(key_file),
                      "XTS_AES_128_KEY", "--no-read-protect")
    assert result.returncode == 0, result.stdout
    assert ours.read_bytes() == reference.read_bytes()


@pytest.mark.parametrize("protect", [True, False])
def test_esp32_flash_encryption_key_matches_espefuse_flash_encryption_alias(
    make_chip: Any, tmp_path: Path, protect: bool
) -> None:
    # `espefuse burn-key flash_encryption KEYFILE` is the burn Espressif pairs with
    # `espsecure encrypt-flash-data --keyfile KEYFILE`; the eFuse files must be identical.
    key = os.urandom(32)
    key_file = tmp_path / "key.bin"
    key_file.write_bytes(key)
    ours = make_chip("esp32", (1, 0))
    reference = tmp_path / "reference.efuse"
    shutil.copy(ours, reference)
    with open_chip("esp32", ours) as device:
        hz.burn_key(device, "BLOCK1", key, None, read_protect=protect, write_protect=protect,
                    confirm=True)
    args = ["burn-key", "flash_encryption", str(key_file)]
    result = espefuse(reference, "esp32", *args, *([] if protect else ["--no-protect-key"]))
    assert result.returncode == 0, result.stdout
    assert ours.read_bytes() == reference.read_bytes()
    assert summary(ours, "esp32", tmp_path)["BLOCK1"]["readable"] is (not protect)


def test_key_burn_is_resumable_and_refuses_another_key(make_chip: Any) -> None:
    key = os.urandom(32)
    efuse_file = make_chip("esp32s3")
    with open_chip("esp32s3", efuse_file) as device:
        # an interrupted run left the key readable and writable, purpose unset
        hz.burn_fields(device, {}, confirm=True)  # no-op
        device.efuses["BLOCK_KEY1"].save(hz.stored_key_order(device, "BLOCK_KEY1",
                                                             "XTS_AES_128_KEY", key))
        device.efuses.burn_all()
        report = hz.burn_key(device, "BLOCK_KEY1", key, "XTS_AES_128_KEY", read_protect=True,
                             confirm=True)
        assert "BLOCK_KEY1" in report.already and "KEY_PURPOSE_1" in report.burned
        again = hz.burn_key(device, "BLOCK_KEY1", key, "XTS_AES_128_KEY", read_protect=True,
                            confirm=True)
        assert not again.changed and again.unverified == ("BLOCK_KEY1",)

        hz.burn_key(device, "BLOCK_KEY2", key, "XTS_AES_128_KEY", read_protect=False,
                    confirm=True)
        before = efuse_file.read_bytes()
        with pytest.raises(DeviceError, match="different key"):
            hz.burn_key(device, "BLOCK_KEY2", os.urandom(32), "XTS_AES_128_KEY",
                        read_protect=False, confirm=True)
        with pytest.raises(DeviceError, match="must stay readable"):
            hz.burn_key(device, "BLOCK_KEY1", key, "XTS_AES_128_KEY", read_protect=False,
                        confirm=True)
        with pytest.raises(DeviceError, match="key purpose XTS_AES_128_KEY"):
            hz.burn_key(device, "BLOCK_KEY1", key, "XTS_AES_256_KEY_1", read_protect=True,
                        confirm=True)
        assert efuse_file.read_bytes() == before


def _public_key_pem(tmp_path: Path) -> Path:
    private = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    pem = tmp_path / "sb-pub.pem"
    pem.write_bytes(private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return pem


def _sbv2_digest(pem: Path) -> bytes:
    import espsecure

    with open(pem, "rb") as f:
        digest: bytes = espsecure._digest_sbv2_public_key(f)
    return digest


@pytest.mark.parametrize(
    ("chip", "revision", "block", "purpose"),
    [("esp32s3", (0, 2), "BLOCK_KEY3", "SECURE_BOOT_DIGEST0"), ("esp32", (3, 0), "BLOCK2", None)],
)
def test_sbv2_digest_burn_matches_espefuse_burn_key_digest(
    make_chip: Any, tmp_path: Path, chip: str, revision: tuple[int, int], block: str,
    purpose: str | None,
) -> None:
    pem = _public_key_pem(tmp_path)
    ours = make_chip(chip, revision)
    reference = tmp_path / "reference.efuse"
    shutil.copy(ours, reference)
    with open_chip(chip, ours) as device:
        hz.burn_key_digest(device, block, _sbv2_digest(pem), purpose, confirm=True)
        state = hz.read_state(device)
    assert not state.key_blocks[block].read_protected
    assert state.key_blocks[block].write_protected
    args = ["burn-key-digest", *([block] if purpose else []), str(pem), *([purpose] if purpose
                                                                          else [])]
    result = espefuse(reference, chip, *args)
    assert result.returncode == 0, result.stdout
    assert ours.read_bytes() == reference.read_bytes()


def test_sbv2_digest_refused_on_esp32_rev1(make_chip: Any, tmp_path: Path) -> None:
    efuse_file = make_chip("esp32", (1, 0))
    with open_chip("esp32", efuse_file) as device, pytest.raises(DeviceError, match=r"v3\.0"):
        hz.burn_key_digest(device, "BLOCK2", bytes(range(32)), None, confirm=True)


# -- fields --------------------------------------------------------------------------------

HARDENING = {
    "esp32s3": {"SPI_BOOT_CRYPT_CNT": 7, "SECURE_BOOT_EN": True, "DIS_PAD_JTAG": True,
                "DIS_USB_JTAG": True, "DIS_DOWNLOAD_MANUAL_ENCRYPT": True},
    "esp32": {"FLASH_CRYPT_CNT": 0x7F, "FLASH_CRYPT_CONFIG": 0xF, "JTAG_DISABLE": True,
              "DISABLE_DL_ENCRYPT": True, "DISABLE_DL_DECRYPT": True, "DISABLE_DL_CACHE": True,
              "ABS_DONE_0": True},
}


@pytest.mark.parametrize("chip", sorted(HARDENING))
def test_burn_fields_is_idempotent(make_chip: Any, tmp_path: Path, chip: str) -> None:
    values = HARDENING[chip]
    efuse_file = make_chip(chip, (1, 0) if chip == "esp32" else (0, 1))
    with open_chip(chip, efuse_file) as device:
        first = hz.burn_fields(device, values, write_protect=["RD_DIS"], confirm=True)
        assert set(values) <= set(first.burned)
        after_first = efuse_file.read_bytes()
        second = hz.burn_fields(device, values, write_protect=["RD_DIS"], confirm=True)
        assert second.burned == ()
    assert efuse_file.read_bytes() == after_first
    ref = summary(efuse_file, chip, tmp_path)
    for name, value in values.items():
        assert int(ref[name]["raw_value"], 16) == int(value), name
    assert ref["RD_DIS"]["writeable"] is False


def test_contradicting_value_is_refused_and_nothing_burned(make_chip: Any, tmp_path: Path) -> None:
    efuse_file = make_chip("esp32c3")
    with open_chip("esp32c3", efuse_file) as device:
        hz.burn_fields(device, {"SPI_BOOT_CRYPT_CNT": 1}, confirm=True)
        before = efuse_file.read_bytes()
        with pytest.raises(DeviceError, match="SPI_BOOT_CRYPT_CNT"):
            hz.burn_fields(device, {"DIS_PAD_JTAG": True, "SPI_BOOT_CRYPT_CNT": 2},
                           confirm=True)
        with pytest.raises(InputError, match="NO_SUCH_EFUSE"):
            hz.burn_fields(device, {"DIS_PAD_JTAG": True, "NO_SUCH_EFUSE": 1}, confirm=True)
        # the refused requests left nothing queued: an unrelated burn burns only itself
        hz.burn_fields(device, {"DIS_USB_JTAG": True}, confirm=True)
    assert efuse_file.read_bytes() != before
    ref = summary(efuse_file, "esp32c3", tmp_path)
    assert int(ref["SPI_BOOT_CRYPT_CNT"]["raw_value"], 16) == 1
    assert ref["DIS_PAD_JTAG"]["value"] is False
    assert ref["DIS_USB_JTAG"]["value"] is True


def test_every_write_needs_confirm(make_chip: Any) -> None:
    efuse_file = make_chip("esp32s3")
    before = efuse_file.read_bytes()
    with open_chip("esp32s3", efuse_file) as device:
        with pytest.raises(UsageError, match="confirm=True"):
            hz.burn_key(device, "BLOCK_KEY0", bytes(32), "XTS_AES_128_KEY", read_protect=True)
        with pytest.raises(UsageError, match="confirm=True"):
            hz.burn_key_digest(device, "BLOCK_KEY1", bytes(32), "SECURE_BOOT_DIGEST0")
        with pytest.raises(UsageError, match="confirm=True"):
            hz.burn_fields(device, {"DIS_PAD_JTAG": True})
        with pytest.raises(UsageError, match="confirm=True"):
            hz.burn_fields(device, {"DIS_PAD_JTAG": True}, confirm=1)  # type: ignore[arg-type]
    assert efuse_file.read_bytes() == before


def test_state_snapshot_reads_security_flags(make_chip: Any) -> None:
    efuse_file = make_chip("esp32s3")
    with open_chip("esp32s3", efuse_file) as device:
        assert not hz.read_state(device).flash_encryption_enabled
        hz.burn_fields(device, {"SPI_BOOT_CRYPT_CNT": 1, "SECURE_BOOT_KEY_REVOKE1": True},
                       confirm=True)
        state = hz.read_state(device)
    assert state.flash_encryption_enabled and state.flash_crypt_cnt == 1
    assert state.secure_boot_key_revoked == (False, True, False)
    assert state.field("DIS_PAD_JTAG") is False
    assert not any(b.used for b in state.key_blocks.values())
    with pytest.raises(InputError, match="NOPE"):
        state.field("NOPE")


def test_refusal_inside_espefuse_burns_nothing_and_leaves_nothing_queued(
    make_chip: Any, tmp_path: Path
) -> None:
    # ESP32-S3 BLOCK_KEY5 cannot hold an XTS key (a hardware quirk espefuse knows about)
    efuse_file = make_chip("esp32s3")
    before = efuse_file.read_bytes()
    with open_chip("esp32s3", efuse_file) as device:
        with pytest.raises(DeviceError, match="KEY_PURPOSE_5"):
            hz.burn(device, keys=[hz.KeyBurn("BLOCK_KEY5", os.urandom(32), "XTS_AES_128_KEY",
                                             read_protect=True)],
                    fields={"DIS_PAD_JTAG": True}, confirm=True)
        assert efuse_file.read_bytes() == before
        hz.burn_fields(device, {"DIS_USB_JTAG": True}, confirm=True)
    ref = summary(efuse_file, "esp32s3", tmp_path)
    assert ref["KEY_PURPOSE_5"]["value"] == "USER"
    assert ref["DIS_PAD_JTAG"]["value"] is False
    assert ref["DIS_USB_JTAG"]["value"] is True


def test_library_prints_nothing(make_chip: Any, capfd: pytest.CaptureFixture[str]) -> None:
    efuse_file = make_chip("esp32c3")
    with open_chip("esp32c3", efuse_file) as device:
        hz.burn_key(device, "BLOCK_KEY0", os.urandom(32), "XTS_AES_128_KEY", read_protect=True,
                    confirm=True)
        hz.burn_fields(device, {"SPI_BOOT_CRYPT_CNT": 1}, confirm=True)
        hz.read_state(device)
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""
