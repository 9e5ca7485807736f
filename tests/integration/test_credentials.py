"""Per-device credentials against the real token, the real NVS tool and real espsecure.

Expected keys are computed here from DESIGN.md's aes-ecb-v1 text with cryptography's AES and
test masters whose bytes this file knows (imported into the token once, like a migration).
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path
from types import SimpleNamespace

import espsecure
import pytest
from esp_idf_nvs_partition_gen import nvs_partition_gen as nvsgen

from make_kdf_vectors import derive as spec_derive  # the independent spec implementation
from make_kdf_vectors import kcv as spec_kcv

CRED_MASTER = bytes.fromhex("8f1e0d2c3b4a59687786a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0")
FE_MASTER = bytes.fromhex("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4")
DEV_A = "24:0a:c4:01:02:03"
DEV_B = "24:0a:c4:01:02:04"
URL = "https://ingest.example.com/v1"
NVS_SIZE = 0x6000
KEYS_ADDR = 0xF000


# -- the spec, independently (tests/vectors/make_kdf_vectors.py) ----------------------------

def spec_secret(mac: str) -> str:
    return spec_derive(CRED_MASTER, mac, "CREDENTIAL", 32).hex()


def spec_nvs_keys(mac: str) -> bytes:
    return spec_derive(CRED_MASTER, mac, "NVS_KEYS", 64)


def nvs_entries(image: bytes) -> dict[tuple[str, str], object]:
    """Read an unencrypted NVS image (ESP-IDF layout): {(namespace, key): value}."""
    names: dict[int, str] = {}
    found: list[tuple[int, str, object]] = []
    ints = {0x01: ("<B", 1), 0x02: ("<H", 2), 0x04: ("<I", 4), 0x08: ("<Q", 8),
            0x11: ("<b", 1), 0x12: ("<h", 2), 0x14: ("<i", 4), 0x18: ("<q", 8)}
    for base in range(0, len(image), 4096):
        page = image[base:base + 4096]
        if page[:4] == b"\xff" * 4:
            continue
        i = 0
        while i < 126:
            if (page[32 + i // 4] >> (2 * (i % 4))) & 3 != 0b10:  # written
                i += 1
                continue
            e = page[64 + 32 * i: 96 + 32 * i]
            ns, kind, span = e[0], e[1], e[2]
            key = e[8:24].split(b"\0")[0].decode()
            if ns == 0:
                names[e[24]] = key
            elif kind == 0x21:
                size = int.from_bytes(e[24:26], "little")
                start = 96 + 32 * i
                found.append((ns, key, page[start:start + size].rstrip(b"\0").decode()))
            elif kind in ints:
                fmt, n = ints[kind]
                found.append((ns, key, struct.unpack(fmt, e[24:24 + n])[0]))
            i += span
    return {(names[ns], key): value for ns, key, value in found}


def nvs_tool_decrypt(image: bytes, keys: bytes, tmp_path: Path) -> bytes:
    """Decrypt with esp-idf-nvs-partition-gen's own decrypt (it wants .bin files)."""
    (tmp_path / "enc.bin").write_bytes(image)
    (tmp_path / "k.bin").write_bytes(keys)
    nvsgen.decrypt(SimpleNamespace(input=str(tmp_path / "enc.bin"), key=str(tmp_path / "k.bin"),
                                   output="dec.bin", outdir=str(tmp_path)))
    return (tmp_path / "dec.bin").read_bytes()


def espsecure_decrypt(key: bytes, data: bytes, address: int, *, xts: bool) -> bytes:
    out = io.BytesIO()
    out.name = "out.bin"
    espsecure.decrypt_flash_data(keyfile=io.BytesIO(key), output=out, address=address,
                                 flash_crypt_conf=0xF, aes_xts=xts,
                                 encrypted_file=io.BytesIO(data))
    return out.getvalue()


# -- fixtures ------------------------------------------------------------------------------------

@pytest.fixture
def ccli(cli):  # type: ignore[no-untyped-def]
    """The CLI with `credentials` registered (the lead registers it in _cli; until then, here)."""
    from hsmflash.cli.credentials import credentials_app
    from hsmflash.cli.main import app

    if not any(g.name == "credentials" for g in app.registered_groups):
        app.add_typer(credentials_app, name="credentials")
    return cli


