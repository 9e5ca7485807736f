"""Nothing irreversible until every input is proven (issue 11a).

Under the shipped production policies (policies/esp32s3-production.toml and the FiPy one, with
the session token's label and this module's key names), every bad input below is refused with
one clear line and a non-zero exit, and the virtual eFuse file and flash file stay
byte-identical. Real SoftHSM2 token, espefuse's virtual eFuses, images built with esptool's
image classes and signed through the token.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from test_provision import _env, snapshot

from conftest import ROOT, TOKEN_LABEL, USER_PIN, Result, run_cli
from hsmflash.formats.partitions import TYPE_APP, TYPE_DATA, Partition, build, default_layout
from imagebuilder import build_app, build_bootloader

BAD_INPUT, REFUSED, DEVICE_ERROR = 3, 5, 7
S3_MAC, FIPY_MAC = "7c:df:a1:00:77:01", "24:0a:c4:00:77:02"


def production_policy(name: str, uniq: str, extra: str = "") -> str:
    """A shipped production policy on the session token, key names made unique (the token is
    shared by the whole session; `audit` stays the session's audit key)."""
    text = (ROOT / "policies" / f"{name}.toml").read_text()
    for label in ("s3-release", "fipy-release"):
        text = text.replace(f'label = "{label}"', f'label = "{TOKEN_LABEL}"')
    for key in ("s3-sbv2-release", "s3-fe-master", "fipy-sbv1-app", "fipy-fe-master"):
        text = text.replace(f'"{key}"', f'"{uniq}-{key}"').replace(f"[keys.{key}]",
                                                                   f"[keys.{uniq}-{key}]")
    return text + extra


@dataclass
class Setup:
    dir: Path
    uniq: str
    env: dict[str, str]
    policies: dict[str, Path] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)
    blanks: dict[str, bytes] = field(default_factory=dict)

    def cli(self, *args: str | Path) -> Result:
        with _env(self.env):
            return run_cli(*args)

    def chip(self, tmp: Path, chip: str) -> tuple[Path, Path]:
        efuse, flash = tmp / f"{chip}.efuse", tmp / f"{chip}.flash"
        efuse.write_bytes(self.blanks[chip])
        flash.write_bytes(b"\xff" * 4 * 1024 * 1024)  # an erased flash, so a write would show
        return efuse, flash


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    tmp = tmp_path_factory.mktemp("refusals")
    uniq = "t" + uuid.uuid4().hex[:10]
    s = Setup(tmp, uniq, {"HSMFLASH_TOKEN": TOKEN_LABEL, "HSMFLASH_PIN": USER_PIN,
                          "HSMFLASH_AUDIT_LOG": str(tmp / "audit.jsonl")})
    for name in ("esp32s3-production", "esp32-fipy-production"):
        path = tmp / f"{name}.toml"
        path.write_text(production_policy(name, uniq))
        s.policies[name] = path
        r = s.cli("--policy", path, "keys", "create")
        assert r.code == 0, r.output
    s3, fipy = s.policies["esp32s3-production"], s.policies["esp32-fipy-production"]
    for key, kind in ((f"{uniq}-stranger-rsa", "rsa-3072"), (f"{uniq}-stranger-ec", "ec-p256")):
        assert s.cli("keys", "generate", key, "--type", kind, "--usage", "sign").code == 0
    raw = {"s3-boot.bin": build_bootloader("esp32s3", seed=21),
           "s3-app.bin": build_app("esp32s3", 60 * 1024, seed=22),
           "fipy-boot.bin": build_bootloader("esp32", seed=23),
           "fipy-app.bin": build_app("esp32", 60 * 1024, seed=24),
           # random bytes, though never the 1-in-256 that start with the ESP image magic 0xE9
           "random.bin": b"\x5a" + os.urandom(24 * 1024 - 1),
           "e8.bin": b"\xe8" + build_app("esp32s3", 60 * 1024, seed=22)[1:],
           "e8-fipy.bin": b"\xe8" + build_app("esp32", 60 * 1024, seed=24)[1:],
           "table.bin": build(default_layout()),
           "data.bin": os.urandom(0x1000),
           "big-boot.bin": build_bootloader("esp32s3", 36 * 1024, seed=25)}
    for name, data in raw.items():
        (tmp / name).write_bytes(data)
        s.files[name] = tmp / name
    signings = [("s3-boot", "s3-boot.bin", s3, f"{uniq}-s3-sbv2-release", "esp32s3"),
                ("s3-app", "s3-app.bin", s3, f"{uniq}-s3-sbv2-release", "esp32s3"),
                ("s3-app-stranger", "s3-app.bin", None, f"{uniq}-stranger-rsa", "esp32s3"),
                ("fipy-app", "fipy-app.bin", fipy, f"{uniq}-fipy-sbv1-app", "esp32"),
                ("fipy-app-stranger", "fipy-app.bin", None, f"{uniq}-stranger-ec", "esp32")]
    for out_name, src, policy, key, chip in signings:
        out = tmp / f"{out_name}.signed"
        scheme = ["--scheme", "sbv1"] if chip == "esp32" else []
        args = ["sign", s.files[src], "-o", out, "--key", key, "--chip", chip, *scheme]
        r = s.cli(*(["--policy", policy] if policy else []), *args)
        assert r.code == 0, r.output
        s.files[out_name] = out
    for chip, mac, rev in (("esp32s3", S3_MAC, "0.2"), ("esp32", FIPY_MAC, "1.0")):
        efuse = tmp / f"blank-{chip}.efuse"
        r = s.cli("virtual", "create", "--chip", chip, "--mac", mac, "--efuse-file", efuse,
                  "--revision", rev)
        assert r.code == 0, r.output
        s.blanks[chip] = efuse.read_bytes()
    return s


