"""Device CA in the real token; certificates and CRLs read by openssl and cryptography.

The device's NVS is decrypted with keys re-derived here from DESIGN.md's aes-ecb-v1 text
(tests/vectors/make_kdf_vectors.py) and the NVS tool's own decrypt; nothing is taken from
hsmflash's output but the files it wrote.
"""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from esp_idf_nvs_partition_gen import nvs_partition_gen as nvsgen

from make_kdf_vectors import derive as spec_derive

CRED_MASTER = bytes.fromhex("8f1e0d2c3b4a59687786a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0")
FE_MASTER = bytes.fromhex("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4")
DEV_A = "24:0a:c4:0a:00:01"
DEV_B = "24:0a:c4:0a:00:02"
NVS_SIZE = 0x6000
KEYS_ADDR = 0xF000


# -- readers, independent of hsmflash ------------------------------------------------------------

def nvs_decrypt(image: bytes, keys: bytes, tmp: Path) -> bytes:
    (tmp / "enc.bin").write_bytes(image)
    (tmp / "k.bin").write_bytes(keys)
    nvsgen.decrypt(SimpleNamespace(input=str(tmp / "enc.bin"), key=str(tmp / "k.bin"),
                                   output="dec.bin", outdir=str(tmp)))
    data = (tmp / "dec.bin").read_bytes()
    for name in ("enc.bin", "k.bin", "dec.bin"):
        (tmp / name).unlink()
    return data


