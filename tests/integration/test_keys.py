"""Keys in a real SoftHSM2 token: attributes read back from the token, import equivalence,
no key bytes in any output."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from pkcs11 import Attribute, Mechanism

from hsmflash.token.keys import find_key

ATTRS = (Attribute.SENSITIVE, Attribute.EXTRACTABLE, Attribute.SIGN, Attribute.DERIVE,
         Attribute.ENCRYPT, Attribute.DECRYPT, Attribute.WRAP, Attribute.UNWRAP)


def test_keys_create_makes_policy_keys_with_only_their_usages(cli, policy_file, session, uniq):
    r = cli("--policy", policy_file, "--json", "keys", "create")
    assert r.code == 0, r.output
    created = {k["name"]: k for k in json.loads(r.out)}
    expected = {
        f"{uniq}-sb-release": ("rsa-3072", {Attribute.SIGN}),
        f"{uniq}-sbv1-app": ("ec-p256", {Attribute.SIGN}),
        f"{uniq}-fe-master": ("aes-256", {Attribute.DERIVE}),
    }
    for name, (key_type, allowed) in expected.items():
        assert created[name]["type"] == key_type
        key = find_key(session, name)
        obj = key.primary
        assert obj[Attribute.SENSITIVE] is True
        assert obj[Attribute.EXTRACTABLE] is False
        assert obj[Attribute.LOCAL] is True  # generated in the token
        for a in (Attribute.SIGN, Attribute.DERIVE, Attribute.ENCRYPT, Attribute.DECRYPT,
                  Attribute.WRAP, Attribute.UNWRAP):
            if a in (Attribute.DERIVE, Attribute.WRAP, Attribute.UNWRAP, Attribute.ENCRYPT,
                     Attribute.DECRYPT) and key_type != "aes-256":
                continue  # not attributes of a private key in every token
            assert bool(obj[a]) == (a in allowed), (name, a)
    # idempotent: a second run creates nothing
    r2 = cli("--policy", policy_file, "--json", "keys", "create")
    assert r2.code == 0
    assert all(k["action"] == "exists" for k in json.loads(r2.out))


def test_imported_keys_behave_like_the_files_and_never_leak(cli, tmp_path, session, uniq):
    # espsecure makes the key files, as a user migrating from files would have them
    fe = tmp_path / "fe.bin"
    sk = tmp_path / "sb.pem"
    subprocess.run(["espsecure", "generate-flash-encryption-key", "--keylen", "256",
                    str(fe)], check=True, capture_output=True,
                   env={**os.environ, "PATH": str(Path(os.sys.executable).parent) + ":"
                        + os.environ["PATH"]})
    subprocess.run(["espsecure", "generate-signing-key", "--version", "2", "--scheme",
                    "ecdsa256", str(sk)], check=True, capture_output=True,
                   env={**os.environ, "PATH": str(Path(os.sys.executable).parent) + ":"
                        + os.environ["PATH"]})
    fe_bytes = fe.read_bytes()
    r1 = cli("keys", "import", f"{uniq}-fe", "--type", "aes-256", "--usage", "encrypt",
             "--file", fe)
    r2 = cli("keys", "import", f"{uniq}-sb", "--type", "ec-p256", "--file", sk)
    assert r1.code == 0 and r2.code == 0, r1.output + r2.output
    assert "destroy" in r1.out

    key = find_key(session, f"{uniq}-fe")
    assert key.primary[Attribute.EXTRACTABLE] is False
    assert key.primary[Attribute.SENSITIVE] is True
    block = os.urandom(64)
    expected = Cipher(algorithms.AES(fe_bytes), modes.ECB()).encryptor().update(block)  # noqa: S305
    assert key.primary.encrypt(block, mechanism=Mechanism.AES_ECB) == expected

    sb = find_key(session, f"{uniq}-sb")
    private = serialization.load_pem_private_key(sk.read_bytes(), None)
    digest = os.urandom(32)
    raw = sb.primary.sign(digest, mechanism=Mechanism.ECDSA)
    from cryptography.hazmat.primitives.asymmetric.utils import (
        Prehashed,
        encode_dss_signature,
    )
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    private.public_key().verify(der, digest, ec.ECDSA(Prehashed(hashes.SHA256())))

    # no key byte in any output, log or error message
    listing = cli("keys", "list")
    bad = cli("keys", "import", f"{uniq}-fe", "--type", "aes-256", "--file", fe)
    assert bad.code == 3
    audit = Path(os.environ["HSMFLASH_AUDIT_LOG"]).read_bytes()
    private_scalar = private.private_numbers().private_value.to_bytes(32, "big")
    for secret in (fe_bytes, private_scalar):
        for text in (r1.output, r2.output, listing.output, bad.output):
            assert secret.hex() not in text.lower()
            assert secret.hex().upper() not in text
        assert secret not in audit
        assert secret.hex().encode() not in audit


def test_keys_list_and_public(cli, tmp_path, uniq):
    assert cli("keys", "generate", f"{uniq}-r", "--type", "rsa-3072").code == 0
    assert cli("keys", "generate", f"{uniq}-x", "--type", "xts-aes-128").code == 0
    r = cli("--json", "keys", "list")
    keys = {k["name"]: k for k in json.loads(r.out)}
    assert keys[f"{uniq}-x"]["kcv"].count("/") == 1  # two objects, two KCVs
    assert keys[f"{uniq}-r"]["fingerprint"].startswith("sha256:")
    pem = tmp_path / "r.pem"
    assert cli("keys", "public", f"pkcs11:token=hsmflash-test;object={uniq}-r", "-o", pem).code == 0
    pub = serialization.load_pem_public_key(pem.read_bytes())
    assert pub.key_size == 3072


@pytest.mark.parametrize(("args", "code", "needle"), [
    (("keys", "generate", "k", "--type", "aes-512"), 3, "aes-512"),
    (("keys", "generate", "k", "--type", "rsa-3072", "--usage", "derive"), 3, "derive"),
    (("keys", "public", "no-such-key-anywhere", "-o", "x.pem"), 4, "no-such-key-anywhere"),
])
def test_bad_key_requests(cli, args, code, needle, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = cli(*args)
    assert r.code == code, r.output
    assert needle in r.err
    assert len(r.err.strip().splitlines()) == 1
    assert not (tmp_path / "x.pem").exists()


def test_digest_of_a_secret_key_says_it_has_no_public_half(cli, uniq):
    """`keys digest` reads public halves without the PIN: a secret key is named as such, not
    reported missing as if it did not exist."""
    assert cli("keys", "generate", f"{uniq}-aes", "--type", "aes-256").code == 0
    r = cli("keys", "digest", f"{uniq}-aes", "--chip", "esp32s3")
    assert r.code == 4
    assert f"no public key '{uniq}-aes'" in r.err and "secret key" in r.err


def test_bad_key_type_is_refused_before_the_pin_is_asked(cli, monkeypatch, tmp_path):
    """Bad input is named before the token is opened: no PIN needed to learn the type is wrong."""
    monkeypatch.delenv("HSMFLASH_PIN")
    r = cli("keys", "generate", "x", "--type", "bogus")
    assert r.code == 3 and "unknown key type 'bogus'" in r.err, r.output
    key = tmp_path / "k.bin"
    key.write_bytes(bytes(32))
    r = cli("keys", "import", "x", "--type", "aes-256", "--usage", "sign", "--file", key)
    assert r.code == 3 and "usage 'sign' is not possible" in r.err, r.output
