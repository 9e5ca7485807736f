"""Device certificates issued per second, CA key in a throw-away SoftHSM2 token, in one batch.

Run: .venv/bin/python bench/bench_certs.py [--count N]
For each CA key type (EC P-256, RSA-3072): one `Station` (one login) issues N device
certificates through `hsmflash.ca.issue_device_cert` (a fresh P-256 device key made in memory
per certificate, TBS built by cryptography, signed in the token, reassembled, verified against
the CA certificate, fsync'd audit intent and outcome, index line). Beside it, the same
certificates signed by cryptography with the CA key in memory (CertificateBuilder.sign), in the
same process: the ratio is what keeping the CA key in the token costs. A second line adds the
device's encrypted NVS partition and nvs_keys partition (`credentials issue --kind x509`'s
library call), which is what a station does per device.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from benchlib import throwaway_token

ROOT = Path(__file__).resolve().parent.parent
LABEL = "hsmflash-bench-certs"


def policy(tmp: Path, ca_type: str):  # type: ignore[no-untyped-def]
    from hsmflash.policy import parse_policy

    return parse_policy({
        "token": {"label": LABEL},
        "keys": {"device-ca": {"type": ca_type, "usage": ["sign"]},
                 "cred-master": {"type": "aes-256", "usage": ["derive"]},
                 "fe-master": {"type": "aes-256", "usage": ["derive"]},
                 "revocation": {"type": "ec-p256", "usage": ["sign"]},
                 "audit": {"type": "ec-p256", "usage": ["sign"]}},
        "chips": {"esp32s3": {"flash_encryption": "xts-aes-128",
                              "derive": {"master": "fe-master"}}},
        "credentials": {"master": "cred-master"},
        "ca": {"key": "device-ca", "dir": str(tmp / f"ca-{ca_type}")},
        "export": {"efuse_burn": True, "device_secrets": True},
    }, "bench")


def software_rate(ca_type: str, count: int) -> float:
    """Certificates per second with the CA key in memory (cryptography signs)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID

    from hsmflash.formats.x509 import random_serial

    ca_key = (ec.generate_private_key(ec.SECP256R1()) if ca_type == "ec-p256"
              else rsa.generate_private_key(65537, 3072))
    issuer = x509.Name.from_rfc4514_string("CN=Bench CA")
    aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    start = time.perf_counter()
    for i in range(count):
        dev = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(UTC)
        (x509.CertificateBuilder()
         .subject_name(x509.Name.from_rfc4514_string(f"CN=dev{i}")).issuer_name(issuer)
         .public_key(dev.public_key()).serial_number(random_serial())
         .not_valid_before(now).not_valid_after(now + timedelta(days=3650))
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False,
                                      False), critical=True)
         .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
         .add_extension(x509.SubjectKeyIdentifier.from_public_key(dev.public_key()),
                        critical=False)
         .add_extension(aki, critical=False)
         .sign(ca_key, hashes.SHA256()))
    return count / (time.perf_counter() - start)


def token_rates(tmp: Path, pin: str, ca_type: str, count: int) -> tuple[float, float]:
    from cryptography.hazmat.primitives.asymmetric import ec

    from hsmflash import ca
    from hsmflash.credentials import build_x509_partitions
    from hsmflash.formats.x509 import parse_name
    from hsmflash.keyuse import Station
    from hsmflash.token.keys import generate_key, key_exists
    from hsmflash.token.session import TokenConfig

    pol = policy(tmp, ca_type)
    config = TokenConfig(token_label=LABEL, pin_handler=lambda _p: pin)
    audit = tmp / f"audit-{ca_type}.jsonl"
    with Station.open(config, pol, audit) as st:
        for name, spec in pol.keys.items():
            if name != "audit" and not key_exists(st.session, name):
                generate_key(st.session, name, spec.type, spec.usage)
        ca.init(st, ca.ca_key(st), parse_name("CN=Bench CA"), 3650)
        ca.ca_key(st).public_key()
    with Station.open(config, pol, audit) as st:
        start = time.perf_counter()
        for i in range(count):
            dev = ec.generate_private_key(ec.SECP256R1())
            ca.issue_device_cert(st, bytes.fromhex(f"7cdfa1{i:06x}"), dev.public_key())
        certs = count / (time.perf_counter() - start)
    n = max(count // 4, 1)
    with Station.open(config, pol, audit) as st:
        start = time.perf_counter()
        for i in range(n):
            build_x509_partitions(st, "esp32s3", bytes.fromhex(f"7cdfa2{i:06x}"),
                                  nvs_size=0x6000, nvs_keys_address=0xF000, nvs_address=0x9000)
        devices = n / (time.perf_counter() - start)
    return certs, devices


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200, help="certificates per run")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    for ca_type in ("ec-p256", "rsa-3072"):
        with throwaway_token(LABEL) as (tmp, pin):
            certs, devices = token_rates(tmp, pin, ca_type, args.count)
        soft = software_rate(ca_type, args.count)
        print(f"{ca_type:8s} CA in SoftHSM2: {certs:7.1f} certificates/s with audit "
              f"({args.count} in one batch); cryptography, key in memory: {soft:7.1f}/s; "
              f"ratio {certs / soft:.2f}")
        print(f"{'':8s} with NVS + nvs_keys partitions (credentials issue --kind x509): "
              f"{devices:6.1f} devices/s")


if __name__ == "__main__":
    main()
