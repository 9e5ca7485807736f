"""Wire efficiency of the serial path: a 4 MiB encrypted image at 921,600 baud through the
baud-modelled ROM-loader double, against the physical floor and against `esptool write-flash`.

Run: .venv/bin/python bench/bench_serial.py [--scale 1.0] [--ports 1,4,8] [--chip esp32s3]

What is measured, per device: connect at 115200, (stub upload), baud change, write the 4 MiB
ciphertext, read back its MD5 — what a station pays per device on the wire. The image is
random data encrypted by espsecure (XTS-AES-128, a throw-away key): incompressible, as every
image hsmflash writes.

The link is `FakeRomLoader` (tests/doubles), a TEST DOUBLE of the chip at the serial boundary:
every frame costs `len(SLIP frame) * 10 / baud` seconds at the chip's current rate, and the
double sleeps that long (times --scale) before the frame arrives, so wall time includes the
wire. Its virtual clock (`wire_seconds`) adds up the modelled wire time exactly; host time is
the wall time minus the slept wire time. "Projected" = wire + host: what a real link at that
rate would take (the double does not model flash erase/program time or USB latency).

Floor = payload bytes * 10 / baud (8N1, no framing, no protocol): 45.5 s for 4 MiB at 921600.

Rows:
- hsmflash stub     : hsmflash.device.serial, esptool's flasher stub, 16 KiB blocks, no deflate
- hsmflash --no-stub: the same through the ROM loader (1 KiB blocks, one ack each)
- esptool write-flash: `esptool --before no-reset --baud 921600 write-flash ADDR FILE` in-process
  (esptool's defaults: stub, deflate, MD5 verify) through the same double
- N ports: N devices at once, one process per port (as `provision` station mode), hsmflash stub;
  devices per hour = N * 3600 / slowest device's projected time.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

BAUD = 921600
IMAGE_SIZE = 4 * 1024 * 1024
ADDRESS = 0x100000
FLASH_SIZE = 8 * 1024 * 1024


def ciphertext(path: Path) -> bytes:
    """4 MiB of random plaintext encrypted by espsecure for ADDRESS with a throw-away key."""
    import espsecure

    plain, key, out = os.urandom(IMAGE_SIZE), os.urandom(32), io.BytesIO()
    with contextlib.redirect_stdout(io.StringIO()):
        espsecure.encrypt_flash_data(io.BytesIO(key), out, ADDRESS, 0xF, True, io.BytesIO(plain))
    data = out.getvalue()
    path.write_bytes(data)
    return data


def _serve_double(chip: str, scale: float, conn: Any) -> None:
    """Child process: one chip double on a pty until told to stop (the chip is not in the
    host's process, so it does not compete with esptool for the host's interpreter)."""
    from doubles import FakeRomLoader

    efuse = Path(tempfile.mkdtemp(prefix="bench-serial-")) / "chip.efuse"
    mac = "7c:df:a1:%02x:%02x:%02x" % tuple(os.urandom(3))  # noqa: UP031
    with FakeRomLoader(chip, mac=mac, efuse_file=efuse, flash_size=FLASH_SIZE,
                       realtime=scale) as dev:
        conn.send(dev.port)
        length = conn.recv()
        region = bytes(dev.flash[ADDRESS:ADDRESS + length])
        conn.send({"wire": dev.wire_seconds,
                   "md5": hashlib.md5(region, usedforsecurity=False).hexdigest()})


def start_double(chip: str, scale: float) -> tuple[Any, Any, str]:
    """A chip double in its own process; returns (process, pipe, port)."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_serve_double, args=(chip, scale, child), daemon=True)
    proc.start()
    return proc, parent, parent.recv()


def finish_double(proc: Any, conn: Any, data: bytes) -> float:
    """Stop a double; check its flash holds `data`; return its modelled wire seconds."""
    conn.send(len(data))
    chip_side = conn.recv()
    proc.join(timeout=10)
    if chip_side["md5"] != hashlib.md5(data, usedforsecurity=False).hexdigest():
        raise SystemExit("the double's flash does not hold the image")
    return float(chip_side["wire"])


