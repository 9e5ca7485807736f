"""What the benchmarks share: a throw-away SoftHSM2 token."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def run_process(argv: list[str], env: dict[str, str]) -> float:
    """Run one process to completion; return its wall time. Fails loudly on a non-zero exit."""
    start = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:3])} failed ({proc.returncode}):\n"
                         f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return elapsed


@contextmanager
def throwaway_token(label: str) -> Iterator[tuple[Path, str]]:
    """A fresh SoftHSM2 token in a temp dir; SOFTHSM2_CONF is set (before the PKCS#11 library
    is loaded) for this process and its children. Yields (temp dir, user PIN); removes
    everything afterwards."""
    from hsmflash.devtools.devtoken import init_token, write_conf

    tmp = Path(tempfile.mkdtemp(prefix=f"{label}-"))
    old_conf = os.environ.get("SOFTHSM2_CONF")
    try:
        conf = write_conf(tmp, tmp / "tokens")
        os.environ["SOFTHSM2_CONF"] = str(conf)
        pin = secrets.token_hex(8)
        init_token(conf, label, secrets.token_hex(8), pin)
        yield tmp, pin
    finally:
        if old_conf is None:
            os.environ.pop("SOFTHSM2_CONF", None)
        else:
            os.environ["SOFTHSM2_CONF"] = old_conf
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def script_token(script: Path, prefix: str) -> Iterator[dict[str, str]]:
    """A token brought up by one of `tokens/*.sh` in a temp dir; yields the HSMFLASH_* (and
    module) environment the script prints; stops it and removes everything afterwards."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        started = subprocess.run(["bash", str(script), "start", str(work)], check=True,
                                 capture_output=True, text=True)
        yield dict(line.split("=", 1) for line in started.stdout.splitlines() if "=" in line)
    finally:
        subprocess.run(["bash", str(script), "stop", str(work)], check=False,
                       capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