def _provision(s: Setup, tmp: Path, chip: str, policy: Path, images: list[str],
               code: int, *words: str) -> Result:
    efuse, flash = s.chip(tmp, chip)
    before = snapshot(efuse, flash)
    args: list[str | Path] = ["--policy", policy, "provision", "--chip", chip,
                              "--virtual-efuses", efuse, "--virtual-flash", flash]
    for image in images:
        args += ["--image", image]
    r = s.cli(*args)
    assert r.code == code, r.output
    assert snapshot(efuse, flash) == before, "refused, yet the device changed"
    lines = [line for line in r.err.strip().splitlines() if not line.startswith("[")]
    assert len(lines) == 1 and "Traceback" not in r.err, r.err  # one clear line
    for w in words:
        assert w in lines[0], lines[0]
    return r


def _s3(s: Setup, boot: str = "s3-boot", app: str = "s3-app") -> list[str]:
    return [f"0x0={s.files[boot]}", f"0x10000={s.files[app]}"]


def _fipy(s: Setup, boot: str = "fipy-boot.bin", app: str = "fipy-app") -> list[str]:
    return [f"0x1000={s.files[boot]}", f"0x10000={s.files[app]}"]


S3_CASES = {
    "random bytes as bootloader": (lambda s: _s3(s, boot="random.bin"), BAD_INPUT,
                                   "not an ESP image"),
    "0xE8 blob as app": (lambda s: _s3(s, app="e8.bin"), BAD_INPUT, "not an ESP app image"),
    "app signed by a key the policy does not name": (
        lambda s: _s3(s, app="s3-app-stranger"), REFUSED, "not signed"),
    "valid unsigned app": (lambda s: _s3(s, app="s3-app.bin"), REFUSED, "not signed"),
    "valid unsigned bootloader": (lambda s: _s3(s, boot="s3-boot.bin"), REFUSED, "not signed"),
    "app image as bootloader": (lambda s: [f"0x0={s.files['s3-app']}"], BAD_INPUT,
                                "a bootloader belongs there"),
    "bootloader image as app": (lambda s: [f"0x10000={s.files['s3-boot']}"], BAD_INPUT,
                                "a app belongs there"),
    "bootloader running into the table": (lambda s: _s3(s, boot="big-boot.bin"), BAD_INPUT,
                                          "runs into the partition table"),
    "negative address": (lambda s: [*_s3(s)[:1], f"-0x10000={s.files['s3-app']}"], BAD_INPUT,
                         "negative"),
    "overlapping images": (lambda s: [*_s3(s), f"0x18000={s.files['s3-app']}"], BAD_INPUT,
                           "overlap"),
    "outside the flash": (lambda s: [*_s3(s)[:1], f"0x400000={s.files['s3-app']}"], BAD_INPUT,
                          "runs past the end"),
    "data between bootloader and table": (lambda s: [*_s3(s), f"0x5000={s.files['data.bin']}"],
                                          BAD_INPUT, "0x5000"),
    "data without a partition table": (lambda s: [*_s3(s), f"0x200000={s.files['data.bin']}"],
                                       BAD_INPUT, "no partition table"),
    "data outside every partition": (
        lambda s: [*_s3(s), f"0x8000={s.files['table.bin']}",
                   f"0x3ff000={s.files['data.bin']}"], BAD_INPUT, "outside every partition"),
    "data into an unencrypted partition": (
        lambda s: [*_s3(s), f"0x8000={s.files['table.bin']}", f"0x9000={s.files['data.bin']}"],
        BAD_INPUT, "not flagged encrypted"),
    "random bytes as partition table": (
        lambda s: [*_s3(s), f"0x8000={s.files['data.bin']}"], BAD_INPUT, "partition table"),
}


