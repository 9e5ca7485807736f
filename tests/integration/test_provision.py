"""`hsmflash provision` end to end on virtual chips (espefuse's eFuse emulator + a flash file).

Nothing here trusts hsmflash to judge its own work. After provisioning, the device is read back
with independent tools only:
- espefuse's own `summary --format json` of the virtual eFuse file (the chip's profile);
- the per-device keys re-derived from a known test master by the aes-ecb-v1 spec text
  (tests/vectors/make_kdf_vectors.py, plain `cryptography` AES, no hsmflash code);
- `espsecure.decrypt_flash_data` on the virtual flash with those keys, which must give the
  original images back; `espsecure.digest_secure_bootloader` for the ESP32 SBv1 digest image;
  `espsecure.verify_signature` / `digest_sbv2_public_key` for Secure Boot.

The helpers below (`Bench`, `check_provisioned`, ...) are shared with test_provision_crash.py
and test_provision_serial.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import espsecure
import pytest
from vectors.make_kdf_vectors import derive

from conftest import ROOT, TOKEN_LABEL, USER_PIN, Result, run_cli
from hsmflash.formats import partitions
from imagebuilder import build_app, build_bootloader

CHIPS = ("esp32s3", "esp32c3", "esp32")
MACS = {"esp32s3": "7c:df:a1:00:00:01", "esp32c3": "58:cf:79:00:00:02",
        "esp32": "24:0a:c4:00:00:03"}
REVISIONS = {"esp32s3": "0.2", "esp32c3": "0.4", "esp32": "1.0"}  # esp32 v1: FiPy-era, SBv1
APP_ADDRESS = 0x10000
# the table the bench writes at 0x8000 (partitions.default_layout): credentials go there
NVS_ADDRESS, NVS_SIZE, NVS_KEYS_ADDRESS = 0x9000, 0x6000, 0xF000
TABLE_ADDRESS = 0x8000
KEY_LENGTHS = {"XTS_AES_128_KEY": 32, "FLASH_ENCRYPTION": 32, "SECURE_BOOT_V1": 32}

# exit codes, DESIGN.md
BAD_INPUT, REFUSED, DEVICE_ERROR = 3, 5, 7


# ---------------------------------------------------------------------------------------
# the bench: one token setup (keys, signed images) per module
# ---------------------------------------------------------------------------------------

def policy_text(uniq: str, *, release: bool = False, master: str = "fe-master") -> str:
    """policies/dev.toml for the session token with this module's key names.

    `release`: the production-like variant (release_mode, keys read-protected, more hardening,
    download mode closed). `master`: the flash-encryption master's name (another one makes a
    policy that contradicts devices provisioned under the first).
    """
    text = (ROOT / "policies" / "dev.toml").read_text()
    text = text.replace('label = "hsmflash-dev"', f'label = "{TOKEN_LABEL}"')
    for name in ("sb-release", "sb-ecdsa", "sbv1-app", "cred-master", "revocation"):
        text = text.replace(f'"{name}"', f'"{uniq}-{name}"')
        text = text.replace(f"[keys.{name}]", f"[keys.{uniq}-{name}]")
    text = text.replace('"fe-master"', f'"{uniq}-{master}"')
    text = text.replace("[keys.fe-master]", f"[keys.{uniq}-{master}]")
    if release:
        text = text.replace("readable_keys = true", "readable_keys = false")
        text = text.replace("release_mode = false", "release_mode = true")
        text = text.replace('harden = ["DIS_PAD_JTAG"]',
                            'harden = ["DIS_PAD_JTAG", "DIS_USB_JTAG", "SOFT_DIS_JTAG=7", '
                            '"DIS_DOWNLOAD_MANUAL_ENCRYPT", "DIS_DIRECT_BOOT", '
                            '"ENABLE_SECURITY_DOWNLOAD"]')
        text = text.replace('harden = ["JTAG_DISABLE"]',
                            'harden = ["JTAG_DISABLE", "DISABLE_DL_ENCRYPT", '
                            '"DISABLE_DL_DECRYPT", "DISABLE_DL_CACHE"]')
    assert text.count(f"{uniq}-{master}") >= 2
    return text


@dataclass
class Image:
    address: int
    path: Path
    data: bytes  # the bytes the user passes: what the flash must decrypt to
    signed: bool


@dataclass
class Bench:
    """Token keys (known fe-master), policies and signed images for all of CHIPS."""

    dir: Path
    uniq: str
    master: bytes
    policy: Path
    release_policy: Path
    audit_log: Path
    env: dict[str, str]
    images: dict[str, list[Image]] = field(default_factory=dict)
    pubkeys: dict[str, Path] = field(default_factory=dict)  # chip -> Secure Boot public PEM
    blanks: dict[tuple[str, str, str], bytes] = field(default_factory=dict)

    def image_args(self, chip: str) -> list[str]:
        return [a for img in self.images[chip] for a in ("--image", f"{img.address:#x}={img.path}")]

    def new_chip(self, tmp: Path, chip: str, name: str = "dev", *, mac: str | None = None,
                 revision: str | None = None) -> tuple[Path, Path]:
        """A blank virtual chip with its own MAC: (eFuse file, flash file not yet created).

        Made by `hsmflash virtual create` once per (chip, MAC, revision), then copied.
        """
        efuse, flash = tmp / f"{name}.efuse", tmp / f"{name}.flash"
        mac, revision = mac or MACS[chip], revision or REVISIONS[chip]
        blank = self.blanks.get((chip, mac, revision))
        if blank is not None:
            efuse.write_bytes(blank)
            return efuse, flash
        if not _unique(mac):  # the CLI refuses these; make one anyway
            from hsmflash.device.virtual import create_virtual_chip

            major, minor = revision.split(".")
            create_virtual_chip(chip, efuse, bytes.fromhex(mac.replace(":", "")),
                                (int(major), int(minor)))
        else:
            r = run_cli("virtual", "create", "--chip", chip, "--mac", mac, "--efuse-file", efuse,
                        "--revision", revision)
            assert r.code == 0, r.output
        self.blanks[(chip, mac, revision)] = efuse.read_bytes()
        return efuse, flash

    def provision_args(self, chip: str, efuse: Path, flash: Path, *extra: str | Path,
                       policy: Path | None = None, images: list[str] | None = None) -> list[str]:
        return ["--policy", str(policy or self.policy), "provision", "--chip", chip,
                "--virtual-efuses", str(efuse), "--virtual-flash", str(flash),
                *(self.image_args(chip) if images is None else images), *map(str, extra)]

    def provision(self, chip: str, efuse: Path, flash: Path, *extra: str | Path,
                  policy: Path | None = None, images: list[str] | None = None,
                  json_out: bool = False) -> Result:
        args = self.provision_args(chip, efuse, flash, *extra, policy=policy, images=images)
        return run_cli(*(["--json"] if json_out else []), *args)

    def cli(self, *args: str | Path) -> Result:
        """`hsmflash ARGS` in-process with the bench's token environment (module fixtures)."""
        with _env(self.env):
            return run_cli(*args)

    def subprocess(self, *args: str | Path, audit_log: Path) -> Result:
        """`hsmflash ARGS` as a separate process (the installed entry point).

        Station mode runs devices in worker processes; a token library that crashed one would
        take the test runner with it.
        """
        env = {k: v for k, v in os.environ.items() if not k.startswith("HSMFLASH_")}
        env.update({**self.env, "HSMFLASH_AUDIT_LOG": str(audit_log)})
        p = subprocess.run([str(Path(sys.executable).with_name("hsmflash")), *map(str, args)],
                           env=env, capture_output=True, text=True, timeout=120)
        return Result(p.returncode, p.stdout, p.stderr)

    def spec_key(self, mac: str, purpose: str, master: bytes | None = None) -> bytes:
        """The per-device key by the aes-ecb-v1 spec, from the known test master."""
        return derive(master or self.master, mac, purpose, KEY_LENGTHS[purpose])


