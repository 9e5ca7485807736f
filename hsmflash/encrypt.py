"""Per-device keys and flash encryption with the keys inside the token.

XTS chips: K1/K2 are token objects (a stored `xts-aes-*` key, or session objects derived for the
device); `flashcrypt` makes one bulk ECB call per key. ESP32 classic needs a different AES key
per 32-byte block: with CKM_XOR_BASE_AND_DATA the token derives each block key itself;
otherwise, only where the policy allows it, the derived per-device key is exported into memory,
used and wiped, and the export is audited with its KCV (invariant 3). The same choice
(`derived_path`) and the same code (`crypt_derived`) serve `encrypt`, `provision`, `flash` and
the credentials' NVS keys.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hsmflash.chips import (
    ESP32_AES256,
    PURPOSE_FOR_SCHEME,
    XTS_AES_128,
    XTS_AES_128_FROM_128,
    XTS_AES_256,
    Chip,
)
from hsmflash.errors import InputError, InternalError, TokenError
from hsmflash.fileio import atomic_write
from hsmflash.formats import flashcrypt, kdf
from hsmflash.keyuse import DerivedKey, KeyUse, Station, wipe
from hsmflash.token.keys import TokenKey

if TYPE_CHECKING:
    import pkcs11.types as p11t

    from hsmflash.token.session import TokenConfig

PATH_XTS = "xts-in-token"
PATH_ESP32_XOR = "esp32-xor-in-token"
PATH_ESP32_EXPORT = "esp32-transient-export"
PATH_ESP32_STORED_EXPORT = "esp32-stored-key-transient-export"
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


def scheme_for(st: Station, chip: Chip, scheme: str | None,
               key: TokenKey | None = None) -> tuple[str, int]:
    """The flash-encryption scheme and FLASH_CRYPT_CONFIG: explicit, else the stored key's
    type where the chip supports it (an xts-aes-256 key on ESP32-S3 means XTS-AES-256, as
    espsecure reads it from the key length), else the policy's profile, else the chip's
    default."""
    prof = st.policy.chips.get(chip.name)
    from_key = key.type if key is not None and key.type in chip.flash_encryption else None
    if scheme is None and key is not None and from_key is None and key.type.startswith("xts-"):
        raise InputError(f"key {key.name!r} is {key.type}, and {chip.name} has no {key.type} "
                         f"flash encryption (it has {', '.join(chip.flash_encryption)})")
    chosen = scheme or from_key or (
        prof.flash_encryption if prof else chip.default_flash_encryption())
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


def _xts_ciphers(scheme: str, key: TokenKey) -> None:
    want = "xts-aes-128" if scheme == XTS_AES_128 else "xts-aes-256"
    if key.type != want:
        raise InputError(f"key {key.name!r} is {key.type}; {scheme} needs an {want} key")
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
    scheme, crypt_config = scheme_for(st, chip, scheme, key)
    check_data(data, address, name)
    if (key is None) == (master is None):
        raise InputError("give either --key NAME or --master NAME with --device MAC")
    if master is not None:
        if device is None:
            raise InputError("--master needs --device MAC")
        kdf.check_device_id(device)
        st.policy.check_master(master.name, chip.name if chip.name in st.policy.chips else None)
    if key is not None and scheme == XTS_AES_128_FROM_128:
        raise TokenError(
            f"{scheme} expands the 128-bit device key with SHA-256 outside the token, and "
            "stored keys never leave it: use --master NAME --device MAC (or an xts-aes-128 key "
            "holding the expanded pair)")
    if key is not None and scheme != ESP32_AES256:
        _xts_ciphers(scheme, key)
    if key is None:
        path = derived_path(st, scheme)
    elif scheme != ESP32_AES256:
        path = PATH_XTS
    else:
        xor_in_token = st.profile().has("xor_derivation")
        path = (PATH_ESP32_STORED_EXPORT if _check_stored_esp32_key(st, key, xor_in_token)
                else PATH_ESP32_XOR)
    mac = kdf.format_mac(device) if device is not None else None
    policy = st.policy

    def check() -> None:
        if decrypt:
            policy.check_decrypt()

    used = key if key is not None else master
    if used is None:
        raise InputError("give either --key NAME or --master NAME with --device MAC")
    in_sha = hashlib.sha256(data).hexdigest()
    subject: dict[str, Any] = {"input_sha256": in_sha, "input": name}
    if mac:
        subject["device"] = mac
    op = "decrypt" if decrypt else "encrypt"
    exports = PATH_EXPORTS.get(path, [])
    with st.use(op, used, subject=subject, check=check, exports=exports,
                detail={"chip": chip.name, "scheme": scheme, "address": f"{address:#x}",
                        "path": path}) as outcome:
        derived: DerivedKey | None = None
        try:
            if master is not None and device is not None:
                derived = derive_for(outcome, device, scheme, path)
                kcv = derived.kcv
            else:
                kcv = used.kcv()
            if derived is not None:
                (out,) = crypt_derived(st, outcome, derived, scheme, path, [(address, data)],
                                       decrypt=decrypt, crypt_config=crypt_config)
            elif scheme != ESP32_AES256:
                k1, k2 = outcome.cipher(0), outcome.cipher(1)
                fn = flashcrypt.xts_decrypt if decrypt else flashcrypt.xts_encrypt
                out = fn(data, address, k1, k2)
            elif path == PATH_ESP32_STORED_EXPORT:
                secret = outcome.export_stored("esp32_classic_stored_transient")
                kcv = outcome["exported"][-1]["kcv"]
                try:
                    fn32 = flashcrypt.esp32_decrypt if decrypt else flashcrypt.esp32_encrypt
                    out = fn32(data, address, secret, crypt_config)
                finally:
                    wipe(secret)
            else:
                if path != PATH_ESP32_XOR:
                    raise InternalError("ESP32-classic stored key without the XOR path")
                out = esp32_xor_in_token(st.config, st.session, outcome.raw_object(), data, address,
                                         crypt_config, decrypt)
        finally:
            if derived is not None:
                derived.destroy()
        out_sha = hashlib.sha256(out).hexdigest()
        outcome.update({"kcv_used": kcv, "output_sha256": out_sha})
    return EncryptResult(out, chip.name, scheme, address, path, kcv, mac, in_sha, out_sha)


# what each path takes out of the token (declared to the use, checked against the policy)
PATH_EXPORTS = {PATH_ESP32_EXPORT: ["esp32_classic_transient"],
                PATH_ESP32_STORED_EXPORT: ["esp32_classic_stored_transient"],
                PATH_EFUSE128_EXPORT: ["efuse128_transient"]}


def derived_path(st: Station, scheme: str) -> str:
    """How a per-device key derived for `scheme` encrypts on this token: XTS with both keys
    in the token; ESP32 classic with each block key derived in the token where it has
    CKM_XOR_BASE_AND_DATA, else exported to memory; ESP32-C2 exported and expanded."""
    if scheme == XTS_AES_128_FROM_128:
        return PATH_EFUSE128_EXPORT
    if scheme == ESP32_AES256:
        return PATH_ESP32_XOR if st.profile().has("xor_derivation") else PATH_ESP32_EXPORT
    return PATH_XTS


def derive_for(use: KeyUse, device: bytes, scheme: str, path: str) -> DerivedKey:
    """Derive the device's flash-encryption key as `path` uses it (in `use`)."""
    return use.derive(device, PURPOSE_FOR_SCHEME[scheme],
                      exportable=path in (PATH_ESP32_EXPORT, PATH_EFUSE128_EXPORT),
                      derive_further=path == PATH_ESP32_XOR)


