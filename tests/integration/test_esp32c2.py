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


def test_provision_a_virtual_c2(cli, tmp_path: Path, uniq: str, policy_file: Path) -> None:
    """A blank virtual ESP32-C2 provisioned by the dev policy, read back with espefuse and
    espsecure: the 128-bit key in the low half of BLOCK_KEY0, the first 128 bits of the ECDSA
    key's SBv2 digest in the high half, and the flash decrypting with the 16-byte key."""
    from test_provision import efuse_summary, raw, sbv2_digest

    from hsmflash.formats import partitions
    from imagebuilder import build_app, build_bootloader

    master = os.urandom(32)
    (tmp_path / "m.bin").write_bytes(master)
    assert cli("keys", "import", f"{uniq}-fe-master", "--type", "aes-256", "--usage", "derive",
               "--file", tmp_path / "m.bin").code == 0
    (tmp_path / "m.bin").unlink()
    assert cli("--policy", policy_file, "keys", "create").code == 0
    pem = tmp_path / "sb.pem"
    assert cli("keys", "public", f"{uniq}-sb-ecdsa", "-o", pem).code == 0
    images = {0x0: build_bootloader("esp32c2", seed=1), 0x10000: build_app("esp32c2", seed=2)}
    args = []
    signed = {}
    for address, data in images.items():
        src, out = tmp_path / f"{address:x}.bin", tmp_path / f"{address:x}.signed"
        src.write_bytes(data)
        r = cli("--policy", policy_file, "sign", src, "-o", out, "--key", f"{uniq}-sb-ecdsa",
                "--chip", "esp32c2")
        assert r.code == 0, r.output
        signed[address] = out.read_bytes()
        args += ["--image", f"{address:#x}={out}"]
    table = tmp_path / "table.bin"
    table.write_bytes(partitions.build(partitions.default_layout()))
    signed[0x8000] = table.read_bytes()
    args += ["--image", f"0x8000={table}"]
    efuse, flash = tmp_path / "c2.efuse", tmp_path / "c2.flash"
    assert cli("virtual", "create", "--chip", "esp32c2", "--mac", MAC, "--efuse-file",
               efuse).code == 0
    r = cli("--policy", policy_file, "provision", "--chip", "esp32c2", "--virtual-efuses",
            efuse, "--virtual-flash", flash, *args)
    assert r.code == 0, r.output

    key16 = derive(master, MAC, PURPOSE, 16)
    summary = efuse_summary("esp32c2", efuse)
    low = raw(summary, "BLOCK_KEY0_LOW_128").to_bytes(16, "big")
    high = raw(summary, "BLOCK_KEY0_HI_128").to_bytes(16, "big")
    assert low == key16[::-1]  # espefuse stores XTS keys byte-reversed (dev: readable)
    assert high == sbv2_digest(pem, tmp_path)[:16]
    assert raw(summary, "SPI_BOOT_CRYPT_CNT") == 1 and raw(summary, "SECURE_BOOT_EN") == 1
    assert raw(summary, "XTS_KEY_LENGTH_256") == 0  # the chip expands the 128-bit key
    data = flash.read_bytes()
    for address, image in signed.items():
        padded = image + b"\xff" * (-len(image) % 16)
        stored = data[address:address + len(padded)]
        assert stored != padded
        assert espsecure_crypt(True, key16, stored, address) == padded, hex(address)
    # a re-run finds it finished: nothing burned or written
    r = cli("--policy", policy_file, "--json", "provision", "--chip", "esp32c2",
            "--virtual-efuses", efuse, "--virtual-flash", flash, *args)
    assert r.code == 0 and json.loads(r.out)[0]["result"] == "already-provisioned", r.output
    # re-flash: a new app signed by the key whose digest half the chip holds
    v2, v2_signed = tmp_path / "v2.bin", tmp_path / "v2.signed"
    v2.write_bytes(build_app("esp32c2", seed=3))
    assert cli("--policy", policy_file, "sign", v2, "-o", v2_signed, "--key",
               f"{uniq}-sb-ecdsa", "--chip", "esp32c2").code == 0
    r = cli("--policy", policy_file, "flash", "--chip", "esp32c2", "--virtual-efuses", efuse,
            "--virtual-flash", flash, "--image", f"0x10000={v2_signed}")
    assert r.code == 0, r.output
    image = v2_signed.read_bytes()
    padded = image + b"\xff" * (-len(image) % 16)
    stored = flash.read_bytes()[0x10000:0x10000 + len(padded)]
    assert espsecure_crypt(True, key16, stored, 0x10000) == padded