def _unique(mac: str) -> bool:
    raw_mac = bytes.fromhex(mac.replace(":", ""))
    return raw_mac not in (bytes(6), b"\xff" * 6) and not raw_mac[0] & 1


@contextlib.contextmanager
def _env(values: dict[str, str]) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        for k, v in values.items():
            mp.setenv(k, v)
        yield


def make_bench(tmp: Path) -> Bench:
    uniq = "t" + uuid.uuid4().hex[:10]
    env = {"HSMFLASH_TOKEN": TOKEN_LABEL, "HSMFLASH_PIN": USER_PIN,
           "HSMFLASH_AUDIT_LOG": str(tmp / "bench-audit.jsonl")}
    policy, release_policy = tmp / "policy.toml", tmp / "release.toml"
    policy.write_text(policy_text(uniq))
    release_policy.write_text(policy_text(uniq, release=True))
    bench = Bench(tmp, uniq, os.urandom(32), policy, release_policy,
                  tmp / "bench-audit.jsonl", env)
    with _env(env):
        master_file = tmp / "master.key"
        master_file.write_bytes(bench.master)
        r = run_cli("keys", "import", f"{uniq}-fe-master", "--type", "aes-256", "--usage",
                    "derive", "--file", master_file)
        assert r.code == 0, r.output
        master_file.unlink()
        r = run_cli("--policy", policy, "keys", "create")
        assert r.code == 0, r.output
        for chip in CHIPS:
            key = f"{uniq}-sbv1-app" if chip == "esp32" else f"{uniq}-sb-release"
            pem = tmp / f"{chip}-sb.pem"
            assert run_cli("keys", "public", key, "-o", pem).code == 0
            bench.pubkeys[chip] = pem
            boot, app = tmp / f"{chip}-boot.bin", tmp / f"{chip}-app.bin"
            boot.write_bytes(build_bootloader(chip, seed=1))
            app.write_bytes(build_app(chip, 48 * 1024 + 100, seed=2))
            images = []
            for path, address in ((boot, 0x1000 if chip == "esp32" else 0x0), (app, APP_ADDRESS)):
                if chip == "esp32" and path is boot:  # SBv1: the digest protects it, unsigned
                    images.append(Image(address, path, path.read_bytes(), False))
                    continue
                out = path.with_suffix(".signed")
                r = run_cli("--policy", policy, "sign", path, "-o", out, "--key", key,
                            "--chip", chip)
                assert r.code == 0, r.output
                images.append(Image(address, out, out.read_bytes(), True))
            table = tmp / "table.bin"
            table.write_bytes(partitions.build(partitions.default_layout()))
            images.append(Image(TABLE_ADDRESS, table, table.read_bytes(), False))
            images.sort(key=lambda i: i.address)
            bench.images[chip] = images
    return bench


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Bench:
    return make_bench(tmp_path_factory.mktemp("bench"))


