"""Throughput of hsmflash.formats.flashcrypt against espsecure on a 4 MiB random image.

Run: .venv/bin/python bench/bench_flashcrypt.py [--mib N] [--runs N]
Both sides run in this process; each figure is the median of several runs. The hsmflash side
uses SoftwareAes (keys in memory), so the ratio measures the algorithm, not a token.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import time
from collections.abc import Callable

import espsecure

from hsmflash.formats.flashcrypt import esp32_encrypt, software_xts_pair, xts_encrypt

ADDRESS = 0x10000


def espsecure_encrypt(key: bytes, data: bytes, *, aes_xts: bool) -> bytes:
    """espsecure's own encrypt-flash-data, fed from memory (its log output silenced)."""
    out = io.BytesIO()
    with contextlib.redirect_stdout(io.StringIO()):
        espsecure.encrypt_flash_data(io.BytesIO(key), out, ADDRESS, 0xF, aes_xts, io.BytesIO(data))
    return out.getvalue()


def median_seconds(run: Callable[[], bytes], runs: int) -> tuple[float, bytes]:
    times = []
    result = b""
    for _ in range(runs):
        start = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def compare(
    name: str, ours: Callable[[], bytes], theirs: Callable[[], bytes], size: int, runs: int
) -> None:
    ours_s, ours_out = median_seconds(ours, runs)
    theirs_s, theirs_out = median_seconds(theirs, runs)
    if ours_out != theirs_out:
        raise SystemExit(f"{name}: hsmflash output differs from espsecure")
    mb = size / 1e6
    print(
        f"{name:<22} espsecure {mb / theirs_s:8.1f} MB/s   hsmflash {mb / ours_s:8.1f} MB/s"
        f"   ratio {theirs_s / ours_s:6.1f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=4, help="image size in MiB (default 4)")
    parser.add_argument("--runs", type=int, default=5, help="runs per measurement (default 5)")
    args = parser.parse_args()
    size = args.mib << 20
    image = os.urandom(size)
    print(f"image {args.mib} MiB at {ADDRESS:#x}, median of {args.runs} runs")

    for key_bytes, name in ((32, "XTS-AES-128"), (64, "XTS-AES-256")):
        key = os.urandom(key_bytes)
        k1, k2 = software_xts_pair(key)
        compare(
            name,
            lambda k1=k1, k2=k2: xts_encrypt(image, ADDRESS, k1, k2),
            lambda key=key: espsecure_encrypt(key, image, aes_xts=True),
            size,
            args.runs,
        )

    esp32_key = os.urandom(32)
    compare(
        "ESP32 classic (0xF)",
        lambda: esp32_encrypt(image, ADDRESS, esp32_key, 0xF),
        lambda: espsecure_encrypt(esp32_key, image, aes_xts=False),
        size,
        args.runs,
    )


if __name__ == "__main__":
    main()