@pytest.fixture
def keys(ccli, tmp_path, uniq, policy_file):  # type: ignore[no-untyped-def]
    """Known credential and flash-encryption masters, a generated revocation key."""
    for name, material in (("cred-master", CRED_MASTER), ("fe-master", FE_MASTER)):
        f = tmp_path / f"{name}.key"
        f.write_bytes(material)
        r = ccli("keys", "import", f"{uniq}-{name}", "--type", "aes-256", "--usage", "derive",
                 "--file", f)
        assert r.code == 0, r.output
        f.unlink()
    r = ccli("keys", "generate", f"{uniq}-revocation", "--type", "ec-p256", "--usage", "sign")
    assert r.code == 0, r.output
    pem = tmp_path / "revocation.pem"
    assert ccli("keys", "public", f"{uniq}-revocation", "-o", pem).code == 0

    def run(*args: object):  # type: ignore[no-untyped-def]
        return ccli("--policy", policy_file, *args)

    return SimpleNamespace(run=run, pem=pem, master=f"{uniq}-cred-master",
                           revocation=f"{uniq}-revocation")


def issue(k, tmp_path: Path, mac: str, chip: str = "esp32s3", *extra: object):  # type: ignore[no-untyped-def]
    tag = mac.replace(":", "")
    nvs, nvs_keys = tmp_path / f"nvs-{tag}.bin", tmp_path / f"keys-{tag}.bin"
    r = k.run("--json", "credentials", "issue", "--device", mac, "--chip", chip,
              "--master", k.master, "--server-url", URL, "--nvs-size", hex(NVS_SIZE),
              "--nvs-keys-address", hex(KEYS_ADDR), "--nvs-out", nvs, "--nvs-keys-out", nvs_keys,
              *extra)
    return r, nvs, nvs_keys


def check(k, tmp_path: Path, mac: str, secret: str, *extra: object):  # type: ignore[no-untyped-def]
    f = tmp_path / "presented.txt"
    f.write_text(secret + "\n")
    return k.run("credentials", "check", "--device", mac, "--secret-file", f, "--master",
                 k.master, "--key", k.revocation, *extra)


def revoke(k, lst: Path, mac: str, reason: str = "board opened"):  # type: ignore[no-untyped-def]
    return k.run("credentials", "revoke", mac, "--list", lst, "--reason", reason, "--key",
                 k.revocation)


# -- storage on the device -----------------------------------------------------------------------

@pytest.mark.parametrize("chip", ["esp32s3", "esp32"])
def test_nvs_partition_decrypts_with_the_nvs_tool_to_the_entries(keys, tmp_path, chip,
                                                                 token_env):
    r, nvs, _ = issue(keys, tmp_path, DEV_A, chip)
    assert r.code == 0, r.output
    image = nvs.read_bytes()
    assert len(image) == NVS_SIZE
    plain = nvs_tool_decrypt(image, spec_nvs_keys(DEV_A), tmp_path)
    assert nvs_entries(plain) == {
        ("hsmflash", "device_id"): "240ac4010203",
        ("hsmflash", "username"): "240ac4010203",
        ("hsmflash", "password"): spec_secret(DEV_A),
        ("hsmflash", "server_url"): URL,
    }
    # byte for byte what the NVS tool itself makes from the same CSV and the same keys
    csv = tmp_path / "expected.csv"
    csv.write_text("key,type,encoding,value\nhsmflash,namespace,,\n"
                   "device_id,data,string,240ac4010203\nusername,data,string,240ac4010203\n"
                   f"password,data,string,{spec_secret(DEV_A)}\nserver_url,data,string,{URL}\n")
    (tmp_path / "tool-keys.bin").write_bytes(spec_nvs_keys(DEV_A))
    nvsgen.encrypt(SimpleNamespace(
        input=[str(csv)], output="tool.bin", size=hex(NVS_SIZE), version=2, keygen=False,
        inputkey=str(tmp_path / "tool-keys.bin"), keyfile=None, key_protect_hmac=False,
        kp_hmac_keygen=False, kp_hmac_keyfile=None, kp_hmac_inputkey=None,
        outdir=str(tmp_path)))
    assert image == (tmp_path / "tool.bin").read_bytes()
    # the secrets appear nowhere: not in the output, not in the audit log
    audit = Path(token_env["HSMFLASH_AUDIT_LOG"]).read_text()
    for secret in (spec_secret(DEV_A), spec_nvs_keys(DEV_A).hex()):
        assert secret not in r.output and secret not in audit
    assert spec_secret(DEV_A).encode() not in image