# ---------------------------------------------------------------------------------------
# the independent oracle
# ---------------------------------------------------------------------------------------

def efuse_summary(chip: str, efuse_file: Path, *, via_cli: bool = False) -> dict[str, Any]:
    """espefuse's own `summary --format json` of a virtual eFuse file.

    `via_cli` runs `python -m espefuse` as a subprocess (slower); otherwise its command API
    in-process, same code path.
    """
    if via_cli:
        out = efuse_file.with_name(efuse_file.name + ".summary.json")
        subprocess.run([sys.executable, "-m", "espefuse", "--virt", "--path-efuse-file",
                        str(efuse_file), "--chip", chip, "summary", "--format", "json",
                        "--file", str(out)], check=True, capture_output=True, timeout=60)
        data: dict[str, Any] = json.loads(out.read_text())
        out.unlink()
        return data
    from espefuse import init_commands

    out = efuse_file.with_name(efuse_file.name + ".summary.json")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        cmds = init_commands(chip=chip, virt=True, virt_efuse_file=str(efuse_file))
        with open(out, "w") as f:  # espefuse closes it
            cmds.summary(format="json", file=f)
    data = json.loads(out.read_text())
    out.unlink()
    return data


def raw(summary: dict[str, Any], name: str) -> int:
    return int(str(summary[name]["raw_value"]), 16)


def block_bytes(summary: dict[str, Any], name: str) -> bytes:
    """A 256-bit block as espefuse reads it (a read-protected one: zeros, shown as ??)."""
    return raw(summary, name).to_bytes(32, "big")


def _pad(data: bytes, unit: int) -> bytes:
    return data + b"\xff" * (-len(data) % unit)


def espsecure_decrypt(key: bytes, data: bytes, address: int, *, xts: bool) -> bytes:
    out = io.BytesIO()
    with contextlib.redirect_stdout(io.StringIO()):
        espsecure.decrypt_flash_data(io.BytesIO(key), out, address, 0xF, xts, io.BytesIO(data))
    return out.getvalue()


def espsecure_verify(version: int, pem: Path, data: bytes) -> None:
    with open(pem, "rb") as k, contextlib.redirect_stdout(io.StringIO()):
        espsecure.verify_signature(version, False, None, k, io.BytesIO(data))


def sbv2_digest(pem: Path, tmp: Path) -> bytes:
    out = tmp / "sbv2-digest.bin"
    with open(pem, "rb") as k, contextlib.redirect_stdout(io.StringIO()):
        espsecure.digest_sbv2_public_key(k, str(out))
    digest = out.read_bytes()
    out.unlink()
    return digest


def esp32_sbv1_digest_image(sb_key: bytes, iv: bytes, bootloader: bytes, tmp: Path) -> bytes:
    out = tmp / "sbv1-digest.bin"
    with contextlib.redirect_stdout(io.StringIO()):
        espsecure.digest_secure_bootloader(io.BytesIO(sb_key), str(out), io.BytesIO(iv),
                                           io.BytesIO(bootloader))
    data = out.read_bytes()
    out.unlink()
    return data


