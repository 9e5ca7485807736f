"""Per-device derivation and flash encryption with keys in the token, against espsecure and
the independently computed aes-ecb-v1 vectors in tests/vectors/."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import espsecure
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pkcs11 import Attribute, ObjectClass

VECTORS = json.loads((Path(__file__).parents[1] / "vectors" / "kdf-aes-ecb-v1.json").read_text())


def espsecure_crypt(decrypt: bool, key: bytes, data: bytes, address: int, *, xts: bool,
                    crypt_config: int = 0xF) -> bytes:
    out = io.BytesIO()
    fn = espsecure.decrypt_flash_data if decrypt else espsecure.encrypt_flash_data
    fn(io.BytesIO(key), out, address, crypt_config, xts, io.BytesIO(data))
    return out.getvalue()


def _import_master(cli, name: str, key_hex: str, tmp_path: Path) -> None:
    f = tmp_path / f"{name}.bin"
    f.write_bytes(bytes.fromhex(key_hex))
    r = cli("keys", "import", name, "--type", "aes-256", "--usage", "derive", "--file", f)
    assert r.code == 0, r.output
    f.unlink()


def test_derive_matches_independent_vectors(cli, tmp_path, uniq):
    masters = {}
    for v in VECTORS:
        if v["master"] not in masters:
            masters[v["master"]] = f"{uniq}-m{len(masters)}"
            _import_master(cli, masters[v["master"]], v["master"], tmp_path)
        r = cli("--json", "derive", "--master", masters[v["master"]], "--device", v["device"],
                "--purpose", v["purpose"])
        assert r.code == 0, r.output
        assert json.loads(r.out)["kcv"] == v["kcv"], v
        assert v["key"] not in r.output  # the key itself never appears


def test_derived_keys_are_session_objects_and_master_stays_put(cli, tmp_path, uniq, session):
    v = VECTORS[0]
    _import_master(cli, f"{uniq}-m", v["master"], tmp_path)
    before = sum(1 for _ in session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY}))
    assert cli("derive", "--master", f"{uniq}-m", "--device", v["device"]).code == 0
    after = sum(1 for _ in session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY}))
    assert before == after
    from hsmflash.token.keys import find_key

    master = find_key(session, f"{uniq}-m").primary
    assert master[Attribute.EXTRACTABLE] is False and master[Attribute.DERIVE] is True
    assert master[Attribute.ENCRYPT] is False


@pytest.mark.parametrize(("chip", "purpose", "address", "length"), [
    ("esp32s3", "XTS_AES_128_KEY", 0x10000, 4096),
    ("esp32s3", "XTS_AES_128_KEY", 0x10010, 16),
    ("esp32c3", "XTS_AES_128_KEY", 0x9050, 1000 * 16),
    ("esp32s3", "XTS_AES_256_KEY", 0x20000 + 48, 4096 + 32),
    ("esp32", "FLASH_ENCRYPTION", 0x10000, 4096),
    ("esp32", "FLASH_ENCRYPTION", 0x1010, 48),
])
def test_device_encryption_equals_espsecure(cli, tmp_path, uniq, policy_file, chip, purpose,
                                            address, length):
    v = next(x for x in VECTORS if x["purpose"] == purpose and x["master"] == VECTORS[-1]["master"])
    _import_master(cli, f"{uniq}-fe-master", v["master"], tmp_path)  # name the policy uses
    plain = os.urandom(length)
    src = tmp_path / "plain.bin"
    src.write_bytes(plain)
    out = tmp_path / "enc.bin"
    scheme = ["--scheme", "xts-aes-256"] if purpose == "XTS_AES_256_KEY" else []
    r = cli("--policy", policy_file, "--json", "encrypt", src, "-o", out, "--chip", chip,
            "--address", hex(address), "--master", f"{uniq}-fe-master", "--device", v["device"],
            *scheme)
    assert r.code == 0, r.output
    info = json.loads(r.out)
    assert info["kcv"] == v["kcv"]
    key = bytes.fromhex(v["key"])
    expected = espsecure_crypt(False, key, plain, address, xts=chip != "esp32")
    assert out.read_bytes() == expected
    assert espsecure_crypt(True, key, out.read_bytes(), address, xts=chip != "esp32") == plain
    if chip == "esp32":
        assert info["path"] == "esp32-transient-export"
        log = Path(os.environ["HSMFLASH_AUDIT_LOG"]).read_text()
        assert '"exported"' in log and v["kcv"] in log
        assert v["key"] not in log
    back = tmp_path / "back.bin"
    r = cli("--policy", policy_file, "decrypt", out, "-o", back, "--chip", chip, "--address",
            hex(address), "--master", f"{uniq}-fe-master", "--device", v["device"], *scheme)
    assert r.code == 0, r.output
    assert back.read_bytes() == plain


@pytest.fixture
def xts_key(cli, tmp_path_factory, uniq):  # type: ignore[no-untyped-def]
    d = tmp_path_factory.mktemp("xts")
    keys = {}
    for n in (32, 64):
        material = os.urandom(n)
        f = d / f"k{n}.bin"
        f.write_bytes(material)
        name = f"{uniq}-x{n}"
        r = cli("keys", "import", name, "--type", f"xts-aes-{n * 4}", "--file", f)
        assert r.code == 0, r.output
        keys[n] = (name, material)
    return keys, d


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.sampled_from([32, 64]), unit=st.integers(0, (16 << 20) // 16 - 1),
       blocks=st.integers(1, 300), data=st.data())
def test_stored_xts_key_property(cli, xts_key, n, unit, blocks, data):
    keys, d = xts_key
    name, material = keys[n]
    address = unit * 16
    plain = data.draw(st.binary(min_size=blocks * 16, max_size=blocks * 16))
    src, out = d / "p.bin", d / "c.bin"
    src.write_bytes(plain)
    scheme = "xts-aes-128" if n == 32 else "xts-aes-256"
    r = cli("encrypt", src, "-o", out, "--chip", "esp32s3", "--address", hex(address),
            "--key", name, "--scheme", scheme)
    assert r.code == 0, r.output
    assert out.read_bytes() == espsecure_crypt(False, material, plain, address, xts=True)


def test_multi_mib_xts(cli, xts_key):
    keys, d = xts_key
    name, material = keys[32]
    plain = os.urandom(3 * 1024 * 1024 + 64)
    src, out = d / "big.bin", d / "big.enc"
    src.write_bytes(plain)
    assert cli("encrypt", src, "-o", out, "--chip", "esp32c3", "--address", "0x110000",
               "--key", name).code == 0
    assert espsecure_crypt(True, material, out.read_bytes(), 0x110000, xts=True) == plain


def test_policy_forbidding_export_refuses_esp32_classic(cli, tmp_path, uniq, policy_file):
    v = VECTORS[0]
    _import_master(cli, f"{uniq}-fe-master", v["master"], tmp_path)
    text = policy_file.read_text().replace("esp32_classic_transient = true",
                                           "esp32_classic_transient = false")
    policy_file.write_text(text)
    src = tmp_path / "p.bin"
    src.write_bytes(os.urandom(64))
    out = tmp_path / "o.bin"
    r = cli("--policy", policy_file, "encrypt", src, "-o", out, "--chip", "esp32",
            "--address", "0x10000", "--master", f"{uniq}-fe-master", "--device", v["device"])
    assert r.code == 5
    assert "esp32_classic_transient" in r.err and "XOR_BASE_AND_DATA" in r.err
    assert not out.exists()


@pytest.mark.parametrize(("args", "code", "needle"), [
    (("--address", "0x10008"), 3, "0x10008"),
    (("--address", "0x10000", "--chip-override", "esp99"), 2, ""),
    (("--address", "zz"), 3, "zz"),
    (("--address", "0x10000", "--device", "24:0a:c4:01:02"), 3, "24:0a:c4:01:02"),
    (("--address", "0x10000", "--device", "00:00:00:00:00:00"), 3, "00:00:00:00:00:00"),
])
def test_bad_encrypt_input(cli, tmp_path, uniq, args, code, needle):
    v = VECTORS[0]
    _import_master(cli, f"{uniq}-m", v["master"], tmp_path)
    src = tmp_path / "p.bin"
    src.write_bytes(os.urandom(64))
    out = tmp_path / "o.bin"
    base = ["encrypt", src, "-o", out, "--chip", "esp32s3", "--master", f"{uniq}-m"]
    if "--device" not in args:
        base += ["--device", v["device"]]
    r = cli(*base, *args)
    assert r.code == code, r.output
    assert needle in r.err
    assert not out.exists()


def test_bad_inputs_more(cli, tmp_path, uniq):
    v = VECTORS[0]
    _import_master(cli, f"{uniq}-m", v["master"], tmp_path)
    assert cli("keys", "generate", f"{uniq}-e", "--type", "aes-256", "--usage",
               "encrypt").code == 0
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    src = tmp_path / "p.bin"
    src.write_bytes(os.urandom(64))
    out = tmp_path / "o.bin"
    cases = [
        ((empty, "--chip", "esp32s3", "--master", f"{uniq}-m"), 3, "empty"),
        ((src, "--chip", "esp99", "--master", f"{uniq}-m"), 3, "esp99"),
        ((src, "--chip", "esp32s3", "--master", f"{uniq}-e"), 4, "CKA_DERIVE"),
        ((src, "--chip", "esp32s3", "--master", f"{uniq}-nokey"), 4, "nokey"),
    ]
    for args, code, needle in cases:
        r = cli("encrypt", *args, "-o", out, "--address", "0x10000", "--device", v["device"])
        assert r.code == code, (args, r.output)
        assert needle in r.err
        assert len(r.err.strip().splitlines()) == 1
        assert not out.exists()


def test_batch_is_resumable(cli, tmp_path, uniq):
    v = VECTORS[0]
    _import_master(cli, f"{uniq}-m", v["master"], tmp_path)
    macs = [f"24:0a:c4:00:00:{i:02x}" for i in range(6)]
    csv = tmp_path / "devices.csv"
    csv.write_text("mac,serial\n" + "\n".join(f"{m},SN{i}" for i, m in enumerate(macs)) + "\n")
    src = tmp_path / "app.bin"
    plain = os.urandom(4096)
    src.write_bytes(plain)
    outdir = tmp_path / "out"
    r = cli("--json", "encrypt", src, "--chip", "esp32s3", "--address", "0x10000",
            "--master", f"{uniq}-m", "--devices", csv, "--out-dir", outdir)
    assert r.code == 0, r.output
    assert json.loads(r.out)["encrypted"] == 6
    files = sorted(outdir.iterdir())
    assert len(files) == 6 and len({f.read_bytes() for f in files}) == 6  # keys differ
    files[0].unlink()
    r = cli("--json", "encrypt", src, "--chip", "esp32s3", "--address", "0x10000",
            "--master", f"{uniq}-m", "--devices", csv, "--out-dir", outdir)
    res = json.loads(r.out)
    assert res["encrypted"] == 1 and res["skipped"] == 5
    bad = tmp_path / "bad.csv"
    bad.write_text("mac\n24:0a:c4:00:00:01\nnot-a-mac\n")
    r = cli("encrypt", src, "--chip", "esp32s3", "--address", "0x10000", "--master",
            f"{uniq}-m", "--devices", bad, "--out-dir", tmp_path / "o2")
    assert r.code == 3 and "line 3" in r.err


@pytest.mark.parametrize("workers", ["1", "2"])
def test_batch_derive_manifest_matches_vectors(cli, tmp_path, uniq, workers):
    """The C-API batch path (and its worker processes) gives the spec's KCVs."""
    master_hex = VECTORS[0]["master"]
    _import_master(cli, f"{uniq}-m", master_hex, tmp_path)
    want = {v["device"]: v["kcv"] for v in VECTORS
            if v["master"] == master_hex and v["purpose"] == "XTS_AES_128_KEY"}
    csv = tmp_path / "lot.csv"
    csv.write_text("mac\n" + "\n".join(want) + "\n")
    out = tmp_path / "kcvs.csv"
    r = cli("derive", "--master", f"{uniq}-m", "--devices", csv, "-o", out, "--workers", workers)
    assert r.code == 0, r.output
    rows = [line.split(",") for line in out.read_text().splitlines()[1:]]
    assert {mac: kcv for mac, _purpose, kcv in rows} == want
    log = Path(os.environ["HSMFLASH_AUDIT_LOG"]).read_text()
    assert '"op":"derive.batch"' in log


