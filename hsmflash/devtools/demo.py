"""The quick start's main job on the embedded default: provision virtual chips end to end.

`python -m hsmflash.devtools.demo WORKDIR` (run by softhsm/quickstart.sh with the dev token and
policies/dev.toml in the environment) builds demo firmware (real ESP images, made with
esptool's image classes by tests/imagebuilder.py, one of them carrying MicroPython frozen
bytecode), signs it through the token, creates a virtual ESP32-S3 and a virtual ESP32 (FiPy,
rev 1) with their own MACs, provisions both, re-flashes the S3 with a new app, and prints what
each device ended with. The S3 gets the MicroPython partition table (`partitions template`:
encrypted `nvs_keys`, `romfs`, `vfs`), a signed app image (`app build`) in `romfs` and a
formatted LittleFS in `vfs`, and `app check` prints its lockdown report. Re-running it is safe:
finished devices are reported as such.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the checkout (this file is hsmflash/devtools/demo.py)
DEVICES = {
    "esp32s3": {"mac": "7c:df:a1:00:10:01", "revision": "0.2"},
    "esp32": {"mac": "24:0a:c4:00:10:01", "revision": "1.0"},
}


def _hs(*args: str) -> None:
    cmd = [str(Path(sys.executable).parent / "hsmflash"), *args]
    print("$ hsmflash " + " ".join(args), flush=True)
    result = subprocess.run(cmd, check=False)  # noqa: S603 - our own CLI, fixed arguments
    if result.returncode != 0:
        raise SystemExit(result.returncode)


def _firmware(work: Path) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from hsmflash.formats.partitions import build, default_layout
    from imagebuilder import build_bootloader, build_micropython_app

    files = {
        "esp32s3-bootloader.bin": build_bootloader("esp32s3", seed=1),
        "esp32s3-app.bin": build_micropython_app("esp32s3", 200 * 1024, seed=2)[0],
        "esp32s3-app-v2.bin": build_micropython_app("esp32s3", 210 * 1024, seed=3)[0],
        "esp32-bootloader.bin": build_bootloader("esp32", seed=4),
        "esp32-app.bin": build_micropython_app("esp32", 200 * 1024, seed=5)[0],
        "partitions.bin": build(default_layout()),
    }
    for name, data in files.items():
        if not (work / name).exists():
            (work / name).write_bytes(data)


def main() -> None:
    work = Path(sys.argv[1] if len(sys.argv) > 1 else "work").resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)
    _firmware(work)
    for name, key, chip in (("esp32s3-bootloader", "sb-release", "esp32s3"),
                            ("esp32s3-app", "sb-release", "esp32s3"),
                            ("esp32s3-app-v2", "sb-release", "esp32s3"),
                            ("esp32-app", "sbv1-app", "esp32")):
        if not Path(f"{name}.signed.bin").exists():
            _hs("sign", f"{name}.bin", "-o", f"{name}.signed.bin", "--key", key, "--chip", chip)
    if not Path("mp-partitions.bin").exists():
        _hs("partitions", "template", "--chip", "esp32s3", "--format", "bin", "-o",
            "mp-partitions.bin")
    app_src = Path("app-src")
    if not app_src.exists():
        app_src.mkdir()
        (app_src / "main.py").write_text("import sensor\nsensor.run()\n")
        (app_src / "sensor.py").write_text("def run():\n    print('reading the sensor')\n")
    if not Path("app.img").exists():
        _hs("app", "build", str(app_src), "-o", "app.img", "--key", "sb-release",
            "--app-version", "1")
    vfs = Path("vfs-files")
    if not vfs.exists():
        vfs.mkdir()
        (vfs / "settings.json").write_text('{"interval_s": 60}\n')
    for chip, dev in DEVICES.items():
        efuses = Path(f"{chip}.efuse.bin")
        if not efuses.exists():
            _hs("virtual", "create", "--chip", chip, "--mac", dev["mac"], "--revision",
                dev["revision"], "--efuse-file", str(efuses))
    _hs("provision", "--chip", "esp32s3", "--virtual-efuses", "esp32s3.efuse.bin",
        "--virtual-flash", "esp32s3.flash.bin", "--image", "0x0=esp32s3-bootloader.signed.bin",
        "--image", "0x8000=mp-partitions.bin", "--image", "0x10000=esp32s3-app.signed.bin",
        "--app", "app.img", "--vfs-dir", str(vfs), "--manifest", "manifest.csv")
    _hs("provision", "--chip", "esp32", "--virtual-efuses", "esp32.efuse.bin",
        "--virtual-flash", "esp32.flash.bin", "--image", "0x1000=esp32-bootloader.bin",
        "--image", "0x8000=partitions.bin", "--image", "0x10000=esp32-app.signed.bin",
        "--manifest", "manifest.csv")
    _hs("flash", "--chip", "esp32s3", "--virtual-efuses", "esp32s3.efuse.bin",
        "--virtual-flash", "esp32s3.flash.bin", "--image", "0x10000=esp32s3-app-v2.signed.bin")
    _hs("app", "check", "--chip", "esp32s3", "--app", "app.img", "--virtual-efuses",
        "esp32s3.efuse.bin", "--virtual-flash", "esp32s3.flash.bin")
    print(f"devices, manifest.csv and firmware are in {work}")


if __name__ == "__main__":
    main()
