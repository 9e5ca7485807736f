"""Audit log rates: fsync'd appends, and verification of a 20,000-record log.

There is no espsecure counterpart for the audit log, so absolute rates are printed.
Run: .venv/bin/python bench/bench_audit.py [--appends N] [--records N]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, utils

from hsmflash.audit import (
    GENESIS_PREV,
    AuditLog,
    _build_record,
    _encode_line,
    checkpoint_digest,
    verify_log,
)
from hsmflash.formats.primitives import fingerprint


def _raw_sign(key: ec.EllipticCurvePrivateKey, digest: bytes) -> str:
    r, s = utils.decode_dss_signature(
        key.sign(digest, ec.ECDSA(utils.Prehashed(hashes.SHA256()))))
    return (r.to_bytes(32, "big") + s.to_bytes(32, "big")).hex()


def build_log(path: Path, n: int, key: ec.EllipticCurvePrivateKey, every: int) -> None:
    """A chained log of n records with a signed checkpoint every `every` records (no fsync)."""
    fp = fingerprint(key.public_key())
    prev, ts = GENESIS_PREV, "2025-01-01T00:00:00.000000Z"
    with open(path, "wb") as f:
        for seq in range(n):
            if seq % every == every - 1:
                rec = _build_record(seq, prev, ts, "bench", "bench", "checkpoint", "ok",
                                    key_fp=fp, detail={
                                        "signed_seq": seq - 1, "signed_hash": prev,
                                        "alg": "ecdsa-p256-sha256",
                                        "sig": _raw_sign(key, checkpoint_digest(seq - 1, prev))})
            else:
                rec = _build_record(seq, prev, ts, "bench", "bench", "sign", "ok",
                                    key="pkcs11:token=release;object=sb-signing", key_fp=fp,
                                    subject={"image": f"fw-{seq}.bin"},
                                    detail={"output_sha256": "ab" * 32})
            f.write(_encode_line(rec))
            prev = rec["hash"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--appends", type=int, default=2000)
    ap.add_argument("--records", type=int, default=20_000)
    ap.add_argument("--checkpoint-every", type=int, default=100)
    args = ap.parse_args()
    key = ec.generate_private_key(ec.SECP256R1())
    with tempfile.TemporaryDirectory(prefix="hsmflash-bench-audit-") as tmp:
        log = AuditLog(Path(tmp) / "append.jsonl", station="bench", actor="bench")
        t0 = time.perf_counter()
        for i in range(args.appends):
            log.append("sign", "ok", key="pkcs11:token=release;object=sb-signing",
                       subject={"image": f"fw-{i}.bin"}, detail={"output_sha256": "ab" * 32})
        dt = time.perf_counter() - t0
        print(f"append (lock + tail read + fsync): {args.appends / dt:10.0f} records/s "
              f"({args.appends} records, {dt * 1e3 / args.appends:.3f} ms each)")

        path = Path(tmp) / "verify.jsonl"
        build_log(path, args.records, key, args.checkpoint_every)
        for label, pub in (("chain only", None), ("chain + signatures", key.public_key())):
            t0 = time.perf_counter()
            report = verify_log(path, pub)
            dt = time.perf_counter() - t0
            print(f"verify ({label}): {report.records / dt:10.0f} records/s "
                  f"({report.records} records, {report.checkpoints} checkpoints, "
                  f"{dt:.3f} s)")


if __name__ == "__main__":
    main()
