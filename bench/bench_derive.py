"""Per-device key derivations per second (aes-ecb-v1, XTS_AES_128_KEY: K1 and K2) in SoftHSM2.

Run: .venv/bin/python bench/bench_derive.py [--devices N] [--audited N] [--rounds N]

A throw-away SoftHSM2 token is created in a temp dir and removed afterwards; the master is an
imported random AES-256 key (CKA_DERIVE only, a token object like `keys create` makes), so the
software figures can be checked against the token's KCVs. Rates, per device (= 2 C_DeriveKey):
  library        keyuse.KeyUse.derive + DerivedKey.kcvs + destroy (batch encryption's path)
  what-if        the library path with TokenKey.usage read once (a recommended change)
  library+audit  derive.derive_kcv (`hsmflash derive`: Station.use, 2 fsync'd records)
  python-pkcs11  derive_key x2 + destroy x2 with hsmflash's template (the binding's floor)
  batch path     hsmflash.token.rawderive (`derive --devices`): the same C_DeriveKey / KCV
                 C_Encrypt / C_DestroyObject through the C API on the session python-pkcs11
                 opened, no per-object Python class; also with a session-object master
  derive --devices  the whole process on a lot, with 1 and 2 worker processes
There is no espsecure equivalent; the named peer is `cryptography` doing the same aes-ecb-v1
computation (SHA-256, AES-ECB under M, the two KCVs) in memory. Target: >= 5,000/s.
Each rate is the median over --rounds interleaved rounds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchlib import throwaway_token
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

TOKEN_LABEL = "hsmflash-bench-derive"
MASTER = "bench-master"
PURPOSE = "XTS_AES_128_KEY"
TARGET = 5000.0
ZERO16 = bytes(16)


def device_macs(n: int) -> list[bytes]:
    """n distinct unicast, non-zero base MACs (Espressif OUI 24:d7:eb)."""
    return [bytes([0x24, 0xD7, 0xEB, (i >> 16) & 0xFF, (i >> 8) & 0xFF, i & 0xFF])
            for i in range(1, n + 1)]


def ecb(key: bytes) -> Any:
    return Cipher(algorithms.AES(key), modes.ECB()).encryptor()  # noqa: S305 - KDF/KCV are ECB


def software_peer(master: bytes, macs: list[bytes]) -> list[str]:
    """aes-ecb-v1 in memory with cryptography: K_D = AES-ECB_M(X_1 || X_2), then both KCVs."""
    from hsmflash.formats import kdf

    enc = ecb(master)
    out = []
    for mac in macs:
        kd = enc.update(b"".join(kdf.derivation_blocks(mac, PURPOSE)))
        out.append("/".join(ecb(kd[i:i + 16]).update(ZERO16)[:3].hex() for i in (0, 16)))
    return out



def usage_read_once(key: Any) -> Any:
    """What-if for a recommendation: the same TokenKey, its usage flags read once (as a cached
    property would) instead of three token attribute reads per derivation."""
    klass = type("UsageReadOnce", (type(key),), {"usage": key.usage})
    return klass(key.name, key.type, key.objects, key.public)


def rate(fn: Callable[[], object], n: int) -> float:
    start = time.perf_counter()
    fn()
    return n / (time.perf_counter() - start)


def per_call_us(fn: Callable[[], object], n: int = 300) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e6


def cli_batch(count: int) -> None:
    """Whole process: `hsmflash derive --devices LOT -o KCVS` with 1 and 2 worker processes."""
    import subprocess

    with throwaway_token(TOKEN_LABEL) as (tmp, pin):
        key = tmp / "master.bin"
        key.write_bytes(os.urandom(32))
        env = {**os.environ, "HSMFLASH_TOKEN": TOKEN_LABEL, "HSMFLASH_PIN": pin,
               "HSMFLASH_AUDIT_LOG": str(tmp / "audit.jsonl")}
        hs = str(Path(sys.executable).parent / "hsmflash")
        subprocess.run([hs, "keys", "import", MASTER, "--type", "aes-256", "--usage", "derive",
                        "--file", str(key)], env=env, check=True, capture_output=True)
        lot = tmp / "lot.csv"
        lot.write_text("mac\n" + "\n".join(kdf_mac(i) for i in range(count)) + "\n")
        for workers in (1, 2):
            start = time.perf_counter()
            subprocess.run([hs, "derive", "--master", MASTER, "--devices", str(lot), "-o",
                            str(tmp / f"kcvs{workers}.csv"), "--workers", str(workers)],
                           env=env, check=True, capture_output=True)
            seconds = time.perf_counter() - start
            verdict = "ok" if count / seconds >= TARGET else "MISSED"
            print(f"derive --devices ({count} devices, {workers} worker(s), whole process): "
                  f"{count / seconds:.0f}/s; target >= {TARGET:.0f}/s: {verdict}")
        if (tmp / "kcvs1.csv").read_bytes() != (tmp / "kcvs2.csv").read_bytes():
            raise SystemExit("worker processes gave different KCVs")


def kdf_mac(i: int) -> str:
    return "24:0a:" + ":".join(f"{b:02x}" for b in i.to_bytes(4, "big"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=2000, help="MACs per round (2000)")
    parser.add_argument("--audited", type=int, default=500,
                        help="MACs per round on the audited path (500; 2 fsyncs each)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (3)")
    parser.add_argument("--cli-devices", type=int, default=40000,
                        help="lot size for the whole-process `hsmflash derive --devices` runs")
    args = parser.parse_args()
    macs = device_macs(args.devices)
    audited_macs = macs[:args.audited]
    master_bytes = os.urandom(32)

    with throwaway_token(TOKEN_LABEL) as (tmp, pin):
        from pkcs11 import Attribute, KeyType, Mechanism

        from hsmflash.derive import derive_kcv
        from hsmflash.formats import kdf
        from hsmflash.keyuse import Station
        from hsmflash.policy import unrestricted_policy
        from hsmflash.token.keys import import_key
        from hsmflash.token.rawderive import RawDeriver
        from hsmflash.token.session import TokenConfig, find_module

        config = TokenConfig(token_label=TOKEN_LABEL, pin_handler=lambda _prompt: pin)
        with Station.open(config, unrestricted_policy(), tmp / "audit.jsonl",
                          station="bench", actor="bench") as st:
            master = import_key(st.session, MASTER, "aes-256", bytearray(master_bytes),
                                ("derive",))
            master = st.key(MASTER)
            session_master = st.session.generate_key(
                KeyType.AES, 256, store=False,
                template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
                          Attribute.DERIVE: True, Attribute.ENCRYPT: False})
            raw = RawDeriver(find_module(None), st.session, master.primary)
            raw_session_master = RawDeriver(find_module(None), st.session, session_master)
            template = {Attribute.TOKEN: False, Attribute.SENSITIVE: True,
                        Attribute.EXTRACTABLE: False, Attribute.ENCRYPT: True,
                        Attribute.DECRYPT: True, Attribute.DERIVE: False, Attribute.WRAP: False,
                        Attribute.UNWRAP: False, Attribute.SIGN: False, Attribute.VERIFY: False}

            def library() -> None:
                with st.use("bench.derive", master) as use:  # one audited use, many derivations
                    for mac in macs:
                        derived = use.derive(mac, PURPOSE)
                        derived.kcvs()
                        derived.destroy()

            cached = usage_read_once(master)

            def library_usage_cached() -> None:
                with st.use("bench.derive", cached) as use:
                    for mac in macs:
                        derived = use.derive(mac, PURPOSE)
                        derived.kcvs()
                        derived.destroy()

            def library_audited() -> None:
                for mac in audited_macs:
                    derive_kcv(st, master, mac, PURPOSE)

            def python_pkcs11() -> None:
                base = master.primary
                for mac in macs:
                    for block in kdf.derivation_blocks(mac, PURPOSE):
                        base.derive_key(KeyType.AES, 128, mechanism=Mechanism.AES_ECB_ENCRYPT_DATA,
                                        mechanism_param=block, template=template).destroy()

            # correctness: the token's KCVs equal the in-memory computation
            check = macs[:20]
            token_kcvs = [derive_kcv(st, master, mac, PURPOSE) for mac in check]
            if token_kcvs != software_peer(master_bytes, check):
                raise SystemExit("token KCVs differ from the software aes-ecb-v1 computation")
            if [raw.kcv(m, PURPOSE) for m in check] != token_kcvs:
                raise SystemExit("the batch path's KCVs differ from KeyUse.derive's")

            n, na = len(macs), len(audited_macs)
            cases: dict[str, tuple[Callable[[], object], int]] = {
                "software peer (cryptography, in memory)":
                    (lambda: software_peer(master_bytes, macs), n),
                "library: KeyUse.derive+kcvs+destroy": (library, n),
                "  what-if: library, usage read once": (library_usage_cached, n),
                "library+audit: derive.derive_kcv": (library_audited, na),
                "python-pkcs11 floor: derive_key+destroy": (python_pkcs11, n),
                "batch path: rawderive (C API) + KCVs": (
                    lambda: [raw.kcv(m, PURPOSE) for m in macs], n),
                "  what-if: batch path, session-object master": (
                    lambda: [raw_session_master.kcv(m, PURPOSE) for m in macs], n),
            }
            rates: dict[str, list[float]] = {name: [] for name in cases}
            for _ in range(args.rounds):
                for name, (fn, count) in cases.items():
                    rates[name].append(rate(fn, count))

            # where a library-path derivation spends its time (µs, single calls)
            mac0 = macs[0]
            detail = {
                "TokenKey.usage (3 token attribute reads)": per_call_us(lambda: master.usage),
                "TokenKey.kcv() (CKA_CHECK_VALUE read)": per_call_us(master.kcv),
                "kdf.derivation_blocks": per_call_us(lambda: kdf.derivation_blocks(mac0, PURPOSE)),
                "AuditLog.append (lock, tail, fsync)": per_call_us(
                    lambda: st.audit.append("bench", "ok", detail={"what": "timing"}), 100),
            }
            session_master.destroy()

    med = {name: statistics.median(v) for name, v in rates.items()}
    print(f"per-device derivations ({PURPOSE}: 2 objects), SoftHSM2, {args.devices} MACs "
          f"({args.audited} audited), median of {args.rounds} rounds")
    print(f"{'path':<44} {'per s':>8} {'us each':>8} {'vs target':>10}")
    for name, value in med.items():
        print(f"{name:<44} {value:8.0f} {1e6 / value:8.1f} {value / TARGET:9.2f}x")
    print("per-call costs inside the library path:")
    for name, us in detail.items():
        print(f"  {name:<42} {us:8.1f} us")
    lib_rate = med["library: KeyUse.derive+kcvs+destroy"]
    peer = med["software peer (cryptography, in memory)"]
    verdict = "ok" if lib_rate >= TARGET else "MISSED"
    print(f"derive (library path): {lib_rate:.0f}/s vs software peer {peer:.0f}/s "
          f"(ratio {lib_rate / peer:.3f}); target >= {TARGET:.0f}/s: {verdict}")
    print(f"derive (audited, hsmflash derive path): "
          f"{med['library+audit: derive.derive_kcv']:.0f}/s")
    print(f"derive floor: python-pkcs11 {med['python-pkcs11 floor: derive_key+destroy']:.0f}/s")
    batch = med["batch path: rawderive (C API) + KCVs"]
    print(f"derive (batch path, one process): {batch:.0f}/s vs software peer {peer:.0f}/s; "
          f"target >= {TARGET:.0f}/s: {'ok' if batch >= TARGET else 'MISSED'}")
    cli_batch(args.cli_devices)

if __name__ == "__main__":
    main()