@pytest.mark.parametrize(("chip", "purpose", "length", "xts"), [
    ("esp32s3", "XTS_AES_128_KEY", 32, True),
    ("esp32", "FLASH_ENCRYPTION", 32, False),
])
def test_nvs_keys_partition_decrypts_with_espsecure_and_the_flash_key(keys, tmp_path, chip,
                                                                      purpose, length, xts):
    r, _, nvs_keys = issue(keys, tmp_path, DEV_B, chip)
    assert r.code == 0, r.output
    encrypted = nvs_keys.read_bytes()
    assert len(encrypted) == 0x1000
    flash_key = spec_derive(FE_MASTER, DEV_B, purpose, length)
    plain = espsecure_decrypt(flash_key, encrypted, KEYS_ADDR, xts=xts)
    expected_keys = spec_nvs_keys(DEV_B)
    assert plain[:64] == expected_keys
    assert struct.unpack_from("<I", plain, 64)[0] == zlib.crc32(expected_keys, 0xFFFFFFFF)
    assert plain[68:] == b"\xff" * (0x1000 - 68)
    assert expected_keys not in encrypted
    # at another address the same bytes do not decrypt: the partition's address is the tweak
    assert espsecure_decrypt(flash_key, encrypted, KEYS_ADDR + 0x1000, xts=xts)[:64] != \
        expected_keys


def test_nvs_keys_layout_is_the_nvs_tools(tmp_path):
    """Our nvs_keys image equals the one the NVS tool's generate_key writes for the same keys."""
    from hsmflash.credentials import nvs_keys_partition

    nvsgen.generate_key(SimpleNamespace(keyfile="k.bin", outdir=str(tmp_path),
                                        key_protect_hmac=False, kp_hmac_keygen=False,
                                        kp_hmac_keyfile=None, kp_hmac_inputkey=None))
    tool = (tmp_path / "keys" / "k.bin").read_bytes()
    assert bytes(nvs_keys_partition(tool[:64])) == tool


def test_csv_template_entries_reach_the_device(keys, tmp_path):
    tmpl = tmp_path / "tmpl.csv"
    tmpl.write_text("# company layout\nkey,type,encoding,value\nacme,namespace,,\n"
                    "user,data,string,dev-{device_id}\ntoken,data,string,{secret}\n"
                    "url,data,string,{server_url}/{mac}\nport,data,u16,8883\n")
    r, nvs, _ = issue(keys, tmp_path, DEV_A, "esp32s3", "--template", tmpl)
    assert r.code == 0, r.output
    entries = nvs_entries(nvs_tool_decrypt(nvs.read_bytes(), spec_nvs_keys(DEV_A), tmp_path))
    assert entries == {("acme", "user"): "dev-240ac4010203", ("acme", "token"): spec_secret(DEV_A),
                       ("acme", "url"): f"{URL}/{DEV_A}", ("acme", "port"): 8883}


def test_issue_is_audited_with_kcvs(keys, tmp_path, token_env):
    r, _, _ = issue(keys, tmp_path, DEV_A)
    assert r.code == 0, r.output
    info = json.loads(r.out)
    cred = spec_derive(CRED_MASTER, DEV_A, "CREDENTIAL", 32)
    assert info["credential_kcv"] == spec_kcv(cred)
    records = [json.loads(x) for x in Path(token_env["HSMFLASH_AUDIT_LOG"]).read_text()
               .splitlines()]
    done = [x for x in records if x["op"] == "credential.issue" and x["phase"] == "ok"]
    assert len(done) == 1 and done[0]["subject"]["device"] == DEV_A
    exported = {e["purpose"]: (e["kcv"], e["why"]) for e in done[0]["detail"]["exported"]}
    assert exported["CREDENTIAL"] == (info["credential_kcv"], "device_secrets")
    assert exported["NVS_KEYS"] == (info["nvs_keys_kcv"], "device_secrets")
    assert any(x["op"] == "encrypt" and x["subject"].get("device") == DEV_A for x in records)
    assert keys.run("audit", "verify", token_env["HSMFLASH_AUDIT_LOG"],
                    "--with-token").code == 0


