"""The audit log end to end: commands that use keys leave a verifiable, checkpointed chain;
tampering is caught and named; truncation is caught against the token."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest


@pytest.fixture
def used_log(cli, uniq, tmp_path) -> tuple[Path, Path]:
    for i in range(3):
        assert cli("keys", "generate", f"{uniq}-k{i}", "--type", "aes-256").code == 0
    log = Path(os.environ["HSMFLASH_AUDIT_LOG"])
    pem = tmp_path / "audit.pem"
    assert cli("keys", "public", "audit", "-o", pem).code == 0
    return log, pem


def test_every_key_command_ends_with_a_signed_checkpoint(cli, used_log):
    log, pem = used_log
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert records[-1]["op"] == "checkpoint"
    assert sum(r["op"] == "checkpoint" for r in records) == 3
    r = cli("--json", "audit", "verify", log, "--pubkey", pem)
    assert r.code == 0, r.output
    assert json.loads(r.out)["signatures_checked"] is True
    r = cli("--json", "audit", "verify", log, "--with-token")
    assert r.code == 0, r.output
    assert json.loads(r.out)["head_checked"] is True


def _rewrite(log: Path, lines: list[str]) -> None:
    log.write_text("".join(line + "\n" for line in lines))


@pytest.mark.parametrize("tamper", ["field", "delete", "swap", "duplicate"])
def test_tampering_is_named(cli, used_log, tamper):
    log, pem = used_log
    lines = log.read_text().splitlines()
    target = 3
    if tamper == "field":
        rec = json.loads(lines[target])
        rec["subject"]["name"] = "forged"
        lines[target] = json.dumps(rec, separators=(",", ":"))
    elif tamper == "delete":
        del lines[target]
    elif tamper == "swap":
        lines[target], lines[target + 1] = lines[target + 1], lines[target]
    else:
        lines.insert(target + 1, lines[target])
    _rewrite(log, lines)
    r = cli("audit", "verify", log, "--pubkey", pem)
    assert r.code == 6, r.output
    assert f"line {target + 1}" in r.err or f"line {target + 2}" in r.err
    assert len(r.err.strip().splitlines()) == 1


def test_cut_tail_caught_with_token(cli, used_log):
    log, pem = used_log
    lines = log.read_text().splitlines()
    _rewrite(log, lines[:-4])
    assert cli("audit", "verify", log, "--pubkey", pem).code == 0  # a cut looks fine offline
    r = cli("audit", "verify", log, "--with-token")
    assert r.code == 6
    assert "head" in r.err


def test_unreadable_log(cli, tmp_path):
    r = cli("audit", "verify", tmp_path / "missing.jsonl")
    assert r.code == 3 and "missing.jsonl" in r.err
    d = tmp_path / "dir.jsonl"
    d.mkdir()
    assert cli("audit", "show", d).code == 3


def test_show_filters_and_report(cli, used_log, uniq):
    log, _ = used_log
    r = cli("--json", "audit", "show", log, "--op", "keys.generate", "--key", f"{uniq}-k1")
    assert r.code == 0, r.output
    recs = json.loads(r.out)
    assert [x["phase"] for x in recs] == ["intent", "ok"]
    r = cli("--json", "audit", "report", log)
    assert json.loads(r.out)["operations"]["keys.generate:ok"] == 3
