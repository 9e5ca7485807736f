"""`policy audit` compares the live token against the policy."""

from __future__ import annotations

import json

from pkcs11 import Attribute, KeyType, MechanismFlag


def test_policy_audit_clean_then_finds_departures(cli, policy_file, session, uniq):
    assert cli("--policy", policy_file, "keys", "create").code == 0
    r = cli("--policy", policy_file, "--json", "policy", "audit")
    assert r.code == 0, r.output
    assert json.loads(r.out)["ok"] is True

    # a signing key made outside hsmflash, extractable: the audit must flag it
    text = policy_file.read_text() + (
        f'\n[keys.{uniq}-rogue]\ntype = "rsa-3072"\nusage = ["sign"]\n')
    policy_file.write_text(text)
    session.generate_keypair(
        KeyType.RSA, 3072, label=f"{uniq}-rogue", store=True,
        capabilities=MechanismFlag.SIGN | MechanismFlag.VERIFY,
        private_template={Attribute.EXTRACTABLE: True, Attribute.SENSITIVE: True},
    )
    r = cli("--policy", policy_file, "--json", "policy", "audit")
    assert r.code == 5
    findings = json.loads(r.out)["findings"]
    assert any(f["key"] == f"{uniq}-rogue" and "extractable" in f["message"] and
               f["severity"] == "error" for f in findings)


def test_policy_audit_reports_missing_key(cli, policy_file, uniq):
    r = cli("--policy", policy_file, "policy", "audit")
    assert r.code == 5
    assert "missing" in r.out