@pytest.mark.parametrize("case", list(S3_CASES))
def test_s3_production_refuses_before_any_burn(setup: Setup, tmp_path: Path, case: str) -> None:
    images, code, words = S3_CASES[case]
    _provision(setup, tmp_path, "esp32s3", setup.policies["esp32s3-production"],
               images(setup), code, words)


FIPY_CASES = {
    "random bytes as bootloader": (lambda s: _fipy(s, boot="random.bin"), BAD_INPUT,
                                   "not an ESP image"),
    "0xE8 blob as app": (lambda s: _fipy(s, app="e8-fipy.bin"), BAD_INPUT,
                         "not an ESP app image"),
    "app signed by a key the policy does not name": (
        lambda s: _fipy(s, app="fipy-app-stranger"), REFUSED, "not signed"),
    "valid unsigned app": (lambda s: _fipy(s, app="fipy-app.bin"), REFUSED, "not signed"),
    "negative address": (lambda s: [*_fipy(s)[:1], f"-0x10000={s.files['fipy-app']}"],
                         BAD_INPUT, "negative"),
    "outside the flash": (lambda s: [*_fipy(s)[:1], f"0x400000={s.files['fipy-app']}"],
                          BAD_INPUT, "runs past the end"),
    "overlapping images": (lambda s: [*_fipy(s), f"0x18000={s.files['fipy-app']}"], BAD_INPUT,
                           "overlap"),
}


@pytest.mark.parametrize("case", list(FIPY_CASES))
def test_fipy_production_refuses_before_any_burn(setup: Setup, tmp_path: Path,
                                                 case: str) -> None:
    images, code, words = FIPY_CASES[case]
    _provision(setup, tmp_path, "esp32", setup.policies["esp32-fipy-production"],
               images(setup), code, words)


@pytest.mark.parametrize(("name", "chip", "entry", "words"), [
    ("esp32s3-production", "esp32s3", '"SOFT_DIS_JTAG=9"', "does not fit"),
    ("esp32s3-production", "esp32s3", '"DIS_PAD_JTAG=2"', "does not fit"),
    ("esp32s3-production", "esp32s3", '"DIS_PAD_JTAG=0"', "does not fit"),
    ("esp32s3-production", "esp32s3", '"SPI_BOOT_CRYPT_CNT=1"', "burned by the plan"),
    ("esp32-fipy-production", "esp32", '"JTAG_DISABLE=3"', "does not fit"),
])
def test_bad_hardening_value_is_refused(setup: Setup, tmp_path: Path, name: str, chip: str,
                                        entry: str, words: str) -> None:
    text = setup.policies[name].read_text()
    first = '"DIS_PAD_JTAG",' if chip == "esp32s3" else '"DISABLE_DL_ENCRYPT",'
    assert first in text
    bad = tmp_path / "bad-harden.toml"
    bad.write_text(text.replace(first, f"{entry},", 1))
    r = run_cli("policy", "check", bad)  # the policy's own check catches it
    assert r.code == BAD_INPUT and f"chips.{chip}.harden" in r.err and words in r.err, r.output
    images = _s3(setup) if chip == "esp32s3" else _fipy(setup)
    _provision(setup, tmp_path, chip, bad, images, BAD_INPUT, words)