# -- server side ---------------------------------------------------------------------------------

def test_devices_never_share_a_credential_and_checks_bind_to_the_device(keys, tmp_path):
    passwords = set()
    for mac in (DEV_A, DEV_B):
        r, nvs, _ = issue(keys, tmp_path, mac)
        assert r.code == 0, r.output
        entries = nvs_entries(nvs_tool_decrypt(nvs.read_bytes(), spec_nvs_keys(mac), tmp_path))
        passwords.add(entries[("hsmflash", "password")])
    assert passwords == {spec_secret(DEV_A), spec_secret(DEV_B)}
    assert len(passwords) == 2

    ok = check(keys, tmp_path, DEV_A, spec_secret(DEV_A))
    assert ok.code == 0, ok.output
    assert "valid" in ok.out
    wrong = check(keys, tmp_path, DEV_B, spec_secret(DEV_A))
    assert wrong.code == 6, wrong.output
    assert "24:0a:c4:01:02:04" in wrong.err and spec_secret(DEV_A) not in wrong.output
    flipped = spec_secret(DEV_A)[:-1] + ("0" if spec_secret(DEV_A)[-1] != "0" else "1")
    assert check(keys, tmp_path, DEV_A, flipped).code == 6


def test_revoked_device_fails_check_and_list_verifies(keys, tmp_path, token_env):
    lst = tmp_path / "revoked.json"
    r = revoke(keys, lst, DEV_A)
    assert r.code == 0, r.output
    assert "sequence 1" in r.out
    rev = check(keys, tmp_path, DEV_A, spec_secret(DEV_A), "--revocations", lst, "--pubkey",
                keys.pem)
    assert rev.code == 6 and "revoked" in rev.err
    # the token's key verifies the list when no --pubkey is given
    assert check(keys, tmp_path, DEV_A, spec_secret(DEV_A), "--revocations", lst).code == 6
    other = check(keys, tmp_path, DEV_B, spec_secret(DEV_B), "--revocations", lst)
    assert other.code == 0, other.output

    r2 = revoke(keys, lst, DEV_B, "returned")
    assert r2.code == 0 and "sequence 2" in r2.out
    shown = keys.run("--json", "credentials", "revoked", "--list", lst, "--verify", "--pubkey",
                     keys.pem)
    assert shown.code == 0, shown.output
    doc = json.loads(shown.out)
    assert doc["sequence"] == 2 and doc["verified"] is True
    assert [(e["device"], e["reason"]) for e in doc["revoked"]] == \
        [(DEV_A, "board opened"), (DEV_B, "returned")]
    old = keys.run("credentials", "revoked", "--list", lst, "--verify", "--pubkey", keys.pem,
                   "--min-sequence", "3")
    assert old.code == 6 and "older" in old.err

    ops = [json.loads(x)["op"] for x in Path(token_env["HSMFLASH_AUDIT_LOG"]).read_text()
           .splitlines()]
    assert ops.count("credential.revoke") == 4 and ops.count("credential.check") >= 6


def _flip(hex_text: str) -> str:
    return hex_text[:10] + ("0" if hex_text[10] != "0" else "1") + hex_text[11:]


EDITS = {  # what someone might change in the file, and how
    "drop-entry": lambda d: d["revoked"].pop(),
    "device": lambda d: d["revoked"][0].update(device="24:0a:c4:01:02:05"),
    "reason": lambda d: d["revoked"][0].update(reason="oops"),
    "sequence": lambda d: d.update(sequence=d["sequence"] + 1),
    "issued": lambda d: d.update(issued="2030-01-01T00:00:00Z"),
    "signer": lambda d: d["signer"].update(key_fp="sha256:" + "0" * 64),
    "signature": lambda d: d["signature"].update(value=_flip(d["signature"]["value"])),
}