def client(kind: str, chip: str, port: str, image: str, barrier: Any) -> float:
    """The host side of one device; returns its wall time from connect to verified MD5."""
    data = Path(image).read_bytes()
    if kind == "esptool":
        import esptool
        from esptool.loader import ESPLoader

        ESPLoader.WRITE_FLASH_ATTEMPTS = 1
    else:
        from hsmflash.device.serial import open_serial
    if barrier is not None:
        barrier.wait()
    started = time.monotonic()
    if kind == "esptool":
        with contextlib.redirect_stdout(io.StringIO()):
            esptool.main(["--chip", chip, "--port", port, "--baud", str(BAUD),
                          "--before", "no-reset", "--after", "no-reset", "write-flash",
                          hex(ADDRESS), image])
    else:
        device = open_serial(port, chip, BAUD, stub=(kind == "stub"))
        try:
            device.write_flash(ADDRESS, data)
            if device.flash_md5(ADDRESS, len(data)) != hashlib.md5(
                    data, usedforsecurity=False).hexdigest():
                raise SystemExit(f"{kind}: MD5 read back does not match")
        finally:
            device.close()
    return time.monotonic() - started


def run_ports(n: int, kind: str, chip: str, image: str, scale: float) -> list[dict[str, Any]]:
    """n devices at once: n chip doubles, n host processes (one host process when n is 1)."""
    data = Path(image).read_bytes()
    doubles = [start_double(chip, scale) for _ in range(n)]
    if n == 1:
        walls = [client(kind, chip, doubles[0][2], image, None)]
    else:
        from concurrent.futures import ProcessPoolExecutor

        ctx = multiprocessing.get_context("spawn")
        with ctx.Manager() as manager:
            barrier = manager.Barrier(n)
            with ProcessPoolExecutor(n, mp_context=ctx) as pool:
                futures = [pool.submit(client, kind, chip, port, image, barrier)
                           for _, _, port in doubles]
                walls = [f.result() for f in futures]
    results = []
    for (proc, conn, _), wall in zip(doubles, walls, strict=True):
        wire = finish_double(proc, conn, data)
        host = max(0.0, wall - wire * scale)
        results.append({"wall": wall, "wire": wire, "host": host, "projected": wire + host})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0,
                        help="sleep this fraction of the modelled wire time (1.0: real time)")
    parser.add_argument("--ports", default="1,4,8")
    parser.add_argument("--chip", default="esp32s3")
    args = parser.parse_args()
    floor = IMAGE_SIZE * 10 / BAUD
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "image.enc"
        ciphertext(image)
        print(f"{args.chip}, {IMAGE_SIZE // 1024} KiB ciphertext at {BAUD} baud, "
              f"floor {floor:.1f} s, wire slept at scale {args.scale}")
        print(f"{'path':24} {'wire s':>8} {'host s':>8} {'projected':>10} {'x floor':>8}")
        rows = {}
        for kind, label in (("stub", "hsmflash stub"), ("rom", "hsmflash --no-stub"),
                            ("esptool", "esptool write-flash")):
            (r,) = run_ports(1, kind, args.chip, str(image), args.scale)
            rows[kind] = r
            print(f"{label:24} {r['wire']:8.1f} {r['host']:8.1f} {r['projected']:10.1f} "
                  f"{r['projected'] / floor:8.2f}")
        print(f"stub vs esptool write-flash: "
              f"{rows['esptool']['projected'] / rows['stub']['projected']:.2f}x faster")
        print(f"\n{'ports':>5} {'slowest projected s':>20} {'devices/hour':>13} {'vs 1 port':>10}")
        one = None
        for n in (int(x) for x in args.ports.split(",")):
            results = run_ports(n, "stub", args.chip, str(image), args.scale)
            slowest = max(r["projected"] for r in results)
            per_hour = n * 3600 / slowest
            one = one or per_hour
            print(f"{n:5} {slowest:20.1f} {per_hour:13.1f} {per_hour / one:10.2f}")


if __name__ == "__main__":
    main()
