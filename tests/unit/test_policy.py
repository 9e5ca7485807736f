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