def crypt_derived(st: Station, use: KeyUse, derived: DerivedKey, scheme: str, path: str,
                  regions: list[tuple[int, bytes]], *, decrypt: bool,
                  crypt_config: int = 0xF) -> list[bytes]:
    """The one path from a per-device key derived in the token (`derive_for`) to flash
    ciphertext, or back: regions `(address, data)` in, one result per region out.

    XTS (`xts-in-token`): K1/K2 stay token objects. ESP32 classic: each 32-byte block's key
    derived in the token (`esp32-xor-in-token`), or the key exported to memory
    (`esp32-transient-export`). ESP32-C2: the 128-bit key exported and expanded
    (`efuse128-transient-export`). Exports are declared to the use (`PATH_EXPORTS`), recorded
    with their KCV, and wiped.
    """
    if path == PATH_EFUSE128_EXPORT:
        return efuse128_crypt(use, derived, regions, decrypt)
    if path == PATH_ESP32_XOR:
        return [esp32_xor_in_token(st.config, st.session, derived.objects[0], data, address,
                                   crypt_config, decrypt) for address, data in regions]
    if path == PATH_ESP32_EXPORT:
        secret = use.export(derived, "esp32_classic_transient")
        try:
            fn32 = flashcrypt.esp32_decrypt if decrypt else flashcrypt.esp32_encrypt
            return [fn32(data, address, secret, crypt_config) for address, data in regions]
        finally:
            wipe(secret)
    if scheme not in (XTS_AES_128, XTS_AES_256):
        raise InternalError(f"no encryption path {path!r} for {scheme}")
    k1, k2 = derived.ciphers()
    fn = flashcrypt.xts_decrypt if decrypt else flashcrypt.xts_encrypt
    return [fn(data, address, k1, k2) for address, data in regions]


