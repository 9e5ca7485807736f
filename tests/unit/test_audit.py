"""The audit log: chain, checkpoints, token head, concurrency, interrupted writes."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils

from hsmflash.audit import (
    GENESIS_PREV,
    AuditLog,
    filter_records,
    iter_records,
    verify_log,
)
from hsmflash.errors import InputError, TokenError, VerificationFailed
from hsmflash.formats.primitives import PublicKey, SignatureAlgorithm

# -- test doubles of the token side --------------------------------------------------------


class SoftwareAuditSigner:
    """Test double of the token's audit key: ECDSA P-256 in software, raw r||s output."""

    algorithm: SignatureAlgorithm = "ec-p256"

    def __init__(self, key: ec.EllipticCurvePrivateKey | None = None) -> None:
        self.key = key or ec.generate_private_key(ec.SECP256R1())

    def public_key(self) -> PublicKey:
        return self.key.public_key()

    def sign_digest(self, digest: bytes) -> bytes:
        der = self.key.sign(digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
        r, s = utils.decode_dss_signature(der)
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")

    def pem(self) -> bytes:
        return self.key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())


class MemoryHeadStore:
    """Test double of the token's CKO_DATA head object, in memory."""

    def __init__(self) -> None:
        self.head: tuple[int, str] | None = None

    def read(self) -> tuple[int, str] | None:
        return self.head

    def write(self, seq: int, hash: str) -> None:
        self.head = (seq, hash)


