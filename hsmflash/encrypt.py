"""Per-device keys and flash encryption with the keys inside the token.

XTS chips: K1/K2 are token objects (a stored `xts-aes-*` key, or session objects derived for the
device); `flashcrypt` makes one bulk ECB call per key. ESP32 classic needs a different AES key
per 32-byte block: with CKM_XOR_BASE_AND_DATA the token derives each block key itself;
otherwise, only where the policy allows it, the derived per-device key is exported into memory,
used and wiped, and the export is audited with its KCV (invariant 3).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hsmflash.chips import ESP32_AES256, XTS_AES_128, XTS_AES_128_FROM_128, XTS_AES_256, Chip
from hsmflash.errors import InputError, InternalError, TokenError
from hsmflash.formats import flashcrypt, kdf
from hsmflash.keyuse import DerivedKey, Station, wipe
from hsmflash.token.keys import TokenKey

PURPOSE_FOR_SCHEME = {
    XTS_AES_128: "XTS_AES_128_KEY",
    XTS_AES_256: "XTS_AES_256_KEY",
    ESP32_AES256: "FLASH_ENCRYPTION",
    XTS_AES_128_FROM_128: "XTS_AES_128_KEY_DERIVED_FROM_128_EFUSE_BITS",
}
PATH_XTS = "xts-in-token"
PATH_ESP32_XOR = "esp32-xor-in-token"
PATH_ESP32_EXPORT = "esp32-transient-export"
# ESP32-C2's 128-bit key: SHA-256 expansion needs the key bytes (no token digests a key into
# two AES objects), so the derived key is exported to memory, expanded, used and wiped
PATH_EFUSE128_EXPORT = "efuse128-transient-export"


@dataclass
class EncryptResult:
    output: bytes = field(repr=False)
    chip: str
    scheme: str
    address: int
    path: str
    kcv: str
    device: str | None
    input_sha256: str
    output_sha256: str

    def summary(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "output"}
        out["address"] = f"{self.address:#x}"
        return out


def scheme_for(st: Station, chip: Chip, scheme: str | None) -> tuple[str, int]:
    """The flash-encryption scheme and FLASH_CRYPT_CONFIG: explicit, else the policy's
    profile, else the chip's default."""
    prof = st.policy.chips.get(chip.name)
    chosen = scheme or (prof.flash_encryption if prof else chip.default_flash_encryption())
    chip.check_flash_encryption(chosen)
    return chosen, (prof.flash_crypt_config if prof else 0xF)


def check_data(data: bytes, address: int, name: str) -> None:
    """Input checks done before any key is touched.

    Raises:
        InputError: empty data, or address/length not a multiple of 16.
    """
    if not data:
        raise InputError(f"{name}: empty input, nothing to encrypt")
    if address % 16:
        raise InputError(f"address {address:#x} is not a multiple of 16")
    if len(data) % 16:
        raise InputError(f"{name}: length {len(data)} is not a multiple of 16 (pad the image)")


def derive_kcv(st: Station, master: TokenKey, device: bytes, purpose: str) -> str:
    """Derive a device key in the token, audit it, return its KCV(s); nothing secret leaves.

    Raises:
        InputError, TokenError, PolicyRefused.
    """
    kdf.key_length(purpose)
    kdf.check_device_id(device)
    mac = kdf.format_mac(device)

    def check() -> None:
        if st.policy.chips:
            st.policy.check_master(master.name)

    with st.use("derive", master, subject={"device": mac},
                detail={"purpose": purpose, "scheme": kdf.SCHEME}, check=check) as outcome:
        derived = st.derive(master, device, purpose)
        try:
            kcv = derived.kcv
        finally:
            derived.destroy()
        outcome["device_kcv"] = kcv
    return kcv


def _xts_ciphers(scheme: str, key: TokenKey) -> None:
    want = "xts-aes-128" if scheme == XTS_AES_128 else "xts-aes-256"
    if key.type != want:
        raise InputError(f"key {key.name!r} is {key.type}; {scheme} needs a {want} key")
    if "encrypt" not in key.usage:
        raise TokenError(f"key {key.name!r} does not allow encryption (CKA_ENCRYPT is false)")