def nvs_blobs(image: bytes) -> dict[tuple[str, str], bytes]:
    """Blobs (NVS v2: BLOB_DATA 0x42 chunks) and strings of a plain NVS image by (ns, key)."""
    names: dict[int, str] = {}
    chunks: dict[tuple[int, str], list[tuple[int, bytes]]] = {}
    for base in range(0, len(image), 4096):
        page = image[base:base + 4096]
        if page[:4] == b"\xff" * 4:
            continue
        i = 0
        while i < 126:
            if (page[32 + i // 4] >> (2 * (i % 4))) & 3 != 0b10:
                i += 1
                continue
            e = page[64 + 32 * i: 96 + 32 * i]
            ns, kind, span, chunk = e[0], e[1], e[2], e[3]
            key = e[8:24].split(b"\0")[0].decode()
            if ns == 0:
                names[e[24]] = key
            elif kind in (0x42, 0x21):
                size = int.from_bytes(e[24:26], "little")
                start = 96 + 32 * i
                chunks.setdefault((ns, key), []).append((chunk, page[start:start + size]))
            i += span
    return {(names[ns], key): b"".join(c for _, c in sorted(parts))
            for (ns, key), parts in chunks.items()}


def openssl(*args: str | Path, check: bool = False) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True,
                          check=check)


def pem_to_der_crl(path: Path) -> x509.CertificateRevocationList:
    return x509.load_pem_x509_crl(path.read_bytes())


# -- fixtures ------------------------------------------------------------------------------------

@pytest.fixture(params=["ec-p256", "rsa-3072"])
def ca_type(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def env(cli, tmp_path, uniq, policy_file, ca_type):  # type: ignore[no-untyped-def]
    """Known masters, a generated CA key of `ca_type`, a policy whose [ca] uses them."""
    for name, material in (("cred-master", CRED_MASTER), ("fe-master", FE_MASTER)):
        f = tmp_path / f"{name}.key"
        f.write_bytes(material)
        r = cli("keys", "import", f"{uniq}-{name}", "--type", "aes-256", "--usage", "derive",
                "--file", f)
        assert r.code == 0, r.output
        f.unlink()
    r = cli("keys", "generate", f"{uniq}-device-ca", "--type", ca_type, "--usage", "sign")
    assert r.code == 0, r.output
    ca_dir = tmp_path / "ca-state"
    text = policy_file.read_text()
    text = text.replace('type = "ec-p256"\nusage = ["sign"]\n\n[keys.audit]',
                        f'type = "{ca_type}"\nusage = ["sign"]\n\n[keys.audit]')
    text = text.replace("[keys.device-ca]", f"[keys.{uniq}-device-ca]")
    text = text.replace('key = "device-ca"', f'key = "{uniq}-device-ca"')
    text = text.replace('dir = "hsmflash-ca"', f'dir = "{ca_dir}"')
    text = text.replace('subject = "CN={mac}"', 'subject = "CN={mac},O=Example Devices"')
    policy_file.write_text(text)
    out = tmp_path / "out"
    out.mkdir()

    def run(*args: object):  # type: ignore[no-untyped-def]
        return cli("--policy", policy_file, *args)

    return SimpleNamespace(run=run, ca_key=f"{uniq}-device-ca", ca_dir=ca_dir, out=out,
                           policy=policy_file, uniq=uniq, tmp=tmp_path)


def init_ca(env: Any) -> Path:
    pem = env.out / "ca.pem"
    r = env.run("ca", "init", "--subject", "CN=Example Device CA,O=Example", "-o", pem)
    assert r.code == 0, r.output
    return pem


def issue(env: Any, mac: str, *extra: object) -> tuple[Any, Path, Path]:
    tag = mac.replace(":", "")
    nvs, keys = env.out / f"nvs-{tag}.bin", env.out / f"keys-{tag}.bin"
    r = env.run("--json", "credentials", "issue", "--kind", "x509", "--device", mac, "--chip",
                "esp32s3", "--nvs-size", hex(NVS_SIZE), "--nvs-keys-address", hex(KEYS_ADDR),
                "--nvs-out", nvs, "--nvs-keys-out", keys, *extra)
    return r, nvs, keys


def device_material(env: Any, mac: str, nvs: Path) -> tuple[bytes, bytes]:
    """(private key DER, certificate DER) read back from the device's NVS by the spec."""
    plain = nvs_decrypt(nvs.read_bytes(), spec_derive(CRED_MASTER, mac, "NVS_KEYS", 64),
                        env.tmp)
    blobs = nvs_blobs(plain)
    return blobs[("hsmflash", "dev_key")], blobs[("hsmflash", "dev_cert")]


def crl(env: Any) -> Path:
    path = env.out / "crl.pem"
    r = env.run("credentials", "crl", "-o", path)
    assert r.code == 0, r.output
    return path


def verify(ca_pem: Path, cert_der: bytes, crl_pem: Path | None, tmp: Path) -> str:
    cert_pem = tmp / "leaf.pem"
    cert_pem.write_bytes(x509.load_der_x509_certificate(cert_der).public_bytes(
        serialization.Encoding.PEM))
    args: list[str | Path] = ["verify", "-CAfile", ca_pem, "-purpose", "sslclient"]
    if crl_pem is not None:
        args += ["-crl_check", "-CRLfile", crl_pem]
    r = openssl(*args, cert_pem)
    return r.stdout + r.stderr


# -- the CA --------------------------------------------------------------------------------------

def test_ca_init_makes_a_root_openssl_accepts_and_keeps_it_in_the_token(env, ca_type):
    pem = init_ca(env)
    assert "OK" in openssl("verify", "-CAfile", pem, pem).stdout
    cert = x509.load_pem_x509_certificate(pem.read_bytes())
    assert cert.subject.rfc4514_string() == "O=Example,CN=Example Device CA"
    assert cert.issuer == cert.subject
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey) == (ca_type == "ec-p256")
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
    # the public key is the token key's
    pub = env.out / "ca-key.pem"
    assert env.run("keys", "public", env.ca_key, "-o", pub).code == 0
    assert cert.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo) == \
        pub.read_bytes()
    r = env.run("--json", "ca", "show")
    assert r.code == 0, r.output
    assert '"self_signed": true' in r.out
    # a second init is refused, nothing written
    again = env.out / "again.pem"
    r = env.run("ca", "init", "--subject", "CN=Other", "-o", again)
    assert r.code == 3 and "already has a CA certificate" in r.output and not again.exists()


