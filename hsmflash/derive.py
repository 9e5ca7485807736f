"""Capability: per-device keys derived in the token, shown only as key check values.

One device (`derive_kcv`) or a whole lot (`derive_batch`: one audited use, the token's C API
directly, optionally across worker processes each with its own session) from a device list
(`read_device_csv`). The keys themselves never leave the token; the KDF is `formats/kdf.py`.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from hsmflash.errors import InputError, UsageError
from hsmflash.fileio import atomic_write
from hsmflash.formats import kdf
from hsmflash.keyuse import Station, check_master
from hsmflash.token.keys import TokenKey

MAX_WORKERS = 64  # each worker is a process with its own token session


def derive_kcv(st: Station, master: TokenKey, device: bytes, purpose: str) -> str:
    """Derive a device key in the token, audit it, return its KCV(s); nothing secret leaves.

    Raises:
        InputError, TokenError, PolicyRefused.
    """
    kdf.key_length(purpose)
    kdf.check_device_id(device)
    mac = kdf.format_mac(device)
    st.policy.check_master(master.name)
    with st.use("derive", master, subject={"device": mac},
                detail={"purpose": purpose, "scheme": kdf.SCHEME}) as outcome:
        derived = outcome.derive(device, purpose)
        try:
            kcv = derived.kcv
        finally:
            derived.destroy()
        outcome["device_kcv"] = kcv
    return kcv


def check_workers(workers: int) -> None:
    """Raise UsageError for more worker processes than `MAX_WORKERS`."""
    if workers > MAX_WORKERS:
        raise UsageError(f"--workers {workers} is more than {MAX_WORKERS} (each worker is a "
                         "process with its own token session)")


def derive_batch(st: Station, master: TokenKey, purpose: str, macs: list[bytes], output: Path,
                 *, source: str, workers: int, pin: str) -> int:
    """Derive every device's key in one audited use and write the KCV manifest
    (`mac,purpose,kcv`) atomically to `output`; the manifest's SHA-256 is in the audit record.
    `workers` 0: one per CPU (up to 4) for lots of 5,000 or more. Returns the workers used.

    Raises:
        UsageError: too many workers. PolicyRefused: more devices than the policy's batch
        limit, or a master the policy does not name. InputError, TokenError: as `derive_kcv`.
    """
    from hsmflash.token.rawderive import RawDeriver, kcvs_in_workers

    check_workers(workers)
    if workers <= 0:
        workers = min(os.cpu_count() or 1, 4) if len(macs) >= 5000 else 1
    kdf.key_length(purpose)
    st.policy.check_batch(len(macs), source)
    st.policy.check_master(master.name)
    list_sha = hashlib.sha256(b"".join(macs)).hexdigest()
    with st.use("derive.batch", master, subject={"devices": len(macs), "list_sha256": list_sha},
                detail={"purpose": purpose, "source": source}) as out:
        check_master(master)  # where it derives, as in every use (the C API path here)
        if workers > 1:
            kcvs = kcvs_in_workers(st.config.module_path, st.config.label, pin, master.name,
                                   purpose, macs, workers)
        else:
            raw = RawDeriver(st.config.module_path, st.session, out.raw_object(),
                             st.config.label, st.config.lib())
            kcvs = [raw.kcv(m, purpose) for m in macs]
        lines = ["mac,purpose,kcv"] + [f"{kdf.format_mac(m)},{purpose},{k}"
                                       for m, k in zip(macs, kcvs, strict=True)]
        manifest = ("\n".join(lines) + "\n").encode()
        atomic_write(output, manifest)
        out.update({"manifest_sha256": hashlib.sha256(manifest).hexdigest(), "workers": workers})
    return workers


def read_device_csv(path: str | Path) -> list[bytes]:
    """MACs from a CSV (a `mac` column, or the first column; `#` comments, blank lines ok).

    Raises:
        InputError: unreadable file, a malformed MAC (names the line), duplicates, no devices.
    """
    import csv
    import io

    from hsmflash.fileio import read_input

    text = read_input(path, "device CSV").decode("utf-8", errors="replace")
    rows = [r for r in csv.reader(io.StringIO(text)) if r and not r[0].lstrip().startswith("#")]
    if not rows:
        raise InputError(f"{path}: no devices listed")
    column = 0
    header = [h.strip().lower() for h in rows[0]]
    if "mac" in header:
        column = header.index("mac")
        rows = rows[1:]
    macs: list[bytes] = []
    seen: set[bytes] = set()
    for lineno, row in enumerate(rows, start=2 if "mac" in header else 1):
        if column >= len(row):
            raise InputError(f"{path}: line {lineno} has no MAC column")
        try:
            mac = kdf.parse_mac(row[column])
        except InputError as e:
            raise InputError(f"{path}: line {lineno}: {e}") from None
        if mac in seen:
            raise InputError(f"{path}: line {lineno}: device {kdf.format_mac(mac)} listed twice")
        seen.add(mac)
        macs.append(mac)
    return macs