def crypt_image(st: Station, data: bytes, chip: Chip, address: int, *,
                key: TokenKey | None = None, master: TokenKey | None = None,
                device: bytes | None = None, scheme: str | None = None,
                decrypt: bool = False, name: str = "input") -> EncryptResult:
    """Encrypt (or decrypt) `data` as the chip's flash at `address`, keys in the token.

    Raises:
        InputError: bad data/address/MAC, wrong key type for the chip's scheme.
        PolicyRefused: the policy forbids the export (ESP32 classic) or decryption.
        TokenError: missing key usage or mechanism.
    """
    scheme, crypt_config = scheme_for(st, chip, scheme)
    check_data(data, address, name)
    if (key is None) == (master is None):
        raise InputError("give either --key NAME or --master NAME with --device MAC")
    if master is not None:
        if device is None:
            raise InputError("--master needs --device MAC")
        kdf.check_device_id(device)
        if master.type != "aes-256":
            raise InputError(f"master key {master.name!r} is {master.type}; needs aes-256")
        if "derive" not in master.usage:
            raise TokenError(f"master key {master.name!r} does not allow derivation "
                             "(CKA_DERIVE is false)")
    if key is not None and scheme == XTS_AES_128_FROM_128:
        raise TokenError(
            f"{scheme} expands the 128-bit device key with SHA-256 outside the token, and "
            "stored keys never leave it: use --master NAME --device MAC (or an xts-aes-128 key "
            "holding the expanded pair)")
    if key is not None and scheme != ESP32_AES256:
        _xts_ciphers(scheme, key)
    if key is not None and scheme == ESP32_AES256:
        raise TokenError(
            "ESP32-classic flash encryption with a stored key needs the token to derive "
            "per-block keys (CKM_XOR_BASE_AND_DATA) or to export the key; stored keys never "
            "leave the token: use --master NAME --device MAC"
        )
    xor_in_token = scheme == ESP32_AES256 and st.supports("XOR_BASE_AND_DATA")
    path = PATH_XTS if scheme != ESP32_AES256 else (
        PATH_ESP32_XOR if xor_in_token else PATH_ESP32_EXPORT)
    if scheme == XTS_AES_128_FROM_128:
        path = PATH_EFUSE128_EXPORT
    mac = kdf.format_mac(device) if device is not None else None
    policy = st.policy

    def check() -> None:
        if decrypt:
            policy.check_decrypt()
        if master is not None and policy.chips:
            policy.check_master(master.name, chip.name if chip.name in policy.chips else None)
        if path == PATH_ESP32_EXPORT:
            policy.check_export("esp32_classic_transient")
        if path == PATH_EFUSE128_EXPORT:
            policy.check_export("efuse128_transient")

    used = key if key is not None else master
    if used is None:
        raise InputError("give either --key NAME or --master NAME with --device MAC")
    in_sha = hashlib.sha256(data).hexdigest()
    subject: dict[str, Any] = {"input_sha256": in_sha, "input": name}
    if mac:
        subject["device"] = mac
    op = "decrypt" if decrypt else "encrypt"
    with st.use(op, used, subject=subject, check=check,
                detail={"chip": chip.name, "scheme": scheme, "address": f"{address:#x}",
                        "path": path}) as outcome:
        derived: DerivedKey | None = None
        try:
            if master is not None and device is not None:
                derived = st.derive(master, device, PURPOSE_FOR_SCHEME[scheme],
                                    exportable=path in (PATH_ESP32_EXPORT, PATH_EFUSE128_EXPORT))
                kcv = derived.kcv
            else:
                kcv = used.kcv()
            if path == PATH_EFUSE128_EXPORT and derived is not None:
                out = efuse128_crypt(st, derived, [(address, data)], decrypt)[0]
                outcome["exported"] = {"kcv": kcv, "why": "efuse128_transient"}
            elif scheme != ESP32_AES256:
                k1, k2 = derived.ciphers() if derived else (st.cipher(used, 0), st.cipher(used, 1))
                fn = flashcrypt.xts_decrypt if decrypt else flashcrypt.xts_encrypt
                out = fn(data, address, k1, k2)
            elif derived is None:
                raise InternalError("ESP32-classic path without a derived key")
            elif path == PATH_ESP32_EXPORT:
                secret = st.export(derived, "ESP32-classic flash encryption")
                outcome["exported"] = {"kcv": kcv, "why": "esp32_classic_transient"}
                try:
                    fn32 = flashcrypt.esp32_decrypt if decrypt else flashcrypt.esp32_encrypt
                    out = fn32(data, address, secret, crypt_config)
                finally:
                    wipe(secret)
            else:
                out = _esp32_xor_in_token(st, derived, data, address, crypt_config, decrypt)
        finally:
            if derived is not None:
                derived.destroy()
        out_sha = hashlib.sha256(out).hexdigest()
        outcome.update({"kcv_used": kcv, "output_sha256": out_sha})
    return EncryptResult(out, chip.name, scheme, address, path, kcv, mac, in_sha, out_sha)