CREDENTIALS = textwrap.dedent("""
    [keys.{uniq}-cred]
    type = "aes-256"
    usage = ["derive"]
    [keys.{uniq}-revocation]
    type = "ec-p256"
    usage = ["sign"]
    [credentials]
    master = "{uniq}-cred"
    revocation_key = "{uniq}-revocation"
    nvs_address = 0x9000
    nvs_size = 0x6000
    nvs_keys_address = 0xF000
""")


def test_image_over_the_nvs_region_is_refused(setup: Setup, tmp_path: Path) -> None:
    text = production_policy("esp32s3-production", setup.uniq,
                             CREDENTIALS.format(uniq=setup.uniq))
    text = text.replace("decrypt = false", "decrypt = false\ndevice_secrets = true")
    policy = tmp_path / "with-nvs.toml"
    policy.write_text(text)
    assert setup.cli("--policy", policy, "keys", "create").code == 0
    table = tmp_path / "table-nvs.bin"
    table.write_bytes(build([Partition("nvs", TYPE_DATA, 2, 0x9000, 0x6000, False),
                             Partition("nvs_keys", TYPE_DATA, 4, 0xF000, 0x1000, True),
                             Partition("factory", TYPE_APP, 0, 0x10000, 0x1F0000, False)]))
    _provision(setup, tmp_path, "esp32s3", policy,
               [*_s3(setup), f"0xa000={setup.files['data.bin']}"], BAD_INPUT,
               "overlaps the nvs (credentials) region")
    _provision(setup, tmp_path, "esp32s3", policy,
               [*_s3(setup), f"0xf000={setup.files['data.bin']}"], BAD_INPUT, "nvs_keys")
    # a table in the plan must put nvs where the policy writes it
    moved = tmp_path / "table-moved.bin"
    moved.write_bytes(build([Partition("nvs", TYPE_DATA, 2, 0x11000, 0x6000, False),
                             Partition("factory", TYPE_APP, 0, 0x20000, 0x1E0000, False)]))
    _provision(setup, tmp_path, "esp32s3", policy, [*_s3(setup)[:1], f"0x8000={moved}",
                                                     f"0x20000={setup.files['s3-app']}"],
               BAD_INPUT, "no nvs partition at 0x9000")


def test_valid_images_still_provision_under_production(setup: Setup, tmp_path: Path) -> None:
    """The refusals above are not everything refused: signed images and a valid table pass."""
    efuse, flash = setup.chip(tmp_path, "esp32s3")
    r = setup.cli("--json", "--policy", setup.policies["esp32s3-production"], "provision",
                  "--chip", "esp32s3", "--virtual-efuses", efuse, "--virtual-flash", flash,
                  "--dry-run", *[a for i in [*_s3(setup), f"0x8000={setup.files['table.bin']}"]
                                 for a in ("--image", i)])
    assert r.code == 0, r.output
    assert json.loads(r.out)[0]["result"] == "planned"


