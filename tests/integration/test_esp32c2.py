"""ESP32-C2 (ESP8684): a 128-bit flash-encryption key that the chip (and espsecure, for 16-byte
key files) expands with SHA-256; Secure Boot V2 with ECDSA P-256 only, P-192 refused."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import espsecure
import pytest
from vectors.make_kdf_vectors import derive

PURPOSE = "XTS_AES_128_KEY_DERIVED_FROM_128_EFUSE_BITS"
MAC = "08:3a:8d:00:c2:01"


def espsecure_crypt(decrypt: bool, key: bytes, data: bytes, address: int) -> bytes:
    out = io.BytesIO()
    fn = espsecure.decrypt_flash_data if decrypt else espsecure.encrypt_flash_data
    fn(io.BytesIO(key), out, address, 0xF, True, io.BytesIO(data))
    return out.getvalue()


@pytest.mark.parametrize(("address", "length"), [(0x10000, 4096), (0x9050, 48), (0x0, 16)])
def test_c2_encryption_equals_espsecure_with_the_16_byte_key(cli, tmp_path: Path, uniq: str,
                                                             policy_file: Path, address: int,
                                                             length: int) -> None:
    master = os.urandom(32)
    (tmp_path / "m.bin").write_bytes(master)
    r = cli("keys", "import", f"{uniq}-fe-master", "--type", "aes-256", "--usage", "derive",
            "--file", tmp_path / "m.bin")
    assert r.code == 0, r.output
    (tmp_path / "m.bin").unlink()
    plain = os.urandom(length)
    (tmp_path / "plain.bin").write_bytes(plain)
    out = tmp_path / "enc.bin"
    r = cli("--policy", policy_file, "--json", "encrypt", tmp_path / "plain.bin", "-o", out,
            "--chip", "esp32c2", "--address", hex(address), "--master", f"{uniq}-fe-master",
            "--device", MAC)
    assert r.code == 0, r.output
    info = json.loads(r.out)
    key16 = derive(master, MAC, PURPOSE, 16)  # what the eFuse holds: 128 bits
    assert info["path"] == "efuse128-transient-export"
    assert out.read_bytes() == espsecure_crypt(False, key16, plain, address)
    log = Path(os.environ["HSMFLASH_AUDIT_LOG"]).read_text()
    assert '"efuse128_transient"' in log and key16.hex() not in log
    back = tmp_path / "back.bin"
    r = cli("--policy", policy_file, "decrypt", out, "-o", back, "--chip", "esp32c2",
            "--address", hex(address), "--master", f"{uniq}-fe-master", "--device", MAC)
    assert r.code == 0, r.output
    assert back.read_bytes() == plain


def test_c2_export_refused_unless_the_policy_allows_it(cli, tmp_path: Path, uniq: str,
                                                       policy_file: Path) -> None:
    strict = tmp_path / "strict.toml"
    strict.write_text(policy_file.read_text().replace("efuse128_transient = true",
                                                      "efuse128_transient = false"))
    (tmp_path / "m.bin").write_bytes(os.urandom(32))
    assert cli("keys", "import", f"{uniq}-fe-master", "--type", "aes-256", "--usage", "derive",
               "--file", tmp_path / "m.bin").code == 0
    (tmp_path / "p.bin").write_bytes(bytes(32))
    out = tmp_path / "o.bin"
    r = cli("--policy", strict, "encrypt", tmp_path / "p.bin", "-o", out, "--chip", "esp32c2",
            "--address", "0x10000", "--master", f"{uniq}-fe-master", "--device", MAC)
    assert r.code == 5 and "efuse128_transient" in r.err, r.output
    assert not out.exists()


def test_p192_is_refused_as_too_weak(cli, tmp_path: Path, uniq: str) -> None:
    r = cli("keys", "generate", f"{uniq}-weak", "--type", "ec-p192")
    assert r.code == 3 and "too weak" in r.err, r.output
    # an image espsecure signed with P-192 (valid on C2 silicon) is refused, naming the curve
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from hsmflash.errors import InputError
    from hsmflash.formats.secureboot import key_algorithm

    weak = ec.generate_private_key(ec.SECP192R1())
    pem = tmp_path / "weak.pem"
    pem.write_bytes(weak.public_key().public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo))
    with pytest.raises(InputError, match="P-192 is too weak"):
        key_algorithm(weak.public_key())
    r = cli("verify", tmp_path / "weak.pem", "--pubkey", pem)
    assert r.code in (3, 6) and "P-192" in r.err, r.output


def test_c2_sbv2_takes_ec_p256_only() -> None:
    from hsmflash.chips import get_chip

    c2 = get_chip("esp32c2")
    assert c2.sbv2_algorithms == ("ec-p256",)
    assert c2.default_flash_encryption() == "xts-aes-128-from-128"


def test_provisioning_a_virtual_c2_is_refused_clearly_before_any_burn(
        cli, tmp_path: Path, policy_file: Path) -> None:
    efuse, flash = tmp_path / "c2.efuse", tmp_path / "c2.flash"
    r = cli("virtual", "create", "--chip", "esp32c2", "--mac", MAC, "--efuse-file", efuse)
    assert r.code == 0, r.output
    before = efuse.read_bytes()
    (tmp_path / "app.bin").write_bytes(b"\xe9" + bytes(4095))
    r = cli("--policy", policy_file, "provision", "--chip", "esp32c2", "--virtual-efuses",
            efuse, "--virtual-flash", flash, "--image", f"0x10000={tmp_path / 'app.bin'}")
    assert r.code == 5 and "ESP32-C2 is not supported yet" in r.err, r.output
    assert efuse.read_bytes() == before and not flash.exists()
