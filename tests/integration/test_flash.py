"""`hsmflash flash`: re-flash provisioned devices with the key re-derived from their MAC.

espsecure decrypts what was written (with the key derived independently by the aes-ecb-v1
spec), eFuse files must stay byte-identical, refusals write nothing. The interrupted-write case
runs over the serial path against FakeRomLoader, a TEST DOUBLE at the serial boundary only.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import espsecure
import pytest

from doubles import FakeRomLoader
from hsmflash.formats.partitions import build, default_layout
from imagebuilder import build_app, build_bootloader
from make_kdf_vectors import derive  # the independent spec implementation

MAC = "7c:df:a1:55:00:01"


def _decrypt(key: bytes, data: bytes, address: int) -> bytes:
    out = io.BytesIO()
    espsecure.decrypt_flash_data(io.BytesIO(key), out, address, 0xF, True, io.BytesIO(data))
    return out.getvalue()


@pytest.fixture
def provisioned(cli, tmp_path, uniq, policy_file):  # type: ignore[no-untyped-def]
    """A virtual ESP32-S3 provisioned under dev.toml with a master whose bytes we know."""
    master = os.urandom(32)
    mfile = tmp_path / "master.bin"
    mfile.write_bytes(master)
    assert cli("keys", "import", f"{uniq}-fe-master", "--type", "aes-256", "--usage", "derive",
               "--file", mfile).code == 0
    mfile.unlink()
    assert cli("--policy", policy_file, "keys", "create").code == 0
    files = {"boot.bin": build_bootloader("esp32s3", seed=11),
             "app.bin": build_app("esp32s3", 90 * 1024, seed=12),
             "app2.bin": build_app("esp32s3", 120 * 1024, seed=13)}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        signed = tmp_path / name.replace(".bin", ".signed")
        assert cli("--policy", policy_file, "sign", tmp_path / name, "-o", signed, "--key",
                   f"{uniq}-sb-release", "--chip", "esp32s3").code == 0
    (tmp_path / "pt.bin").write_bytes(build(default_layout()))
    efuse, flash = tmp_path / "s3.efuse", tmp_path / "s3.flash"
    assert cli("virtual", "create", "--chip", "esp32s3", "--mac", MAC, "--efuse-file",
               efuse).code == 0
    r = cli("--policy", policy_file, "provision", "--chip", "esp32s3", "--virtual-efuses", efuse,
            "--virtual-flash", flash, "--image", f"0x0={tmp_path / 'boot.signed'}",
            "--image", f"0x8000={tmp_path / 'pt.bin'}",
            "--image", f"0x10000={tmp_path / 'app.signed'}")
    assert r.code == 0, r.output
    key = derive(master, MAC, "XTS_AES_128_KEY", 32)
    return {"dir": tmp_path, "efuse": efuse, "flash": flash, "key": key, "policy": policy_file}


def _flash_args(p, *images: str) -> list[str | Path]:  # type: ignore[no-untyped-def]
    args: list[str | Path] = ["--policy", p["policy"], "flash", "--chip", "esp32s3",
                              "--virtual-efuses", p["efuse"], "--virtual-flash", p["flash"]]
    for image in images:
        args += ["--image", image]
    return args


def test_flash_writes_new_app_decryptable_with_rederived_key(cli, provisioned):
    p = provisioned
    efuse_before = p["efuse"].read_bytes()
    new = (p["dir"] / "app2.signed").read_bytes()
    r = cli("--json", *_flash_args(p, f"0x10000={p['dir'] / 'app2.signed'}"))
    assert r.code == 0, r.output
    flash = p["flash"].read_bytes()
    region = flash[0x10000:0x10000 + len(new) + (-len(new) % 16)]
    assert _decrypt(p["key"], region, 0x10000)[:len(new)] == new
    assert p["efuse"].read_bytes() == efuse_before  # eFuses untouched
    # again: nothing to do
    r = cli(*_flash_args(p, f"0x10000={p['dir'] / 'app2.signed'}"))
    assert r.code == 0 and "up-to-date" in r.out


def test_refusals_write_nothing(cli, provisioned, tmp_path, uniq):
    p = provisioned
    before = (p["efuse"].read_bytes(), p["flash"].read_bytes())
    unsigned = p["dir"] / "app2.bin"
    cases = [
        (_flash_args(p, f"0x10000={unsigned}"), 5, "not signed"),
        (_flash_args(p, f"0x9000={p['dir'] / 'app2.signed'}"), 3, "0x9000"),
        (_flash_args(p, f"0x400000={p['dir'] / 'app2.signed'}"), 3, "0x400000"),
        (_flash_args(p, "0x10000=missing.bin"), 3, "missing.bin"),
    ]
    for args, code, needle in cases:
        r = cli(*args)
        assert r.code == code, (args, r.output)
        assert needle in r.err
        assert (p["efuse"].read_bytes(), p["flash"].read_bytes()) == before


def test_other_master_key_is_refused(cli, provisioned, uniq):
    p = provisioned
    other = p["policy"].read_text().replace(f'"{uniq}-fe-master"', f'"{uniq}-other-master"')
    other = other.replace(f"[keys.{uniq}-fe-master]", f"[keys.{uniq}-other-master]")
    other_policy = p["dir"] / "other.toml"
    other_policy.write_text(other)
    assert cli("--policy", other_policy, "keys", "create").code == 0
    before = p["flash"].read_bytes()
    r = cli("--policy", other_policy, "flash", "--chip", "esp32s3", "--virtual-efuses",
            p["efuse"], "--virtual-flash", p["flash"], "--image",
            f"0x10000={p['dir'] / 'app2.signed'}")
    assert r.code == 7, r.output
    assert "another master key or policy" in r.err
    assert p["flash"].read_bytes() == before


def test_interrupted_serial_write_completes_on_rerun(cli, provisioned):
    """Cable pulled mid-write (the double hangs up after N flash blocks), then a re-run."""
    p = provisioned
    new = (p["dir"] / "app2.signed").read_bytes()
    flash_image = bytearray(p["flash"].read_bytes())
    args: list[str | Path] = ["--policy", p["policy"], "flash", "--chip", "esp32s3", "--image",
                              f"0x10000={p['dir'] / 'app2.signed'}"]
    with FakeRomLoader("esp32s3", efuse_file=p["efuse"], flash_size=len(flash_image),
                       drop_after_flash_blocks=3) as chip:  # 16 KiB stub blocks
        chip.flash[:] = flash_image
        r = cli(*args, "--port", chip.port)
    assert r.code == 7, r.output
    assert chip.dropped
    half = bytes(chip.flash)
    assert half != bytes(flash_image)  # part of the new image was written
    with FakeRomLoader("esp32s3", efuse_file=p["efuse"], flash_size=len(half)) as chip2:
        chip2.flash[:] = half
        r = cli(*args, "--port", chip2.port)
    assert r.code == 0, r.output
    region = bytes(chip2.flash[0x10000:0x10000 + len(new)])
    assert _decrypt(p["key"], region, 0x10000) == new


def test_flash_proves_every_image_against_the_devices_table(cli, provisioned):
    """Code must be code, signed; the table, nvs and nvs_keys only when asked by name."""
    p = provisioned
    before = (p["efuse"].read_bytes(), p["flash"].read_bytes())
    blob = p["dir"] / "blob.bin"
    blob.write_bytes(b"\xe8" + os.urandom(0x3000))
    data = p["dir"] / "data.bin"
    data.write_bytes(os.urandom(0x1000))
    cases = [
        (_flash_args(p, f"0x10000={blob}"), 3, "not an ESP image"),
        (_flash_args(p, f"0x0={p['dir'] / 'app.signed'}"), 3, "a bootloader belongs there"),
        (_flash_args(p, f"0x8000={p['dir'] / 'pt.bin'}"), 5, "--allow-rewrite table"),
        (_flash_args(p, f"0xf000={data}"), 5, "--allow-rewrite nvs_keys"),
        (_flash_args(p, f"0x9000={data}"), 5, "--allow-rewrite nvs"),
        ([*_flash_args(p, f"0x9000={data}"), "--allow-rewrite", "nvs"], 3,
         "not flagged encrypted"),
        (_flash_args(p, f"0x11000={data}"), 3, "not at its start"),
        ([*_flash_args(p, f"0x8000={p['dir'] / 'pt.bin'}"), "--allow-rewrite", "tabel"], 2,
         "tabel"),
    ]
    for args, code, needle in cases:
        r = cli(*args)
        assert r.code == code, (args, r.output)
        assert needle in r.err, r.err
        assert (p["efuse"].read_bytes(), p["flash"].read_bytes()) == before


def test_allow_rewrite_is_explicit_and_audited(cli, provisioned, token_env):
    import json

    p = provisioned
    r = cli(*_flash_args(p, f"0x8000={p['dir'] / 'pt.bin'}"), "--allow-rewrite", "table")
    assert r.code == 0, r.output
    log = Path(token_env["HSMFLASH_AUDIT_LOG"]).read_text().splitlines()
    check = [json.loads(x) for x in log if '"flash.check"' in x and '"ok"' in x][-1]
    assert check["detail"]["allow_rewrite"] == ["table"]


def test_flash_needs_a_key_whose_digest_the_device_holds(cli, provisioned, uniq):
    p = provisioned
    two = p["policy"].read_text().replace(f'keys = ["{uniq}-sb-release"]',
                                          f'keys = ["{uniq}-sb-release", "{uniq}-sb-second"]', 1)
    two += f'\n[keys.{uniq}-sb-second]\ntype = "rsa-3072"\nusage = ["sign"]\n'
    policy = p["dir"] / "two.toml"
    policy.write_text(two)
    assert cli("--policy", policy, "keys", "create").code == 0
    out = p["dir"] / "app2.second"
    assert cli("--policy", policy, "sign", p["dir"] / "app2.bin", "-o", out, "--key",
               f"{uniq}-sb-second", "--chip", "esp32s3").code == 0
    before = (p["efuse"].read_bytes(), p["flash"].read_bytes())
    args = _flash_args(p, f"0x10000={out}")
    args[1] = policy
    r = cli(*args)
    assert r.code == 5 and "digest" in r.err, r.output
    assert (p["efuse"].read_bytes(), p["flash"].read_bytes()) == before