@pytest.mark.parametrize("edit", EDITS)
def test_any_edit_to_the_list_fails_verification(keys, tmp_path, edit):
    lst = tmp_path / "revoked.json"
    assert revoke(keys, lst, DEV_A).code == 0
    assert revoke(keys, lst, DEV_B).code == 0
    doc = json.loads(lst.read_text())
    EDITS[edit](doc)
    lst.write_text(json.dumps(doc, indent=2))
    r = keys.run("credentials", "revoked", "--list", lst, "--verify", "--pubkey", keys.pem)
    assert r.code == 6, r.output
    assert str(lst) in r.err
    # a server checking against it refuses too, and revoking on top of it is refused
    assert check(keys, tmp_path, DEV_B, spec_secret(DEV_B), "--revocations", lst).code == 6
    assert revoke(keys, lst, "24:0a:c4:01:02:07").code == 6


def test_list_does_not_verify_with_another_key(keys, tmp_path, uniq):
    lst = tmp_path / "revoked.json"
    assert revoke(keys, lst, DEV_A).code == 0
    assert keys.run("keys", "generate", f"{uniq}-other", "--type", "ec-p256",
                    "--usage", "sign").code == 0
    other = tmp_path / "other.pem"
    assert keys.run("keys", "public", f"{uniq}-other", "-o", other).code == 0
    r = keys.run("credentials", "revoked", "--list", lst, "--verify", "--pubkey", other)
    assert r.code == 6 and "another key" in r.err


def test_truncated_list_fails_verification(keys, tmp_path):
    lst = tmp_path / "revoked.json"
    assert revoke(keys, lst, DEV_A).code == 0
    lst.write_bytes(lst.read_bytes()[:-20])
    r = keys.run("credentials", "revoked", "--list", lst, "--verify", "--pubkey", keys.pem)
    assert r.code == 6 and "not a valid signed list" in r.err


# -- bad input -----------------------------------------------------------------------------------

def test_revoking_twice_is_a_clear_error(keys, tmp_path):
    lst = tmp_path / "revoked.json"
    assert revoke(keys, lst, DEV_A).code == 0
    before = lst.read_bytes()
    r = revoke(keys, lst, DEV_A)
    assert r.code == 3
    assert "already revoked" in r.err and DEV_A in r.err
    assert lst.read_bytes() == before


@pytest.mark.parametrize("mac", ["24:0a:c4:01:02", "zz:0a:c4:01:02:03", "01:00:5e:00:00:01",
                                 "00:00:00:00:00:00"])
def test_malformed_device_is_refused_everywhere(keys, tmp_path, mac):
    r, nvs, nvs_keys = issue(keys, tmp_path, mac)
    assert r.code == 3 and "MAC" in r.err, r.output
    assert not nvs.exists() and not nvs_keys.exists()
    assert check(keys, tmp_path, mac, spec_secret(DEV_A)).code == 3
    r = revoke(keys, tmp_path / "l.json", mac)
    assert r.code == 3 and "MAC" in r.err
    assert not (tmp_path / "l.json").exists()


@pytest.mark.parametrize(("csv", "needle"), [
    ("key,type,value\nacme,namespace,\n", "header"),
    ("key,type,encoding,value\nacme,namespace,,\ntoken,data,string\n", "line 3"),
    ("key,type,encoding,value\nacme,namespace,,\ntoken,data,str,{secret}\n", "encoding"),
    ("key,type,encoding,value\nacme,namespace,,\nthis_key_is_far_too_long,data,string,"
     "{secret}\n", "longer than 15"),
    ("key,type,encoding,value\nacme,namespace,,\nuser,data,string,x\n", "{secret}"),
    ("key,type,encoding,value\ntoken,data,string,{secret}\n", "namespace"),
    ("key,type,encoding,value\nacme,namespace,,\nport,data,u8,300\ntoken,data,string,{secret}\n",
     "out of range"),
    ("key,type,encoding,value\nacme,namespace,,\ncert,file,binary,/etc/passwd\n", "file"),
])
def test_malformed_csv_is_refused_before_any_key_use(keys, tmp_path, token_env, csv, needle):
    tmpl = tmp_path / "bad.csv"
    tmpl.write_text(csv)
    r, nvs, nvs_keys = issue(keys, tmp_path, DEV_A, "esp32s3", "--template", tmpl)
    assert r.code == 3, r.output
    assert needle in r.err and "bad.csv" in r.err
    assert not nvs.exists() and not nvs_keys.exists()
    audit = Path(token_env["HSMFLASH_AUDIT_LOG"])
    assert not audit.exists() or "credential.issue" not in audit.read_text()


