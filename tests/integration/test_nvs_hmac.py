"""NVS keys the ESP-IDF 6 way (CONFIG_NVS_SEC_KEY_PROTECT_USING_HMAC) on a virtual ESP32-S3.

Checked with independent tools only: espefuse's summary of the virtual eFuses; the HMAC_UP key
K re-derived from the known test master by the aes-ecb-v1 spec; eky/tky computed here with
Python's hmac from the seeds of ESP-IDF's nvs_sec_provider, and again by the NVS tool's own
`--key_protect_hmac` key generation; the NVS partition decrypted by the NVS tool.
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path
from types import SimpleNamespace

import pytest
from esp_idf_nvs_partition_gen import nvs_partition_gen as nvsgen
from test_ca import nvs_blobs, nvs_decrypt
from test_provision import NVS_ADDRESS, NVS_KEYS_ADDRESS, NVS_SIZE, efuse_summary, make_bench
from vectors.make_kdf_vectors import derive

MAC = "7c:df:a1:00:20:01"


def spec_nvs_keys(k: bytes) -> bytes:
    """eky || tky from K: HMAC-SHA256 over 0x5A5ABEAE x 8 and 0xA5A5DECE x 8 (byte order as
    ESP-IDF stores the uint32 seeds 0xAEBE5A5A / 0xCEDEA5A5 little-endian)."""
    return (hmac.new(k, bytes.fromhex("5a5abeae") * 8, hashlib.sha256).digest()
            + hmac.new(k, bytes.fromhex("a5a5dece") * 8, hashlib.sha256).digest())


def tool_nvs_keys(k: bytes, tmp: Path) -> bytes:
    """The NVS tool's own --key_protect_hmac key generation from K."""
    (tmp / "hmac.bin").write_bytes(k)
    nvsgen.generate_key(SimpleNamespace(
        keyfile="tool-keys.bin", outdir=str(tmp), key_protect_hmac=True, kp_hmac_keygen=False,
        kp_hmac_keyfile=None, kp_hmac_inputkey=str(tmp / "hmac.bin")))
    data = next(tmp.rglob("tool-keys.bin")).read_bytes()
    return data[:64]