def test_ca_csr_and_import_cert_from_a_root_elsewhere(env, tmp_path):
    csr_path = env.out / "ca.csr"
    r = env.run("ca", "csr", "--subject", "CN=Example Sub CA,O=Example", "-o", csr_path)
    assert r.code == 0, r.output
    req = x509.load_pem_x509_csr(csr_path.read_bytes())
    assert req.is_signature_valid
    # the company root, elsewhere (openssl as the outside CA)
    root_key = tmp_path / "root.key"
    root_pem = tmp_path / "root.pem"
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", root_key, "-out", root_pem, "-subj", "/CN=Company Root", "-days", "30",
            check=True)
    ext = tmp_path / "ext.cnf"
    ext.write_text("basicConstraints=critical,CA:TRUE,pathlen:0\n"
                   "keyUsage=critical,keyCertSign,cRLSign\nsubjectKeyIdentifier=hash\n")
    sub = tmp_path / "sub.pem"
    openssl("x509", "-req", "-in", csr_path, "-CA", root_pem, "-CAkey", root_key,
            "-CAcreateserial", "-out", sub, "-days", "30", "-extfile", ext, check=True)
    # a certificate for another key is refused
    r = env.run("ca", "import-cert", root_pem)
    assert r.code == 6 and "another key" in r.output
    r = env.run("ca", "import-cert", sub)
    assert r.code == 0, r.output
    r, _, _ = issue(env, DEV_A)
    assert r.code == 0, r.output
    chain = tmp_path / "chain.pem"
    _, cert_der = device_material(env, DEV_A, env.out / "nvs-240ac40a0001.bin")
    chain.write_bytes(sub.read_bytes())
    leaf = tmp_path / "leaf.pem"
    leaf.write_bytes(x509.load_der_x509_certificate(cert_der).public_bytes(
        serialization.Encoding.PEM))
    out = openssl("verify", "-CAfile", root_pem, "-untrusted", chain, leaf)
    assert "OK" in out.stdout, out.stdout + out.stderr


# -- device certificates -------------------------------------------------------------------------