def make_out_dir(out_dir: Path) -> None:
    """The batch's output directory, made if missing.

    Raises:
        InputError: it cannot be made.
    """
    if not out_dir.is_dir():
        try:
            out_dir.mkdir(parents=True)
        except OSError as e:
            raise InputError(f"--out-dir {str(out_dir)!r}: {e.strerror}") from None


def encrypt_batch(st: Station, data: bytes, chip: Chip, address: int, master: TokenKey,
                  macs: list[bytes], out_dir: Path, *, scheme: str | None, name: str,
                  source: str) -> Iterator[dict[str, str]]:
    """Encrypt one image for each device of a lot, a file per device in `out_dir`
    (`AABBCCDDEEFF-0xADDR.bin`, written atomically, so a file present is complete and skipped
    on a re-run). Yields one row per device as it goes (`status`: encrypted or skipped).

    Raises:
        PolicyRefused: more devices than the policy's batch limit (before any key use).
        InputError: `out_dir` cannot be made; as `crypt_image`.
    """
    st.policy.check_batch(len(macs), source)
    make_out_dir(out_dir)
    for mac in macs:
        device = kdf.format_mac(mac)
        target = out_dir / f"{device.replace(':', '')}-{address:#x}.bin"
        if target.exists():  # written atomically: present means complete
            yield {"device": device, "output": str(target), "status": "skipped"}
            continue
        r = crypt_image(st, data, chip, address, master=master, device=mac, scheme=scheme,
                        name=name)
        atomic_write(target, r.output)
        yield {"device": device, "output": str(target), "kcv": r.kcv, "status": "encrypted"}


def efuse128_crypt(use: KeyUse, derived: DerivedKey, regions: list[tuple[int, bytes]],
                   decrypt: bool) -> list[bytes]:
    """XTS with a 128-bit eFuse key (ESP32-C2): export it to memory (declared to the use as
    `efuse128_transient`, recorded with its KCV), expand with SHA-256 as the chip does, use,
    wipe."""
    secret = use.export(derived, "efuse128_transient")
    expanded = bytearray(flashcrypt.expand_efuse_128(secret))
    try:
        k1, k2 = flashcrypt.software_xts_pair(expanded)
        fn = flashcrypt.xts_decrypt if decrypt else flashcrypt.xts_encrypt
        return [fn(data, address, k1, k2) for address, data in regions]
    finally:
        wipe(secret)
        wipe(expanded)


