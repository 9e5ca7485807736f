"""Device certificates against a real mosquitto broker on 127.0.0.1.

Two virtual ESP32-S3 are provisioned under a policy whose `[credentials] kind = "x509"`. Each
device's key and certificate are recovered the way the chip would: the `nvs_keys` partition is
decrypted from the virtual flash with the flash-encryption key re-derived by the aes-ecb-v1 spec
(espsecure), the NVS partition with the keys found there (the NVS tool), and the blobs read from
the plain NVS. mosquitto (require_certificate, cafile = the device CA, crlfile) accepts both;
after `credentials revoke` and `credentials crl`, the revoked one is refused and the other still
connects, both after a reload (SIGHUP) of the running broker and after a restart.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from test_ca import nvs_blobs, nvs_decrypt
from test_provision import (
    NVS_ADDRESS,
    NVS_KEYS_ADDRESS,
    NVS_SIZE,
    Bench,
    espsecure_decrypt,
    make_bench,
)

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
DEVICES = ("7c:df:a1:00:10:01", "7c:df:a1:00:10:02")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)


@contextlib.contextmanager
def broker(workdir: Path, ca_pem: Path, crl_pem: Path,
           server: tuple[Path, Path]) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """mosquitto with a TLS listener that requires a client certificate from the device CA."""
    if not Path(MOSQUITTO).exists():
        pytest.fail("mosquitto is not installed (bash softhsm/install.sh installs it)")
    port = free_port()
    conf = workdir / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\n"
        f"cafile {ca_pem}\ncertfile {server[0]}\nkeyfile {server[1]}\n"
        f"require_certificate true\nuse_identity_as_username true\ncrlfile {crl_pem}\n"
        "allow_anonymous false\npersistence false\nlog_dest stderr\nuser root\n")
    log = (workdir / "mosquitto.log").open("w")
    proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 15
        while True:
            if proc.poll() is not None:
                pytest.fail("mosquitto exited: " + (workdir / "mosquitto.log").read_text())
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
                break
            if time.monotonic() > deadline:
                pytest.fail("mosquitto did not listen")
            time.sleep(0.05)
        yield port, proc
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def mqtt_connect(port: int, server_ca: Path, cert: Path, key: Path, client_id: str) -> str:
    """TLS + MQTT 3.1.1 CONNECT: "accepted" on CONNACK 0, else what the client saw."""
    ctx = ssl.create_default_context(cafile=str(server_ca))
    ctx.load_cert_chain(str(cert), str(key))
    cid = client_id.encode()
    body = b"\x00\x04MQTT\x04\x02\x00\x3c" + len(cid).to_bytes(2, "big") + cid
    packet = b"\x10" + bytes([len(body)]) + body
    try:
        with socket.create_connection(("127.0.0.1", port), 5) as raw, \
                ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(packet)
            answer = tls.recv(4)
            return "accepted" if answer == b"\x20\x02\x00\x00" else f"answer {answer.hex()}"
    except (ssl.SSLError, ConnectionError, TimeoutError) as e:
        return f"{type(e).__name__}: {e}"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    tmp = tmp_path_factory.mktemp("mqtt")
    bench: Bench = make_bench(tmp)
    u = bench.uniq
    ca_dir = tmp / "ca-state"
    text = bench.policy.read_text()
    text = text.replace("[keys.device-ca]", f"[keys.{u}-device-ca]")
    text = text.replace('key = "device-ca"', f'key = "{u}-device-ca"')
    text = text.replace('dir = "hsmflash-ca"', f'dir = "{ca_dir}"')
    text = text.replace('[credentials]', '[credentials]\nkind = "x509"')
    policy = tmp / "x509.toml"
    policy.write_text(text)
    r = bench.cli("--policy", str(policy), "keys", "create")
    assert r.code == 0, r.output
    ca_pem = tmp / "device-ca.pem"
    r = bench.cli("--policy", str(policy), "ca", "init", "--subject",
                  "CN=Test Device CA,O=hsmflash tests", "-o", str(ca_pem))
    assert r.code == 0, r.output
    devices = {}
    manifest = tmp / "manifest.jsonl"
    for n, mac in enumerate(DEVICES):
        efuse, flash = bench.new_chip(tmp, "esp32s3", f"dev{n}", mac=mac)
        r = bench.cli("--policy", str(policy), "provision", "--chip", "esp32s3",
                      "--virtual-efuses", str(efuse), "--virtual-flash", str(flash),
                      "--manifest", str(manifest), *bench.image_args("esp32s3"))
        assert r.code == 0, r.output
        devices[mac] = (flash, r.output)
    # the server's own certificate, from a CA the clients trust (made by openssl)
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", tmp / "server-ca.key", "-out", tmp / "server-ca.pem", "-subj",
            "/CN=Test Server CA", "-days", "2")
    openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", tmp / "server.key", "-out", tmp / "server.csr", "-subj", "/CN=127.0.0.1")
    (tmp / "san.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", tmp / "server.csr", "-CA", tmp / "server-ca.pem", "-CAkey",
            tmp / "server-ca.key", "-CAcreateserial", "-out", tmp / "server.pem", "-days", "2",
            "-extfile", tmp / "san.cnf")
    return bench, policy, ca_pem, devices, manifest, tmp


def recover(bench: Bench, mac: str, flash: Path, tmp: Path) -> tuple[bytes, bytes]:
    """(key DER, certificate DER) from the virtual flash, with keys re-derived by the spec."""
    data = flash.read_bytes()
    keys_part = espsecure_decrypt(bench.spec_key(mac, "XTS_AES_128_KEY"),
                                  data[NVS_KEYS_ADDRESS:NVS_KEYS_ADDRESS + 0x1000],
                                  NVS_KEYS_ADDRESS, xts=True)
    plain = nvs_decrypt(data[NVS_ADDRESS:NVS_ADDRESS + NVS_SIZE], keys_part[:64], tmp)
    blobs = nvs_blobs(plain)
    return blobs[("hsmflash", "dev_key")], blobs[("hsmflash", "dev_cert")]


def client_files(key_der: bytes, cert_der: bytes, where: Path) -> tuple[Path, Path]:
    """The device's key and certificate as PEM files for Python's ssl (the test is the device)."""
    where.mkdir(exist_ok=True)
    key = serialization.load_der_private_key(key_der, None)
    (where / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    (where / "cert.pem").write_bytes(
        x509.load_der_x509_certificate(cert_der).public_bytes(serialization.Encoding.PEM))
    return where / "cert.pem", where / "key.pem"


def test_broker_accepts_devices_and_refuses_a_revoked_one(fleet):  # type: ignore[no-untyped-def]
    bench, policy, ca_pem, devices, manifest, tmp = fleet
    material = {mac: recover(bench, mac, flash, tmp) for mac, (flash, _) in devices.items()}
    # the manifest records each device's certificate serial and fingerprint
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    for mac, (_key, cert_der) in material.items():
        cert = x509.load_der_x509_certificate(cert_der)
        row = next(r for r in rows if r["mac"] == mac)
        assert row["cert_serial"] == f"{cert.serial_number:x}"
        import hashlib

        assert row["cert_sha256"] == hashlib.sha256(cert_der).hexdigest()
    # the device keys appear in no file the station wrote (outside the encrypted flash)
    # and in no output
    station_files = [p for p in tmp.rglob("*") if p.is_file() and not p.name.endswith(".flash")]
    for key_der, _ in material.values():
        for text in (out for _, out in devices.values()):
            assert key_der.hex() not in text
        for p in station_files:
            assert key_der not in p.read_bytes(), p
        for _, (flash, _) in devices.items():
            assert key_der not in flash.read_bytes()  # only encrypted on the device
    files = {mac: client_files(k, c, tmp / f"client-{n}")
             for n, (mac, (k, c)) in enumerate(material.items())}
    revoked, kept = DEVICES
    crl_pem = tmp / "crl.pem"
    r = bench.cli("--policy", str(policy), "credentials", "crl", "-o", str(crl_pem))
    assert r.code == 0, r.output
    server = (tmp / "server.pem", tmp / "server.key")
    with broker(tmp, ca_pem, crl_pem, server) as (port, proc):
        for mac in DEVICES:
            assert mqtt_connect(port, tmp / "server-ca.pem", *files[mac], mac) == "accepted"
        r = bench.cli("--policy", str(policy), "credentials", "revoke", revoked, "--reason",
                      "stolen")
        assert r.code == 0, r.output
        r = bench.cli("--policy", str(policy), "credentials", "crl", "-o", str(crl_pem))
        assert r.code == 0, r.output
        # a reload (SIGHUP) picks up the new CRL
        proc.send_signal(signal.SIGHUP)
        log_path = tmp / "mosquitto.log"
        deadline = time.monotonic() + 10
        while "Reloading config" not in log_path.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert mqtt_connect(port, tmp / "server-ca.pem", *files[revoked], revoked) != "accepted"
        assert mqtt_connect(port, tmp / "server-ca.pem", *files[kept], kept) == "accepted"
    # and so does a restart
    with broker(tmp, ca_pem, crl_pem, server) as (port, _proc):
        refused = mqtt_connect(port, tmp / "server-ca.pem", *files[revoked], revoked)
        assert mqtt_connect(port, tmp / "server-ca.pem", *files[kept], kept) == "accepted"
    # the client only sees the connection closed; the broker's log says why: the same
    # certificate it accepted before now fails verification against the new CRL
    assert refused != "accepted"
    log = (tmp / "mosquitto.log").read_text()
    assert "certificate verify failed" in log, log
    assert f"as {revoked}" not in log and f"as {kept}" in log
