"""Flash encryption with the key in a SoftHSM2 token against espsecure with a plaintext key file.

Run: .venv/bin/python bench/bench_encrypt.py [--mib N] [--runs N] [--cli-runs N]

A throw-away SoftHSM2 token is created in a temp dir and removed afterwards. Figures:
  (a) XTS-AES-128 (ESP32-S3): the key imported into the token (two AES-128 objects, K1/K2),
      `flashcrypt.xts_encrypt` with `keyuse.TokenCipher` (one bulk C_Encrypt per key), and the
      same through `perdevice.crypt_image` in an audited `Station`; peer: espsecure's
      `encrypt_flash_data(..., aes_xts=True)` in this process, fed from memory. Target >= 3x.
  (b) ESP32 classic (FLASH_CRYPT_CONFIG 0xF): `perdevice.crypt_image` with `--master/--device`
      semantics in a Station (derive K_D in the token, audited transient export, in-memory
      `flashcrypt.esp32_encrypt`, wipe); peer: espsecure with the plaintext K_D. Target >= 1x.
  (c) whole process, XTS: `hsmflash encrypt --key` vs `espsecure encrypt-flash-data --aes-xts`.
Every hsmflash output is checked equal to espsecure's. In-process figures are medians of
--runs runs; ratio = espsecure time / hsmflash time (>1: hsmflash faster).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from benchlib import run_process, throwaway_token
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TOKEN_LABEL = "hsmflash-bench-encrypt"
ADDRESS = 0x10000
XTS_KEY = "bench-xts"
MASTER = "fe-master"  # the dev policy's derivation master
DEVICE = bytes.fromhex("24d7eb1a2b3c")


def espsecure_encrypt(key: bytes, data: bytes, *, aes_xts: bool) -> bytes:
    """espsecure's own encrypt_flash_data, fed from memory (its log output silenced)."""
    import espsecure

    out = io.BytesIO()
    with contextlib.redirect_stdout(io.StringIO()):
        espsecure.encrypt_flash_data(io.BytesIO(key), out, ADDRESS, 0xF, aes_xts,
                                     io.BytesIO(data))
    return out.getvalue()


def median_seconds(fn: Callable[[], bytes], runs: int) -> tuple[float, bytes]:
    times, result = [], b""
    for _ in range(runs):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def software_kd(master: bytes, device: bytes, purpose: str) -> bytes:
    """aes-ecb-v1 in memory (DESIGN.md), to hand espsecure the plaintext per-device key."""
    from hsmflash.formats import kdf

    enc = Cipher(algorithms.AES(master), modes.ECB()).encryptor()  # noqa: S305 - the KDF is ECB
    return enc.update(b"".join(kdf.derivation_blocks(device, purpose))) + enc.finalize()


def dev_policy(tmp: Path):  # type: ignore[no-untyped-def]
    """policies/dev.toml pointed at the throw-away token (esp32_classic_transient = true)."""
    from hsmflash.policy import load_policy

    text = (ROOT / "policies" / "dev.toml").read_text(encoding="utf-8")
    path = tmp / "policy.toml"
    path.write_text(text.replace('label = "hsmflash-dev"', f'label = "{TOKEN_LABEL}"'),
                    encoding="utf-8")
    return load_policy(path)