def test_scheme_comes_from_the_stored_key_type(cli, xts_key):
    """`--key` with an xts-aes-256 key on ESP32-S3 means XTS-AES-256 (as espsecure reads it
    from the key length), without --scheme."""
    keys, d = xts_key
    name, material = keys[64]
    plain = os.urandom(4096)
    src, out = d / "k256.bin", d / "k256.enc"
    src.write_bytes(plain)
    r = cli("encrypt", src, "-o", out, "--chip", "esp32s3", "--address", "0x20000",
            "--key", name, "--json")
    assert r.code == 0, r.output
    assert '"scheme": "xts-aes-256"' in r.out
    assert out.read_bytes() == espsecure_crypt(False, material, plain, 0x20000, xts=True)
    # a chip without XTS-AES-256 still refuses the key, naming it
    r = cli("encrypt", src, "-o", d / "c3.enc", "--chip", "esp32c3", "--address", "0x20000",
            "--key", name)
    assert r.code == 3 and name in r.err and not (d / "c3.enc").exists()
    assert "esp32c3 has no xts-aes-256 flash encryption" in r.err


def test_a_wrong_master_is_the_same_refusal_in_every_command(cli, tmp_path, uniq, policy_file):
    """A key the policy does not name as a derivation master: derive, encrypt, batch derive
    and the SBv1 bootloader digest all refuse it the same way (exit 5), before any key use."""
    assert cli("keys", "generate", f"{uniq}-not-master", "--type", "xts-aes-128").code == 0
    from imagebuilder import build_bootloader

    src = tmp_path / "p.bin"
    src.write_bytes(os.urandom(64))
    boot = tmp_path / "boot.bin"
    boot.write_bytes(build_bootloader("esp32"))
    devices = tmp_path / "devices.csv"
    devices.write_text("mac\n24:0a:c4:00:00:01\n")
    log = tmp_path / "wrong-master.jsonl"
    wrong = ("--master", f"{uniq}-not-master")
    commands = {
        "derive": ("derive", *wrong, "--device", "24:0a:c4:00:00:01"),
        "encrypt": ("encrypt", src, "-o", tmp_path / "o.bin", "--chip", "esp32s3",
                    "--address", "0x10000", *wrong, "--device", "24:0a:c4:00:00:01"),
        "derive --devices": ("derive", *wrong, "--devices", devices, "-o", tmp_path / "k.csv"),
        "digest-bootloader": ("digest-bootloader", boot, "-o", tmp_path / "d.bin", *wrong,
                              "--device", "24:0a:c4:00:00:01"),
    }
    for what, args in commands.items():
        r = cli("--policy", policy_file, "--audit-log", log, *args)
        assert r.code == 5, (what, r.output)
        assert f"'{uniq}-not-master' is not a derivation master" in r.err, (what, r.err)
    assert not (tmp_path / "o.bin").exists() and not (tmp_path / "k.csv").exists()
    assert not log.exists() or "not-master" not in log.read_text()  # no key was used


def test_a_lot_over_the_batch_limit_is_refused_before_the_pin(cli, tmp_path, uniq, policy_file,
                                                              monkeypatch):
    """`max_devices_per_batch` refuses a lot before the token is opened (no PIN needed) and
    before any output directory is made."""
    policy_file.write_text(policy_file.read_text() + "\n[limits]\nmax_devices_per_batch = 1\n")
    devices = tmp_path / "devices.csv"
    devices.write_text("mac\n24:0a:c4:00:00:01\n24:0a:c4:00:00:02\n")
    src = tmp_path / "p.bin"
    src.write_bytes(os.urandom(64))
    monkeypatch.delenv("HSMFLASH_PIN")
    master = ("--master", f"{uniq}-fe-master")
    for args in (("derive", *master, "--devices", devices, "-o", tmp_path / "k.csv"),
                 ("encrypt", src, "--chip", "esp32s3", "--address", "0x10000", *master,
                  "--devices", devices, "--out-dir", tmp_path / "out")):
        r = cli("--policy", policy_file, *args)
        assert r.code == 5 and "max_devices_per_batch (1)" in r.err, (args, r.output)
    assert not (tmp_path / "out").exists() and not (tmp_path / "k.csv").exists()