def test_entries_too_big_for_the_partition(keys, tmp_path):
    tmpl = tmp_path / "big.csv"
    tmpl.write_text("key,type,encoding,value\nacme,namespace,,\ntoken,data,string,{secret}\n"
                    + "".join(f"k{i},data,string,{'x' * 1000}\n" for i in range(40)))
    r, nvs, _ = issue(keys, tmp_path, DEV_A, "esp32s3", "--template", tmpl)
    assert r.code == 3 and "do not fit" in r.err, r.output
    assert not nvs.exists()


def test_bad_secret_file_and_sizes(keys, tmp_path):
    r = check(keys, tmp_path, DEV_A, "not-hex")
    assert r.code == 3 and "presented.txt" in r.err
    r, _, _ = issue(keys, tmp_path, DEV_A, "esp32s3", "--nvs-size", "0x2000")
    assert r.code == 3 and "NVS size" in r.err
    r, _, _ = issue(keys, tmp_path, DEV_A, "esp32s3", "--nvs-keys-address", "0xf010")
    assert r.code == 3 and "4 KiB" in r.err


def test_chip_outside_the_policy_is_refused(keys, tmp_path):
    r, nvs, _ = issue(keys, tmp_path, DEV_A, "esp32s2")
    assert r.code == 5, r.output
    assert not nvs.exists()



@pytest.mark.parametrize("which", ["--nvs-out", "--nvs-keys-out"])
def test_issue_to_an_unwritable_path_uses_no_key(keys, tmp_path, which):  # type: ignore[no-untyped-def]
    bad = tmp_path / "no-such-dir" / "out.bin"
    log = tmp_path / "audit.jsonl"
    before = log.read_bytes() if log.exists() else b""
    r, nvs, nvs_keys = issue(keys, tmp_path, "7c:df:a1:00:30:01", "esp32s3", which, bad)
    assert r.code == 3, r.output
    assert str(bad) in r.err
    assert (log.read_bytes() if log.exists() else b"") == before  # no key use recorded
    assert not nvs.exists() and not nvs_keys.exists()


def test_issue_takes_the_addresses_from_the_devices_table(keys, tmp_path):  # type: ignore[no-untyped-def]
    from hsmflash.formats import partitions

    table = tmp_path / "mp.csv"
    table.write_text(partitions.to_csv(partitions.micropython_template()))
    nvs, nvs_keys = tmp_path / "nvs.bin", tmp_path / "keys.bin"
    r = keys.run("--json", "credentials", "issue", "--device", DEV_B, "--chip", "esp32s3",
                 "--master", keys.master, "--server-url", URL, "--table", table,
                 "--nvs-out", nvs, "--nvs-keys-out", nvs_keys)
    assert r.code == 0, r.output
    info = json.loads(r.out)
    assert (info["nvs_keys_address"], info["nvs_size"]) == ("0xe000", "0x5000")
    assert len(nvs.read_bytes()) == 0x5000
    flash_key = spec_derive(FE_MASTER, DEV_B, "XTS_AES_128_KEY", 32)
    plain = espsecure_decrypt(flash_key, nvs_keys.read_bytes(), 0xE000, xts=True)
    assert plain[:64] == spec_nvs_keys(DEV_B)


def test_issue_without_a_table_or_nvs_keys_address_is_refused(keys, tmp_path):  # type: ignore[no-untyped-def]
    nvs = tmp_path / "nvs.bin"
    r = keys.run("credentials", "issue", "--device", DEV_B, "--chip", "esp32s3", "--master",
                 keys.master, "--server-url", URL, "--nvs-out", nvs)
    assert r.code == 2 and "--table" in r.err and not nvs.exists()
    table = tmp_path / "upstream.csv"
    table.write_text("nvs, data, nvs, 0x9000, 0x6000\nphy_init, data, phy, 0xf000, 0x1000\n")
    r = keys.run("credentials", "issue", "--device", DEV_B, "--chip", "esp32s3", "--master",
                 keys.master, "--server-url", URL, "--table", table, "--nvs-out", nvs)
    assert r.code == 3 and "nvs_keys" in r.err and not nvs.exists()