def efuse128_crypt(st: Station, derived: DerivedKey, regions: list[tuple[int, bytes]],
                   decrypt: bool) -> list[bytes]:
    """XTS with a 128-bit eFuse key (ESP32-C2): export it to memory (the caller checked the
    policy and records the export), expand with SHA-256 as the chip does, use, wipe."""
    secret = st.export(derived, "ESP32-C2 flash encryption (SHA-256 key expansion)")
    expanded = bytearray(flashcrypt.expand_efuse_128(secret))
    try:
        k1, k2 = flashcrypt.software_xts_pair(expanded)
        fn = flashcrypt.xts_decrypt if decrypt else flashcrypt.xts_encrypt
        return [fn(data, address, k1, k2) for address, data in regions]
    finally:
        wipe(secret)
        wipe(expanded)


def _esp32_xor_in_token(st: Station, derived: DerivedKey, data: bytes, address: int,
                        crypt_config: int, decrypt: bool) -> bytes:
    """ESP32 classic with per-block keys derived in the token (CKM_XOR_BASE_AND_DATA).

    The flash runs AES "backwards" on byte-reversed blocks; espsecure's layout is reproduced
    by `flashcrypt.esp32_crypt_with_block_ciphers`.
    """
    from pkcs11 import Attribute, KeyType, Mechanism

    base = derived.objects[0]
    cache: dict[bytes, Any] = {}

    def block_cipher(block_address: int) -> Any:
        tweak = flashcrypt.esp32_block_tweak(block_address, crypt_config)
        if tweak not in cache:
            obj = base.derive_key(
                KeyType.AES, 256, mechanism=Mechanism.XOR_BASE_AND_DATA, mechanism_param=tweak,
                template={Attribute.TOKEN: False, Attribute.SENSITIVE: True,
                          Attribute.EXTRACTABLE: False, Attribute.ENCRYPT: True,
                          Attribute.DECRYPT: True},
            )
            cache[tweak] = obj
        return cache[tweak]

    try:
        return esp32_with_block_keys(data, address, block_cipher, decrypt)
    finally:
        for obj in cache.values():
            obj.destroy()


def esp32_with_block_keys(data: bytes, address: int, block_key: Callable[[int], Any],
                          decrypt: bool) -> bytes:
    """ESP32-classic flash crypto given a token key object per 32-byte block address."""
    from pkcs11 import Mechanism

    out = bytearray()
    for off in range(0, len(data), 16):
        blk_addr = (address + off) & ~31
        obj = block_key(blk_addr)
        block = data[off:off + 16][::-1]
        # encrypting flash data is AES-decrypt in the ESP32's reversed-byte convention
        res = (obj.encrypt(block, mechanism=Mechanism.AES_ECB) if decrypt
               else obj.decrypt(block, mechanism=Mechanism.AES_ECB))
        out += bytes(res)[::-1]
    return bytes(out)


def read_device_csv(path: Any) -> list[bytes]:
    """MACs from a CSV (a `mac` column, or the first column; `#` comments, blank lines ok).

    Raises:
        InputError: unreadable file, a malformed MAC (names the line), duplicates, no devices.
    """
    import csv
    import io

    from hsmflash.fileio import read_input

    text = read_input(path, "device CSV").decode("utf-8", errors="replace")
    rows = [r for r in csv.reader(io.StringIO(text)) if r and not r[0].lstrip().startswith("#")]
    if not rows:
        raise InputError(f"{path}: no devices listed")
    column = 0
    header = [h.strip().lower() for h in rows[0]]
    if "mac" in header:
        column = header.index("mac")
        rows = rows[1:]
    macs: list[bytes] = []
    seen: set[bytes] = set()
    for lineno, row in enumerate(rows, start=2 if "mac" in header else 1):
        if column >= len(row):
            raise InputError(f"{path}: line {lineno} has no MAC column")
        try:
            mac = kdf.parse_mac(row[column])
        except InputError as e:
            raise InputError(f"{path}: line {lineno}: {e}") from None
        if mac in seen:
            raise InputError(f"{path}: line {lineno}: device {kdf.format_mac(mac)} listed twice")
        seen.add(mac)
        macs.append(mac)
    return macs
