"""Signing and XTS encryption through p11-kit remoting against direct access to the same token.

Run: .venv/bin/python bench/bench_remote.py [--mib N] [--runs N]

`tokens/p11kit-remote.sh` makes a SoftHSM2 token in a temp dir and serves it with
`p11-kit server` on a Unix socket. The same token is then used two ways, each in its own
process (a PKCS#11 module is loaded once per process): direct (libsofthsm2.so) and remote
(p11-kit-client.so). Figures are medians of --runs runs:
  sign   one SBv2 RSA-3072-PSS signature on a host digest (the token part of `hsmflash sign`)
  xts    `flashcrypt.xts_encrypt` of an N MiB image with an imported XTS-AES-128 key (two bulk
         C_Encrypt calls; python-pkcs11 sends the input again for its length query, so the
         remote path moves about twice the image over the socket)
ratio = remote / direct (how many times slower remoting is). Outputs are checked equal.
The server is stopped and the directory removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from benchlib import script_token

ROOT = Path(__file__).resolve().parent.parent

_WORKER = r"""
import hashlib, json, os, statistics, sys, time
from hsmflash.formats import flashcrypt
from hsmflash.keyuse import TokenCipher, TokenSigner
from hsmflash.token.keys import find_key, generate_key, import_key, key_exists
from hsmflash.token.session import TokenConfig, open_session

mib, runs = int(sys.argv[1]), int(sys.argv[2])
pin = open(os.environ["HSMFLASH_PIN_FILE"]).read().strip()
cfg = TokenConfig(module=os.environ["HSMFLASH_MODULE"], token_label=os.environ["HSMFLASH_TOKEN"],
                  pin_handler=lambda _p: pin)
data = bytes(range(256)) * (mib * 4096)
with open_session(cfg, rw=True) as s:
    if not key_exists(s, "bench-rsa"):
        generate_key(s, "bench-rsa", "rsa-3072", ("sign",))
    if not key_exists(s, "bench-xts"):
        import_key(s, "bench-xts", "xts-aes-128", bytes(range(32)), ("encrypt",))
    signer = TokenSigner(find_key(s, "bench-rsa"))
    xts = find_key(s, "bench-xts")
    k1, k2 = TokenCipher(xts.objects[0]), TokenCipher(xts.objects[1])
    digest = hashlib.sha256(b"image").digest()
    sign_t, xts_t = [], []
    for _ in range(runs):
        t = time.perf_counter(); signer.sign_digest(digest); sign_t.append(time.perf_counter() - t)
        t = time.perf_counter(); out = flashcrypt.xts_encrypt(data, 0x10000, k1, k2)
        xts_t.append(time.perf_counter() - t)
print(json.dumps({"sign": statistics.median(sign_t), "xts": statistics.median(xts_t),
                  "xts_sha256": hashlib.sha256(out).hexdigest()}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=4)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    with script_token(ROOT / "tokens" / "p11kit-remote.sh", "hsmflash-bench-remote-") as remote:
        direct = {**remote, "HSMFLASH_MODULE": "/usr/lib/softhsm/libsofthsm2.so"}
        results = {}
        for mode, extra in (("direct", direct), ("remote", remote)):
            env = {**os.environ, **extra}
            r = subprocess.run([sys.executable, "-c", _WORKER, str(args.mib), str(args.runs)],
                               env=env, check=True, capture_output=True, text=True)
            results[mode] = json.loads(r.stdout.splitlines()[-1])
    assert results["direct"]["xts_sha256"] == results["remote"]["xts_sha256"]
    print(f"p11-kit remoting vs direct SoftHSM2 (medians of {args.runs} runs)")
    for what, label in (("sign", "sign RSA-3072-PSS (one digest)"),
                        ("xts", f"XTS-AES-128 encrypt {args.mib} MiB")):
        d, r = results["direct"][what], results["remote"][what]
        print(f"  {label:34} direct {d * 1000:9.2f} ms  remote {r * 1000:9.2f} ms  "
              f"ratio {r / d:5.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
