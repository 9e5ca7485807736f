"""An audit log a file-writer cannot forge: before any key use the log's tail is checked
against the head and path binding stored in the token; a cut, rolled-back, replaced,
fragmentary or foreign-appended log stops the command (exit 6) before the key is used and
before any output is written, and a foreign record is never signed by a checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import TOKEN_LABEL, USER_PIN
from imagebuilder import build_app


def _forged(log: Path, n: int = 2) -> bytes:
    """What someone who can write the file (but not use the token) can append: records with
    a correct hash chain, built from the public format."""
    from hsmflash.audit import _build_record, _encode_line

    last = json.loads(log.read_bytes().splitlines()[-1])
    seq, prev, out = last["seq"], last["hash"], b""
    for _ in range(n):
        seq += 1
        rec = _build_record(seq, prev, last["ts"], "evil", "mallory", "sign", "ok",
                            subject={"image": "innocent.bin"})
        out += _encode_line(rec)
        prev = rec["hash"]
    return out


@pytest.fixture
def signing(cli, uniq, tmp_path):
    """A key, an image, and a log that has already seen two signing commands."""
    key = f"{uniq}-ec"
    assert cli("keys", "generate", key, "--type", "ec-p256").code == 0
    image = tmp_path / "app.bin"
    image.write_bytes(build_app("esp32c6", 8 * 1024, seed=5))
    log = tmp_path / "audit.jsonl"
    assert cli("sign", image, "-o", tmp_path / "first.bin", "--key", key, "--chip",
               "esp32c6").code == 0

    def sign(out: str = "signed.bin", *extra: str):  # type: ignore[no-untyped-def]
        return cli(*extra, "sign", image, "-o", tmp_path / out, "--key", key, "--chip",
                   "esp32c6")

    return sign, log, tmp_path


def _refused(r, log: Path, before: bytes | None, out: Path, *words: str) -> None:  # type: ignore[no-untyped-def]
    assert r.code == 6, r.output
    assert not out.exists()
    line = r.err.strip().splitlines()[0]
    assert "no key was used" in line and "To recover" in line, line
    for w in words:
        assert w in line, line
    if before is not None:  # not even an intent record: the key was not used
        assert log.read_bytes() == before


def test_rechained_foreign_append_stops_the_next_command(signing):
    sign, log, d = signing
    good = log.read_bytes()
    log.write_bytes(good + _forged(log))
    before = log.read_bytes()
    _refused(sign(), log, before, d / "signed.bin", "someone else appended")
    # recovery as the message says: keep the evidence, restore the verified lines
    n = len(good.splitlines())
    assert f"first {n} lines" in sign().err
    log.write_bytes(good)
    assert sign().code == 0


def test_rollback_to_an_older_copy_is_refused(signing):
    sign, log, d = signing
    older = log.read_bytes()
    assert sign("second.bin").code == 0
    log.write_bytes(older)
    _refused(sign(), log, older, d / "signed.bin", "rolled back")


def test_cut_log_is_refused(signing):
    sign, log, d = signing
    lines = log.read_bytes().splitlines(keepends=True)
    log.write_bytes(b"".join(lines[:-2]))
    before = log.read_bytes()
    _refused(sign(), log, before, d / "signed.bin", "cut")


def test_replaced_log_is_refused(signing, cli):
    sign, log, d = signing
    other = d / "other.jsonl"  # a genuine log of the same token, kept elsewhere
    assert sign("o.bin", "--audit-log", str(other)).code == 0
    shutil.copyfile(other, log)
    before = log.read_bytes()
    _refused(sign(), log, before, d / "signed.bin", "replaced")
    r = cli("audit", "verify", log, "--with-token")  # the auditor's view says so too
    assert r.code == 6 and "replaced" in r.err, r.output


@pytest.mark.parametrize("how", ["emptied", "deleted"])
def test_emptied_or_deleted_log_is_refused(signing, how):
    sign, log, d = signing
    if how == "emptied":
        log.write_bytes(b"")
    else:
        log.unlink()
    _refused(sign(), log, None, d / "signed.bin", "empty or missing")
    assert log.read_bytes() == b""


def test_fragment_of_the_log_is_refused(signing):
    sign, log, d = signing
    lines = log.read_bytes().splitlines(keepends=True)
    log.write_bytes(b"".join(lines[2:]))
    before = log.read_bytes()
    _refused(sign(), log, before, d / "signed.bin")


def test_first_use_of_a_new_log_works(signing):
    sign, _, d = signing
    fresh = d / "fresh.jsonl"
    r = sign("f.bin", "--audit-log", str(fresh))
    assert r.code == 0, r.output
    records = [json.loads(x) for x in fresh.read_text().splitlines()]
    assert records[0]["seq"] == 0 and records[-1]["op"] == "checkpoint"
    assert all("tag" in r for r in records)  # every record is signed by the audit key


def test_audit_verify_refuses_empty_fragment_and_unauthenticated(cli, signing):
    _, log, d = signing
    pem = d / "audit.pem"
    assert cli("keys", "public", "audit", "-o", pem).code == 0
    r = cli("audit", "verify", log)
    assert r.code == 6 and "--pubkey" in r.err and "--with-token" in r.err, r.output
    assert "OK" not in r.out
    empty = d / "empty.jsonl"
    empty.write_bytes(b"")
    r = cli("audit", "verify", empty, "--pubkey", pem)
    assert r.code == 6 and "empty" in r.err, r.output
    partial = d / "partial.jsonl"
    partial.write_bytes(log.read_bytes().splitlines()[0][:40])
    r = cli("audit", "verify", partial, "--pubkey", pem)
    assert r.code == 6 and "fragment" in r.err, r.output
    front_cut = d / "front.jsonl"
    front_cut.write_bytes(b"".join(log.read_bytes().splitlines(keepends=True)[3:]))
    assert cli("audit", "verify", front_cut, "--pubkey", pem).code == 6


def _station(policy_file: Path, log: Path):  # type: ignore[no-untyped-def]
    from hsmflash.keyuse import Station
    from hsmflash.policy import load_policy
    from hsmflash.token.session import TokenConfig

    cfg = TokenConfig(token_label=TOKEN_LABEL, pin_handler=lambda _p: USER_PIN)
    return Station.open(cfg, load_policy(policy_file), log)


def test_foreign_record_during_a_command_is_never_checkpointed(policy_file, tmp_path, uniq):
    from hsmflash.errors import VerificationFailed

    log = tmp_path / "during.jsonl"
    with _station(policy_file, log) as st, st.use("test.op", subject={"n": 1}):
        pass
    with pytest.raises(VerificationFailed) as caught:
        with _station(policy_file, log) as st, st.use("test.op", subject={"n": 2}):
            log.write_bytes(log.read_bytes() + _forged(log, 1))
    assert "someone else appended" in str(caught.value)
    records = [json.loads(x) for x in log.read_text().splitlines()]
    assert records[-1]["actor"] == "mallory"  # nothing was written (or signed) after it
    assert records[-2]["phase"] == "intent"


def test_failed_checkpoint_comes_after_the_commands_own_error(policy_file, tmp_path, capsys):
    from hsmflash.cli.main import _second_lines
    from hsmflash.errors import InputError

    log = tmp_path / "both.jsonl"
    with pytest.raises(InputError) as caught:
        with _station(policy_file, log) as st:
            with st.use("test.op"):
                pass
            log.write_bytes(log.read_bytes() + _forged(log, 1))
            raise InputError("image 'app.bin' is not an ESP image")
    assert str(caught.value) == "image 'app.bin' is not an ESP image"
    _second_lines(caught.value)
    second = capsys.readouterr().err.strip().splitlines()
    assert len(second) == 1
    assert second[0].startswith("error: audit checkpoint failed: audit log")


def test_audit_verify_checks_record_tags(cli, signing):
    _, log, d = signing
    pem = d / "audit.pem"
    assert cli("keys", "public", "audit", "-o", pem).code == 0
    lines = log.read_text().splitlines()
    rec = json.loads(lines[1])
    other = json.loads(lines[2])["tag"]  # a genuine tag, but over another record
    rec["tag"] = other
    lines[1] = json.dumps(rec, separators=(",", ":"))
    log.write_text("".join(x + "\n" for x in lines))
    r = cli("audit", "verify", log, "--pubkey", pem)
    assert r.code == 6 and "line 2" in r.err and "tag" in r.err, r.output
