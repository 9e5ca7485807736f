"""Provisioning throughput on virtual chips: seconds per device and devices per minute for
1, 4 and 8 devices in station mode (one `hsmflash provision` with N device pairs).

Run: .venv/bin/python bench/bench_provision.py [--runs N]

A throw-away SoftHSM2 token with policies/dev.toml's keys, real signed ESP32-S3 images (built
with esptool's image classes), fresh virtual chips (espefuse's eFuse emulator + flash files) for
every run. The named peer is the same job done by hand with Espressif's tools for one device:
`espsecure encrypt-flash-data` per image plus `espefuse burn-key`/`burn-efuse` (virtual), with
a plaintext key file; it is what a station without hsmflash runs, minus the key management.
Each figure is the median wall time of --runs whole-process runs; the peer is timed for the
same images on the same kind of virtual chip.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
HS = str(BIN / "hsmflash")
LABEL = "hsmflash-bench-provision"
sys.path.insert(0, str(ROOT / "tests"))

from benchlib import run_process, throwaway_token  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    from imagebuilder import build_app, build_bootloader

    with throwaway_token(LABEL) as (tmp, pin):
        conf = tmp / "softhsm2.conf"
        policy = tmp / "policy.toml"
        policy.write_text((ROOT / "policies" / "dev.toml").read_text()
                          .replace('label = "hsmflash-dev"', f'label = "{LABEL}"'))
        env = {**os.environ, "SOFTHSM2_CONF": str(conf), "HSMFLASH_PIN": pin,
               "HSMFLASH_POLICY": str(policy), "HSMFLASH_AUDIT_LOG": str(tmp / "audit.jsonl")}
        run_process([HS, "keys", "create"], env)
        (tmp / "boot.bin").write_bytes(build_bootloader("esp32s3", seed=1))
        (tmp / "app.bin").write_bytes(build_app("esp32s3", 1024 * 1024, seed=2))
        for name in ("boot", "app"):
            run_process([HS, "sign", str(tmp / f"{name}.bin"), "-o", str(tmp / f"{name}.signed"),
                 "--key", "sb-release", "--chip", "esp32s3"], env)
        from hsmflash.formats import partitions

        # the table written to the device places the credentials (nvs, nvs_keys)
        (tmp / "table.bin").write_bytes(partitions.build(partitions.default_layout()))
        images = ["--image", f"0x0={tmp / 'boot.signed'}",
                  "--image", f"0x8000={tmp / 'table.bin'}",
                  "--image", f"0x10000={tmp / 'app.signed'}"]
        counter = 0
        results: dict[int, list[float]] = {}
        for n in (1, 4, 8):
            results[n] = []
            for _ in range(args.runs):
                devices: list[str] = []
                for _ in range(n):
                    counter += 1
                    efuse = tmp / f"d{counter}.efuse"
                    mac = f"7c:df:a1:{counter >> 16 & 255:02x}:{counter >> 8 & 255:02x}:" \
                          f"{counter & 255:02x}"
                    run_process([HS, "virtual", "create", "--chip", "esp32s3", "--mac", mac,
                         "--efuse-file", str(efuse)], env)
                    devices += ["--virtual-efuses", str(efuse), "--virtual-flash",
                                str(tmp / f"d{counter}.flash")]
                results[n].append(run_process([HS, "provision", "--chip", "esp32s3", *devices,
                                       *images], env))
        peer = []
        (tmp / "flash.key").write_bytes(os.urandom(32))
        run_process([HS, "keys", "public", "sb-release", "-o", str(tmp / "sb.pem")], env)
        esps, espf = str(BIN / "espsecure"), str(BIN / "espefuse")
        for i in range(args.runs):
            efuse = tmp / f"peer{i}.efuse"
            run_process([HS, "virtual", "create", "--chip", "esp32s3", "--mac",
                 f"7c:df:a1:ee:00:{i:02x}", "--efuse-file", str(efuse)], env)
            virt = [espf, "--virt", "--path-efuse-file", str(efuse), "--chip", "esp32s3",
                    "--do-not-confirm"]
            start = time.perf_counter()
            for name, addr in (("boot", "0x0"), ("app", "0x10000")):
                run_process([esps, "encrypt-flash-data", "--aes-xts", "--keyfile",
                     str(tmp / "flash.key"), "--address", addr, "--output",
                     str(tmp / f"{name}.enc"), str(tmp / f"{name}.signed")], env)
            run_process([*virt, "burn-key", "BLOCK_KEY0", str(tmp / "flash.key"),
                         "XTS_AES_128_KEY"], env)
            run_process([*virt, "burn-key-digest", "BLOCK_KEY1", str(tmp / "sb.pem"),
                 "SECURE_BOOT_DIGEST0"], env)
            run_process([*virt, "burn-efuse", "SPI_BOOT_CRYPT_CNT", "1", "SECURE_BOOT_EN", "1",
                 "DIS_PAD_JTAG", "1"], env)
            peer.append(time.perf_counter() - start)
        peer_t = statistics.median(peer)
        print(f"peer: Espressif tools by hand for one device (espsecure encrypt x2, espefuse "
              f"burn-key, burn-key-digest, burn-efuse; key file on disk): {peer_t:.2f} s")
        print("provision virtual ESP32-S3 (SBv2 digest, XTS key, 1 MiB app + bootloader, "
              f"credentials NVS), station mode, median of {args.runs} runs")
        print(f"{'devices':>8} {'wall s':>8} {'s/device':>9} {'devices/min':>12}")
        for n, times in results.items():
            t = statistics.median(times)
            print(f"{n:8d} {t:8.2f} {t / n:9.2f} {60 * n / t:12.1f}")
        for n, times in results.items():
            t = statistics.median(times)
            print(f"provision station mode, {n} device(s): {t / n:.2f} s/device, "
                  f"{60 * n / t:.1f} devices/min; ratio vs Espressif tools by hand "
                  f"{peer_t / (t / n):.2f}x (>1: hsmflash faster per device)")


if __name__ == "__main__":
    main()