def check_provisioned(bench: Bench, chip: str, summary: dict[str, Any], flash: bytes, mac: str,
                      tmp: Path, *, release: bool = False) -> None:
    """Assert the device is what the policy's profile says, with independent tools only."""
    classic = chip == "esp32"
    fe_purpose = "FLASH_ENCRYPTION" if classic else "XTS_AES_128_KEY"
    fe_key = bench.spec_key(mac, fe_purpose)

    # -- eFuses, as espefuse shows them
    if classic:
        sb_key = bench.spec_key(mac, "SECURE_BOOT_V1")
        assert raw(summary, "FLASH_CRYPT_CONFIG") == 0xF
        assert bin(raw(summary, "FLASH_CRYPT_CNT")).count("1") % 2 == 1  # odd: enabled
        assert raw(summary, "ABS_DONE_0") == 1
        assert raw(summary, "JTAG_DISABLE") == 1
        key_blocks = {"BLOCK1": fe_key, "BLOCK2": sb_key}
        if release:
            for name in ("DISABLE_DL_ENCRYPT", "DISABLE_DL_DECRYPT", "DISABLE_DL_CACHE"):
                assert raw(summary, name) == 1, name
            assert summary["FLASH_CRYPT_CNT"]["writeable"] is False  # cannot be turned off
    else:
        assert summary["KEY_PURPOSE_0"]["value"] == "XTS_AES_128_KEY"
        assert summary["KEY_PURPOSE_1"]["value"] == "SECURE_BOOT_DIGEST0"
        assert block_bytes(summary, "BLOCK_KEY1") == sbv2_digest(bench.pubkeys[chip], tmp)
        assert summary["BLOCK_KEY1"]["readable"] is True  # a digest is public
        for name in ("BLOCK_KEY1", "KEY_PURPOSE_0", "KEY_PURPOSE_1"):
            assert summary[name]["writeable"] is False, f"{name} not write-protected"
        assert raw(summary, "SECURE_BOOT_EN") == 1
        assert raw(summary, "DIS_PAD_JTAG") == 1
        assert raw(summary, "SPI_BOOT_CRYPT_CNT") == (7 if release else 1)
        revoked = [raw(summary, f"SECURE_BOOT_KEY_REVOKE{i}") for i in range(3)]
        assert revoked == ([0, 1, 1] if release else [0, 0, 0])
        for p in range(2, 6):
            assert summary[f"KEY_PURPOSE_{p}"]["value"] == "USER"  # other slots untouched
        key_blocks = {"BLOCK_KEY0": fe_key}
        if release:
            for name in ("DIS_USB_JTAG", "DIS_DOWNLOAD_MANUAL_ENCRYPT", "DIS_DIRECT_BOOT",
                         "ENABLE_SECURITY_DOWNLOAD"):
                assert raw(summary, name) == 1, name
            assert raw(summary, "SOFT_DIS_JTAG") == 7
    for block, key in key_blocks.items():
        assert summary[block]["writeable"] is False, f"{block} not write-protected"
        if release:
            assert summary[block]["readable"] is False, f"{block} readable in release mode"
            assert block_bytes(summary, block) == bytes(32)  # a protected key reads as zeros
        else:
            # espefuse's burn_key stores key files byte-reversed in these blocks
            assert summary[block]["readable"] is True
            assert block_bytes(summary, block) == key[::-1], f"{block} is not the spec key"

    # -- flash: decrypts with the spec key to the original images
    unit = 32 if classic else 16
    for img in bench.images[chip]:
        if classic and img.address == 0x1000:
            digest_image_len = 0x1000 + len(_pad(img.data, 128))
            plain = espsecure_decrypt(fe_key, flash[:digest_image_len], 0x0, xts=False)
            expected = esp32_sbv1_digest_image(sb_key, plain[:128], img.data, tmp)
            assert plain == expected, "SBv1 digest image differs from espsecure's"
            continue
        length = len(_pad(img.data, unit))
        plain = espsecure_decrypt(fe_key, flash[img.address:img.address + length], img.address,
                                  xts=not classic)
        assert plain == _pad(img.data, unit), f"image at {img.address:#x} does not decrypt"
        if img.signed:
            espsecure_verify(1 if classic else 2, bench.pubkeys[chip], plain[:len(img.data)])
    # the credential partitions are there, encrypted (an erased NVS would read all 0xFF)
    assert flash[NVS_ADDRESS:NVS_ADDRESS + NVS_SIZE] != b"\xff" * NVS_SIZE
    assert flash[NVS_KEYS_ADDRESS:NVS_KEYS_ADDRESS + 0x1000] != b"\xff" * 0x1000


def check_virtual(bench: Bench, chip: str, efuse: Path, flash: Path, tmp: Path, *,
                  mac: str | None = None, release: bool = False, via_cli: bool = False) -> None:
    check_provisioned(bench, chip, efuse_summary(chip, efuse, via_cli=via_cli),
                      flash.read_bytes(), mac or MACS[chip], tmp, release=release)


def snapshot(*paths: Path) -> list[bytes | None]:
    """File contents; a missing file and an erased flash file (all 0xFF) compare equal."""
    out: list[bytes | None] = []
    for p in paths:
        data = p.read_bytes() if p.exists() else None
        out.append(None if data is not None and data == b"\xff" * len(data) else data)
    return out


def json_out(r: Result) -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = json.loads(r.out)
    return data


# ---------------------------------------------------------------------------------------
# 1. end to end
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("chip", CHIPS)
def test_provision_blank_chip_gives_the_policy_profile(bench: Bench, cli: Callable[..., Result],
                                                       tmp_path: Path, chip: str) -> None:
    efuse, flash = bench.new_chip(tmp_path, chip)
    r = bench.provision(chip, efuse, flash, json_out=True)
    assert r.code == 0, r.output
    (dev,) = json_out(r)
    assert dev["result"] == "provisioned" and dev["mac"] == MACS[chip]
    check_virtual(bench, chip, efuse, flash, tmp_path, via_cli=True)
    # the KCVs reported (and put in manifests) are those of the spec keys
    spec = bench.spec_key(MACS[chip], "FLASH_ENCRYPTION" if chip == "esp32" else
                          "XTS_AES_128_KEY")
    halves = [spec] if chip == "esp32" else [spec[:16], spec[16:]]
    assert dev["fe_kcv"] == "/".join(kcv(h) for h in halves)
    assert spec.hex() not in r.output and spec[::-1].hex() not in r.output


def kcv(key: bytes) -> str:
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    enc = Cipher(algorithms.AES(key), modes.ECB()).encryptor()  # noqa: S305 - KCV definition
    return (enc.update(bytes(16)) + enc.finalize())[:3].hex()