@pytest.fixture(scope="module")
def provisioned(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    tmp = tmp_path_factory.mktemp("hmac")
    bench = make_bench(tmp)
    text = bench.policy.read_text()
    marker = '[chips.esp32s3]\n'
    assert marker in text
    text = text.replace(marker, marker + 'nvs_encryption = "hmac"\n')
    text = text.replace("[keys.device-ca]", f"[keys.{bench.uniq}-device-ca]")
    text = text.replace('key = "device-ca"', f'key = "{bench.uniq}-device-ca"')
    text = text.replace('dir = "hsmflash-ca"', f'dir = "{tmp / "ca"}"')
    policy = tmp / "hmac.toml"
    policy.write_text(text)
    efuse, flash = bench.new_chip(tmp, "esp32s3", "s3", mac=MAC)
    r = bench.cli("--policy", str(policy), "provision", "--chip", "esp32s3", "--virtual-efuses",
                  str(efuse), "--virtual-flash", str(flash), *bench.image_args("esp32s3"))
    assert r.code == 0, r.output
    return bench, policy, efuse, flash, tmp, r


def test_hmac_up_key_is_burned_read_protected(provisioned):  # type: ignore[no-untyped-def]
    _bench, _policy, efuse, _flash, _tmp, _r = provisioned
    summary = efuse_summary("esp32s3", efuse, via_cli=True)
    assert summary["KEY_PURPOSE_5"]["value"] == "HMAC_UP"
    assert summary["BLOCK_KEY5"]["readable"] is False
    assert summary["BLOCK_KEY5"]["writeable"] is False
    assert summary["KEY_PURPOSE_5"]["writeable"] is False
    assert int(str(summary["BLOCK_KEY5"]["raw_value"]), 16) == 0  # reads back as zeros


def test_nvs_decrypts_with_keys_from_the_spec_and_the_nvs_tool(provisioned):  # type: ignore[no-untyped-def]
    bench, _policy, _efuse, flash, tmp, r = provisioned
    k = derive(bench.master, MAC, "NVS_HMAC_UP", 32)
    keys = spec_nvs_keys(k)
    assert tool_nvs_keys(k, tmp) == keys  # the reference agrees with the seeds' byte order
    data = flash.read_bytes()
    plain = nvs_decrypt(data[NVS_ADDRESS:NVS_ADDRESS + NVS_SIZE], keys, tmp)
    entries = nvs_blobs(plain)
    assert entries[("hsmflash", "device_id")].rstrip(b"\0") == b"7cdfa1002001"
    password = entries[("hsmflash", "password")].rstrip(b"\0")
    assert len(password) == 64 and bytes.fromhex(password.decode())
    # no nvs_keys partition: its place in flash is still erased
    assert data[NVS_KEYS_ADDRESS:NVS_KEYS_ADDRESS + 0x1000] == b"\xff" * 0x1000
    # neither K nor the NVS keys appear in the output or the audit log
    audit = bench.audit_log.read_text()
    for secret in (k.hex(), keys.hex()):
        assert secret not in r.output and secret not in audit
    assert '"op":"nvs.hmac-keys"' in audit


def test_credentials_issue_writes_no_nvs_keys_partition_with_hmac(provisioned):  # type: ignore[no-untyped-def]
    bench, policy, _efuse, _flash, tmp, _r = provisioned
    nvs, keys = tmp / "issued-nvs.bin", tmp / "issued-keys.bin"
    r = bench.cli("--policy", str(policy), "credentials", "issue", "--device", MAC, "--chip",
                  "esp32s3", "--nvs-out", str(nvs), "--nvs-keys-out", str(keys))
    assert r.code == 0, r.output
    assert not keys.exists() and "no nvs_keys partition" in r.output
    k = derive(bench.master, MAC, "NVS_HMAC_UP", 32)
    plain = nvs_decrypt(nvs.read_bytes(), spec_nvs_keys(k), tmp)
    assert nvs_blobs(plain)[("hsmflash", "device_id")].rstrip(b"\0") == b"7cdfa1002001"


def test_hmac_scheme_is_refused_for_a_chip_without_hmac(tmp_path, cli):  # type: ignore[no-untyped-def]
    from conftest import ROOT

    text = (ROOT / "policies" / "dev.toml").read_text()
    old = 'flash_encryption = "esp32-aes-256"\n'
    assert old in text
    text = text.replace(old, old + 'nvs_encryption = "hmac"\n')
    bad = tmp_path / "bad.toml"
    bad.write_text(text)
    r = cli("policy", "check", bad)
    assert r.code == 3 and "chips.esp32.nvs_encryption" in r.output and "HMAC" in r.output


def test_certificate_nvs_with_hmac_keys(provisioned):  # type: ignore[no-untyped-def]
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    bench, policy, _efuse, _flash, tmp, _r = provisioned
    assert bench.cli("--policy", str(policy), "keys", "create").code == 0
    r = bench.cli("--policy", str(policy), "ca", "init", "--subject", "CN=HMAC test CA",
                  "-o", str(tmp / "ca.pem"))
    assert r.code == 0, r.output
    nvs, keys = tmp / "x509-nvs.bin", tmp / "x509-keys.bin"
    r = bench.cli("--policy", str(policy), "credentials", "issue", "--kind", "x509", "--device",
                  MAC, "--chip", "esp32s3", "--nvs-out", str(nvs), "--nvs-keys-out", str(keys))
    assert r.code == 0, r.output
    assert not keys.exists()
    k = derive(bench.master, MAC, "NVS_HMAC_UP", 32)
    blobs = nvs_blobs(nvs_decrypt(nvs.read_bytes(), spec_nvs_keys(k), tmp))
    cert = x509.load_der_x509_certificate(blobs[("hsmflash", "dev_cert")])
    key = serialization.load_der_private_key(blobs[("hsmflash", "dev_key")], None)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()  # type: ignore[union-attr]
    ca = x509.load_pem_x509_certificate((tmp / "ca.pem").read_bytes())
    cert.verify_directly_issued_by(ca)
