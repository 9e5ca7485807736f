"""The token matrix: hsmflash on every PKCS#11 token Debian ships, each brought up for real by
`tokens/*.sh` (SoftHSM2 is the session token from conftest).

Each token runs the same focused journey through the real CLI (a subprocess per command: every
token has its own module and environment): probe, keys for a policy the token can satisfy,
signatures verified by espsecure, XTS equal to espsecure, per-device derivation, Espressif's
ESP32-classic vectors through the XOR path, and the audit log verified with the public key and
against the token. A path a token cannot do is skipped naming the missing capability, after
checking that hsmflash refuses it with a message naming that capability. A token that cannot be
brought up FAILS the run (CI installs all of them).

`EXPECTED` is the "tested tokens" table of docs/tokens.md: the profile must match it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import espsecure
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from conftest import ROOT, TOKEN_LABEL, USER_PIN
from imagebuilder import build_app

pytestmark = pytest.mark.tokens
VECTORS = ROOT / "tests" / "vectors" / "esp32-flashcrypt"
TOKENS = ("softhsm", "nss", "opencryptoki", "tpm2", "p11kit-remote")
CAPS = ("aes_generate", "aes_import", "in_token_xts", "in_token_derivation", "xor_derivation",
        "rsa_3072_generate", "rsa_pss", "ec_p256_generate", "ecdsa_p256", "ec_p384_generate",
        "ecdsa_p384", "data_objects")


def _row(*missing: str) -> dict[str, bool]:
    return {c: c not in missing for c in CAPS}


_NO_AES = ("aes_generate", "aes_import", "in_token_xts", "in_token_derivation", "xor_derivation")
EXPECTED: dict[str, dict[str, bool]] = {
    "softhsm": _row("xor_derivation"),
    "nss": _row("data_objects"),
    "opencryptoki": _row("in_token_derivation", "xor_derivation", "ec_p256_generate",
                         "ecdsa_p256", "ec_p384_generate", "ecdsa_p384"),
    "tpm2": _row(*_NO_AES),
    "p11kit-remote": _row("in_token_derivation", "xor_derivation"),
}
HSMFLASH = Path(sys.executable).with_name("hsmflash")


@dataclass
class Token:
    name: str
    env: dict[str, str]
    workdir: Path
    audit_log: Path
    caps: dict[str, bool] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)  # key type -> key name in the token

    def run(self, *args: object, policy: Path | None = None) -> subprocess.CompletedProcess[str]:
        argv = [str(HSMFLASH)]
        if policy is not None:
            argv += ["--policy", str(policy)]
        argv += [str(a) for a in args]
        return subprocess.run(argv, env=self.env, capture_output=True, text=True,
                              timeout=300, check=False)

    def ok(self, *args: object, policy: Path | None = None) -> str:
        r = self.run(*args, policy=policy)
        assert r.returncode == 0, f"{self.name}: hsmflash {args}: {r.stdout}{r.stderr}"
        return r.stdout

    def need(self, *caps: str) -> None:
        missing = [c for c in caps if not self.caps.get(c)]
        if missing:
            pytest.skip(f"{self.name}: missing capability {', '.join(missing)}")


def _script_env(script: str, state: Path) -> dict[str, str]:
    r = subprocess.run(["bash", str(ROOT / "tokens" / script), "start", str(state)],
                       capture_output=True, text=True, timeout=600, check=False)
    if r.returncode != 0:
        pytest.fail(f"tokens/{script} start failed (exit {r.returncode}): {r.stderr[-2000:]}",
                    pytrace=False)
    return dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)


_SCRIPTS = {"nss": "nss.sh", "opencryptoki": "opencryptoki.sh", "tpm2": "tpm2.sh",
            "p11kit-remote": "p11kit-remote.sh"}


@pytest.fixture(scope="session", params=TOKENS)
def token(request: pytest.FixtureRequest) -> Iterator[Token]:
    name = request.param
    work = Path(tempfile.mkdtemp(prefix=f"hsmflash-{name}-"))
    base = {k: v for k, v in os.environ.items() if not k.startswith("HSMFLASH_")}
    base["XDG_CACHE_HOME"] = str(work / "cache")
    script = _SCRIPTS.get(name)
    try:
        if script is None:
            env = {**base, "HSMFLASH_TOKEN": TOKEN_LABEL, "HSMFLASH_PIN": USER_PIN}
        else:
            env = {**base, **_script_env(script, work / "state")}
        tok = Token(name, {**env, "HSMFLASH_AUDIT_LOG": str(work / "audit.jsonl")}, work,
                    work / "audit.jsonl")
        info = json.loads(tok.ok("--json", "token", "info"))
        assert info["capabilities"] is not None, f"{name}: token info did not probe"
        tok.caps = {c: bool(v["ok"]) for c, v in info["capabilities"].items()}
        yield tok
    finally:
        if script is not None:
            subprocess.run(["bash", str(ROOT / "tokens" / script), "stop",
                            str(work / "state")], capture_output=True, timeout=120, check=False)
        shutil.rmtree(work, ignore_errors=True)


def _aes_ecb(key: bytes, data: bytes) -> bytes:
    enc = Cipher(algorithms.AES(key), modes.ECB()).encryptor()  # noqa: S305 - reference
    return enc.update(data) + enc.finalize()


def _kcv(key: bytes) -> str:
    return _aes_ecb(key, bytes(16))[:3].hex()


def _espsecure_crypt(key: bytes, data: bytes, address: int, *, xts: bool,
                     crypt_config: int = 0xF) -> bytes:
    out = io.BytesIO()
    espsecure.encrypt_flash_data(io.BytesIO(key), out, address, crypt_config, xts,
                                 io.BytesIO(data))
    return out.getvalue()


def _write_policy(tok: Token, keys: dict[str, tuple[str, str]], extra: str = "") -> Path:
    lines = ['name = "matrix"', "[token]", f'label = "{tok.env["HSMFLASH_TOKEN"]}"']
    for key_name, (key_type, usage) in keys.items():
        lines += [f'[keys."{key_name}"]', f'type = "{key_type}"', f'usage = ["{usage}"]']
    path = tok.workdir / f"policy-{uuid.uuid4().hex[:6]}.toml"
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


# -- the journey, in order, per token ------------------------------------------------------------

def test_profile_matches_the_tested_tokens_table(token: Token) -> None:
    assert token.caps == EXPECTED[token.name]
    info = json.loads(token.ok("--json", "token", "info"))
    assert info["profile"]["cached"], "the second `token info` must use the cached profile"
    want_key = "ec-p256" if token.caps["ec_p256_generate"] else "rsa-3072"
    assert info["audit"]["key_type"] == want_key
    assert info["audit"]["head_store"] == ("data-object" if token.caps["data_objects"]
                                           else "key-id")
    # probing again leaves nothing behind in the token
    before = token.ok("--json", "keys", "list")
    fresh = json.loads(token.ok("--json", "token", "info", "--refresh"))
    assert not fresh["profile"]["cached"]
    assert {c: v["ok"] for c, v in fresh["capabilities"].items()} == EXPECTED[token.name]
    assert token.ok("--json", "keys", "list") == before
    assert "hsmflash-probe" not in before


def test_keys_create_for_what_the_token_can_do(token: Token) -> None:
    tag = uuid.uuid4().hex[:6]
    wanted = {"rsa-3072": "rsa_3072_generate", "ec-p256": "ec_p256_generate",
              "ec-p384": "ec_p384_generate", "aes-256": "aes_generate",
              "xts-aes-128": "aes_generate"}
    usage = {"aes-256": "derive", "xts-aes-128": "encrypt"}
    keys = {f"mx{tag}-{t}": (t, usage.get(t, "sign")) for t, cap in wanted.items()
            if token.caps[cap]}
    policy = _write_policy(token, keys)
    token.ok("keys", "create", policy=policy)
    listed = {k["name"]: k for k in json.loads(token.ok("--json", "keys", "list"))}
    for key_name, (key_type, key_usage) in keys.items():
        k = listed[key_name]
        assert (k["type"], k["usage"], k["sensitive"], k["extractable"]) == (
            key_type, [key_usage], True, False), k
        token.keys[key_type] = key_name
        if key_type == "xts-aes-128":  # both halves present (NSS merged same-ID objects)
            assert len(k["kcv"].split("/")) == 2
            assert "?" not in k["kcv"] and k["kcv"].split("/")[0] != k["kcv"].split("/")[1]
    assert token.run("keys", "create", policy=policy).returncode == 0  # idempotent
    if not token.caps["aes_import"]:
        raw = token.workdir / "aes.key"
        raw.write_bytes(os.urandom(32))
        r = token.run("keys", "import", f"mx{tag}-imp", "--type", "aes-256", "--file", raw)
        assert r.returncode == 4 and "aes_import" in r.stderr, r.stderr
    # a type the token cannot make is refused naming the capability
    for key_type, cap in wanted.items():
        if not token.caps[cap]:
            r = token.run("keys", "generate", f"mx{tag}-no-{key_type}", "--type", key_type)
            assert r.returncode == 4 and cap in r.stderr, r.stderr


@pytest.mark.parametrize(("key_type", "chip", "cap"), [
    ("rsa-3072", "esp32s3", "rsa_pss"), ("ec-p256", "esp32c6", "ecdsa_p256"),
    ("ec-p384", "esp32p4", "ecdsa_p384"),
])
def test_sign_verified_by_espsecure(token: Token, key_type: str, chip: str, cap: str) -> None:
    token.need(cap)
    key = token.keys.get(key_type)
    assert key, f"{token.name}: no {key_type} key from keys create"
    image = token.workdir / f"app-{chip}.bin"
    image.write_bytes(build_app(chip, 24 * 1024, seed=5))
    out = token.workdir / f"app-{chip}.signed"
    token.ok("sign", image, "-o", out, "--key", key, "--chip", chip, "--scheme", "sbv2")
    pem = token.workdir / f"{key}.pem"
    token.ok("keys", "public", key, "-o", pem)
    with open(pem, "rb") as k, open(out, "rb") as d:
        espsecure.verify_signature("2", False, None, k, d)


def test_xts_encrypt_equals_espsecure(token: Token) -> None:
    token.need("aes_import", "in_token_xts")
    key = os.urandom(32)
    keyfile = token.workdir / "xts.key"
    keyfile.write_bytes(key)
    name = f"mx-xts-{uuid.uuid4().hex[:6]}"
    token.ok("keys", "import", name, "--type", "xts-aes-128", "--file", keyfile)
    keyfile.unlink()
    listed = {k["name"]: k for k in json.loads(token.ok("--json", "keys", "list"))}
    assert listed[name]["kcv"] == f"{_kcv(key[:16])}/{_kcv(key[16:])}"
    plain = build_app("esp32s3", 16 * 1024, seed=9)
    src, out = token.workdir / "plain.bin", token.workdir / "xts.enc"
    src.write_bytes(plain)
    token.ok("encrypt", src, "-o", out, "--chip", "esp32s3", "--address", "0x10000",
             "--key", name)
    assert out.read_bytes() == _espsecure_crypt(key, plain, 0x10000, xts=True)


def test_per_device_derivation(token: Token) -> None:
    token.need("aes_import")
    master = os.urandom(32)
    f = token.workdir / "master.key"
    f.write_bytes(master)
    name = f"mx-m-{uuid.uuid4().hex[:6]}"
    token.ok("keys", "import", name, "--type", "aes-256", "--usage", "derive", "--file", f)
    f.unlink()
    mac = "24:0a:c4:12:34:56"
    r = token.run("--json", "derive", "--master", name, "--device", mac,
                  "--purpose", "XTS_AES_128_KEY")
    if not token.caps["in_token_derivation"]:
        assert r.returncode == 4 and "in_token_derivation" in r.stderr, r.stderr
        pytest.skip(f"{token.name}: missing capability in_token_derivation (refused clearly)")
    assert r.returncode == 0, r.stderr
    from hsmflash.formats import kdf

    k_d = _aes_ecb(master, b"".join(kdf.derivation_blocks(bytes.fromhex(mac.replace(":", "")),
                                                          "XTS_AES_128_KEY")))
    assert json.loads(r.stdout)["kcv"] == f"{_kcv(k_d[:16])}/{_kcv(k_d[16:])}"


def test_esp32_classic_vectors_with_an_imported_key(token: Token) -> None:
    """Espressif's ESP32 vectors (esptool test/secure_images) for FLASH_CRYPT_CONFIG 0x0, 0x3,
    0x9, 0xC, 0xF, through the in-token XOR path with the imported espsecure key."""
    token.need("aes_import")
    name = f"mx-fe-{uuid.uuid4().hex[:6]}"
    token.ok("keys", "import", name, "--type", "aes-256", "--usage", "derive",
             "--file", VECTORS / "256bit_key.bin")
    plain = VECTORS / "bootloader.bin"
    for conf, vector in ((0x0, "conf0"), (0x3, "conf3"), (0x9, "conf9"), (0xC, "confc"),
                         (0xF, None)):
        policy = _write_policy(token, {name: ("aes-256", "derive")}, (
            "[chips.esp32]\n"
            'flash_encryption = "esp32-aes-256"\n'
            f"flash_crypt_config = {conf}\n"
            f'derive = {{ master = "{name}", scheme = "aes-ecb-v1" }}\n'
            'release_mode = false\nunsigned_images = ["bootloader", "app"]\n'
            "[export]\nefuse_burn = true\n"))
        out = token.workdir / f"bl-{conf:x}.enc"
        r = token.run("--json", "encrypt", plain, "-o", out, "--chip", "esp32",
                      "--address", "0x1000", "--key", name, policy=policy)
        if not token.caps["xor_derivation"]:
            assert r.returncode == 4 and "xor_derivation" in r.stderr, r.stderr
            assert not out.exists()
            pytest.skip(f"{token.name}: missing capability xor_derivation (refused clearly)")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["path"] == "esp32-xor-in-token"
        suffix = f"-{vector}" if vector else ""
        assert out.read_bytes() == (VECTORS / f"bootloader-encrypted{suffix}.bin").read_bytes()


def test_esp32_classic_provisioning_keeps_the_device_key_in_a_xor_token(token: Token) -> None:
    """Provisioning a virtual ESP32 (FiPy-era v1.0) on a token with CKM_XOR_BASE_AND_DATA:
    every block key is derived in the token, so a policy that forbids exporting the per-device
    key (`esp32_classic_transient = false`) still provisions, and the flash decrypts with
    espsecure under the key the aes-ecb-v1 spec derives from the master."""
    token.need("aes_import", "in_token_derivation", "xor_derivation")
    from hsmflash.formats import kdf
    from imagebuilder import build_bootloader

    master = os.urandom(32)
    name = f"mx-pm-{uuid.uuid4().hex[:6]}"
    f = token.workdir / "pm.key"
    f.write_bytes(master)
    token.ok("keys", "import", name, "--type", "aes-256", "--usage", "derive", "--file", f)
    f.unlink()
    policy = _write_policy(token, {name: ("aes-256", "derive")}, (
        "[chips.esp32]\n"
        'flash_encryption = "esp32-aes-256"\n'
        "flash_crypt_config = 0xF\n"
        f'derive = {{ master = "{name}", scheme = "aes-ecb-v1" }}\n'
        'readable_keys = true\nrelease_mode = false\nunsigned_images = ["bootloader", "app"]\n'
        "[export]\nefuse_burn = true\nesp32_classic_transient = false\n"))
    mac = "24:0a:c4:0f:1a:01"
    efuse, flash = token.workdir / "fipy.efuse", token.workdir / "fipy.flash"
    token.ok("virtual", "create", "--chip", "esp32", "--mac", mac, "--revision", "1.0",
             "--efuse-file", efuse)
    boot, app = token.workdir / "boot.bin", token.workdir / "app.bin"
    boot.write_bytes(build_bootloader("esp32", seed=3))
    app.write_bytes(build_app("esp32", 64 * 1024, seed=4))
    r = token.run("--json", "provision", "--chip", "esp32", "--virtual-efuses", efuse,
                  "--virtual-flash", flash, "--image", f"0x1000={boot}",
                  "--image", f"0x10000={app}", policy=policy)
    assert r.returncode == 0, r.stdout + r.stderr
    k_d = _aes_ecb(master, b"".join(kdf.derivation_blocks(bytes.fromhex(mac.replace(":", "")),
                                                          "FLASH_ENCRYPTION")))
    written = flash.read_bytes()
    for address, image in ((0x1000, boot.read_bytes()), (0x10000, app.read_bytes())):
        size = len(image) + (-len(image) % 32)
        out = io.BytesIO()
        espsecure.decrypt_flash_data(io.BytesIO(k_d), out, address, 0xF, False,
                                     io.BytesIO(written[address:address + size]))
        assert out.getvalue()[:len(image)] == image
    records = [json.loads(line) for line in token.audit_log.read_text().splitlines()]
    encrypt = [r for r in records if r["op"] == "provision.encrypt" and r["phase"] == "intent"]
    assert encrypt and encrypt[-1]["detail"]["path"] == "esp32-xor-in-token"
    # the only export is the key burned into the eFuses
    exported = [e["why"] for r in records if r["op"].startswith("provision.")
                and r["phase"] == "ok" for e in r["detail"].get("exported", [])]
    assert exported and set(exported) == {"efuse_burn"}


def test_audit_log_verifies_with_the_public_key_and_against_the_token(token: Token) -> None:
    assert token.audit_log.is_file(), f"{token.name}: no key was used"
    pem = token.workdir / "audit.pem"
    token.ok("keys", "public", "audit", "-o", pem)
    listed = {k["name"]: k for k in json.loads(token.ok("--json", "keys", "list"))}
    want = "ec-p256" if token.caps["ec_p256_generate"] else "rsa-3072"
    assert listed["audit"]["type"] == want
    report = json.loads(token.ok("--json", "audit", "verify", token.audit_log, "--pubkey", pem))
    assert report["signatures_checked"] and report["checkpoints"] >= 1
    report = json.loads(token.ok("--json", "audit", "verify", token.audit_log, "--with-token"))
    assert report["head_checked"]
    # a log cut back to before the last checkpoint is caught against the token's head
    cut = token.workdir / "cut.jsonl"
    lines = token.audit_log.read_bytes().splitlines(keepends=True)
    cut.write_bytes(b"".join(lines[:-1]))
    r = token.run("audit", "verify", cut, "--with-token")
    assert r.returncode == 6, r.stdout + r.stderr
    assert hashlib.sha256(token.audit_log.read_bytes()).hexdigest()  # the log is intact


def test_batch_derivation_through_the_function_list(token: Token) -> None:
    """`derive --devices` calls C_DeriveKey through C_GetFunctionList (p11-kit's proxy and
    client export no C_* symbols): it works where the token derives, else is refused."""
    token.need("aes_import")
    master = os.urandom(32)
    f = token.workdir / "batch-master.key"
    f.write_bytes(master)
    name = f"mx-bm-{uuid.uuid4().hex[:6]}"
    token.ok("keys", "import", name, "--type", "aes-256", "--usage", "derive", "--file", f)
    f.unlink()
    devices = token.workdir / "devices.csv"
    devices.write_text("mac\n24:0a:c4:00:00:01\n24:0a:c4:00:00:02\n")
    out = token.workdir / "kcvs.csv"
    r = token.run("derive", "--master", name, "--devices", devices, "-o", out,
                  "--purpose", "FLASH_ENCRYPTION", "--workers", "1")
    if not token.caps["in_token_derivation"]:
        assert r.returncode == 4 and "in_token_derivation" in r.stderr, r.stderr
        assert not out.exists()
        pytest.skip(f"{token.name}: missing capability in_token_derivation (refused clearly)")
    assert r.returncode == 0, r.stderr
    from hsmflash.formats import kdf

    rows = out.read_text().splitlines()[1:]
    for row in rows:
        mac, _purpose, kcv = row.split(",")
        k_d = _aes_ecb(master, b"".join(kdf.derivation_blocks(
            bytes.fromhex(mac.replace(":", "")), "FLASH_ENCRYPTION")))
        assert kcv == _kcv(k_d)


def test_esp32_classic_stored_key_without_xor_only_wrapped_out_under_policy(token: Token) -> None:
    """A FiPy fleet's espsecure key on a token without XOR derivation: importing it wrappable
    needs export.esp32_classic_stored_transient; then each use wraps it out to memory, audited
    with its KCV, and the output equals Espressif's vectors."""
    token.need("aes_import")
    if token.caps["xor_derivation"]:
        pytest.skip(f"{token.name}: has xor_derivation; the stored key never leaves the token")
    name = f"mx-wfe-{uuid.uuid4().hex[:6]}"
    keyfile = VECTORS / "256bit_key.bin"
    strict = _write_policy(token, {}, "")
    r = token.run("keys", "import", name, "--type", "aes-256", "--usage", "derive", "--file",
                  keyfile, "--wrappable", policy=strict)
    assert r.returncode == 5 and "esp32_classic_stored_transient" in r.stderr, r.stderr
    allow = "[export]\nesp32_classic_stored_transient = true\nefuse_burn = true\n"
    token.ok("keys", "import", name, "--type", "aes-256", "--usage", "derive", "--file",
             keyfile, "--wrappable", policy=_write_policy(token, {}, allow))
    for conf, vector in ((0x3, "-conf3"), (0xF, "")):
        chip = ("[chips.esp32]\nflash_encryption = \"esp32-aes-256\"\n"
                f"flash_crypt_config = {conf}\n"
                f'derive = {{ master = "{name}", scheme = "aes-ecb-v1" }}\n'
                'release_mode = false\nunsigned_images = ["bootloader", "app"]\n')
        out = token.workdir / f"wbl-{conf:x}.enc"
        args = ("--json", "encrypt", VECTORS / "bootloader.bin", "-o", out, "--chip", "esp32",
                "--address", "0x1000", "--key", name)
        keys = {name: ("aes-256", "derive")}
        denied = token.run(*args, policy=_write_policy(
            token, keys, chip + "[export]\nefuse_burn = true\n"))
        assert denied.returncode == 5 and "esp32_classic_stored_transient" in denied.stderr
        assert not out.exists()
        r = token.run(*args, policy=_write_policy(token, keys, chip + allow))
        if token.name == "p11kit-remote":  # the client filters the wrap mechanisms
            assert r.returncode == 4 and "cannot wrap key" in r.stderr, r.stderr
            assert not out.exists()
            pytest.skip("p11kit-remote: key wrapping is filtered by the p11-kit client "
                        "(refused clearly, naming xor_derivation)")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["path"] == "esp32-stored-key-transient-export"
        assert out.read_bytes() == (VECTORS / f"bootloader-encrypted{vector}.bin").read_bytes()
    records = [json.loads(line) for line in token.audit_log.read_text().splitlines()]
    exported = [e for r in records
                if r["op"] == "encrypt" and r["phase"] == "ok" and "exported" in r["detail"]
                for e in r["detail"]["exported"]]
    key = keyfile.read_bytes()
    assert exported and all(e["kcv"] == _kcv(key) and e["why"] == "esp32_classic_stored_transient"
                            for e in exported)
    assert key.hex() not in token.audit_log.read_text()