class FileHeadStore:
    """Test double of the token's head object shared by several processes (a JSON file)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> tuple[int, str] | None:
        if not self.path.exists():
            return None
        d = json.loads(self.path.read_text())
        return d["seq"], d["hash"]

    def write(self, seq: int, hash: str) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"seq": seq, "hash": hash}))
        os.replace(tmp, self.path)


# -- helpers ---------------------------------------------------------------------------------


def new_log(path: Path, n: int = 10) -> AuditLog:
    log = AuditLog(path, station="station-1", actor="alice")
    for i in range(n):
        log.append("sign", "ok", key="pkcs11:token=release;object=sb-signing",
                   key_fp="ab" * 32, subject={"image": f"fw{i}.bin"}, detail={"i": i})
    return log


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def rewrite(path: Path, new_lines: list[bytes]) -> None:
    path.write_bytes(b"".join(new_lines))


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "audit.jsonl"


# -- format --------------------------------------------------------------------------------


def test_records_follow_the_documented_format(log_path: Path) -> None:
    log = AuditLog(log_path, station="st", actor="bob")
    log.append("derive", "intent", kcv="a1b2c3", subject={"device": "24:0a:c4:00:00:01"})
    log.append("derive", "ok")
    first, second = (json.loads(x) for x in lines(log_path))
    assert list(first) == ["v", "seq", "ts", "station", "actor", "op", "phase", "kcv",
                           "subject", "detail", "prev", "hash"]
    assert (first["v"], first["seq"], first["prev"]) == (1, 0, GENESIS_PREV)
    assert first["ts"].endswith("Z") and datetime.fromisoformat(first["ts"][:-1] + "+00:00")
    body = {k: v for k, v in first.items() if k != "hash"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert first["hash"] == hashlib.sha256(canonical.encode()).hexdigest()
    assert (second["seq"], second["prev"]) == (1, first["hash"])
    assert "key" not in second and "kcv" not in second and "key_fp" not in second


def test_a_clean_log_verifies(log_path: Path) -> None:
    new_log(log_path, 10)
    report = verify_log(log_path)
    assert (report.records, report.last_seq) == (10, 9)
    assert report.last_hash == json.loads(lines(log_path)[-1])["hash"]
    assert report.open_intents == []


def test_non_ascii_fields_round_trip(log_path: Path) -> None:
    log = AuditLog(log_path, station="Zürich-Ω", actor="José")
    log.append("sign", "ok", subject={"note": "日本"})
    assert "Zürich-Ω" in log_path.read_text(encoding="utf-8")
    assert verify_log(log_path).records == 1


# -- tampering names the first bad record ---------------------------------------------------


def _change_field(ls: list[bytes]) -> list[bytes]:
    rec = json.loads(ls[4])
    rec["subject"]["image"] = "evil.bin"
    ls[4] = (json.dumps(rec, separators=(",", ":")) + "\n").encode()
    return ls


@pytest.mark.parametrize(("tamper", "message"), [
    (_change_field, "line 5 (seq 4): hash does not match its content"),
    (lambda ls: ls[:4] + ls[5:], "line 5 (seq 5): seq 5 where 4 was expected"),
    (lambda ls: [*ls[:4], ls[5], ls[4], *ls[6:]], "line 5 (seq 5): seq 5 where 4 was expected"),
    (lambda ls: [*ls[:5], ls[4], *ls[5:]], "line 6 (seq 4): seq 4 where 5 was expected"),
    (lambda ls: [*ls[:3], b"\n", *ls[3:]], "line 4: not a JSON record"),
], ids=["changed-field", "deleted", "swapped", "duplicated", "blank-line"])
def test_tampering_fails_naming_the_first_bad_record(
        log_path: Path, tamper: Callable[[list[bytes]], list[bytes]], message: str) -> None:
    new_log(log_path, 10)
    rewrite(log_path, tamper(lines(log_path)))
    with pytest.raises(VerificationFailed, match=re.escape(message)):
        verify_log(log_path)


def test_a_rehashed_forgery_is_caught_by_the_checkpoint(log_path: Path) -> None:
    signer, head = SoftwareAuditSigner(), MemoryHeadStore()
    log = new_log(log_path, 5)
    log.checkpoint(signer, head)
    # The forger edits seq 2 and recomputes every hash after it: the chain alone holds.
    from hsmflash.audit import record_hash
    ls, prev = [json.loads(x) for x in lines(log_path)], None
    ls[2]["subject"]["image"] = "evil.bin"
    for rec in ls[2:]:
        rec["prev"] = prev or ls[1]["hash"]
        rec["hash"] = record_hash(rec)
        prev = rec["hash"]
    rewrite(log_path, [(json.dumps(r) + "\n").encode() for r in ls])
    with pytest.raises(VerificationFailed, match=r"line 6 \(seq 5\): checkpoint does not sign"):
        verify_log(log_path, signer.public_key())


# -- checkpoints and the token's head ------------------------------------------------------


def test_checkpoint_signs_the_previous_record_and_stores_its_own_head(log_path: Path) -> None:
    signer, head = SoftwareAuditSigner(), MemoryHeadStore()
    log = new_log(log_path, 3)
    cp = log.checkpoint(signer, head, key="pkcs11:token=release;object=audit")
    before = json.loads(lines(log_path)[2])
    assert (cp["detail"]["signed_seq"], cp["detail"]["signed_hash"]) == (2, before["hash"])
    assert head.head == (3, cp["hash"])
    # The documented message: SHA-256(uint64_be(seq) || hash bytes), raw r||s.
    digest = hashlib.sha256((2).to_bytes(8, "big") + bytes.fromhex(before["hash"])).digest()
    sig = bytes.fromhex(cp["detail"]["sig"])
    der = utils.encode_dss_signature(int.from_bytes(sig[:32], "big"),
                                     int.from_bytes(sig[32:], "big"))
    signer.key.public_key().verify(der, digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
    log.append("sign", "ok")
    report = verify_log(log_path, signer.public_key(), expected_head=head.head)
    assert (report.checkpoints, report.unsigned_tail, report.head_checked) == (1, 1, True)


def test_a_forged_checkpoint_signature_fails(log_path: Path) -> None:
    signer = SoftwareAuditSigner()
    log = new_log(log_path, 3)
    log.checkpoint(signer, MemoryHeadStore())
    ls = lines(log_path)
    rec = json.loads(ls[3])
    rec["detail"]["sig"] = SoftwareAuditSigner().sign_digest(b"\x00" * 32).hex()
    from hsmflash.audit import record_hash
    rec["hash"] = record_hash(rec)
    rewrite(log_path, [*ls[:3], (json.dumps(rec) + "\n").encode()])
    verify_log(log_path)  # without the key only the chain is checked
    with pytest.raises(VerificationFailed,
                       match=r"line 4 \(seq 3\): checkpoint signature does not verify"):
        verify_log(log_path, signer.public_key())


def test_verifying_with_another_key_fails(log_path: Path) -> None:
    new_log(log_path, 2).checkpoint(SoftwareAuditSigner(), MemoryHeadStore())
    with pytest.raises(VerificationFailed, match="signed by another key"):
        verify_log(log_path, SoftwareAuditSigner().public_key())


def test_checkpoint_fingerprints_without_prefix_still_verify(log_path: Path) -> None:
    # logs written before key_fp became "sha256:<hex>" in checkpoints too
    signer = SoftwareAuditSigner()
    new_log(log_path, 3).checkpoint(signer, MemoryHeadStore())
    ls = lines(log_path)
    rec = json.loads(ls[3])
    assert rec["key_fp"].startswith("sha256:")
    rec["key_fp"] = rec["key_fp"].removeprefix("sha256:")
    from hsmflash.audit import record_hash
    rec["hash"] = record_hash(rec)
    rewrite(log_path, [*ls[:3], (json.dumps(rec) + "\n").encode()])
    assert verify_log(log_path, signer.public_key()).checkpoints == 1
    with pytest.raises(VerificationFailed, match="signed by another key"):
        verify_log(log_path, SoftwareAuditSigner().public_key())


def test_with_a_key_a_log_without_any_checkpoint_fails(log_path: Path) -> None:
    new_log(log_path, 2)
    with pytest.raises(VerificationFailed, match="no checkpoint"):
        verify_log(log_path, SoftwareAuditSigner().public_key())


def test_cutting_the_tail_is_caught_against_the_token_head(log_path: Path) -> None:
    signer, head = SoftwareAuditSigner(), MemoryHeadStore()
    log = new_log(log_path, 41)
    log.checkpoint(signer, head)
    new_log(log_path, 15).checkpoint(signer, head)
    assert head.head is not None and head.head[0] == 57
    rewrite(log_path, lines(log_path)[:42])  # back to the first checkpoint: still signed
    assert verify_log(log_path, signer.public_key()).records == 42
    with pytest.raises(VerificationFailed,
                       match="ends at seq 41 but the token's head is seq 57"):
        verify_log(log_path, signer.public_key(), expected_head=head.head)


def test_a_replaced_log_is_caught_against_the_token_head(tmp_path: Path) -> None:
    signer, head = SoftwareAuditSigner(), MemoryHeadStore()
    real, other = tmp_path / "real.jsonl", tmp_path / "other.jsonl"
    new_log(real, 4).checkpoint(signer, head)
    new_log(other, 4).checkpoint(signer, MemoryHeadStore())  # same key, another history
    with pytest.raises(VerificationFailed, match=r"line 5 \(seq 4\): hash differs"):
        verify_log(other, signer.public_key(), expected_head=head.head)


def test_checkpoint_refuses_to_re_anchor_a_cut_log(log_path: Path) -> None:
    signer, head = SoftwareAuditSigner(), MemoryHeadStore()
    log = new_log(log_path, 5)
    log.checkpoint(signer, head)
    saved = head.head
    rewrite(log_path, lines(log_path)[:3])
    with pytest.raises(VerificationFailed, match="ends at seq 2 but the token's head is seq 5"):
        log.checkpoint(signer, head)
    assert head.head == saved


def test_checkpoint_needs_a_p256_key_and_a_record(log_path: Path) -> None:
    log = AuditLog(log_path, station="s", actor="a")
    with pytest.raises(InputError, match="empty"):
        log.checkpoint(SoftwareAuditSigner(), MemoryHeadStore())
    p384 = SoftwareAuditSigner(ec.generate_private_key(ec.SECP384R1()))
    p384.algorithm = "ec-p384"
    with pytest.raises(TokenError, match="ec-p256"):
        log.checkpoint(p384, MemoryHeadStore())


# -- intents and outcomes ------------------------------------------------------------------


def test_use_writes_intent_then_ok_with_the_outcome(log_path: Path) -> None:
    log = AuditLog(log_path, station="s", actor="a")
    with log.use("derive", key="pkcs11:object=master", kcv="c0ffee",
                 subject={"mac": "24:0A:C4:00:00:01"}, detail={"purpose": "XTS"}) as out:
        assert [json.loads(x)["phase"] for x in lines(log_path)] == ["intent"]
        out["device_kcv"] = "123456"
    intent, ok = (json.loads(x) for x in lines(log_path))
    assert intent["detail"] == {"purpose": "XTS"}
    assert ok["phase"] == "ok" and ok["kcv"] == "c0ffee"
    assert ok["detail"] == {"device_kcv": "123456", "intent_seq": 0}


def test_use_records_an_error_and_re_raises(log_path: Path) -> None:
    log = AuditLog(log_path, station="s", actor="a")
    with pytest.raises(TokenError), log.use("sign", key="pkcs11:object=k"):
        raise TokenError("CKR_PIN_INCORRECT while logging in")
    with pytest.raises(ValueError), log.use("sign"):
        raise ValueError("may hold anything")
    recs = list(iter_records(log_path))
    assert [r["phase"] for r in recs] == ["intent", "error", "intent", "error"]
    assert recs[1]["detail"] == {"intent_seq": 0, "error_class": "TokenError",
                                 "error": "CKR_PIN_INCORRECT while logging in"}
    assert recs[3]["detail"] == {"intent_seq": 2, "error_class": "ValueError"}
    assert verify_log(log_path).open_intents == []


def _die_inside_use(path: str) -> None:
    log = AuditLog(path, station="s", actor="a")
    with log.use("efuse-burn", key="pkcs11:object=fe"):
        os._exit(1)  # power lost while the key is in use


def test_an_interrupted_operation_shows_as_an_open_intent(log_path: Path) -> None:
    new_log(log_path, 2)
    p = multiprocessing.get_context("spawn").Process(target=_die_inside_use,
                                                     args=(str(log_path),))
    p.start()
    p.join(60)
    assert p.exitcode == 1
    new_log(log_path, 1)
    report = verify_log(log_path)
    assert report.records == 4
    assert [(i.line, i.seq, i.op) for i in report.open_intents] == [(3, 2, "efuse-burn")]


# -- power lost mid-write --------------------------------------------------------------------


def test_a_partial_last_line_is_reported_then_cut_and_recorded(log_path: Path) -> None:
    log = new_log(log_path, 3)
    full = lines(log_path)
    fragment = full[2][:40]
    rewrite(log_path, [*full[:2], fragment])
    report = verify_log(log_path)
    assert (report.records, report.partial_final_line) == (2, 3)
    log.append("sign", "intent")
    recs = list(iter_records(log_path))
    assert [r["op"] for r in recs] == ["sign", "sign", "log-repair", "sign"]
    assert recs[2]["detail"]["cut_partial_line"] == {
        "bytes": len(fragment), "sha256": hashlib.sha256(fragment).hexdigest()}
    assert verify_log(log_path).records == 4


def test_a_whole_record_missing_only_its_newline_is_kept(log_path: Path) -> None:
    log = new_log(log_path, 3)
    data = log_path.read_bytes()
    log_path.write_bytes(data[:-1])
    assert verify_log(log_path).records == 3
    log.append("sign", "ok")
    recs = list(iter_records(log_path))
    assert [r["seq"] for r in recs] == [0, 1, 2, 3]
    assert verify_log(log_path).repairs == 0


def test_append_refuses_after_a_damaged_last_record(log_path: Path) -> None:
    log = new_log(log_path, 3)
    ls = lines(log_path)
    rewrite(log_path, [*ls[:2], ls[2].replace(b"fw2.bin", b"fw9.bin")])
    with pytest.raises(VerificationFailed, match=r"last record is damaged.*audit verify"):
        log.append("sign", "ok")
    assert len(lines(log_path)) == 3


# -- unreadable logs -----------------------------------------------------------------------


def test_a_missing_or_unreadable_log_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=str(tmp_path / "nope.jsonl")):
        verify_log(tmp_path / "nope.jsonl")
    with pytest.raises(InputError, match="cannot read audit log"):
        verify_log(tmp_path)  # a directory
    with pytest.raises(InputError, match="cannot read audit log"):
        list(iter_records(tmp_path / "nope.jsonl"))
    with pytest.raises(InputError, match="cannot open audit log"):
        AuditLog(tmp_path / "no-dir" / "a.jsonl", station="s", actor="a").append("x", "ok")


# -- several processes on one station --------------------------------------------------------


def _worker(path: str, pem: bytes, head_path: str, worker: int) -> None:
    key = serialization.load_pem_private_key(pem, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    signer, head = SoftwareAuditSigner(key), FileHeadStore(Path(head_path))
    log = AuditLog(path, station="s", actor=f"worker-{worker}")
    for i in range(100):
        log.append("sign", "ok", subject={"worker": worker, "i": i})
        if i % 25 == 24:
            log.checkpoint(signer, head)


def test_eight_processes_appending_at_once_leave_one_chain(tmp_path: Path) -> None:
    path, head_path = tmp_path / "audit.jsonl", tmp_path / "head.json"
    signer = SoftwareAuditSigner()
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(str(path), signer.pem(), str(head_path), w))
             for w in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * 8
    head = FileHeadStore(head_path).read()
    report = verify_log(path, signer.public_key(), expected_head=head)
    assert (report.records, report.checkpoints) == (800 + 32, 32)
    assert head == (report.last_seq, report.last_hash)
    ops = [r for r in iter_records(path) if r["op"] == "sign"]
    assert sorted((r["subject"]["worker"], r["subject"]["i"]) for r in ops) == [
        (w, i) for w in range(8) for i in range(100)]


# -- reading for `audit show` --------------------------------------------------------------


def test_filter_records_by_op_key_device_and_time(log_path: Path) -> None:
    log = AuditLog(log_path, station="s", actor="a")
    log.append("derive", "ok", key="pkcs11:token=t;object=master%201",
               subject={"mac": "24:0A:C4:00:00:01"})
    log.append("sign", "ok", key="pkcs11:token=t;object=sb", subject={"device": "240ac4000002"})
    recs = list(iter_records(log_path))
    assert [r["seq"] for r in filter_records(recs, op="sign")] == [1]
    assert [r["seq"] for r in filter_records(recs, key="master 1")] == [0]
    assert [r["seq"] for r in filter_records(recs, key="pkcs11:token=t;object=sb")] == [1]
    assert [r["seq"] for r in filter_records(recs, device="24-0a-c4-00-00-01")] == [0]
    assert [r["seq"] for r in filter_records(recs, device="24:0a:c4:00:00:02")] == [1]
    now = datetime.now(UTC)
    assert len(list(filter_records(recs, since=now - timedelta(hours=1)))) == 2
    assert list(filter_records(recs, until=now - timedelta(hours=1))) == []


def test_a_line_with_a_duplicated_field_is_refused(log_path: Path) -> None:
    new_log(log_path, 3)
    ls = lines(log_path)
    ls[1] = ls[1].replace(b'"op":"sign"', b'"op":"erase","op":"sign"')
    rewrite(log_path, ls)
    with pytest.raises(VerificationFailed, match=r"line 2: not a JSON record.*duplicate field"):
        verify_log(log_path)