class Table:
    def __init__(self, size: int) -> None:
        self.mb = size / 1e6
        self.rows: list[tuple[str, float, float, float]] = []
        print(f"{'measurement':<44} {'espsecure':>11} {'hsmflash':>11} {'ratio':>7}  target")

    def row(self, name: str, theirs_s: float, ours_s: float, target: float,
            unit: str = "MB/s") -> float:
        ratio = theirs_s / ours_s
        if unit == "MB/s":
            a, b = f"{self.mb / theirs_s:6.1f} MB/s", f"{self.mb / ours_s:6.1f} MB/s"
        else:
            a, b = f"{theirs_s:8.3f} s", f"{ours_s:8.3f} s"
        ok = "ok" if ratio >= target else "MISSED"
        print(f"{name:<44} {a:>11} {b:>11} {ratio:6.2f}x  >={target:g} {ok}")
        self.rows.append((name, theirs_s, ours_s, target))
        return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=4, help="image size in MiB (default 4)")
    parser.add_argument("--runs", type=int, default=5, help="in-process runs (default 5)")
    parser.add_argument("--cli-runs", type=int, default=3, help="whole-process runs (default 3)")
    args = parser.parse_args()
    size = args.mib << 20
    image = os.urandom(size)

    with throwaway_token(TOKEN_LABEL) as (tmp, pin):
        from hsmflash.chips import get_chip
        from hsmflash.encrypt import PATH_ESP32_EXPORT, PATH_XTS, crypt_image
        from hsmflash.formats.flashcrypt import esp32_encrypt, xts_encrypt
        from hsmflash.keyuse import Station, TokenCipher
        from hsmflash.token.keys import generate_key, import_key
        from hsmflash.token.session import TokenConfig, open_session

        config = TokenConfig(token_label=TOKEN_LABEL, pin_handler=lambda _prompt: pin)
        xts_key = os.urandom(32)
        master = os.urandom(32)
        with open_session(config, rw=True) as session:
            import_key(session, XTS_KEY, "xts-aes-128", bytearray(xts_key), ("encrypt",))
            import_key(session, MASTER, "aes-256", bytearray(master), ("derive",))
            generate_key(session, "audit", "ec-p256", ("sign",))
        policy = dev_policy(tmp)
        audit = tmp / "audit.jsonl"

        print(f"{args.mib} MiB random image at {ADDRESS:#x}, SoftHSM2 token, median of "
              f"{args.runs} runs (whole process: {args.cli_runs})")
        table = Table(size)
        summary: list[str] = []

        # (a) XTS-AES-128, key in the token
        theirs_s, theirs = median_seconds(lambda: espsecure_encrypt(xts_key, image, aes_xts=True),
                                          args.runs)
        with open_session(config, rw=False) as session:
            from hsmflash.token.keys import find_key

            key = find_key(session, XTS_KEY)
            k1, k2 = TokenCipher(key.objects[0]), TokenCipher(key.objects[1])
            ours_s, ours = median_seconds(lambda: xts_encrypt(image, ADDRESS, k1, k2), args.runs)
        if ours != theirs:
            raise SystemExit("XTS: token output differs from espsecure")
        r = table.row("XTS-AES-128 token (xts_encrypt+TokenCipher)", theirs_s, ours_s, 3)
        summary.append(f"XTS-AES-128, key in token, library: {r:.2f}x espsecure "
                       f"({size / 1e6 / ours_s:.1f} vs {size / 1e6 / theirs_s:.1f} MB/s; "
                       f"target >= 3x)")

        chip = get_chip("esp32s3")
        paths: set[str] = set()
        with Station.open(config, policy, audit, station="bench", actor="bench") as st:
            xkey = st.key(XTS_KEY)

            def xts_station() -> bytes:
                result = crypt_image(st, image, chip, ADDRESS, key=xkey)
                paths.add(result.path)
                return result.output

            st_s, res = median_seconds(xts_station, args.runs)
        if res != theirs or paths != {PATH_XTS}:
            raise SystemExit(f"XTS (Station): output differs from espsecure (path {paths})")
        table.row("XTS-AES-128 token, Station.crypt_image+audit", theirs_s, st_s, 3)

        # (b) ESP32 classic: derive in token, audited transient export, in-memory crypt
        kd = software_kd(master, DEVICE, "FLASH_ENCRYPTION")
        e32_theirs_s, e32_theirs = median_seconds(
            lambda: espsecure_encrypt(kd, image, aes_xts=False), args.runs)
        esp32 = get_chip("esp32")
        paths.clear()
        with Station.open(config, policy, audit, station="bench", actor="bench") as st:
            mkey = st.key(MASTER)

            def esp32_station() -> bytes:
                result = crypt_image(st, image, esp32, ADDRESS, master=mkey, device=DEVICE)
                paths.add(result.path)
                return result.output

            e32_s, e32_out = median_seconds(esp32_station, args.runs)
        if e32_out != e32_theirs:
            raise SystemExit("ESP32 classic: hsmflash output differs from espsecure")
        if paths != {PATH_ESP32_EXPORT}:
            raise SystemExit(f"ESP32 classic ran path {paths}, expected {PATH_ESP32_EXPORT}")
        r = table.row("ESP32 classic (derive+export, Station)", e32_theirs_s, e32_s, 1)
        summary.append(f"ESP32 classic, per-device key from the token master: {r:.2f}x "
                       f"espsecure ({size / 1e6 / e32_s:.2f} vs {size / 1e6 / e32_theirs_s:.2f}"
                       f" MB/s; target >= 1x)")
        mem_s, mem = median_seconds(lambda: esp32_encrypt(image, ADDRESS, kd, 0xF), args.runs)
        if mem != e32_theirs:
            raise SystemExit("ESP32 classic (in memory): output differs from espsecure")
        table.row("  reference: flashcrypt.esp32_encrypt (RAM)", e32_theirs_s, mem_s, 1)

        # (c) whole process, XTS with the stored key
        plain, keyfile = tmp / "plain.bin", tmp / "xts.key"
        plain.write_bytes(image)
        fd = os.open(keyfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(xts_key)
        env = {k: v for k, v in os.environ.items() if not k.startswith("HSMFLASH_")}
        env.update({"HSMFLASH_TOKEN": TOKEN_LABEL, "HSMFLASH_PIN": pin,
                    "HSMFLASH_AUDIT_LOG": str(tmp / "audit-cli.jsonl")})
        out_h, out_e = tmp / "enc-hsmflash.bin", tmp / "enc-espsecure.bin"
        h_argv = [str(BIN / "hsmflash"), "encrypt", str(plain), "-o", str(out_h),
                  "--chip", "esp32s3", "--address", hex(ADDRESS), "--key", XTS_KEY]
        e_argv = [str(BIN / "espsecure"), "encrypt-flash-data", "--aes-xts", "--keyfile",
                  str(keyfile), "--address", hex(ADDRESS), "--output", str(out_e), str(plain)]
        run_process(h_argv, env)  # warm-up
        run_process(e_argv, env)
        h_times, e_times = [], []
        for _ in range(args.cli_runs):
            h_times.append(run_process(h_argv, env))
            e_times.append(run_process(e_argv, env))
        if out_h.read_bytes() != out_e.read_bytes() or out_e.read_bytes() != theirs:
            raise SystemExit("whole process: hsmflash encrypt output differs from espsecure")
        h_med, e_med = statistics.median(h_times), statistics.median(e_times)
        r = table.row("XTS-AES-128 whole process (CLI)", e_med, h_med, 1, unit="s")
        summary.append(f"XTS-AES-128 whole process: hsmflash encrypt {h_med:.3f} s, espsecure "
                       f"encrypt-flash-data {e_med:.3f} s: {r:.2f}x")

    for line in summary:
        print(line)


if __name__ == "__main__":
    main()
