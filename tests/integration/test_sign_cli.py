"""Signing through the token, checked by espsecure (the independent implementation)."""

from __future__ import annotations

import io
import json

import espsecure
import pytest

from imagebuilder import build_app, build_bootloader, build_micropython_app
from softsigner import espsecure_key


def _espsecure_verify(version: str, pem, image) -> None:
    with open(pem, "rb") as k, open(image, "rb") as d:
        espsecure.verify_signature(version, False, None, k, d)


@pytest.mark.parametrize(("chip", "key_type"), [
    ("esp32s3", "rsa-3072"), ("esp32c3", "rsa-3072"), ("esp32c6", "ec-p256"),
    ("esp32p4", "ec-p384"), ("esp32", "rsa-3072"),
])
def test_sbv2_signed_by_token_passes_espsecure(cli, tmp_path, uniq, chip, key_type):
    key = f"{uniq}-{key_type}"
    assert cli("keys", "generate", key, "--type", key_type).code == 0
    image = tmp_path / "app.bin"
    image.write_bytes(build_app(chip, 40 * 1024, seed=3))
    out = tmp_path / "signed.bin"
    r = cli("--json", "sign", image, "-o", out, "--key", key, "--chip", chip, "--scheme", "sbv2")
    assert r.code == 0, r.output
    assert json.loads(r.out)["signatures"] == 1
    pem = tmp_path / "pub.pem"
    assert cli("keys", "public", key, "-o", pem).code == 0
    _espsecure_verify("2", pem, out)
    assert cli("verify", out, "--pubkey", pem).code == 0
    assert cli("verify", out, "--key", key).code == 0
    # a flipped bit in the image or in the signature block fails both verifiers (exit 6)
    for offset in (100, len(out.read_bytes()) - 4096 + 40):
        bad = bytearray(out.read_bytes())
        bad[offset] ^= 0x01
        tampered = tmp_path / f"bad{offset}.bin"
        tampered.write_bytes(bad)
        r = cli("verify", tampered, "--pubkey", pem)
        assert r.code == 6, r.output
        with pytest.raises(Exception):  # noqa: B017 - espsecure raises its FatalError
            _espsecure_verify("2", pem, tampered)


def test_sbv1_app_signature_and_espsecure_images_verify(cli, tmp_path, uniq):
    key = f"{uniq}-v1"
    assert cli("keys", "generate", key, "--type", "ec-p256").code == 0
    image = tmp_path / "fw.bin"
    image.write_bytes(build_micropython_app("esp32")[0])  # frozen bytecode from mpy-cross
    out = tmp_path / "fw-signed.bin"
    r = cli("sign", image, "-o", out, "--key", key)  # esp32 defaults to sbv1
    assert r.code == 0, r.output
    pem = tmp_path / "v1.pem"
    assert cli("keys", "public", key, "-o", pem).code == 0
    _espsecure_verify("1", pem, out)

    # the reverse: espsecure signs with a key file, hsmflash verifies
    keyfile = tmp_path / "es.pem"
    espsecure_key(keyfile, "1", None)
    es_out = tmp_path / "es-signed.bin"
    with open(keyfile, "rb") as k, open(image, "rb") as d:
        espsecure.sign_data("1", [k], str(es_out), False, False, None, [], [], d)
    pub = tmp_path / "es-pub.pem"
    with open(keyfile, "rb") as k, io.FileIO(pub, "wb") as o:
        espsecure.extract_public_key("1", k, o)
    assert cli("verify", es_out, "--pubkey", pub).code == 0


