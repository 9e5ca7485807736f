"""Per-device key derivations per second (aes-ecb-v1, XTS_AES_128_KEY: K1 and K2) in SoftHSM2.

Run: .venv/bin/python bench/bench_derive.py [--devices N] [--audited N] [--rounds N]

A throw-away SoftHSM2 token is created in a temp dir and removed afterwards; the master is an
imported random AES-256 key (CKA_DERIVE only, a token object like `keys create` makes), so the
software figures can be checked against the token's KCVs. Rates, per device (= 2 C_DeriveKey):
  library        keyuse.Station.derive + DerivedKey.kcvs + destroy (batch encryption's path)
  what-if        the library path with TokenKey.usage read once (a recommended change)
  library+audit  perdevice.derive_kcv (`hsmflash derive`: Station.use, 2 fsync'd records)
  python-pkcs11  derive_key x2 + destroy x2 with hsmflash's template (the binding's floor)
  C calls        the same C_DeriveKey/C_DestroyObject (+ KCV C_Encrypt) through ctypes on the
                 session python-pkcs11 opened: SoftHSM's own floor, no per-object Python
  session master the C floor with the master as a session object (what a token object costs)
There is no espsecure equivalent; the named peer is `cryptography` doing the same aes-ecb-v1
computation (SHA-256, AES-ECB under M, the two KCVs) in memory. Target: >= 5,000/s.
Each rate is the median over --rounds interleaved rounds.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import secrets
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

TOKEN_LABEL = "hsmflash-bench-derive"
MASTER = "bench-master"
PURPOSE = "XTS_AES_128_KEY"
TARGET = 5000.0
ZERO16 = bytes(16)


@contextmanager
def throwaway_token() -> Iterator[tuple[Path, str]]:
    """A fresh SoftHSM2 token in a temp dir; SOFTHSM2_CONF is set before the PKCS#11 library
    is loaded. Yields (temp dir, user PIN); removes everything afterwards."""
    from hsmflash.devtoken import init_token, write_conf

    tmp = Path(tempfile.mkdtemp(prefix="hsmflash-bench-derive-"))
    try:
        conf = write_conf(tmp, tmp / "tokens")
        os.environ["SOFTHSM2_CONF"] = str(conf)
        pin = secrets.token_hex(8)
        init_token(conf, TOKEN_LABEL, secrets.token_hex(8), pin)
        yield tmp, pin
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def device_macs(n: int) -> list[bytes]:
    """n distinct unicast, non-zero base MACs (Espressif OUI 24:d7:eb)."""
    return [bytes([0x24, 0xD7, 0xEB, (i >> 16) & 0xFF, (i >> 8) & 0xFF, i & 0xFF])
            for i in range(1, n + 1)]


def ecb(key: bytes) -> Any:
    return Cipher(algorithms.AES(key), modes.ECB()).encryptor()  # noqa: S305 - KDF/KCV are ECB


def software_peer(master: bytes, macs: list[bytes]) -> list[str]:
    """aes-ecb-v1 in memory with cryptography: K_D = AES-ECB_M(X_1 || X_2), then both KCVs."""
    from hsmflash import kdf

    enc = ecb(master)
    out = []
    for mac in macs:
        kd = enc.update(b"".join(kdf.derivation_blocks(mac, PURPOSE)))
        out.append("/".join(ecb(kd[i:i + 16]).update(ZERO16)[:3].hex() for i in (0, 16)))
    return out


# -- a thin ctypes view of the same module, for the C-call floor -----------------------------
class _Mechanism(ctypes.Structure):
    _fields_ = (("mechanism", ctypes.c_ulong), ("parameter", ctypes.c_void_p),
                ("parameter_len", ctypes.c_ulong))


class _DerivationString(ctypes.Structure):
    _fields_ = (("data", ctypes.c_char_p), ("length", ctypes.c_ulong))


class _Attribute(ctypes.Structure):
    _fields_ = (("type", ctypes.c_ulong), ("value", ctypes.c_void_p),
                ("value_len", ctypes.c_ulong))


class CFloor:
    """C_DeriveKey / C_EncryptInit+C_Encrypt / C_DestroyObject straight into the module, on a
    session (and login) that python-pkcs11 opened in this process. The template is the one
    `Station.derive` passes, plus CLASS/KEY_TYPE/VALUE_LEN as python-pkcs11 adds them."""

    def __init__(self, module: str, session: Any) -> None:
        from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass

        self.lib = ctypes.CDLL(module)  # the already-loaded library: same instance and login
        self.session = ctypes.c_ulong(session.handle)
        bools = {Attribute.TOKEN: False, Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
                 Attribute.ENCRYPT: True, Attribute.DECRYPT: True, Attribute.DERIVE: False,
                 Attribute.WRAP: False, Attribute.UNWRAP: False, Attribute.SIGN: False,
                 Attribute.VERIFY: False}
        ulongs = {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES,
                  Attribute.VALUE_LEN: 16}
        self._keep: list[Any] = []
        items: list[tuple[int, Any]] = [(int(a), ctypes.c_ubyte(v)) for a, v in bools.items()]
        items += [(int(a), ctypes.c_ulong(int(v))) for a, v in ulongs.items()]
        self.template = (_Attribute * len(items))()
        for i, (attr, buf) in enumerate(items):
            self._keep.append(buf)
            self.template[i] = _Attribute(attr, ctypes.cast(ctypes.pointer(buf), ctypes.c_void_p),
                                          ctypes.sizeof(buf))
        self.derive_mech = int(Mechanism.AES_ECB_ENCRYPT_DATA)
        self.ecb = _Mechanism(int(Mechanism.AES_ECB), None, 0)

    def run(self, master_handle: int, macs: list[bytes], kcv: bool) -> None:
        from hsmflash import kdf

        lib, sess, tpl = self.lib, self.session, self.template
        base = ctypes.c_ulong(master_handle)
        handle, out, out_len = ctypes.c_ulong(), (ctypes.c_ubyte * 16)(), ctypes.c_ulong()
        for mac in macs:
            handles = []
            for block in kdf.derivation_blocks(mac, PURPOSE):
                param = _DerivationString(block, 16)
                mech = _Mechanism(self.derive_mech,
                                  ctypes.cast(ctypes.pointer(param), ctypes.c_void_p),
                                  ctypes.sizeof(param))
                rv = lib.C_DeriveKey(sess, ctypes.byref(mech), base, tpl, len(tpl),
                                     ctypes.byref(handle))
                if rv:
                    raise SystemExit(f"C_DeriveKey failed: {rv:#x}")
                handles.append(handle.value)
            if kcv:
                for h in handles:
                    out_len.value = 16
                    if (lib.C_EncryptInit(sess, ctypes.byref(self.ecb), ctypes.c_ulong(h))
                            or lib.C_Encrypt(sess, ZERO16, 16, out, ctypes.byref(out_len))):
                        raise SystemExit("C_Encrypt (KCV) failed")
            for h in handles:
                lib.C_DestroyObject(sess, ctypes.c_ulong(h))


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=2000, help="MACs per round (2000)")
    parser.add_argument("--audited", type=int, default=500,
                        help="MACs per round on the audited path (500; 2 fsyncs each)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (3)")
    args = parser.parse_args()
    macs = device_macs(args.devices)
    audited_macs = macs[:args.audited]
    master_bytes = os.urandom(32)

    with throwaway_token() as (tmp, pin):
        from pkcs11 import Attribute, KeyType, Mechanism

        from hsmflash import kdf
        from hsmflash.keys import import_key
        from hsmflash.keyuse import Station
        from hsmflash.perdevice import derive_kcv
        from hsmflash.policy import unrestricted_policy
        from hsmflash.token import TokenConfig, find_module

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
            floor = CFloor(find_module(None), st.session)
            template = {Attribute.TOKEN: False, Attribute.SENSITIVE: True,
                        Attribute.EXTRACTABLE: False, Attribute.ENCRYPT: True,
                        Attribute.DECRYPT: True, Attribute.DERIVE: False, Attribute.WRAP: False,
                        Attribute.UNWRAP: False, Attribute.SIGN: False, Attribute.VERIFY: False}

            def library() -> None:
                for mac in macs:
                    derived = st.derive(master, mac, PURPOSE)
                    derived.kcvs()
                    derived.destroy()

            cached = usage_read_once(master)

            def library_usage_cached() -> None:
                for mac in macs:
                    derived = st.derive(cached, mac, PURPOSE)
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

            n, na = len(macs), len(audited_macs)
            cases: dict[str, tuple[Callable[[], object], int]] = {
                "software peer (cryptography, in memory)":
                    (lambda: software_peer(master_bytes, macs), n),
                "library: Station.derive+kcvs+destroy": (library, n),
                "  what-if: library, usage read once": (library_usage_cached, n),
                "library+audit: perdevice.derive_kcv": (library_audited, na),
                "python-pkcs11 floor: derive_key+destroy": (python_pkcs11, n),
                "C calls: C_DeriveKey+C_Destroy": (
                    lambda: floor.run(master.primary.handle, macs, kcv=False), n),
                "C calls: + KCV C_Encrypt (= library work)": (
                    lambda: floor.run(master.primary.handle, macs, kcv=True), n),
                "C calls, session-object master, + KCV": (
                    lambda: floor.run(session_master.handle, macs, kcv=True), n),
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
    lib_rate = med["library: Station.derive+kcvs+destroy"]
    peer = med["software peer (cryptography, in memory)"]
    verdict = "ok" if lib_rate >= TARGET else "MISSED"
    print(f"derive (library path): {lib_rate:.0f}/s vs software peer {peer:.0f}/s "
          f"(ratio {lib_rate / peer:.3f}); target >= {TARGET:.0f}/s: {verdict}")
    print(f"derive (audited, hsmflash derive path): "
          f"{med['library+audit: perdevice.derive_kcv']:.0f}/s")
    print(f"derive floors: python-pkcs11 {med['python-pkcs11 floor: derive_key+destroy']:.0f}/s, "
          f"C calls {med['C calls: + KCV C_Encrypt (= library work)']:.0f}/s with KCVs "
          f"(token master), {med['C calls, session-object master, + KCV']:.0f}/s "
          "(session master)")


if __name__ == "__main__":
    main()
