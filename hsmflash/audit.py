"""The tamper-evident audit log: JSON Lines, hash-chained, checkpointed by the token's audit key.

One record per line (docs/formats.md, "The audit log"):

    {"v":1,"seq":n,"ts":"2025-01-31T12:00:00.123456Z","station":..,"actor":..,"op":..,
     "phase":"intent|ok|error","key":"pkcs11:...","kcv"|"key_fp":..,"subject":{..},
     "detail":{..},"prev":hex,"hash":hex}

- `seq` starts at 0 and increases by 1; `prev` is the previous record's `hash`, 64 zeros for seq 0.
- `hash` = SHA-256 of the canonical JSON of the record without `hash` (sorted keys, separators
  `,` and `:`, no ASCII escaping, UTF-8). Lines are written compact in the field order above.
- `key`, `kcv` and `key_fp` are omitted when unknown; `subject` and `detail` are always present.
- An outcome (`ok`/`error`) written by `AuditLog.use` names its intent in `detail["intent_seq"]`.
- A `checkpoint` record (phase `ok`) signs the record just before it: its detail holds
  `signed_seq`, `signed_hash` and `sig`, the raw ECDSA P-256 r||s (hex) over
  SHA-256(uint64_be(signed_seq) || bytes.fromhex(signed_hash)). Its own (seq, hash) is then
  stored as the head in the token, so truncation and rollback show against the token.

A record written by a process that holds the token (`AuditLog.anchor`) carries `tag`: the
audit key's raw ECDSA P-256 r||s (hex) over SHA-256(uint64_be(seq) || bytes.fromhex(hash)),
outside the hashed body. Before such a process appends (under the lock), it checks the tail:
the first time against the token (the head of this log must be in it with its hash; the log
the token bound to this path must be this one; every record after the head must chain and carry
a valid tag), then from the last record it verified or wrote. So a cut, rolled-back, replaced
or foreign-appended log is refused before the next key use, and a checkpoint never signs a
record that someone who can only write the file added.

Appends take an exclusive `flock` on the log file itself, read only the last line, write one
line and fsync before returning. A final line without its newline (power lost mid-write) is
repaired under the lock: if it is a whole record that chains, only the newline is added; any
other fragment was never fsync'd, so no caller saw its append return and no key was used for it.
It is cut off, and a `log-repair` record stating its length and SHA-256 is written first.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import stat
import struct
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, Protocol
from urllib.parse import unquote

from cryptography.hazmat.primitives.asymmetric import ec, rsa

from hsmflash.errors import (
    Error,
    InputError,
    InternalError,
    TokenError,
    VerificationFailed,
)
from hsmflash.fileio import open_regular
from hsmflash.formats.primitives import (
    DigestSigner,
    PublicKey,
    fingerprint,
    verify_digest_signature,
)

VERSION = 1
GENESIS_PREV = "0" * 64
PHASES = ("intent", "ok", "error")
CHECKPOINT_OP = "checkpoint"
REPAIR_OP = "log-repair"
_P256_HALF = 32
_REQUIRED: dict[str, type] = {
    "v": int, "seq": int, "ts": str, "station": str, "actor": str, "op": str, "phase": str,
    "subject": dict, "detail": dict, "prev": str, "hash": str,
}
_OPTIONAL: dict[str, type] = {"key": str, "kcv": str, "key_fp": str, "tag": str}
# not covered by `hash`: a signature over the record's (seq, hash), added after hashing
_UNHASHED = ("hash", "tag")

Record = dict[str, Any]
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                              allow_nan=False)


class LogBinding(Protocol):
    """Which log (its genesis id) the token keeps for one log path: a token object."""

    def read(self) -> str | None:
        """The bound log's id, or None before the path's first checkpoint."""
        ...

    def write(self, log_id: str) -> None:
        """Bind the path to this log."""
        ...


@dataclass
class Anchor:
    """What ties an appending process to the token: the audit key signs (tags) every record
    it writes, and the head and path binding stored in the token say which log is the real one.

    `heads(log_id)` returns the head store of a log; `binding` is this path's binding.
    """

    signer: DigestSigner
    heads: Callable[[str], HeadStore]
    binding: LogBinding


class HeadStore(Protocol):
    """Where the log head (seq, hash of the last checkpoint) is kept: a token object."""

    def read(self) -> tuple[int, str] | None:
        """The stored head, or None before the first checkpoint."""
        ...

    def write(self, seq: int, hash: str) -> None:
        """Replace the stored head."""
        ...


# -- record format -------------------------------------------------------------------------


def record_hash(record: Record) -> str:
    """SHA-256 (hex) of the canonical JSON of `record` without its `hash` and `tag` fields.

    Raises:
        InternalError: the record holds something JSON cannot carry.
    """
    body = {k: v for k, v in record.items() if k not in _UNHASHED}
    try:
        canonical = _CANONICAL.encode(body).encode("utf-8")
    except (TypeError, ValueError, UnicodeEncodeError) as e:
        raise InternalError(f"audit record is not plain JSON: {e}") from e
    return hashlib.sha256(canonical).hexdigest()


def checkpoint_digest(seq: int, hash_hex: str) -> bytes:
    """The digest a checkpoint signs: SHA-256(uint64_be(seq) || bytes.fromhex(hash))."""
    return hashlib.sha256(struct.pack(">Q", seq) + bytes.fromhex(hash_hex)).digest()


def _sig_verifies(public_key: PublicKey, sig: object, digest: bytes) -> bool:
    """Does `sig` (hex, as the token signed it) verify over the prehashed `digest`?"""
    try:
        raw = bytes.fromhex(sig) if isinstance(sig, str) else b""
    except ValueError:
        return False
    return verify_digest_signature(public_key, raw, digest)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _build_record(seq: int, prev: str, ts: str, station: str, actor: str, op: str, phase: str,
                  *, key: str | None = None, kcv: str | None = None, key_fp: str | None = None,
                  subject: dict[str, Any] | None = None,
                  detail: dict[str, Any] | None = None) -> Record:
    if phase not in PHASES:
        raise InternalError(f"audit phase must be one of {', '.join(PHASES)}, not {phase!r}")
    if kcv is not None and key_fp is not None:
        raise InternalError("an audit record names a key by kcv or by key_fp, not both")
    record: Record = {"v": VERSION, "seq": seq, "ts": ts, "station": station, "actor": actor,
                      "op": op, "phase": phase}
    for name, value in (("key", key), ("kcv", kcv), ("key_fp", key_fp)):
        if value is not None:
            record[name] = value
    record["subject"] = _printable(dict(subject or {}))
    record["detail"] = _printable(dict(detail or {}))
    record["prev"] = prev
    record["hash"] = record_hash(record)
    return record


def _printable(value: Any) -> Any:
    """File names that are not UTF-8 arrive as str with lone surrogates (os.fsdecode); the
    log keeps their bytes visible as \\xNN instead of failing to encode. Paths are file names."""
    if isinstance(value, os.PathLike):
        value = os.fsdecode(value)
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        return value
    if isinstance(value, dict):
        return {_printable(k): _printable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_printable(v) for v in value]
    return value


def _encode_line(record: Record) -> bytes:
    return (json.dumps(record, separators=(",", ":"), ensure_ascii=False) + "\n").encode("utf-8")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate field {k!r}")
        out[k] = v
    return out


_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicate_keys)


def _where(lineno: int, seq: object) -> str:
    return f"line {lineno} (seq {seq})" if isinstance(seq, int) else f"line {lineno}"


def _parse_line(raw: bytes, lineno: int) -> Record:
    """Parse one line and check its shape and its own hash; the chain is the caller's job."""
    try:
        obj = _DECODER.decode(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise VerificationFailed(f"line {lineno}: not a JSON record ({e})") from e
    if not isinstance(obj, dict):
        raise VerificationFailed(f"line {lineno}: not a JSON object")
    def bad(what: str) -> VerificationFailed:
        return VerificationFailed(f"{_where(lineno, obj.get('seq'))}: {what}")

    if obj.get("v") != VERSION:
        raise bad(f"unsupported record version {obj.get('v')!r}")
    for name, typ in _REQUIRED.items():
        if type(obj.get(name)) is not typ:
            raise bad(f"field {name!r} is missing" if name not in obj
                      else f"field {name!r} is not a {typ.__name__}")
    for name, typ in _OPTIONAL.items():
        if name in obj and type(obj[name]) is not typ:
            raise bad(f"field {name!r} is not a {typ.__name__}")
    if obj["phase"] not in PHASES:
        raise bad(f"unknown phase {obj['phase']!r}")
    try:
        expected = record_hash(obj)
    except InternalError as e:
        raise bad("not plain JSON") from e
    if obj["hash"] != expected:
        raise bad("hash does not match its content")
    return obj


# -- reading ---------------------------------------------------------------------------------


def _reverse_lines(fd: int, end: int, chunk: int = 8192) -> Iterator[bytes]:
    """Lines of the file before offset `end`, last first; each keeps its newline if it has one."""
    pos, buf = end, b""
    while pos > 0:
        n = min(chunk, pos)
        pos -= n
        buf = os.pread(fd, n, pos) + buf
        while (cut := buf.rfind(b"\n", 0, len(buf) - 1)) >= 0:
            yield buf[cut + 1:]
            buf = buf[:cut + 1]
    if buf:
        yield buf


def _forward_lines(fd: int, chunk: int = 65536) -> Iterator[bytes]:
    """Lines of the whole file from the start, each with its newline if it has one."""
    pos, buf = 0, b""
    while data := os.pread(fd, chunk, pos):
        pos += len(data)
        buf += data
        *lines, buf = buf.split(b"\n")
        for line in lines:
            yield line + b"\n"
    if buf:
        yield buf


def _open_for_reading(path: Path) -> BinaryIO:
    """Open a log for reading: a regular file only (a FIFO or /dev/zero never ends)."""
    try:
        return os.fdopen(open_regular(path, "audit log"), "rb")
    except InputError as e:  # "audit log 'X' is a directory" -> "... 'X': is a directory"
        reason = e.diagnostics().removeprefix(f"audit log {str(path)!r} ")
        raise InputError(f"cannot read audit log {str(path)!r}: {reason}") from None


def iter_records(path: str | Path) -> Iterator[Record]:
    """The records of a log, in order, each checked for shape and own hash (not the chain).

    An unterminated final line that is not a whole record is skipped (see the module doc).

    Raises:
        InputError: the log cannot be read, or a line is not an audit record.
    """
    path = Path(path)
    with _open_for_reading(path) as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                yield _parse_line(raw.rstrip(b"\n"), lineno)
            except VerificationFailed as e:
                if not raw.endswith(b"\n"):
                    return
                raise InputError(f"audit log {path} {e}") from e


def _norm_device(value: object) -> str:
    return str(value).lower().replace(":", "").replace("-", "")


def _key_matches(uri: str, wanted: str) -> bool:
    if uri == wanted:
        return True
    attrs = dict(p.split("=", 1) for p in uri.removeprefix("pkcs11:").split(";") if "=" in p)
    return unquote(attrs.get("object", "")) == wanted


def _parse_ts(ts: str) -> datetime:
    return datetime.fromisoformat(ts.replace("Z", "+00:00"))


def filter_records(records: Iterable[Record], *, op: str | None = None, key: str | None = None,
                   device: str | None = None, since: datetime | None = None,
                   until: datetime | None = None) -> Iterator[Record]:
    """Records matching every given criterion (for `audit show`).

    `key` matches the record's URI exactly or its `object=` label; `device` matches
    subject["device"] or subject["mac"], ignoring case and `:`/`-`; `since`/`until` are
    inclusive bounds on `ts` (naive datetimes are taken as UTC).

    Raises:
        InputError: a record's timestamp is not RFC 3339.
    """
    def aware(d: datetime | None) -> datetime | None:
        return d.replace(tzinfo=UTC) if d is not None and d.tzinfo is None else d

    since, until = aware(since), aware(until)
    for rec in records:
        if op is not None and rec.get("op") != op:
            continue
        if key is not None and not _key_matches(str(rec.get("key", "")), key):
            continue
        if device is not None:
            subj = rec.get("subject") or {}
            found = subj.get("device", subj.get("mac"))
            if found is None or _norm_device(found) != _norm_device(device):
                continue
        if since is not None or until is not None:
            try:
                ts = _parse_ts(rec["ts"])
            except (KeyError, ValueError) as e:
                raise InputError(f"audit record seq {rec.get('seq')}: bad timestamp") from e
            if (since is not None and ts < since) or (until is not None and ts > until):
                continue
        yield rec


# -- verification ------------------------------------------------------------------------------


@dataclass(frozen=True)
class OpenIntent:
    """An intent with no outcome: an interrupted (or still running) operation."""

    line: int
    seq: int
    op: str
    ts: str
    key: str | None


@dataclass
class VerifyReport:
    """What `verify_log` found in a log that verifies."""

    path: Path
    records: int = 0
    checkpoints: int = 0
    last_seq: int | None = None
    last_hash: str | None = None
    first_ts: str | None = None
    last_ts: str | None = None
    open_intents: list[OpenIntent] = field(default_factory=list)
    unsigned_tail: int = 0  # records after the last checkpoint
    repairs: int = 0  # log-repair records (power lost mid-write)
    signatures_checked: bool = False
    head_checked: bool = False
    partial_final_line: int | None = None  # an unterminated fragment, ignored


# checkpoint algorithms: the audit key is ECDSA P-256 where the token makes it, else RSA-3072
ALG_ECDSA_P256 = "ecdsa-p256-sha256"
ALG_RSA_PSS = "rsassa-pss-3072-sha256"
_SIG_LEN = {ALG_ECDSA_P256: 2 * _P256_HALF, ALG_RSA_PSS: 384}


def checkpoint_alg(public_key: PublicKey) -> str | None:
    """The checkpoint algorithm for an audit public key, or None if it cannot be one."""
    if isinstance(public_key, ec.EllipticCurvePublicKey) and isinstance(public_key.curve,
                                                                         ec.SECP256R1):
        return ALG_ECDSA_P256
    if isinstance(public_key, rsa.RSAPublicKey) and public_key.key_size == 3072:
        return ALG_RSA_PSS
    return None


def _signature_ok(public_key: PublicKey, alg: str, sig: bytes, digest: bytes) -> bool:
    return checkpoint_alg(public_key) == alg and verify_digest_signature(public_key, sig, digest)


def _verify_checkpoint(rec: Record, where: str, prev_seq: int | None,
                       public_key: PublicKey | None,
                       key_fp: str | None) -> None:
    d = rec["detail"]
    if rec["phase"] != "ok":
        raise VerificationFailed(f"{where}: a checkpoint must have phase ok")
    if prev_seq is None or d.get("signed_seq") != prev_seq or d.get("signed_hash") != rec["prev"]:
        raise VerificationFailed(f"{where}: checkpoint does not sign the record before it")
    sig = d.get("sig")
    try:
        raw = bytes.fromhex(sig) if isinstance(sig, str) else b""
    except ValueError:
        raw = b""
    alg = d.get("alg", ALG_ECDSA_P256)
    if alg not in _SIG_LEN:
        raise VerificationFailed(f"{where}: checkpoint algorithm {str(alg)[:40]!r} is unknown")
    if len(raw) != _SIG_LEN[alg]:
        raise VerificationFailed(f"{where}: checkpoint signature has the wrong length for {alg}")
    if public_key is None:
        return
    recorded = rec.get("key_fp")
    # hsmflash 0.1 wrote checkpoint fingerprints as bare hex, without "sha256:"
    if recorded is not None and key_fp is not None \
            and str(recorded).removeprefix("sha256:") != key_fp.removeprefix("sha256:"):
        raise VerificationFailed(f"{where}: checkpoint was signed by another key "
                                 f"({str(recorded)[:23]}...)")
    if checkpoint_alg(public_key) != alg:
        raise VerificationFailed(f"{where}: checkpoint is {alg}, the given key cannot verify it")
    if not _signature_ok(public_key, alg, raw, checkpoint_digest(prev_seq, rec["prev"])):
        raise VerificationFailed(f"{where}: checkpoint signature does not verify")


def verify_log(path: str | Path, public_key: PublicKey | None = None,
               expected_head: tuple[int, str] | None = None) -> VerifyReport:
    """Verify a whole log without a token: format, hashes, chain, checkpoints, the token's head.

    With `public_key` every checkpoint signature is checked, and a non-empty log without any
    checkpoint fails (nothing in it would be authenticated); records after the last checkpoint
    are only counted (`unsigned_tail`). With `expected_head` (seq, hash) from the token, the
    record at that seq must exist and carry that hash. Intents without outcome are listed, not
    failed: an interrupted operation must be visible.

    Raises:
        InputError: the log cannot be read.
        VerificationFailed: naming the first bad record (line number, seq, what is wrong).
    """
    path = Path(path)
    audit_key: PublicKey | None = None
    if public_key is not None:
        if checkpoint_alg(public_key) is None:
            raise InputError("the audit public key must be ECDSA P-256 or RSA-3072")
        audit_key = public_key
    key_fp = fingerprint(audit_key) if audit_key is not None else None
    report = VerifyReport(path, signatures_checked=public_key is not None)
    pending: dict[int, OpenIntent] = {}
    prev_seq: int | None = None
    prev_hash = GENESIS_PREV
    with _open_for_reading(path) as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.endswith(b"\n"):
                try:
                    rec = _parse_line(raw, lineno)
                except VerificationFailed:
                    report.partial_final_line = lineno
                    break
            else:
                rec = _parse_line(raw[:-1], lineno)
            seq = rec["seq"]
            where = _where(lineno, seq)
            want = 0 if prev_seq is None else prev_seq + 1
            if seq != want:
                raise VerificationFailed(f"{where}: seq {seq} where {want} was expected")
            if rec["prev"] != prev_hash:
                raise VerificationFailed(f"{where}: prev does not match the previous record")
            tag_digest = checkpoint_digest(seq, rec["hash"])
            if audit_key is not None and "tag" in rec \
                    and not _sig_verifies(audit_key, rec["tag"], tag_digest):
                raise VerificationFailed(f"{where}: record tag is not the audit key's signature")
            if rec["op"] == CHECKPOINT_OP:
                _verify_checkpoint(rec, where, prev_seq, audit_key, key_fp)
                report.checkpoints += 1
                report.unsigned_tail = 0
            else:
                report.unsigned_tail += 1
            if expected_head is not None and seq == expected_head[0]:
                if rec["hash"] != expected_head[1]:
                    raise VerificationFailed(f"{where}: hash differs from the token's head "
                                             "(the log was replaced or rolled back)")
                report.head_checked = True
            if rec["op"] == REPAIR_OP:
                report.repairs += 1
            if rec["phase"] == "intent":
                pending[seq] = OpenIntent(lineno, seq, rec["op"], rec["ts"], rec.get("key"))
            else:
                pending.pop(rec["detail"].get("intent_seq", -1), None)
            report.records += 1
            report.first_ts = report.first_ts or rec["ts"]
            report.last_ts = rec["ts"]
            prev_seq, prev_hash = seq, rec["hash"]
    report.last_seq = prev_seq
    report.last_hash = prev_hash if prev_seq is not None else None
    if expected_head is not None and not report.head_checked:
        ends = "is empty" if prev_seq is None else f"ends at seq {prev_seq}"
        raise VerificationFailed(f"audit log {path} {ends} but the token's head is seq "
                                 f"{expected_head[0]} (records were cut)")
    if report.records == 0:
        what = ("holds only an unfinished fragment" if report.partial_final_line
                else "is empty")
        raise VerificationFailed(f"audit log {path} {what}: there is nothing to verify "
                                 "(an audit log starts with a whole record at seq 0)")
    if public_key is not None and report.records and not report.checkpoints:
        raise VerificationFailed(f"audit log {path} has no checkpoint: none of its "
                                 f"{report.records} records is signed by the audit key")
    report.open_intents = sorted(pending.values(), key=lambda i: i.seq)
    return report


# -- appending -------------------------------------------------------------------------------


class _LockedLog:
    """The log file under an exclusive lock, with its verified tail."""

    def __init__(self, fd: int, path: Path, station: str, actor: str,
                 tagger: DigestSigner | None = None) -> None:
        self.fd, self.path, self.station, self.actor = fd, path, station, actor
        self.tagger = tagger
        self.seq: int | None = None
        self.hash = GENESIS_PREV
        self._load_tail()

    def _corrupt(self, what: str) -> VerificationFailed:
        return VerificationFailed(f"audit log {self.path}: {what}; "
                                  f"run `hsmflash audit verify {self.path}`")

    def _load_tail(self) -> None:
        size = os.fstat(self.fd).st_size
        lines = _reverse_lines(self.fd, size)
        last = next(lines, None)
        if last is None:
            return
        fragment = b""
        if not last.endswith(b"\n"):
            fragment, last = last, next(lines, None)
        if last is not None:
            try:
                rec = _parse_line(last[:-1], 0)
            except VerificationFailed as e:
                raise self._corrupt("its last record is damaged") from e
            self.seq, self.hash = rec["seq"], rec["hash"]
        if fragment:
            self._repair(fragment, size)

    def _repair(self, fragment: bytes, size: int) -> None:
        try:
            rec: Record | None = _parse_line(fragment, 0)
        except VerificationFailed:
            rec = None
        want = 0 if self.seq is None else self.seq + 1
        if rec is not None and rec["seq"] == want and rec["prev"] == self.hash:
            self._write(b"\n")  # only the newline was lost: keep the verified record
            self.seq, self.hash = rec["seq"], rec["hash"]
            return
        os.ftruncate(self.fd, size - len(fragment))
        os.fsync(self.fd)
        self.write(REPAIR_OP, "ok", detail={
            "cut_partial_line": {"bytes": len(fragment),
                                 "sha256": hashlib.sha256(fragment).hexdigest()}})

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self.fd, view):]
            os.fsync(self.fd)
        except OSError as e:
            raise InputError(f"cannot write audit log {self.path}: {e.strerror or e}") from e

    def write(self, op: str, phase: str, **fields: Any) -> Record:
        seq = 0 if self.seq is None else self.seq + 1
        record = _build_record(seq, self.hash, _now(), self.station, self.actor, op, phase,
                               **fields)
        if self.tagger is not None:
            record["tag"] = self.tagger.sign_digest(checkpoint_digest(seq, record["hash"])).hex()
        try:
            line = _encode_line(record)
        except UnicodeEncodeError as e:
            raise InternalError(f"audit record is not plain JSON: {e}") from e
        self._write(line)
        self.seq, self.hash = seq, record["hash"]
        return record

    def genesis_id(self) -> str | None:
        """The log's identity: the first 16 hex digits of its first record's hash."""
        first = next(iter(_forward_lines(self.fd)), b"")
        try:
            return str(_parse_line(first.rstrip(b"\n"), 1)["hash"])[:16] if first else None
        except VerificationFailed:
            return None

    def records_after(self, seq: int | None) -> list[Record]:
        """Every whole record after `seq` (all of them for None), in order, read from the end.
        Each is checked for shape and own hash; the chain is the caller's job."""
        found: list[Record] = []
        for raw in _reverse_lines(self.fd, os.fstat(self.fd).st_size):
            if not raw.endswith(b"\n"):
                continue  # an unfinished fragment, repaired on the next write
            try:
                rec = _parse_line(raw[:-1], 0)
            except VerificationFailed as e:
                raise self._corrupt(f"a record after the token's head is damaged ({e})") from e
            if seq is not None and rec["seq"] <= seq:
                break
            found.append(rec)
        found.reverse()
        return found

    def find(self, seq: int) -> Record | None:
        """The record with this seq, searched from the end (heads are near the tail)."""
        size = os.fstat(self.fd).st_size
        for raw in _reverse_lines(self.fd, size):
            try:
                rec = _parse_line(raw.rstrip(b"\n"), 0)
            except VerificationFailed as e:
                raise self._corrupt("a record before its tail is damaged") from e
            if rec["seq"] <= seq:
                return rec if rec["seq"] == seq else None
        return None


