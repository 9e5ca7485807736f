"""The in-token ESP32-classic path (CKM_XOR_BASE_AND_DATA) on NSS softokn: time and peak memory.

Run: .venv/bin/python bench/bench_xor.py [--sizes 1,4] [--conf 0xF]

`tokens/nss.sh` makes an NSS database in a temp dir (through p11-kit's proxy; nothing else may
hold an NSS registration meanwhile). A 32-byte ESP32 flash key is imported (aes-256, derive
only); for each size a fresh process runs `encrypt.esp32_xor_in_token` on an image of that size
and reports its time and peak RSS (VmHWM). Each output is checked against
`espsecure encrypt-flash-data` (in this process). The issue's bar: peak RSS of the 4 MiB case
within 64 MiB of the 1 MiB case. The database is unregistered and removed at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

from benchlib import script_token

ROOT = Path(__file__).resolve().parent.parent
KEY = bytes(range(1, 33))

_WORKER = r"""
import hashlib, json, os, sys, time
from hsmflash.encrypt import esp32_xor_in_token
from hsmflash.token.keys import find_key, import_key, key_exists
from hsmflash.token.session import TokenConfig, open_session

mib, conf, key = int(sys.argv[1]), int(sys.argv[2], 0), bytes.fromhex(sys.argv[3])
pin = open(os.environ["HSMFLASH_PIN_FILE"]).read().strip()
cfg = TokenConfig(module=os.environ["HSMFLASH_MODULE"], token_label=os.environ["HSMFLASH_TOKEN"],
                  pin_handler=lambda _p: pin)
data = bytes(range(256)) * (mib * 4096)
with open_session(cfg, rw=True) as s:
    if not key_exists(s, "bench-fe"):
        import_key(s, "bench-fe", "aes-256", key, ("derive",))
    base = find_key(s, "bench-fe").primary
    t = time.perf_counter()
    out = esp32_xor_in_token(cfg, s, base, data, 0x10000, conf, False)
    took = time.perf_counter() - t
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({"seconds": took, "peak_kib": hwm, "sha256": hashlib.sha256(out).hexdigest()}))
"""


def main() -> int:
    import espsecure

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1,4", help="image sizes in MiB, comma-separated")
    ap.add_argument("--conf", default="0xF", help="FLASH_CRYPT_CONFIG")
    args = ap.parse_args()
    with script_token(ROOT / "tokens" / "nss.sh", "hsmflash-bench-xor-") as token_env:
        env = {**os.environ, **token_env}
        print(f"ESP32-classic XOR path on NSS softokn, FLASH_CRYPT_CONFIG {args.conf}")
        peaks = {}
        for mib in (int(x) for x in args.sizes.split(",")):
            r = subprocess.run([sys.executable, "-c", _WORKER, str(mib), args.conf, KEY.hex()],
                               env=env, check=True, capture_output=True, text=True)
            res = json.loads(r.stdout.splitlines()[-1])
            data = bytes(range(256)) * (mib * 4096)
            ref = io.BytesIO()
            espsecure.encrypt_flash_data(io.BytesIO(KEY), ref, 0x10000, int(args.conf, 0),
                                         False, io.BytesIO(data))
            same = hashlib.sha256(ref.getvalue()).hexdigest() == res["sha256"]
            peaks[mib] = res["peak_kib"]
            print(f"  {mib:3} MiB  {res['seconds']:7.2f} s  peak RSS {res['peak_kib'] / 1024:7.1f}"
                  f" MiB  equal to espsecure: {'yes' if same else 'NO'}")
        if len(peaks) > 1:
            lo, hi = min(peaks), max(peaks)
            print(f"  peak RSS {hi} MiB - {lo} MiB = {(peaks[hi] - peaks[lo]) / 1024:.1f} MiB "
                  f"(an in-memory image copy or two: {2 * (hi - lo)} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