@pytest.mark.parametrize("chip", ["esp32s3", "esp32"])
def test_release_profile_read_protects_keys_and_locks(bench: Bench, cli: Callable[..., Result],
                                                      tmp_path: Path, chip: str) -> None:
    efuse, flash = bench.new_chip(tmp_path, chip)
    r = bench.provision(chip, efuse, flash, policy=bench.release_policy)
    assert r.code == 0, r.output
    check_virtual(bench, chip, efuse, flash, tmp_path, release=True)
    # a finished release device is recognised even though its key cannot be read back
    before = snapshot(efuse, flash)
    r = bench.provision(chip, efuse, flash, policy=bench.release_policy, json_out=True)
    assert r.code == 0, r.output
    assert json_out(r)[0]["result"] == "already-provisioned"
    assert snapshot(efuse, flash) == before


@pytest.mark.parametrize("count", [2, 8])
def test_station_mode_virtual_devices_and_manifest(bench: Bench, cli: Callable[..., Result],
                                                   tmp_path: Path, count: int) -> None:
    # 8 workers start at once on one SoftHSM token: each must still find it
    macs = [f"7c:df:a1:00:10:{i + 1:02x}" for i in range(count)]
    chips = [bench.new_chip(tmp_path, "esp32s3", f"d{i}", mac=mac) for i, mac in enumerate(macs)]
    manifest = tmp_path / "m.csv"
    devices = [arg for efuse, flash in chips
               for arg in ("--virtual-efuses", efuse, "--virtual-flash", flash)]
    r = bench.subprocess("--policy", bench.policy, "provision", "--chip", "esp32s3", *devices,
                         *bench.image_args("esp32s3"), "--manifest", manifest,
                         audit_log=tmp_path / "audit.jsonl")
    assert r.code == 0, r.output
    for (efuse, flash), mac in zip(chips, macs, strict=True):
        check_virtual(bench, "esp32s3", efuse, flash, tmp_path, mac=mac)
    import csv

    rows = list(csv.DictReader(manifest.open()))
    assert sorted(r["mac"] for r in rows) == macs
    assert all(r["result"] == "provisioned" and r["chip"] == "esp32s3" for r in rows)


def test_station_mode_one_bad_device_fails_alone(bench: Bench, cli: Callable[..., Result],
                                                 tmp_path: Path) -> None:
    good = bench.new_chip(tmp_path, "esp32s3", "good", mac="7c:df:a1:00:11:01")
    bad = bench.new_chip(tmp_path, "esp32", "bad")  # an ESP32 presented as an ESP32-S3
    before = snapshot(*bad)
    args = ["--policy", bench.policy, "provision", "--chip", "esp32s3",
            "--virtual-efuses", good[0], "--virtual-flash", good[1],
            "--virtual-efuses", bad[0], "--virtual-flash", bad[1], *bench.image_args("esp32s3")]
    r = bench.subprocess(*args, audit_log=tmp_path / "audit.jsonl")
    assert r.code == DEVICE_ERROR, r.output
    assert f"1 of 2 device(s) failed; first: {bad[0]}" in r.err
    assert "Traceback" not in r.err
    assert snapshot(*bad) == before
    check_virtual(bench, "esp32s3", *good, tmp_path, mac="7c:df:a1:00:11:01")
    # --debug: the worker's traceback, for a bug report
    r = bench.subprocess("--debug", *args, audit_log=tmp_path / "audit.jsonl")
    assert r.code == DEVICE_ERROR, r.output
    assert "Traceback" in r.err and "hsmflash/device/" in r.err and "wrong chip" in r.err


# ---------------------------------------------------------------------------------------
# 2. re-run and dry run
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("chip", ["esp32s3", "esp32"])
def test_rerun_on_finished_device_changes_nothing(bench: Bench, cli: Callable[..., Result],
                                                  tmp_path: Path, chip: str) -> None:
    efuse, flash = bench.new_chip(tmp_path, chip)
    assert bench.provision(chip, efuse, flash).code == 0
    before = snapshot(efuse, flash)
    r = bench.provision(chip, efuse, flash)
    assert r.code == 0, r.output
    assert "already-provisioned" in r.out
    assert snapshot(efuse, flash) == before
    r = bench.provision(chip, efuse, flash, json_out=True)
    assert r.code == 0 and json_out(r)[0]["burned"] == []
    assert snapshot(efuse, flash) == before