class AuditLog:
    """A station's audit log file; safe to append from several processes at once."""

    def __init__(self, path: str | Path, *, station: str, actor: str) -> None:
        self.path = Path(path)
        self.station = station
        self.actor = actor
        self._anchor: Anchor | None = None
        self._public: PublicKey | None = None
        # the last (seq, hash) this process has verified or written (None: not yet checked)
        self._verified: tuple[int | None, str] | None = None

    def anchor(self, anchor: Anchor) -> None:
        """Tie this log to the token: from now on, before each append (under the lock) the
        log's tail is checked (the first time against the token's head and path binding,
        then from the last verified record), and every record written carries a tag.

        Raises:
            TokenError: the audit key is neither ECDSA P-256 nor RSA-3072.
        """
        public_key = anchor.signer.public_key()
        if checkpoint_alg(public_key) is None:
            raise TokenError("the audit key must be ec-p256 or rsa-3072, not "
                             f"{anchor.signer.algorithm}")
        self._anchor, self._public, self._verified = anchor, public_key, None

    def _refuse(self, what: str, recover: str) -> VerificationFailed:
        return VerificationFailed(f"audit log {self.path} {what}; no key was used. To recover: "
                                  f"{recover}")

    def _check_tail(self, log: _LockedLog) -> None:
        """Refuse a log whose tail this process cannot vouch for (see `anchor`)."""
        anchor, public_key = self._anchor, self._public
        if anchor is None or public_key is None:
            return
        new_log = "start a new log with --audit-log NEWFILE"
        if self._verified is None:
            bound = anchor.binding.read()
            ident = log.genesis_id()
            if log.seq is None:
                if bound is not None:
                    raise self._refuse(
                        "is empty or missing, but the token holds a head for the log kept at "
                        f"this path (log {bound})",
                        f"restore that log from backup, or {new_log}")
                self._verified = (None, GENESIS_PREV)
                return
            if bound is not None and bound != ident:
                raise self._refuse(
                    f"is not the log the token keeps for this path (log {bound}, this file is "
                    f"log {ident}): it was replaced",
                    f"restore the original log, or {new_log}")
            head = anchor.heads(ident).read() if ident is not None else None
            if head is not None:
                found = log.find(head[0])
                if found is None:
                    raise self._refuse(
                        f"ends at seq {log.seq}, but the token's head is seq {head[0]}: it was "
                        "cut or rolled back to an older copy",
                        f"restore the complete log (up to seq {head[0]}) from backup, or "
                        f"{new_log}")
                if found["hash"] != head[1]:
                    raise self._refuse(
                        f"differs from the token's head at seq {head[0]}: it was replaced or "
                        "rolled back", f"restore the original log, or {new_log}")
                start: tuple[int | None, str] = (head[0], head[1])
            else:
                start = (None, GENESIS_PREV)
        else:
            start = self._verified
        seq, prev = start
        for rec in log.records_after(seq):
            want = 0 if seq is None else seq + 1
            line = rec["seq"] + 1
            if rec["seq"] != want or rec["prev"] != prev:
                raise self._refuse(
                    f"line {line} (seq {rec['seq']}) does not chain to seq "
                    f"{'-' if seq is None else seq}, which the token or this process verified",
                    f"keep the file as evidence and restore the log up to seq {seq} "
                    f"(its first {want} lines), or {new_log}")
            if not _sig_verifies(public_key, rec.get("tag"),
                                 checkpoint_digest(rec["seq"], rec["hash"])):
                raise self._refuse(
                    f"line {line} (seq {rec['seq']}) was not written by hsmflash with this "
                    "token's audit key (its tag is missing or does not verify): someone else "
                    "appended to the log",
                    f"keep the file as evidence (`hsmflash audit show {self.path}`) and restore "
                    f"its first {want} lines (up to seq {'-' if seq is None else seq}), or "
                    f"{new_log}")
            seq, prev = rec["seq"], rec["hash"]
        if (seq, prev) != (log.seq, log.hash):
            raise self._refuse(
                f"ends at seq {log.seq}, which does not follow the verified seq {seq}",
                f"restore the log up to seq {seq} from backup, or {new_log}")
        self._verified = (seq, prev)

    @contextmanager
    def _locked(self) -> Iterator[_LockedLog]:
        created = not os.path.lexists(self.path)
        try:  # never through a planted symbolic link; a FIFO or device is refused below
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
                         | os.O_NONBLOCK | os.O_CLOEXEC, 0o640)
        except OSError as e:
            what = ("is a symbolic link; refusing to follow it" if os.path.islink(self.path)
                    else e.strerror or str(e))
            raise InputError(f"cannot open audit log {self.path}: {what}") from e
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise InputError(f"audit log {self.path} is not a regular file")
            os.set_blocking(fd, True)
            fcntl.flock(fd, fcntl.LOCK_EX)
            if created:  # make the new file's name durable too
                dfd = os.open(self.path.parent, os.O_RDONLY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
            log = _LockedLog(fd, self.path, self.station, self.actor,
                             self._anchor.signer if self._anchor is not None else None)
            self._check_tail(log)
            try:
                yield log
            finally:
                if self._anchor is not None:  # what this process wrote is verified
                    self._verified = (log.seq, log.hash)
        finally:
            os.close(fd)  # releases the lock

    def append(self, op: str, phase: str, *, key: str | None = None, kcv: str | None = None,
               key_fp: str | None = None, subject: dict[str, Any] | None = None,
               detail: dict[str, Any] | None = None) -> Record:
        """Append one record, fsync'd before returning; returns the record written.

        Raises:
            InputError: the log cannot be opened or written.
            VerificationFailed: the log's last record is damaged (run `audit verify`).
            InternalError: bad phase, both kcv and key_fp, or non-JSON subject/detail.
        """
        with self._locked() as log:
            return log.write(op, phase, key=key, kcv=kcv, key_fp=key_fp, subject=subject,
                             detail=detail)

    @contextmanager
    def use(self, op: str, *, key: str | None = None, kcv: str | None = None,
            key_fp: str | None = None, subject: dict[str, Any] | None = None,
            detail: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
        """Write a durable intent, yield a dict for outcome details, then write ok or error.

        The outcome's detail is the yielded dict plus `intent_seq`; on failure also `error_class`
        and, for hsmflash errors only, `error` (their one-line message; other exceptions' text
        could carry anything, so only their class is kept). The exception is re-raised.

        Raises:
            as `append`, and whatever the block raises.
        """
        ids: dict[str, Any] = {"key": key, "kcv": kcv, "key_fp": key_fp, "subject": subject}
        intent = self.append(op, "intent", detail=detail, **ids)
        outcome: dict[str, Any] = {}
        try:
            yield outcome
        except BaseException as e:
            failure = {**outcome, "intent_seq": intent["seq"], "error_class": type(e).__name__}
            if isinstance(e, Error):
                failure["error"] = e.diagnostics()
            self.append(op, "error", detail=failure, **ids)
            raise
        self.append(op, "ok", detail={**outcome, "intent_seq": intent["seq"]}, **ids)

    def checkpoint(self, signer: DigestSigner, head_store: HeadStore, *,
                   key: str | None = None) -> Record:
        """Sign the last record with the audit key, append the checkpoint, store it as the head.

        Before signing, the token's current head must still be in the log with the same hash,
        so a cut or replaced log is never re-anchored. All of it happens under the log's lock.

        Raises:
            TokenError: the signer is not ECDSA P-256 or returned a bad signature.
            InputError: the log is empty or cannot be written.
            VerificationFailed: the token's head is not in the log (cut, rolled back, replaced).
        """
        public_key = signer.public_key()
        alg = checkpoint_alg(public_key)
        if signer.algorithm not in ("ec-p256", "rsa-3072") or alg is None:
            raise TokenError(f"the audit key must be ec-p256 or rsa-3072, not {signer.algorithm}")
        with self._locked() as log:
            if log.seq is None:
                raise InputError(f"audit log {self.path} is empty: nothing to checkpoint")
            head = head_store.read()
            if head is not None:
                found = log.find(head[0])
                if found is None:
                    raise VerificationFailed(f"audit log {self.path} ends at seq {log.seq} but "
                                             f"the token's head is seq {head[0]}")
                if found["hash"] != head[1]:
                    raise VerificationFailed(f"audit log {self.path}: seq {head[0]} differs from "
                                             "the token's head (replaced or rolled back)")
            signed_seq, signed_hash = log.seq, log.hash
            digest = checkpoint_digest(signed_seq, signed_hash)
            sig = signer.sign_digest(digest)
            if not _signature_ok(public_key, alg, sig, digest):
                raise TokenError("the audit key returned a signature that does not verify")
            record = log.write(CHECKPOINT_OP, "ok", key=key,
                               key_fp=fingerprint(public_key),
                               detail={"signed_seq": signed_seq, "signed_hash": signed_hash,
                                       "alg": alg, "sig": sig.hex()})
            head_store.write(record["seq"], record["hash"])
            return record


def report(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Summarise records: outcomes per operation, uses per key (most used first), how many
    devices, how many uses exported a per-device key, and the intents with no outcome (an
    operation interrupted: power, SIGKILL)."""
    ops: Counter[str] = Counter()
    keys: Counter[str] = Counter()
    devices: set[str] = set()
    exports = 0
    intents: dict[int, dict[str, Any]] = {}
    for r in records:
        if r["phase"] == "intent":
            intents[r["seq"]] = r
            continue
        intents.pop(r["detail"].get("intent_seq", -1), None)
        ops[f"{r['op']}:{r['phase']}"] += 1
        if r.get("key"):
            keys[str(r["key"]).rsplit("object=", 1)[-1]] += 1
        dev = (r.get("subject") or {}).get("device")
        if dev:
            devices.add(dev)
        if "exported" in r["detail"]:
            exports += 1
    return {
        "operations": dict(ops),
        "keys": dict(keys.most_common()),
        "devices": len(devices),
        "exports": exports,
        "interrupted": [{"seq": s, "op": r["op"], "ts": r["ts"]} for s, r in intents.items()],
    }
