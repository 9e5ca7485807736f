"""Policies: shipped ones are valid; malformed or contradictory ones name the field (exit 3)."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import ROOT, run_cli
from hsmflash.errors import InputError
from hsmflash.policy import load_policy

SHIPPED = sorted((ROOT / "policies").glob("*.toml"))


def test_at_least_the_three_required_policies_ship():
    names = {p.stem for p in SHIPPED}
    assert {"dev", "esp32-fipy-production", "esp32s3-production"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_policies_are_valid(path):
    r = run_cli("policy", "check", path)
    assert r.code == 0, r.output


def test_production_policies_protect_keys():
    for name in ("esp32-fipy-production", "esp32s3-production"):
        pol = load_policy(ROOT / "policies" / f"{name}.toml")
        assert not pol.export.decrypt
        for prof in pol.chips.values():
            assert prof.release_mode and not prof.readable_keys


BASE = """
[keys.m]
type = "aes-256"
usage = ["derive"]
[keys.s]
type = "rsa-3072"
usage = ["sign"]
[chips.esp32s3]
flash_encryption = "xts-aes-128"
secure_boot = { scheme = "sbv2", keys = ["s"] }
derive = { master = "m" }
[export]
efuse_burn = true
"""


@pytest.mark.parametrize(("text", "field"), [
    ("[keys.m\n", "TOML syntax"),
    (BASE.replace('type = "aes-256"', 'type = "aes-512"'), "keys.m.type"),
    (BASE.replace('usage = ["derive"]', 'usage = ["sign"]'), "keys.m.usage"),
    (BASE + "\n[keys.e]\ntype = \"ec-p256\"\nusage = [\"sign\"]\nextractable = true\n",
     "keys.e.extractable"),
    (BASE.replace('"xts-aes-128"', '"esp32-aes-256"'), "chips.esp32s3.flash_encryption"),
    (BASE.replace('keys = ["s"]', 'keys = ["m"]'), "chips.esp32s3.secure_boot.keys"),
    (BASE.replace('keys = ["s"]', 'keys = ["nope"]'), "chips.esp32s3.secure_boot.keys"),
    (BASE.replace('master = "m"', 'master = "s"'), "chips.esp32s3.derive.master"),
    (BASE.replace("[chips.esp32s3]", "[chips.esp99]"), "chips.esp99"),
    (BASE.replace("efuse_burn = true", "efuse_burn = false"), "export.efuse_burn"),
    (BASE + "\n[limits]\nmax_devices = 3\n", "limits.max_devices"),
    (BASE.replace('secure_boot = { scheme = "sbv2"', 'secure_boot = { scheme = "sbv1"'),
     "chips.esp32s3.secure_boot.scheme"),
])
def test_bad_policies_name_the_field(tmp_path, text, field):
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(InputError, match=field.replace(".", r"\.")):
        load_policy(p)
    r = run_cli("policy", "check", p)
    assert r.code == 3
    assert field in r.err
    assert len(r.err.strip().splitlines()) == 1


def test_missing_policy_file(tmp_path):
    r = run_cli("policy", "check", tmp_path / "nope.toml")
    assert r.code == 3
    assert "nope.toml" in r.err


def test_base_policy_loads(tmp_path: Path):
    p = tmp_path / "ok.toml"
    p.write_text(BASE)
    pol = load_policy(p)
    assert pol.chips["esp32s3"].derive_master == "m"


def test_unknown_harden_efuse_is_named(tmp_path):
    p = tmp_path / "bad.toml"
    derive = 'derive = { master = "m" }'
    p.write_text(BASE.replace(derive, derive + '\nharden = ["DIS_PAD_JTAG", "DIS_PAD_JTAGG"]'))
    r = run_cli("policy", "check", p)
    assert r.code == 3
    assert "chips.esp32s3.harden" in r.err and "DIS_PAD_JTAGG" in r.err


# -- chip facts, key names, fields that must take effect (issue 11a) ----------------------

def _chip(chip: str, fe: str = "xts-aes-128", sb_key: str = "s", extra: str = "") -> str:
    return BASE.replace("[chips.esp32s3]", f"[chips.{chip}]").replace(
        '"xts-aes-128"', f'"{fe}"').replace('keys = ["s"]', f'keys = ["{sb_key}"]') \
        .replace('derive = { master = "m" }', 'derive = { master = "m" }\n' + extra)


EC = ('\n[keys.e]\ntype = "ec-p256"\nusage = ["sign"]\n'
      '[keys.p]\ntype = "ec-p384"\nusage = ["sign"]\n')
CREDS = ('\n[keys.c]\ntype = "aes-256"\nusage = ["derive"]\n[keys.r]\ntype = "ec-p256"\n'
         'usage = ["sign"]\n[credentials]\nmaster = "c"\nrevocation_key = "r"\n'
         'nvs_address = 0x9000\nnvs_keys_address = 0xF000\n')


@pytest.mark.parametrize(("text", "field", "words"), [
    (_chip("esp32c5", "xts-aes-256"), "chips.esp32c5.flash_encryption", "not supported"),
    (_chip("esp32c5", extra='key_block = "BLOCK_KEY5"'), "chips.esp32c5.key_block",
     "cannot hold an XTS key"),
    (_chip("esp32s3", "xts-aes-256", extra='key_block = "BLOCK_KEY5"'),
     "chips.esp32s3.key_block", "two consecutive"),
    (_chip("esp32h2", sb_key="e") + EC, "chips.esp32h2.secure_boot.keys", "insecure"),
    (_chip("esp32c5", sb_key="e") + EC, "chips.esp32c5.secure_boot.keys", "insecure"),
    (_chip("esp32p4", sb_key="e") + EC, "chips.esp32p4.secure_boot.keys", "insecure"),
    (_chip("esp32p4", sb_key="p").replace('"p"]', '"p"], allow_insecure_ecdsa = true') + EC,
     "chips.esp32p4.revisions", "v3.0"),
    (_chip("esp32p4", sb_key="p", extra="revisions = [1, 3]").replace(
        '"p"]', '"p"], allow_insecure_ecdsa = true') + EC, "chips.esp32p4.revisions", "v3.0"),
    (_chip("esp32c6", sb_key="e").replace('"e"]', '"e"], allow_insecure_ecdsa = true') + EC,
     "chips.esp32c6.secure_boot.allow_insecure_ecdsa", "no effect"),
    (BASE.replace('[keys.s]', '[keys."s/x"]').replace('["s"]', '["s/x"]'), "keys.s/x",
     "only letters"),
    (BASE.replace('[keys.s]', '[keys."s.k1"]').replace('["s"]', '["s.k1"]'), "keys.s.k1",
     "reserved"),
    (BASE.replace('[keys.s]', f'[keys.{"s" * 65}]').replace('["s"]', f'["{"s" * 65}"]'),
     "keys.sss", "1 to 64"),
    (_chip("esp32s3", extra="flash_size = 0"), "chips.esp32s3.flash_size", "positive"),
    (_chip("esp32s3", extra='images = { "-0x1000" = "a.bin" }'), "chips.esp32s3.images",
     "4 KiB aligned"),
    (_chip("esp32s3", extra='images = { "0x400000" = "a.bin" }'), "chips.esp32s3.images",
     "inside"),
    (_chip("esp32s3", extra='images = { "0xa000" = "a.bin" }').replace(
        "efuse_burn = true", "efuse_burn = true\ndevice_secrets = true") + CREDS,
     "chips.esp32s3.images", "nvs"),
    (_chip("esp32s3", extra='unsigned_images = ["app"]'), "chips.esp32s3.unsigned_images",
     "release-mode"),
    (_chip("esp32s3", extra='release_mode = false\nunsigned_images = ["firmware"]'),
     "chips.esp32s3.unsigned_images", "not an image kind"),
    (BASE.replace('secure_boot = { scheme = "sbv2", keys = ["s"] }\n', ""),
     "chips.esp32s3.secure_boot", "unsigned_images"),
])
def test_policy_loader_refuses_chip_facts_and_bad_fields(tmp_path, text, field, words):
    p = tmp_path / "bad.toml"
    p.write_text(text)
    r = run_cli("policy", "check", p)
    assert r.code == 3, r.output
    assert field in r.err and words in r.err, r.err
    assert len(r.err.strip().splitlines()) == 1


def test_insecure_ecdsa_needs_the_override_by_name(tmp_path):
    p = tmp_path / "ok.toml"
    p.write_text(_chip("esp32h2", sb_key="e").replace('"e"]', '"e"], allow_insecure_ecdsa = '
                                                      'true') + EC)
    assert load_policy(p).chips["esp32h2"].secure_boot.allow_insecure_ecdsa
    p.write_text(_chip("esp32p4", sb_key="p", extra="revisions = [3]").replace(
        '"p"]', '"p"], allow_insecure_ecdsa = true') + EC)
    assert run_cli("policy", "check", p).code == 0  # SECURE_BOOT_SHA384_EN is in v3.x's map


def test_bootloader_key_other_than_derived_is_refused(tmp_path):
    # the field did nothing before: a validated field must take effect or be refused
    text = (ROOT / "policies" / "esp32-fipy-production.toml").read_text()
    p = tmp_path / "bk.toml"
    p.write_text(text.replace('bootloader_key = "derived"', 'bootloader_key = "fipy-fe-master"'))
    r = run_cli("policy", "check", p)
    assert r.code == 3 and "chips.esp32.secure_boot.bootloader_key" in r.err, r.output


def test_harden_on_p4_is_checked_against_the_revisions_map(tmp_path):
    p = tmp_path / "p4.toml"
    p.write_text(_chip("esp32p4", extra='revisions = [1]\nharden = ["SECURE_BOOT_SHA384_EN"]'))
    r = run_cli("policy", "check", p)
    assert r.code == 3 and "not an eFuse of esp32p4 v1.x" in r.err, r.output
    p.write_text(_chip("esp32p4", extra='revisions = [3]\nharden = ["SECURE_BOOT_SHA384_EN"]'))
    assert run_cli("policy", "check", p).code == 0