def test_three_signatures_then_fourth_refused(cli, tmp_path, uniq):
    keys = [f"{uniq}-k{i}" for i in range(4)]
    for k in keys:
        assert cli("keys", "generate", k, "--type", "rsa-3072").code == 0
    current = tmp_path / "app.bin"
    current.write_bytes(build_app("esp32s3", 20000, seed=9))
    for i, k in enumerate(keys[:3]):
        out = tmp_path / f"s{i}.bin"
        r = cli("sign", current, "-o", out, "--key", k, "--chip", "esp32s3",
                *(["--append"] if i else []))
        assert r.code == 0, r.output
        current = out
    for k in keys[:3]:
        pem = tmp_path / f"{k}.pem"
        assert cli("keys", "public", k, "-o", pem).code == 0
        _espsecure_verify("2", pem, current)
    fourth = tmp_path / "s3.bin"
    r = cli("sign", current, "-o", fourth, "--key", keys[3], "--chip", "esp32s3", "--append")
    assert r.code == 3
    assert not fourth.exists()


def test_sbv1_bootloader_digest_equals_espsecure(cli, tmp_path, uniq):
    import os

    key_file = tmp_path / "sb.key"
    key_file.write_bytes(os.urandom(32))
    iv = tmp_path / "iv.bin"
    iv.write_bytes(os.urandom(128))
    boot = tmp_path / "bootloader.bin"
    boot.write_bytes(build_bootloader("esp32", seed=5))
    assert cli("keys", "import", f"{uniq}-sbk", "--type", "aes-256", "--usage", "encrypt",
               "--file", key_file).code == 0
    ours = tmp_path / "ours.bin"
    r = cli("digest-bootloader", boot, "-o", ours, "--key", f"{uniq}-sbk", "--iv", iv)
    assert r.code == 0, r.output
    theirs = tmp_path / "theirs.bin"
    with open(key_file, "rb") as k, open(iv, "rb") as v, open(boot, "rb") as b:
        espsecure.digest_secure_bootloader(k, str(theirs), v, b)
    assert ours.read_bytes() == theirs.read_bytes()


@pytest.mark.parametrize(("make", "args", "code"), [
    (lambda: b"\x7fELF" + bytes(100), ("--chip", "esp32s3"), 3),          # not an image
    (lambda: build_app("esp32c3", 9000), ("--chip", "esp32s3"), 3),       # wrong chip
    (lambda: build_app("esp32s3", 9000)[:5000], ("--chip", "esp32s3"), 3),  # truncated
])
def test_bad_images_refused_without_output(cli, tmp_path, uniq, make, args, code):
    key = f"{uniq}-r"
    assert cli("keys", "generate", key, "--type", "rsa-3072").code == 0
    image = tmp_path / "in.bin"
    image.write_bytes(make())
    out = tmp_path / "out.bin"
    r = cli("sign", image, "-o", out, "--key", key, *args)
    assert r.code == code, r.output
    assert len(r.err.strip().splitlines()) == 1
    assert not out.exists()


def test_wrong_key_type_and_policy_refusal(cli, tmp_path, uniq, policy_file):
    assert cli("--policy", policy_file, "keys", "create").code == 0
    image = tmp_path / "in.bin"
    image.write_bytes(build_app("esp32s3", 9000))
    out = tmp_path / "out.bin"
    # an AES key cannot sign
    r = cli("--policy", policy_file, "sign", image, "-o", out, "--key", f"{uniq}-fe-master",
            "--chip", "esp32s3")
    assert r.code == 3 and "fe-master" in r.err
    # the ECDSA key exists but the policy only allows sb-release on esp32s3
    r = cli("--policy", policy_file, "sign", image, "-o", out, "--key", f"{uniq}-sbv1-app",
            "--chip", "esp32s3")
    assert r.code in (3, 5), r.output
    assert not out.exists()
    c6 = tmp_path / "c6.bin"
    c6.write_bytes(build_app("esp32c6", 9000))
    r = cli("--policy", policy_file, "sign", c6, "-o", out, "--key", f"{uniq}-sb-ecdsa",
            "--chip", "esp32c6")
    assert r.code == 0, r.output
    out.unlink()
    r = cli("--policy", policy_file, "sign", image, "-o", out, "--key", f"{uniq}-sb-ecdsa",
            "--chip", "esp32s3")
    assert r.code == 3  # esp32s3 SBv2 takes only RSA
    assert not out.exists()