@pytest.mark.parametrize("chip", ["esp32s3", "esp32"])
def test_dry_run_prints_plan_and_touches_nothing(bench: Bench, cli: Callable[..., Result],
                                                 tmp_path: Path, chip: str) -> None:
    efuse, flash = bench.new_chip(tmp_path, chip)
    flash.write_bytes(b"\xff" * 4 * 1024 * 1024)
    before = snapshot(efuse, flash)
    r = bench.provision(chip, efuse, flash, "--dry-run", json_out=True)
    assert r.code == 0, r.output
    assert snapshot(efuse, flash) == before
    (dev,) = json_out(r)
    assert dev["result"] == "planned"
    plan = dev["plan"]
    assert plan["mac"] == MACS[chip] and plan["already_provisioned"] is False
    assert plan["fe_state"] == "burn"
    if chip == "esp32":
        assert plan["fe_blocks"] == [{"block": "BLOCK1", "purpose": None}]
        assert [b["block"] for b in plan["sb_blocks"]] == ["BLOCK2"]
        assert plan["enable"] == {"FLASH_CRYPT_CONFIG": 15, "FLASH_CRYPT_CNT": 1,
                                  "ABS_DONE_0": 1, "JTAG_DISABLE": 1}
        assert [w["address"] for w in plan["flash"]] == ["0x0", "0x8000", "0x10000", "0x9000",
                                                     "0xf000"]
    else:
        assert plan["fe_blocks"] == [{"block": "BLOCK_KEY0", "purpose": "XTS_AES_128_KEY"}]
        assert plan["sb_blocks"][0]["purpose"] == "SECURE_BOOT_DIGEST0"
        assert plan["enable"]["SPI_BOOT_CRYPT_CNT"] == 1
        assert plan["enable"]["SECURE_BOOT_EN"] == 1
        assert [w["address"] for w in plan["flash"]] == ["0x0", "0x8000", "0x10000", "0x9000",
                                                     "0xf000"]
    # nothing of the plan happened: still a blank chip, which a real run then provisions
    summary = efuse_summary(chip, efuse)
    assert raw(summary, "FLASH_CRYPT_CNT" if chip == "esp32" else "SPI_BOOT_CRYPT_CNT") == 0
    # human form: the plan as JSON on stdout
    r = bench.provision(chip, efuse, flash, "--dry-run")
    assert r.code == 0 and json.loads(r.out)["fe_state"] == "burn"
    assert snapshot(efuse, flash) == before


def test_dry_run_does_not_create_the_flash_file(bench: Bench, cli: Callable[..., Result],
                                                tmp_path: Path) -> None:
    efuse, flash = bench.new_chip(tmp_path, "esp32s3")
    before = efuse.read_bytes()
    r = bench.provision("esp32s3", efuse, flash, "--dry-run", json_out=True)
    assert r.code == 0, r.output
    assert efuse.read_bytes() == before
    assert not flash.exists()


# ---------------------------------------------------------------------------------------
# 3. refusals before any eFuse is burned
# ---------------------------------------------------------------------------------------

def _refused(bench: Bench, chip: str, efuse: Path, flash: Path, code: int, *words: str,
             policy: Path | None = None, images: list[str] | None = None) -> Result:
    before = snapshot(efuse, flash)
    r = bench.provision(chip, efuse, flash, policy=policy, images=images)
    assert r.code == code, r.output
    assert snapshot(efuse, flash) == before, "refused, yet the device changed"
    for w in words:
        assert w in r.err.lower(), r.err
    assert len(r.err.strip().splitlines()) >= 1 and "Traceback" not in r.err
    return r


def _other_master_policy(bench: Bench, tmp: Path, *, release: bool) -> Path:
    other = tmp / "other-master.toml"
    other.write_text(policy_text(bench.uniq, release=release, master="fe-master-b"))
    r = run_cli("--policy", other, "keys", "create")
    assert r.code == 0, r.output
    return other


@pytest.mark.parametrize(("chip", "release"), [("esp32s3", False), ("esp32s3", True),
                                               ("esp32c3", False), ("esp32", False),
                                               ("esp32", True)])
def test_device_provisioned_with_another_master_is_refused(
        bench: Bench, cli: Callable[..., Result], tmp_path: Path, chip: str,
        release: bool) -> None:
    policy = bench.release_policy if release else bench.policy
    efuse, flash = bench.new_chip(tmp_path, chip)
    assert bench.provision(chip, efuse, flash, policy=policy).code == 0
    other = _other_master_policy(bench, tmp_path, release=release)
    _refused(bench, chip, efuse, flash, DEVICE_ERROR, "another", policy=other)
    check_virtual(bench, chip, efuse, flash, tmp_path, release=release)  # still intact


def test_device_with_another_secure_boot_digest_is_refused(
        bench: Bench, cli: Callable[..., Result], tmp_path: Path) -> None:
    efuse, flash = bench.new_chip(tmp_path, "esp32s3")
    assert bench.provision("esp32s3", efuse, flash).code == 0
    # same master, another Secure Boot key: the digest in BLOCK_KEY1 contradicts it
    other = tmp_path / "other-sb.toml"
    other.write_text(bench.policy.read_text().replace(f"{bench.uniq}-sb-release",
                                                      f"{bench.uniq}-sb-other"))
    assert run_cli("--policy", other, "keys", "create").code == 0
    args = []
    for img in bench.images["esp32s3"]:
        if not img.signed:  # the partition table
            args += ["--image", f"{img.address:#x}={img.path}"]
            continue
        out = tmp_path / (img.path.name + ".other")
        r = run_cli("--policy", other, "sign", img.path.with_suffix(".bin"), "-o", out, "--key",
                    f"{bench.uniq}-sb-other", "--chip", "esp32s3")
        assert r.code == 0, r.output
        args += ["--image", f"{img.address:#x}={out}"]
    _refused(bench, "esp32s3", efuse, flash, DEVICE_ERROR, "another policy", policy=other,
             images=args)


