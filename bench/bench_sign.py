"""Whole-process signing of a 2 MiB ESP32-S3 app image: `hsmflash sign` vs `espsecure sign-data
--hsm`, both against the same throw-away SoftHSM2 token and the same RSA-3072 key.

Run: .venv/bin/python bench/bench_sign.py [--runs N] [--mib N]
Each figure is the median wall time of N complete processes (interpreter start, imports, module
load, login, signing, output write; for hsmflash also the fsync'd audit records and the signed
checkpoint). Runs alternate between the two tools. Both outputs pass `espsecure
verify-signature` before anything is timed. Target: hsmflash must not be slower (ratio >= 1).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

from benchlib import run_process, throwaway_token

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
HSMFLASH = str(BIN / "hsmflash")
ESPSECURE = str(BIN / "espsecure")
TOKEN_LABEL = "hsmflash-bench-sign"
KEY = "bench-sb-rsa"
CHIP = "esp32s3"

sys.path.insert(0, str(ROOT / "tests"))


def slot_id(label: str) -> int:
    """The SoftHSM2 slot holding the token (espsecure's config names a slot, not a label)."""
    import pkcs11

    from hsmflash.token.session import find_module

    return int(pkcs11.lib(find_module(None)).get_token(token_label=label).slot.slot_id)


def verify(image: Path, pubkey: Path, env: dict[str, str]) -> None:
    run_process([ESPSECURE, "verify-signature", "--version", "2", "--keyfile", str(pubkey),
                 str(image)], env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15,
                        help="timed runs per tool (default 15)")
    parser.add_argument("--mib", type=int, default=2, help="image size in MiB (default 2)")
    args = parser.parse_args()

    from imagebuilder import build_app

    with throwaway_token(TOKEN_LABEL) as (tmp, pin):
        env = {k: v for k, v in os.environ.items() if not k.startswith("HSMFLASH_")}
        env.update({
            "SOFTHSM2_CONF": os.environ["SOFTHSM2_CONF"],
            "HSMFLASH_TOKEN": TOKEN_LABEL,
            "HSMFLASH_PIN": pin,
            "HSMFLASH_AUDIT_LOG": str(tmp / "audit.jsonl"),
        })
        image = tmp / "app.bin"
        image.write_bytes(build_app(CHIP, args.mib * 1024 * 1024))

        # The key: generated in the token by hsmflash. hsmflash labels the private and the
        # public object with the same CKA_LABEL, which is exactly what espsecure looks up
        # (PRIVATE_KEY by `label`, PUBLIC_KEY by `label_pubkey`), so both use one key pair.
        run_process([HSMFLASH, "keys", "generate", KEY, "--type", "rsa-3072"], env)
        pub = tmp / "pub.pem"
        run_process([HSMFLASH, "keys", "public", KEY, "-o", str(pub)], env)

        cfg = tmp / "hsm.cfg"
        fd = os.open(cfg, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            from hsmflash.token.session import find_module

            f.write("[hsm_config]\n"
                    f"pkcs11_lib = {find_module(None)}\n"
                    f"credentials = {pin}\n"
                    f"slot = {slot_id(TOKEN_LABEL)}\n"
                    f"label = {KEY}\n"
                    f"label_pubkey = {KEY}\n")

        out_h, out_e = tmp / "signed-hsmflash.bin", tmp / "signed-espsecure.bin"
        hsmflash_argv = [HSMFLASH, "sign", str(image), "-o", str(out_h), "--key", KEY,
                         "--chip", CHIP]
        espsecure_argv = [ESPSECURE, "sign-data", "--version", "2", "--hsm", "--hsm-config",
                          str(cfg), "--output", str(out_e), str(image)]

        # Warm-up (first hsmflash use also creates the token's audit key) and correctness.
        run_process(hsmflash_argv, env)
        run_process(espsecure_argv, env)
        verify(out_h, pub, env)
        verify(out_e, pub, env)
        if out_h.stat().st_size != out_e.stat().st_size:
            raise SystemExit("signed images differ in size")

        times: dict[str, list[float]] = {"hsmflash": [], "espsecure": []}
        for _ in range(args.runs):
            times["hsmflash"].append(run_process(hsmflash_argv, env))
            times["espsecure"].append(run_process(espsecure_argv, env))
        verify(out_h, pub, env)

        # Interpreter start + importing each CLI's modules: the fixed cost in every figure.
        floor = {
            name: statistics.median(run_process([sys.executable, "-c", f"import {modules}"], env)
                                    for _ in range(3))
            for name, modules in (("hsmflash", "hsmflash.cli.main, hsmflash.sign"),
                                  ("espsecure", "espsecure"))
        }

    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"sign {args.mib} MiB {CHIP} app image, RSA-3072 SBv2, SoftHSM2, "
          f"whole process, median of {args.runs} runs")
    print(f"{'tool':<10} {'median s':>9} {'min s':>8} {'max s':>8} {'imports s':>10}")
    for name in ("espsecure", "hsmflash"):
        t = times[name]
        print(f"{name:<10} {med[name]:9.3f} {min(t):8.3f} {max(t):8.3f} {floor[name]:10.3f}")
    ratio = med["espsecure"] / med["hsmflash"]
    verdict = "ok" if ratio >= 1 else "SLOWER than espsecure"
    print(f"sign (whole process): espsecure {med['espsecure']:.3f} s / hsmflash "
          f"{med['hsmflash']:.3f} s = ratio {ratio:.2f}x (>1: hsmflash faster; target >= 1: "
          f"{verdict})")


if __name__ == "__main__":
    main()