def test_device_certificate_in_nvs_has_every_field_and_verifies_with_crl(env, token_env):
    ca_pem = init_ca(env)
    r, nvs, _ = issue(env, DEV_A)
    assert r.code == 0, r.output
    key_der, cert_der = device_material(env, DEV_A, nvs)
    ca_cert = x509.load_pem_x509_certificate(ca_pem.read_bytes())
    cert = x509.load_der_x509_certificate(cert_der)
    private = serialization.load_der_private_key(key_der, None)
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert isinstance(private.curve, ec.SECP256R1)
    # the key in NVS is the certificate's
    assert private.public_key().public_numbers() == cert.public_key().public_numbers()
    cert.verify_directly_issued_by(ca_cert)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == DEV_A
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == \
        "Example Devices"
    assert cert.issuer == ca_cert.subject
    assert 0 < cert.serial_number < 2**128 and cert.serial_number.bit_length() > 64
    life = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert life == timedelta(days=3650)
    assert abs(cert.not_valid_before_utc - datetime.now(UTC)) < timedelta(minutes=5)
    ext = cert.extensions
    bc = ext.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    ku = ext.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign
    assert list(ext.get_extension_for_class(x509.ExtendedKeyUsage).value) == \
        [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert ext.get_extension_for_class(x509.SubjectKeyIdentifier).value == \
        x509.SubjectKeyIdentifier.from_public_key(cert.public_key())
    assert ext.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier == \
        ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    # the manifest-like output and the audit log name the serial, never the key
    assert f"{cert.serial_number:x}" in r.out
    audit = Path(token_env["HSMFLASH_AUDIT_LOG"]).read_text()
    assert f"{cert.serial_number:x}" in audit and '"op":"cert.issue"' in audit
    # openssl: chain and CRL
    crl_pem = crl(env)
    assert ": OK" in verify(ca_pem, cert_der, crl_pem, env.tmp)
    lst = pem_to_der_crl(crl_pem)
    assert lst.is_signature_valid(ca_cert.public_key())  # type: ignore[arg-type]
    assert lst.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 1
    assert lst.next_update_utc - lst.last_update_utc == timedelta(days=30)
    # the device key's bytes are nowhere but inside the encrypted NVS
    hay = [r.output.encode(), audit.encode()]
    hay += [p.read_bytes() for p in env.tmp.rglob("*") if p.is_file()]
    for blob in hay:
        assert key_der not in blob and key_der.hex().encode() not in blob
        assert private.private_numbers().private_value.to_bytes(32, "big") not in blob


def test_revoke_puts_the_serial_in_the_crl_and_openssl_refuses(env):
    ca_pem = init_ca(env)
    r, nvs_a, _ = issue(env, DEV_A)
    assert r.code == 0, r.output
    r, nvs_b, _ = issue(env, DEV_B)
    assert r.code == 0, r.output
    r = env.run("credentials", "revoke", DEV_A, "--reason", "board opened")
    assert r.code == 0, r.output
    crl_pem = crl(env)
    _, cert_a = device_material(env, DEV_A, nvs_a)
    _, cert_b = device_material(env, DEV_B, nvs_b)
    assert "certificate revoked" in verify(ca_pem, cert_a, crl_pem, env.tmp)
    assert ": OK" in verify(ca_pem, cert_b, crl_pem, env.tmp)
    lst = pem_to_der_crl(crl_pem)
    serial_a = x509.load_der_x509_certificate(cert_a).serial_number
    assert [e.serial_number for e in lst] == [serial_a]
    assert lst.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 2
    # twice: a clear error, the CRL unchanged
    before = (env.ca_dir / "crl.der").read_bytes()
    r = env.run("credentials", "revoke", DEV_A)
    assert r.code == 3 and "already revoked" in r.output
    assert (env.ca_dir / "crl.der").read_bytes() == before
    # by serial
    serial_b = x509.load_der_x509_certificate(cert_b).serial_number
    r = env.run("credentials", "revoke", "--serial", f"{serial_b:x}")
    assert r.code == 0, r.output
    assert "certificate revoked" in verify(ca_pem, cert_b, crl(env), env.tmp)


def test_reissue_revokes_the_previous_certificate_unless_kept(env):
    ca_pem = init_ca(env)
    r, nvs, _ = issue(env, DEV_A)
    assert r.code == 0, r.output
    _, first = device_material(env, DEV_A, nvs)
    r, nvs, _ = issue(env, DEV_A)
    assert r.code == 0, r.output
    _, second = device_material(env, DEV_A, nvs)
    crl_pem = crl(env)
    assert "certificate revoked" in verify(ca_pem, first, crl_pem, env.tmp)
    assert ": OK" in verify(ca_pem, second, crl_pem, env.tmp)
    r, nvs, _ = issue(env, DEV_A, "--keep-previous")
    assert r.code == 0, r.output
    _, third = device_material(env, DEV_A, nvs)
    crl_pem = crl(env)
    assert ": OK" in verify(ca_pem, second, crl_pem, env.tmp)
    assert ": OK" in verify(ca_pem, third, crl_pem, env.tmp)


def _device_csr(subject: str, tmp: Path, curve: str = "P-256") -> Path:
    key, csr = tmp / "dev.key", tmp / "dev.csr"
    openssl("req", "-new", "-newkey", "ec", "-pkeyopt", f"ec_paramgen_curve:{curve}", "-nodes",
            "-keyout", key, "-out", csr, "-subj", subject, check=True)
    return csr


def test_sign_csr_checks_signature_key_and_subject_before_the_ca_key(env, token_env):
    ca_pem = init_ca(env)
    log = Path(token_env["HSMFLASH_AUDIT_LOG"])
    good = _device_csr(f"/CN={DEV_A}/O=Example Devices", env.tmp)
    out = env.out / "dev.pem"
    r = env.run("credentials", "sign-csr", good, "--device", DEV_A, "-o", out)
    assert r.code == 0, r.output
    cert = x509.load_pem_x509_certificate(out.read_bytes())
    assert ": OK" in verify(ca_pem, cert.public_bytes(serialization.Encoding.DER), None,
                            env.tmp)
    uses = log.read_text().count('"op":"cert.issue"')
    # a subject the policy does not allow for this device
    other = _device_csr(f"/CN={DEV_B}/O=Example Devices", env.tmp)
    bad_out = env.out / "bad.pem"
    r = env.run("credentials", "sign-csr", other, "--device", DEV_A, "-o", bad_out)
    assert r.code == 5 and "subject" in r.output and not bad_out.exists()
    # a P-384 key
    p384 = _device_csr(f"/CN={DEV_A}/O=Example Devices", env.tmp, "P-384")
    r = env.run("credentials", "sign-csr", p384, "--device", DEV_A, "-o", bad_out)
    assert r.code == 5 and "P-256" in r.output and not bad_out.exists()
    # a bad signature (one byte of the signature flipped)
    req = x509.load_pem_x509_csr(good.read_bytes())
    der = bytearray(req.public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0x01
    tampered = env.tmp / "tampered.der"
    tampered.write_bytes(bytes(der))
    r = env.run("credentials", "sign-csr", tampered, "--device", DEV_A, "-o", bad_out)
    assert r.code == 6 and "signature" in r.output and not bad_out.exists()
    assert log.read_text().count('"op":"cert.issue"') == uses  # the CA key was not used


# -- bad input -----------------------------------------------------------------------------------

def test_issue_before_the_ca_has_a_certificate_is_refused_with_nothing_written(env, token_env):
    r, nvs, keys = issue(env, DEV_A)
    assert r.code == 4 and "no CA certificate" in r.output and "ca init" in r.output
    assert not nvs.exists() and not keys.exists()
    log = Path(token_env["HSMFLASH_AUDIT_LOG"])
    assert not log.exists() or "cert.issue" not in log.read_text()
    r = env.run("credentials", "crl", "-o", env.out / "crl.pem")
    assert r.code == 4 and not (env.out / "crl.pem").exists()


def test_ca_key_of_the_wrong_type_or_usage(env, cli, uniq):
    # the policy names another key
    r = env.run("ca", "init", "--key", f"{uniq}-cred-master", "--subject", "CN=x", "-o",
                env.out / "x.pem")
    assert r.code == 5 and not (env.out / "x.pem").exists()
    # without a policy: an AES key, and an EC key without sign
    r = cli("ca", "init", "--key", f"{uniq}-cred-master", "--subject", "CN=x", "-o",
            env.out / "x.pem")
    assert r.code == 4 and "ec-p256 or rsa-3072" in r.output
    # a policy whose [ca] key is an aes key does not load
    text = env.policy.read_text().replace(f'key = "{uniq}-device-ca"',
                                          f'key = "{uniq}-cred-master"')
    bad = env.tmp / "bad.toml"
    bad.write_text(text)
    r = cli("--policy", bad, "ca", "show")
    assert r.code == 3 and "ca.key" in r.output


def test_revoking_an_unknown_device_and_a_tampered_crl(env):
    init_ca(env)
    r = env.run("credentials", "revoke", DEV_B)
    assert r.code == 3 and "no certificate issued" in r.output
    assert not (env.ca_dir / "crl.der").exists()
    r, _, _ = issue(env, DEV_A)
    assert r.code == 0, r.output
    crl(env)
    path = env.ca_dir / "crl.der"
    der = bytearray(path.read_bytes())
    der[-3] ^= 0x01
    path.write_bytes(bytes(der))
    r = env.run("credentials", "revoke", DEV_A)
    assert r.code == 6 and "CRL" in r.output
    assert path.read_bytes() == bytes(der)  # nothing written
    out = env.out / "crl2.pem"
    r = env.run("credentials", "crl", "-o", out)
    assert r.code == 6 and not out.exists()


def test_command_line_mistakes_are_usage_errors(env):
    init_ca(env)
    r = env.run("credentials", "revoke", DEV_A, "--serial", "01")
    assert r.code == 2 and "not both" in r.output
    r = env.run("credentials", "revoke")
    assert r.code == 2
    r = env.run("credentials", "revoke", "--serial", "xyz")
    assert r.code == 3 and "hexadecimal" in r.output
    tmpl = env.tmp / "t.csv"
    tmpl.write_text("key,type,encoding,value\nns,namespace,,\npw,data,string,{secret}\n")
    r, nvs, keys = issue(env, DEV_A, "--template", tmpl)
    assert r.code == 2 and not nvs.exists() and not keys.exists()
    r = env.run("credentials", "issue", "--kind", "pem", "--device", DEV_A, "--chip", "esp32s3")
    assert r.code == 2 and "--kind" in r.output


def test_an_unwritable_ca_directory_is_refused_before_the_ca_key_is_used(env, token_env):
    init_ca(env)
    blocker = env.tmp / "a-file"
    blocker.write_text("not a directory")
    r, nvs, keys = issue(env, DEV_A, "--ca-dir", blocker / "ca")
    assert r.code == 3 and "CA directory" in r.output
    assert not nvs.exists() and not keys.exists()
    assert "cert.issue" not in Path(token_env["HSMFLASH_AUDIT_LOG"]).read_text()