def test_chip_not_in_policy_is_refused(bench: Bench, cli: Callable[..., Result],
                                       tmp_path: Path) -> None:
    efuse, flash = bench.new_chip(tmp_path, "esp32s2", mac="7c:df:a1:00:20:01", revision="0.0")
    app = tmp_path / "s2-app.bin"
    app.write_bytes(build_app("esp32s2", seed=3))
    _refused(bench, "esp32s2", efuse, flash, REFUSED, "esp32s2",
             images=["--image", f"0x10000={app}"])


def test_revision_outside_policy_is_refused(bench: Bench, cli: Callable[..., Result],
                                            tmp_path: Path) -> None:
    # the FiPy profile covers ESP32 rev0-1 (SBv1); an ECO3 chip is not for it
    policy = tmp_path / "fipy.toml"
    policy.write_text(bench.policy.read_text().replace(
        'harden = ["JTAG_DISABLE"]', 'harden = ["JTAG_DISABLE"]\nrevisions = [0, 1]'))
    efuse, flash = bench.new_chip(tmp_path, "esp32", revision="3.0")
    r = _refused(bench, "esp32", efuse, flash, REFUSED, "v3.0", policy=policy)
    assert "revision" in r.err.lower() or "not covered" in r.err.lower()


def test_flash_file_in_a_missing_directory_is_refused_before_any_burn(
        bench: Bench, cli: Callable[..., Result], tmp_path: Path) -> None:
    efuse, _ = bench.new_chip(tmp_path, "esp32s3")
    flash = tmp_path / "no-such-dir" / "dev.flash"
    _refused(bench, "esp32s3", efuse, flash, BAD_INPUT, "no-such-dir", "does not exist")


def test_manifest_in_a_missing_directory_is_refused_before_any_burn(
        bench: Bench, cli: Callable[..., Result], tmp_path: Path) -> None:
    efuse, flash = bench.new_chip(tmp_path, "esp32s3")
    before = snapshot(efuse, flash)
    r = bench.provision("esp32s3", efuse, flash, "--manifest", tmp_path / "nope" / "m.csv")
    assert r.code == BAD_INPUT, r.output
    assert "nope" in r.err and "does not exist" in r.err
    assert snapshot(efuse, flash) == before


def test_missing_image_is_refused(bench: Bench, cli: Callable[..., Result],
                                  tmp_path: Path) -> None:
    efuse, flash = bench.new_chip(tmp_path, "esp32s3")
    missing = tmp_path / "nowhere" / "app.signed"
    _refused(bench, "esp32s3", efuse, flash, BAD_INPUT, "app.signed",
             images=[*bench.image_args("esp32s3")[:2], "--image", f"0x10000={missing}"])


@pytest.mark.parametrize("chip", ["esp32s3", "esp32"])
def test_unsigned_app_is_refused(bench: Bench, cli: Callable[..., Result], tmp_path: Path,
                                 chip: str) -> None:
    efuse, flash = bench.new_chip(tmp_path, chip)
    app = next(p for p in bench.images[chip] if p.address == APP_ADDRESS).path.with_suffix(".bin")
    args = [*bench.image_args(chip)[:2], "--image", f"0x10000={app}"]
    _refused(bench, chip, efuse, flash, REFUSED, "not signed", images=args)


def test_unsigned_bootloader_is_refused_on_sbv2(bench: Bench, cli: Callable[..., Result],
                                                tmp_path: Path) -> None:
    efuse, flash = bench.new_chip(tmp_path, "esp32s3")
    boot = bench.images["esp32s3"][0].path.with_suffix(".bin")
    args = ["--image", f"0x0={boot}", *bench.image_args("esp32s3")[2:]]
    _refused(bench, "esp32s3", efuse, flash, REFUSED, "not signed", images=args)


def test_app_signed_by_a_key_outside_the_policy_is_refused(
        bench: Bench, cli: Callable[..., Result], tmp_path: Path) -> None:
    efuse, flash = bench.new_chip(tmp_path, "esp32s3")
    stranger = f"{bench.uniq}-stranger"
    assert run_cli("keys", "generate", stranger, "--type", "rsa-3072", "--usage", "sign").code == 0
    app = next(p for p in bench.images["esp32s3"] if p.address == APP_ADDRESS).path
    out = tmp_path / "app.stranger.signed"
    r = run_cli("sign", app.with_suffix(".bin"), "-o", out, "--key", stranger, "--chip",
                "esp32s3")
    assert r.code == 0, r.output
    args = [*bench.image_args("esp32s3")[:2], "--image", f"0x10000={out}"]
    _refused(bench, "esp32s3", efuse, flash, REFUSED, "not signed", images=args)


def test_wrong_chip_type_is_refused(bench: Bench, cli: Callable[..., Result],
                                    tmp_path: Path) -> None:
    # an ESP32 presented as an ESP32-S3. (An ESP32-C3 eFuse file cannot be told from an S3 one:
    # same size, no chip-type field; over a serial port esptool tells, see the serial tests.)
    efuse, flash = bench.new_chip(tmp_path, "esp32")
    _refused(bench, "esp32s3", efuse, flash, DEVICE_ERROR, "esp32")
    assert efuse_summary("esp32", efuse)["MAC"]["value"].startswith(MACS["esp32"])