def _check_stored_esp32_key(st: Station, key: TokenKey, xor_in_token: bool) -> bool:
    """A stored ESP32-classic flash key (a FiPy fleet's espsecure key, imported) is used
    through the token's XOR derivation, never leaving the token. On a token without it, only a
    key imported `--wrappable` (policy export.esp32_classic_stored_transient, checked in the
    `use`) is wrapped out to memory per use; returns True for that path.

    Raises:
        InputError: not an aes-256 key.
        TokenError: the token lacks XOR derivation (and the key is not wrappable), or the key
            lacks CKA_DERIVE.
    """
    if key.type != "aes-256":
        raise InputError(f"key {key.name!r} is {key.type}; ESP32-classic flash encryption "
                         "needs the 32-byte key as an aes-256 key")
    if not xor_in_token and key.extractable:
        return True
    if not xor_in_token:
        from hsmflash.token.profile import capability_refusal

        raise capability_refusal(
            st.config.label, "xor_derivation",
            f"ESP32-classic flash encryption with the stored key {key.name!r}",
            instead="use a token with CKM_XOR_BASE_AND_DATA (NSS), or derive per-device keys "
            "from a master (--master NAME --device MAC) under a policy that allows "
            "export.esp32_classic_transient, or re-import the key with --wrappable under a "
            "policy that allows export.esp32_classic_stored_transient")
    if "derive" not in key.usage:
        raise TokenError(f"key {key.name!r} does not allow derivation (CKA_DERIVE is false); "
                         "the ESP32-classic XOR path needs it: import it with --usage derive")
    return False


# ESP32-classic blocks handled per batch: bounds memory (one token key alive at a time, one
# batch of offsets) whatever the image size.
_XOR_BATCH_BLOCKS = 4096


def esp32_xor_in_token(config: TokenConfig, session: p11t.Session, base: p11t.Key, data: bytes,
                       address: int,
                       crypt_config: int, decrypt: bool) -> bytes:
    """ESP32 classic with each 32-byte block's key derived in the token as `base XOR tweak`
    (CKM_XOR_BASE_AND_DATA); `base` is the 32-byte flash key, never read out.

    Blocks sharing a tweak (FLASH_CRYPT_CONFIG below 0xF repeats tweaks) go through one
    C_Encrypt/C_Decrypt call; each per-block key is destroyed as soon as it has been used, so
    memory stays flat in the image size. The calls go straight through the module's C API
    (`rawderive.RawXorCipher`). The flash runs AES "backwards" on byte-reversed 16-byte blocks,
    as espsecure does.

    Raises:
        InputError: bad address/length/crypt_config.
        TokenError: the token refuses a derivation or an AES operation.
    """
    from hsmflash.token.rawderive import RawXorCipher

    check_data(data, address, "input")
    flashcrypt.esp32_block_tweak(address, crypt_config)  # validates crypt_config
    cipher = RawXorCipher(config.module_path, session, base, config.lib())
    out = bytearray(len(data))
    view = memoryview(data)
    step = _XOR_BATCH_BLOCKS * 16
    for start in range(0, len(data), step):
        groups: dict[bytes, list[int]] = {}
        tweak = b""
        for off in range(start, min(start + step, len(data)), 16):
            if off == start or (address + off) % 32 == 0:  # both halves share a tweak
                tweak = flashcrypt.esp32_block_tweak((address + off) & ~31, crypt_config)
            groups.setdefault(tweak, []).append(off)
        for tweak, offsets in groups.items():
            blob = b"".join(bytes(view[o:o + 16])[::-1] for o in offsets)
            # encrypting flash data is AES-decrypt in the ESP32's reversed convention
            res = cipher.crypt(tweak, blob, encrypt=decrypt)
            for i, o in enumerate(offsets):
                out[o:o + 16] = res[16 * i:16 * i + 16][::-1]
    return bytes(out)
