"""The provisioning manifest: one row per device (MAC, chip, revision, key check values, image
digests, result, time), CSV or JSON Lines, appended by every station and read back by re-flash
in Secure Download Mode to check the MAC a user names.
"""

from __future__ import annotations

import csv
import fcntl
import io
import json
import os
from pathlib import Path
from typing import Any

from hsmflash.errors import DeviceError, InputError
from hsmflash.fileio import open_append


def _csv_cell(value: Any) -> Any:
    """A cell a spreadsheet shows as text: a leading = + - @ (or tab/CR) would make it a
    formula (CSV injection), so such cells get a leading '."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def write_manifest(path: Path, rows: list[dict[str, Any]]) -> None:
    """Append one row per device (`DeviceResult.manifest_row()`) to a CSV or JSON Lines
    manifest, under an exclusive lock (stations may share one file), fsync'd.

    Raises:
        InputError: the manifest cannot be opened for appending.
    """
    fd = open_append(path, "manifest")
    with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        new = os.fstat(fd).st_size == 0
        if path.suffix == ".csv":
            cols = [
                "time",
                "mac",
                "chip",
                "revision",
                "fe_kcv",
                "sb_kcv",
                "images",
                "result",
                "error",
                "seconds",
                "cert_serial",
                "cert_sha256",
            ]
            buf = io.StringIO()
            w = csv.DictWriter(buf, fieldnames=cols)
            if new:
                w.writeheader()
            for r in rows:
                w.writerow(
                    {
                        k: _csv_cell(v)
                        for k, v in {
                            **r,
                            "images": ";".join(
                                f"{i['address']}:{i['sha256']}" for i in r["images"]
                            ),
                        }.items()
                    }
                )
            f.write(buf.getvalue())
        else:
            for r in rows:
                f.write(json.dumps(r, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def manifest_row(manifest: str | None, mac: str, chip: str) -> dict[str, Any] | None:
    """The latest successful provisioning row for `mac` in a manifest (CSV or JSON Lines).

    Raises:
        DeviceError: the manifest exists but has no successful row for this MAC and chip.
        InputError: the manifest cannot be read.
    """
    if manifest is None or not Path(manifest).exists():
        return None
    try:
        text = Path(manifest).read_text(encoding="utf-8")
    except OSError as e:
        raise InputError(f"{manifest}: cannot read the manifest ({e.strerror})") from None
    if manifest.endswith(".csv"):
        rows = list(csv.DictReader(text.splitlines()))
    else:
        try:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        except ValueError as e:
            raise InputError(f"{manifest}: not JSON Lines ({e})") from None
    done = [r for r in rows if str(r.get("mac", "")).lower() == mac and r.get("chip") == chip
            and r.get("result") in ("provisioned", "already-provisioned")]
    if not done:
        raise DeviceError(f"{mac} is not a provisioned {chip} in {manifest}: check --device")
    return done[-1]