@pytest.mark.parametrize("mac", ["00:00:00:00:00:00", "ff:ff:ff:ff:ff:ff", "01:00:5e:00:00:01"])
def test_chip_without_unique_mac_is_refused(bench: Bench, cli: Callable[..., Result],
                                            tmp_path: Path, mac: str) -> None:
    efuse, flash = bench.new_chip(tmp_path, "esp32s3", mac=mac)
    _refused(bench, "esp32s3", efuse, flash, DEVICE_ERROR, "mac")


def test_refusals_leave_no_trace_of_key_use(bench: Bench, cli: Callable[..., Result],
                                            tmp_path: Path, token_env: dict[str, str]) -> None:
    """A refusal before the device is touched exports no key (audit: no burn, no encrypt)."""
    efuse, flash = bench.new_chip(tmp_path, "esp32s3", mac="00:00:00:00:00:00")
    _refused(bench, "esp32s3", efuse, flash, DEVICE_ERROR)
    log = Path(token_env["HSMFLASH_AUDIT_LOG"])
    ops = [json.loads(line)["op"] for line in log.read_text().splitlines()] if log.exists() \
        else []
    assert not [op for op in ops if op.startswith(("provision.burn", "provision.write",
                                                   "provision.encrypt"))]


def test_audit_log_records_every_provisioning_step(bench: Bench, cli: Callable[..., Result],
                                                   tmp_path: Path,
                                                   token_env: dict[str, str]) -> None:
    efuse, flash = bench.new_chip(tmp_path, "esp32s3")
    assert bench.provision("esp32s3", efuse, flash).code == 0
    log = Path(token_env["HSMFLASH_AUDIT_LOG"])
    pem = tmp_path / "audit.pem"
    assert run_cli("keys", "public", "audit", "-o", pem).code == 0
    r = run_cli("--json", "audit", "verify", log, "--pubkey", pem)
    assert r.code == 0, r.output
    assert json.loads(r.out)["interrupted"] == []
    records = [json.loads(line) for line in log.read_text().splitlines()]
    ops = {(x["op"], x["phase"]) for x in records}
    for op in ("plan", "burn-keys", "encrypt", "write-flash", "enable"):
        assert (f"provision.{op}", "intent") in ops and (f"provision.{op}", "ok") in ops, op
    burn = next(x for x in records if x["op"] == "provision.burn-keys" and x["phase"] == "ok")
    exported = burn["detail"]["exported"]
    assert exported[0]["purpose"] == "XTS_AES_128_KEY"
    spec = bench.spec_key(MACS["esp32s3"], "XTS_AES_128_KEY")
    assert exported[0]["kcv"] == f"{kcv(spec[:16])}/{kcv(spec[16:])}"
    text = log.read_text()
    assert spec.hex() not in text and spec[::-1].hex() not in text
    assert hashlib.sha256(bench.master).hexdigest() not in text


def test_two_secure_boot_keys_burn_both_digests(bench: Bench, cli: Callable[..., Result],
                                                tmp_path: Path) -> None:
    """ESP32-C6 under dev.toml trusts two Secure Boot V2 keys (RSA and ECDSA): both digests are
    burned, each in its own slot, as espsecure computes them; a re-run burns nothing."""
    chip = "esp32c6"
    pems = {}
    for name in ("sb-release", "sb-ecdsa"):
        pems[name] = tmp_path / f"{name}.pem"
        assert bench.cli("keys", "public", f"{bench.uniq}-{name}", "-o", pems[name]).code == 0
    args = []
    for path, address, data in ((tmp_path / "boot.bin", 0x0, build_bootloader(chip, seed=5)),
                                (tmp_path / "app.bin", APP_ADDRESS, build_app(chip, seed=6))):
        path.write_bytes(data)
        signed = path.with_suffix(".signed")
        r = bench.cli("--policy", bench.policy, "sign", path, "-o", signed,
                      "--key", f"{bench.uniq}-sb-ecdsa", "--chip", chip)
        assert r.code == 0, r.output
        args += ["--image", f"{address:#x}={signed}"]
    table = bench.images["esp32s3"][1]  # the same partition table
    assert table.address == TABLE_ADDRESS
    args += ["--image", f"{TABLE_ADDRESS:#x}={table.path}"]
    efuse, flash = bench.new_chip(tmp_path, chip, mac="60:55:f9:00:00:06", revision="0.1")
    r = bench.provision(chip, efuse, flash, images=args)
    assert r.code == 0, r.output
    summary = efuse_summary(chip, efuse)
    assert summary["KEY_PURPOSE_1"]["value"] == "SECURE_BOOT_DIGEST0"
    assert summary["KEY_PURPOSE_2"]["value"] == "SECURE_BOOT_DIGEST1"
    assert block_bytes(summary, "BLOCK_KEY1") == sbv2_digest(pems["sb-release"], tmp_path)
    assert block_bytes(summary, "BLOCK_KEY2") == sbv2_digest(pems["sb-ecdsa"], tmp_path)
    before = efuse.read_bytes()
    r = bench.provision(chip, efuse, flash, images=args, json_out=True)
    assert r.code == 0, r.output
    assert json_out(r)[0]["result"] == "already-provisioned"
    assert efuse.read_bytes() == before