def test_token_other_than_the_policys_is_refused(setup: Setup, tmp_path: Path) -> None:
    policy = setup.policies["esp32s3-production"]
    efuse, flash = setup.chip(tmp_path, "esp32s3")
    before = snapshot(efuse, flash)
    args = ["--policy", policy, "provision", "--chip", "esp32s3", "--virtual-efuses", efuse,
            "--virtual-flash", flash, *[a for i in _s3(setup) for a in ("--image", i)]]
    r = setup.cli("--token", "someone-elses-token", *args)
    assert r.code == REFUSED and "someone-elses-token" in r.err and "allow_other_token" in r.err
    assert snapshot(efuse, flash) == before
    # the policy can say otherwise, by name
    lax = tmp_path / "lax.toml"
    lax.write_text(policy.read_text().replace(f'label = "{TOKEN_LABEL}"',
                                              f'label = "{TOKEN_LABEL}"\nallow_other_token = true'))
    r = setup.cli("--token", "someone-elses-token", "--policy", lax, "keys", "list")
    assert r.code == 4 and "someone-elses-token" in r.err, r.output  # then: no such token


def test_a_device_in_use_by_another_process_is_refused(setup: Setup, tmp_path: Path) -> None:
    efuse, flash = setup.chip(tmp_path, "esp32s3")
    before = snapshot(efuse, flash)
    lock = efuse.with_name(efuse.name + ".lock")
    holder = subprocess.Popen(  # another process provisioning this chip holds its lock
        [sys.executable, "-c", "import fcntl,sys,time\nf=open(sys.argv[1],'a')\n"
         "fcntl.flock(f,fcntl.LOCK_EX)\nprint('held',flush=True)\ntime.sleep(60)", str(lock)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        audit = tmp_path / "audit.jsonl"
        r = setup.cli("--audit-log", audit, "--policy", setup.policies["esp32s3-production"],
                      "provision", "--chip", "esp32s3", "--virtual-efuses", efuse,
                      "--virtual-flash", flash, *[a for i in _s3(setup) for a in ("--image", i)])
    finally:
        holder.kill()
        holder.wait()
    assert r.code == DEVICE_ERROR and "in use by another hsmflash process" in r.err, r.output
    assert snapshot(efuse, flash) == before
    ops = [json.loads(x)["op"] for x in audit.read_text().splitlines()] if audit.exists() else []
    assert not [op for op in ops if op.startswith("provision.")], ops  # nothing audited


def test_a_development_profile_allows_unsigned_images_only_by_name(setup: Setup,
                                                                  tmp_path: Path) -> None:
    text = setup.policies["esp32s3-production"].read_text().replace(
        "release_mode = true", 'release_mode = false\nunsigned_images = ["app"]', 1)
    dev = tmp_path / "dev-unsigned.toml"
    dev.write_text(text)
    efuse, flash = setup.chip(tmp_path, "esp32s3")
    r = setup.cli("--json", "--policy", dev, "provision", "--chip", "esp32s3", "--dry-run",
                  "--virtual-efuses", efuse, "--virtual-flash", flash,
                  *[a for i in _s3(setup, app="s3-app.bin") for a in ("--image", i)])
    assert r.code == 0, r.output
    # the bootloader is not named: still refused; a signature that fails is never waved through
    _provision(setup, tmp_path, "esp32s3", dev, _s3(setup, boot="s3-boot.bin"), REFUSED,
               "not signed")
    _provision(setup, tmp_path, "esp32s3", dev, _s3(setup, app="s3-app-stranger"), REFUSED,
               "not signed")


def test_key_names_are_checked(setup: Setup) -> None:
    for name in ("bad/name", "x.k1", "a" * 65, "_lead", "sp ace"):
        r = setup.cli("keys", "generate", name, "--type", "aes-256", "--usage", "derive")
        assert r.code == BAD_INPUT and "key name" in r.err, r.output


def test_credentials_issue_uses_only_the_policys_master(setup: Setup, tmp_path: Path) -> None:
    text = production_policy("esp32s3-production", setup.uniq,
                             CREDENTIALS.format(uniq=setup.uniq))
    policy = tmp_path / "creds.toml"
    policy.write_text(text.replace("decrypt = false", "decrypt = false\ndevice_secrets = true"))
    assert setup.cli("--policy", policy, "keys", "create").code == 0
    out = tmp_path / "nvs.bin"
    r = setup.cli("--policy", policy, "credentials", "issue", "--device", S3_MAC, "--chip",
                  "esp32s3", "--nvs-out", out, "--nvs-keys-out", tmp_path / "k.bin",
                  "--master", f"{setup.uniq}-s3-fe-master")
    assert r.code == REFUSED and "credentials master" in r.err, r.output
    assert not out.exists()


P4_POLICY = """
[token]
label = "{label}"
[keys.{u}-p4-sb]
type = "ec-p384"
usage = ["sign"]
[keys.{u}-p4-fe]
type = "aes-256"
usage = ["derive"]
[keys.audit]
type = "ec-p256"
usage = ["sign"]
[chips.esp32p4]
flash_encryption = "xts-aes-128"
secure_boot = {{ scheme = "sbv2", keys = ["{u}-p4-sb"], allow_insecure_ecdsa = true }}
derive = {{ master = "{u}-p4-fe" }}
revisions = [3]
readable_keys = true
release_mode = false
[export]
efuse_burn = true
"""


def test_p384_secure_boot_burns_sha384_en_and_needs_p4_v3(setup: Setup, tmp_path: Path) -> None:
    from test_provision import efuse_summary, raw

    policy = tmp_path / "p4.toml"
    policy.write_text(P4_POLICY.format(label=TOKEN_LABEL, u=setup.uniq))
    assert setup.cli("--policy", policy, "keys", "create").code == 0
    images = []
    # the P4 bootloader sits at 0x2000: it must end before the table at 0x8000
    for name, data, address in (
            ("p4-boot", build_bootloader("esp32p4", 16 * 1024, seed=31), 0x2000),
            ("p4-app", build_app("esp32p4", 60 * 1024, seed=32), 0x10000)):
        src, out = tmp_path / f"{name}.bin", tmp_path / f"{name}.signed"
        src.write_bytes(data)
        r = setup.cli("--policy", policy, "sign", src, "-o", out, "--key",
                      f"{setup.uniq}-p4-sb", "--chip", "esp32p4")
        assert r.code == 0, r.output
        images += ["--image", f"{address:#x}={out}"]
    for rev, code in (("1.0", REFUSED), ("3.0", 0)):
        efuse, flash = tmp_path / f"p4-{rev}.efuse", tmp_path / f"p4-{rev}.flash"
        r = setup.cli("virtual", "create", "--chip", "esp32p4", "--mac", "60:55:f9:00:77:03",
                      "--efuse-file", efuse, "--revision", rev)
        assert r.code == 0, r.output
        before = snapshot(efuse, flash)
        r = setup.cli("--policy", policy, "provision", "--chip", "esp32p4", "--virtual-efuses",
                      efuse, "--virtual-flash", flash, *images)
        assert r.code == code, r.output
        if code:
            assert snapshot(efuse, flash) == before and "v1.0" in r.err
            continue
        summary = efuse_summary("esp32p4", efuse)
        assert raw(summary, "SECURE_BOOT_EN") == 1
        assert raw(summary, "SECURE_BOOT_SHA384_EN") == 1  # else the ROM rejects P-384 blocks


def test_exports_the_plan_needs_are_checked_before_any_burn(setup: Setup,
                                                            tmp_path: Path) -> None:
    # ESP32 classic on SoftHSM (no CKM_XOR_BASE_AND_DATA) exports K_D to memory to encrypt
    fipy = tmp_path / "fipy-no-transient.toml"
    fipy.write_text(setup.policies["esp32-fipy-production"].read_text().replace(
        "esp32_classic_transient = true", "esp32_classic_transient = false"))
    _provision(setup, tmp_path, "esp32", fipy, _fipy(setup), REFUSED,
               "esp32_classic_transient")
    # credentials written by provisioning leave the token into the device
    text = production_policy("esp32s3-production", setup.uniq,
                             CREDENTIALS.format(uniq=setup.uniq))
    creds = tmp_path / "creds-no-secrets.toml"
    creds.write_text(text)
    assert setup.cli("--policy", creds, "keys", "create").code == 0
    _provision(setup, tmp_path, "esp32s3", creds, _s3(setup), REFUSED, "device_secrets")
