"""Per-device server credentials: derived in the token, stored in encrypted NVS, revocable.

**Secret.** A device's credential secret is the `aes-ecb-v1` key for purpose `CREDENTIAL`
(32 bytes) derived from the policy's credential master and the device's base MAC (kdf.py). The
device presents it as 64 lowercase hex digits. The server keeps no credential database: it
checks a presented secret by re-deriving the device's key in the token and comparing
`AES-ECB_K(nonce)` computed in the token with the same block computed under the presented secret
(random 16-byte nonce, constant-time comparison), so the secret never leaves the token to be
checked. It leaves the token only to be written to the device (an audited export with its KCV).

**Storage.** The secret goes into an ESP-IDF NVS partition made by esp-idf-nvs-partition-gen,
encrypted (XTS-AES-256, as NVS does) with the device's NVS keys: purpose `NVS_KEYS` (64 bytes,
eky || tky) from the same master. The NVS keys go into the 4 KiB `nvs_keys` partition
(eky 32 | tky 32 | CRC32 | 0xFF...), which is itself encrypted with the device's
flash-encryption key at its flash address (`encrypt.crypt_image`: the chip's own scheme and
path under the policy).

**Revocation.** `revoke` signs a new list in the token (the format, and its verification
with the public key alone, is `formats/revocation.py`).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import hmac
import io
import json
import os
import re
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from esp_idf_nvs_partition_gen import nvs_partition_gen as nvsgen

from hsmflash.chips import Chip, get_chip
from hsmflash.encrypt import crypt_image
from hsmflash.errors import InputError, TokenError, VerificationFailed
from hsmflash.fileio import atomic_write, locked_directory, read_input
from hsmflash.formats import kdf
from hsmflash.formats.flashcrypt import SoftwareAes
from hsmflash.formats.primitives import fingerprint
from hsmflash.formats.revocation import (
    LIST_VERSION,
    RevocationList,
    load_revocation_list,
    sign_list,
)
from hsmflash.keyuse import DerivedKey, KeyUse, Station, check_master, wipe
from hsmflash.policy import ChipProfile, Policy
from hsmflash.token.keys import TokenKey

CREDENTIAL_PURPOSE = "CREDENTIAL"
NVS_KEYS_PURPOSE = "NVS_KEYS"
SECRET_BYTES = kdf.PURPOSES[CREDENTIAL_PURPOSE]
NVS_KEYS_BYTES = kdf.PURPOSES[NVS_KEYS_PURPOSE]
NVS_PAGE = 0x1000
NVS_KEYS_PARTITION_SIZE = 0x1000
NVS_MIN_SIZE = 0x3000  # ESP-IDF: read/write NVS needs 3 pages (one is kept free)
NVS_MAX_KEY = 15  # NVS key and namespace names: at most 15 characters

_ENCODINGS_VARLEN = ("string", "hex2bin", "base64", "binary")
_ENCODINGS_INT = {
    "u8": (0, 2**8 - 1), "i8": (-(2**7), 2**7 - 1),
    "u16": (0, 2**16 - 1), "i16": (-(2**15), 2**15 - 1),
    "u32": (0, 2**32 - 1), "i32": (-(2**31), 2**31 - 1),
    "u64": (0, 2**64 - 1), "i64": (-(2**63), 2**63 - 1),
}
_CSV_HEADER = ["key", "type", "encoding", "value"]



@dataclass(frozen=True)
class CredentialSettings:
    """Where credentials come from and what the device's NVS holds besides the secret.

    Read from the policy's `[credentials]` table where the policy has one; the defaults are the
    key names of policies/dev.toml.
    """

    master: str = "cred-master"
    revocation_key: str = "revocation"
    server_url: str = ""
    username_template: str = "{device_id}"
    namespace: str = "hsmflash"

    @classmethod
    def from_policy(cls, policy: Policy) -> CredentialSettings:
        """The policy's `[credentials]` values over the defaults."""
        section = policy.credentials
        if section is None:
            return cls()
        return cls(**{name: getattr(section, name) for name in cls.__dataclass_fields__})


def device_id(device: bytes) -> str:
    """The device id written to NVS and used in usernames: the base MAC as 12 hex digits."""
    return device.hex()


def username_for(settings: CredentialSettings, device: bytes) -> str:
    return (settings.username_template.replace("{device_id}", device_id(device))
            .replace("{mac}", kdf.format_mac(device)))


# -- NVS template ---------------------------------------------------------------------------

@dataclass(frozen=True)
class NvsRow:
    """One row of an NVS partition CSV (the NVS tool's format: key,type,encoding,value)."""

    key: str
    type: str
    encoding: str = ""
    value: str | bytearray = ""  # bytearray: a `binary` blob (device keys, wiped by the owner)


@dataclass(frozen=True)
class NvsTemplate:
    """NVS rows whose values may hold placeholders, filled in per device.

    Placeholders: {device_id} (12 hex digits), {mac} (aa:bb:..), {username}, {secret} (the
    credential as 64 hex digits), {server_url}.
    """

    rows: tuple[NvsRow, ...]
    source: str = "default template"

    def render(self, values: dict[str, str]) -> list[NvsRow]:
        def fill(text: str | bytearray) -> str | bytearray:
            if isinstance(text, bytearray):
                return text
            for name, value in values.items():
                text = text.replace("{" + name + "}", value)
            return text

        return [NvsRow(r.key, r.type, r.encoding, fill(r.value)) for r in self.rows]


def default_template(settings: CredentialSettings) -> NvsTemplate:
    """namespace `settings.namespace`: device_id, username, password (the secret), server_url."""
    rows = [
        NvsRow(settings.namespace, "namespace"),
        NvsRow("device_id", "data", "string", "{device_id}"),
        NvsRow("username", "data", "string", "{username}"),
        NvsRow("password", "data", "string", "{secret}"),
    ]
    if settings.server_url:
        rows.append(NvsRow("server_url", "data", "string", "{server_url}"))
    return NvsTemplate(tuple(rows))


def parse_template(text: str, source: str) -> NvsTemplate:
    """Parse an NVS CSV template (header `key,type,encoding,value`; `#` comments).

    Only `namespace` and `data` rows: a credentials template carries values, not file paths.

    Raises:
        InputError: a malformed row (named by line), no namespace first, or no {secret}.
    """
    lines = [(n, line) for n, line in enumerate(text.splitlines(), start=1)
             if line.strip() and not line.lstrip().startswith("#")]
    if not lines:
        raise InputError(f"CSV template {source}: empty")
    rows: list[NvsRow] = []
    reader = csv.reader([line for _, line in lines])
    try:
        parsed = list(reader)
    except csv.Error as e:
        raise InputError(f"CSV template {source}: {e}") from None
    header = [h.strip().lower() for h in parsed[0]]
    if header != _CSV_HEADER:
        raise InputError(f"CSV template {source}: line {lines[0][0]}: header must be "
                         f"{','.join(_CSV_HEADER)}, not {','.join(parsed[0])!r}")
    for (lineno, _), fields in zip(lines[1:], parsed[1:], strict=True):
        where = f"CSV template {source}: line {lineno}"
        if len(fields) != len(_CSV_HEADER):
            raise InputError(f"{where}: {len(fields)} fields, expected 4 "
                             "(key,type,encoding,value)")
        key, kind, encoding, value = (f.strip() for f in fields)
        _check_row(where, key, kind, encoding, value, first=not rows)
        rows.append(NvsRow(key, kind, encoding.lower(), value))
    if not any("{secret}" in r.value for r in rows):
        raise InputError(f"CSV template {source}: no value holds {{secret}}: the device would "
                         "get no credential")
    return NvsTemplate(tuple(rows), source)


def load_template(path: str | Path) -> NvsTemplate:
    """Read and parse an NVS CSV template file (see `parse_template`).

    Raises:
        InputError: unreadable, not UTF-8, or malformed.
    """
    raw = read_input(path, "CSV template")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"CSV template {str(path)!r} is not UTF-8 text") from None
    return parse_template(text, str(path))


def _check_row(where: str, key: str, kind: str, encoding: str, value: str, *,
               first: bool) -> None:
    if not key:
        raise InputError(f"{where}: empty key")
    if len(key) > NVS_MAX_KEY:
        raise InputError(f"{where}: key {key!r} is longer than {NVS_MAX_KEY} characters")
    if kind == "namespace":
        if encoding or value:
            raise InputError(f"{where}: a namespace row has no encoding or value")
        return
    if kind == "file":
        raise InputError(f"{where}: 'file' rows are not allowed in a credentials template")
    if kind != "data":
        raise InputError(f"{where}: type {kind!r} is not 'namespace' or 'data'")
    if first:
        raise InputError(f"{where}: the first entry must be a namespace row")
    enc = encoding.lower()
    if enc in _ENCODINGS_INT:
        try:
            number = int(value, 0)
        except ValueError:
            raise InputError(f"{where}: {key}: {value!r} is not an integer") from None
        low, high = _ENCODINGS_INT[enc]
        if not low <= number <= high:
            raise InputError(f"{where}: {key}: {value} is out of range for {enc}")
    elif enc not in _ENCODINGS_VARLEN:
        raise InputError(f"{where}: {key}: unknown encoding {encoding!r} (one of: "
                         f"{', '.join([*_ENCODINGS_INT, *_ENCODINGS_VARLEN])})")
    elif enc == "hex2bin" and "{" not in value and (
            len(value) % 2 or not re.fullmatch(r"[0-9a-fA-F]*", value)):
        raise InputError(f"{where}: {key}: hex2bin value is not an even number of hex digits")


# -- NVS partitions ---------------------------------------------------------------------------

NVS_MAX_SIZE = 16 * 1024 * 1024


def check_nvs_size(size: int) -> None:
    """Raises InputError unless `size` is a whole number of 4 KiB pages, at least 0x3000 and
    at most 16 MiB (the largest flash hsmflash provisions)."""
    if size % NVS_PAGE or size < NVS_MIN_SIZE or size > NVS_MAX_SIZE:
        raise InputError(f"NVS size {size:#x} must be a multiple of 0x1000, at least "
                         f"{NVS_MIN_SIZE:#x} and at most {NVS_MAX_SIZE:#x}")


def build_nvs(rows: Sequence[NvsRow], nvs_keys: bytes | bytearray, size: int) -> bytes:
    """An encrypted NVS partition image of `size` bytes, made by esp-idf-nvs-partition-gen.

    `nvs_keys` is eky || tky (64 bytes). One page is left free, as the NVS tool and ESP-IDF do.

    Raises:
        InputError: bad size, or the entries do not fit / are rejected by the NVS tool.
    """
    check_nvs_size(size)
    if len(nvs_keys) != NVS_KEYS_BYTES:
        raise InputError(f"NVS keys must be {NVS_KEYS_BYTES} bytes")
    out = io.BytesIO()
    nvs = nvsgen.nvs_open(out, size - NVS_PAGE, nvsgen.Page.VERSION2, is_encrypt=True,
                          key=nvs_keys)
    try:
        for row in rows:
            if row.type == "namespace":
                nvsgen.write_entry(nvs, row.key, "namespace", "", "")
            else:
                value = bytes(row.value) if isinstance(row.value, bytearray) else row.value
                nvsgen.write_entry(nvs, row.key, "data", row.encoding, value)
        nvsgen.nvs_close(nvs)
    except (nvsgen.InsufficientSizeError, nvsgen.PageFullError):
        raise InputError(f"NVS entries do not fit a {size:#x}-byte partition") from None
    except nvsgen.InputError as e:
        # the tool's messages name keys and encodings, never values
        raise InputError(f"the NVS tool refused an entry: {str(e).splitlines()[0]}") from None
    finally:
        nvs.encr_key = None
    return out.getvalue()


def nvs_keys_partition(nvs_keys: bytes | bytearray) -> bytearray:
    """The 4 KiB `nvs_keys` partition: eky | tky | CRC32 (zlib, init 0xFFFFFFFF, LE) | 0xFF...

    The layout `nvs_partition_gen.generate_key` writes and ESP-IDF's nvs_flash_read_security_cfg
    reads. The caller wipes the returned buffer.

    Raises:
        InputError: `nvs_keys` is not 64 bytes.
    """
    if len(nvs_keys) != NVS_KEYS_BYTES:
        raise InputError(f"NVS keys must be {NVS_KEYS_BYTES} bytes")
    buf = bytearray(b"\xff") * NVS_KEYS_PARTITION_SIZE
    buf[:NVS_KEYS_BYTES] = nvs_keys
    struct.pack_into("<I", buf, NVS_KEYS_BYTES,
                     zlib.crc32(bytes(buf[:NVS_KEYS_BYTES]), 0xFFFFFFFF) & 0xFFFFFFFF)
    return buf


@dataclass
class DevicePartitions:
    """What `build_device_partitions` returns: two images to flash, and public facts."""

    nvs: bytes = field(repr=False)
    nvs_keys: bytes = field(repr=False)  # encrypted with the device's flash-encryption key
    info: dict[str, Any] = field(default_factory=dict)


def _master(st: Station, name: str) -> TokenKey:
    key = st.key(name)
    check_master(key)
    return key


NVS_HMAC_PURPOSE = "NVS_HMAC_UP"
# ESP-IDF's CONFIG_NVS_SEC_KEY_PROTECT_USING_HMAC (nvs_sec_provider; the NVS tool's
# --key_protect_hmac): eky = HMAC-SHA256(K, 5A 5A BE AE x 8), tky = HMAC-SHA256(K, A5 A5 DE CE x 8)
# with K the HMAC_UP eFuse key; in the firmware each seed is the uint32 0xAEBE5A5A / 0xCEDEA5A5
# stored little-endian.
HMAC_EKEY_SEED = bytes.fromhex("5a5abeae") * 8
HMAC_TKEY_SEED = bytes.fromhex("a5a5dece") * 8


def hmac_nvs_keys(st: Station, fe_master: TokenKey, device: bytes, chip: str) -> \
        tuple[bytearray, str]:
    """The NVS keys eky || tky a chip with HMAC_UP key K derives at boot, computed in the token.

    K is the `aes-ecb-v1` key for purpose NVS_HMAC_UP from the chip profile's master (the key
    provisioning burns as HMAC_UP); the two HMACs run in the token on a sign-only derived
    object. Audited as `nvs.hmac-keys` with K's KCV; the caller wipes the returned buffer.

    Raises:
        PolicyRefused: device secrets may not leave the token. TokenError: missing mechanism.
    """
    mac = kdf.format_mac(device)
    with st.use("nvs.hmac-keys", fe_master, subject={"device": mac},
                detail={"chip": chip, "purpose": NVS_HMAC_PURPOSE, "scheme": kdf.SCHEME},
                exports=["device_secrets"]) as outcome:
        eky, tky = outcome.derived_hmac_sha256(device, NVS_HMAC_PURPOSE,
                                               [HMAC_EKEY_SEED, HMAC_TKEY_SEED], "device_secrets")
        kcv = outcome["exported"][-1]["kcv"]
        keys = eky + tky
        wipe(eky)
        wipe(tky)
    return keys, kcv


def _nvs_keys(st: Station, profile: ChipProfile, use: KeyUse, fe_master: TokenKey,
              device: bytes, derived: list[DerivedKey]) -> tuple[bytearray, str]:
    """The device's NVS keys by the profile's scheme, and a label for their check value;
    `use` is the credential master's open use."""
    if profile.nvs_encryption == "hmac":
        keys, kcv = hmac_nvs_keys(st, fe_master, device, profile.chip)
        return keys, f"hmac_up:{kcv}"
    d = use.derive(device, NVS_KEYS_PURPOSE, exportable=True)
    derived.append(d)
    return use.export(d, "device_secrets"), d.kcv


def _hex_or_none(value: int | None) -> str | None:
    return None if value is None else f"{value:#x}"


def _protect_nvs_keys(st: Station, profile: ChipProfile, keys_plain: bytearray, chip: Chip,
                      nvs_keys_address: int | None, fe_master: TokenKey, device: bytes,
                      info: dict[str, Any]) -> bytes:
    """The encrypted nvs_keys partition (nvs-keys scheme), or b"" (hmac: the chip derives)."""
    try:
        if profile.nvs_encryption == "hmac":
            info.update({"nvs_encryption": "hmac", "hmac_key_block": profile.nvs_hmac_key_block})
            return b""
        if nvs_keys_address is None:
            raise InputError("the nvs-keys NVS scheme needs the nvs_keys partition's address")
        enc = crypt_image(st, bytes(keys_plain), chip, nvs_keys_address, master=fe_master,
                          device=device, name="nvs_keys partition")
    finally:
        wipe(keys_plain)
    info.update({"nvs_encryption": "nvs-keys", "nvs_keys_address": _hex_or_none(nvs_keys_address),
                 "nvs_keys_sha256": enc.output_sha256, "flash_encryption": enc.scheme,
                 "flash_key_kcv": enc.kcv, "path": enc.path})
    return enc.output


def _issue_inputs(st: Station, chip: str, device: bytes, nvs_size: int,
                  nvs_keys_address: int | None, nvs_address: int | None
                  ) -> tuple[Chip, ChipProfile, str]:
    """(chip, its profile, the MAC as text): where a device's credential goes, checked before
    any key is used.

    Raises:
        InputError: bad MAC, size or address; an unknown chip.
        PolicyRefused: no profile for `chip`, or device secrets may not leave the token.
    """
    kdf.check_device_id(device)
    the_chip = get_chip(chip)
    check_nvs_size(nvs_size)
    if nvs_keys_address is not None and nvs_keys_address % NVS_PAGE:
        raise InputError(f"nvs_keys address {nvs_keys_address:#x} is not 4 KiB aligned")
    if nvs_address is not None and nvs_address % NVS_PAGE:
        raise InputError(f"NVS address {nvs_address:#x} is not 4 KiB aligned")
    profile = st.policy.profile(chip)
    st.policy.check_export("device_secrets")  # refused before anything is built
    return the_chip, profile, kdf.format_mac(device)


def build_device_partitions(
    st: Station, chip: str, device: bytes, *, nvs_size: int, nvs_keys_address: int | None,
    nvs_address: int | None = None, template: NvsTemplate | None = None,
    settings: CredentialSettings | None = None, kind: str | None = None,
) -> DevicePartitions:
    """Issue a device's credential: its encrypted NVS partition and encrypted `nvs_keys`.

    `kind` is "secret" (this function) or "x509" (`build_x509_partitions`); by default the
    policy's `[credentials] kind`.

    The credential and NVS keys are derived in the token, exported to memory only to build the
    partitions (audited as `credential.issue` with their KCVs, allowed by the policy's export
    rules) and wiped; the `nvs_keys` partition is then encrypted like any image for the device
    (`encrypt` audit record, the chip's scheme from the policy).

    Raises:
        InputError: bad MAC, size, address or template; an unknown chip.
        PolicyRefused: the policy has no profile for `chip` or forbids the export.
        TokenError: missing keys, usages or mechanisms.
    """
    if kind is None:
        kind = st.policy.credentials.kind if st.policy.credentials else "secret"
    if kind == "x509":
        return build_x509_partitions(st, chip, device, nvs_size=nvs_size,
                                     nvs_keys_address=nvs_keys_address, nvs_address=nvs_address,
                                     settings=settings)
    settings = settings or CredentialSettings.from_policy(st.policy)
    template = template or default_template(settings)
    the_chip, profile, mac = _issue_inputs(st, chip, device, nvs_size, nvs_keys_address,
                                           nvs_address)
    username = username_for(settings, device)
    values = {"device_id": device_id(device), "mac": mac, "username": username,
              "server_url": settings.server_url}
    # Everything the device's entries can get wrong is found before a key is touched.
    # (a dummy key: XTS refuses equal halves)
    build_nvs(template.render({**values, "secret": "0" * 2 * SECRET_BYTES}),
              bytes(range(NVS_KEYS_BYTES)), nvs_size)
    master = _master(st, settings.master)
    fe_master = st.key(profile.derive_master)

    detail = {"chip": chip, "nvs_size": f"{nvs_size:#x}",
              "nvs_keys_address": _hex_or_none(nvs_keys_address), "template": template.source,
              "scheme": kdf.SCHEME}
    if nvs_address is not None:
        detail["nvs_address"] = f"{nvs_address:#x}"
    keys_plain = bytearray()
    with st.use("credential.issue", master, subject={"device": mac}, detail=detail,
                exports=["device_secrets"]) as outcome:
        derived: list[DerivedKey] = []
        secret = nvs_keys = bytearray()
        try:
            derived.append(outcome.derive(device, CREDENTIAL_PURPOSE, exportable=True))
            cred_kcv = derived[0].kcv
            secret = outcome.export(derived[0], "device_secrets")
            nvs_keys, nvs_keys_kcv = _nvs_keys(st, profile, outcome, fe_master, device, derived)
            nvs = build_nvs(template.render({**values, "secret": secret.hex()}), nvs_keys,
                            nvs_size)
            keys_plain = nvs_keys_partition(nvs_keys)
        finally:
            wipe(secret)
            wipe(nvs_keys)
            for d in derived:
                d.destroy()
        outcome["nvs_sha256"] = hashlib.sha256(nvs).hexdigest()
    info: dict[str, Any] = {
        "device": mac, "device_id": device_id(device), "username": username, "chip": chip,
        "credential_kcv": cred_kcv, "nvs_keys_kcv": nvs_keys_kcv,
        "nvs_size": f"{nvs_size:#x}", "nvs_sha256": hashlib.sha256(nvs).hexdigest(),
    }
    protected = _protect_nvs_keys(st, profile, keys_plain, the_chip, nvs_keys_address,
                                  fe_master, device, info)
    if nvs_address is not None:
        info["nvs_address"] = f"{nvs_address:#x}"
    return DevicePartitions(nvs, protected, info)


# -- X.509 device certificates -------------------------------------------------------------------

CERT_KEY = "dev_cert"  # NVS blob: the device certificate (DER)
PRIVKEY_KEY = "dev_key"  # NVS blob: the device private key (PKCS#8 DER, P-256)
_DUMMY_BLOB = 1024  # larger than any P-256 key or device certificate we make


def x509_rows(settings: CredentialSettings, device: bytes, cert_der: bytes,
              key_der: bytearray) -> list[NvsRow]:
    """The device's NVS entries for a certificate: device_id, dev_cert, dev_key (blobs)."""
    return [
        NvsRow(settings.namespace, "namespace"),
        NvsRow("device_id", "data", "string", device_id(device)),
        NvsRow(CERT_KEY, "data", "binary", bytearray(cert_der)),
        NvsRow(PRIVKEY_KEY, "data", "binary", key_der),
    ]


def build_x509_partitions(
    st: Station, chip: str, device: bytes, *, nvs_size: int, nvs_keys_address: int | None,
    nvs_address: int | None = None, settings: CredentialSettings | None = None,
    ca_dir: Path | None = None, keep_previous: bool = False,
) -> DevicePartitions:
    """Issue a device certificate and write key + certificate into the device's encrypted NVS.

    The device key (EC P-256) is made on the station in memory; only its PKCS#8 DER goes into
    the NVS image, encrypted with the device's NVS keys, and the buffer is wiped after (best
    effort: cryptography's key object cannot be wiped). The CA signs through the key-use choke
    point (`cert.issue`); the key's export is audited with its public-key fingerprint
    (`credential.issue`). Unless `keep_previous`, the device's earlier certificates are revoked
    in the CRL.

    Raises:
        InputError, PolicyRefused, TokenError: as `build_device_partitions`; TokenError also
            when the CA has no certificate yet.
    """
    from cryptography.hazmat.primitives.asymmetric import ec as _ec
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        NoEncryption,
        PrivateFormat,
    )

    from hsmflash import ca

    settings = settings or CredentialSettings.from_policy(st.policy)
    the_chip, profile, mac = _issue_inputs(st, chip, device, nvs_size, nvs_keys_address,
                                           nvs_address)
    rules = ca.settings_of(st)
    ca.subject_for(rules, device)  # a bad template fails here, before any key use
    build_nvs(x509_rows(settings, device, bytes(_DUMMY_BLOB), bytearray(_DUMMY_BLOB)),
              bytes(range(NVS_KEYS_BYTES)), nvs_size)
    ca_key = ca.ca_key(st)
    ca.require_certificate(st, ca_key)
    master = _master(st, settings.master)
    fe_master = st.key(profile.derive_master)
    directory = ca_dir if ca_dir is not None else Path(rules.dir)
    ca.check_ca_dir(directory)
    previous = [int(r["serial"], 16) for r in ca.read_index(directory) if r["device"] == mac]

    private = _ec.generate_private_key(_ec.SECP256R1())
    public = private.public_key()
    key_fp = fingerprint(public)
    issued = ca.issue_device_cert(st, device, public, ca_dir=directory,
                                  detail={"chip": chip, "key_origin": "station-memory"})
    detail = {"chip": chip, "nvs_size": f"{nvs_size:#x}", "kind": "x509",
              "nvs_keys_address": _hex_or_none(nvs_keys_address), "scheme": kdf.SCHEME,
              "serial": f"{issued.serial:x}"}
    if nvs_address is not None:
        detail["nvs_address"] = f"{nvs_address:#x}"
    keys_plain = bytearray()
    key_der = bytearray()
    with st.use("credential.issue", master, subject={"device": mac}, detail=detail,
                exports=["device_secrets"]) as outcome:
        nvs_keys = bytearray()
        derived: list[DerivedKey] = []
        try:
            key_der = bytearray(private.private_bytes(Encoding.DER, PrivateFormat.PKCS8,
                                                      NoEncryption()))
            del private
            # the device key was made here, in memory: its export is its public fingerprint
            outcome.setdefault("exported", []).append(
                {"purpose": "device_key", "key_fp": key_fp, "why": "device_secrets"})
            nvs_keys, nvs_keys_kcv = _nvs_keys(st, profile, outcome, fe_master, device,
                                               derived)
            nvs = build_nvs(x509_rows(settings, device, issued.der, key_der), nvs_keys,
                            nvs_size)
            keys_plain = nvs_keys_partition(nvs_keys)
        finally:
            wipe(key_der)
            wipe(nvs_keys)
            for d in derived:
                d.destroy()
        outcome["nvs_sha256"] = hashlib.sha256(nvs).hexdigest()
    info: dict[str, Any] = {
        "device": mac, "device_id": device_id(device), "chip": chip, "kind": "x509",
        "serial": f"{issued.serial:x}", "cert_sha256": issued.sha256, "device_key_fp": key_fp,
        "cert_der": issued.der.hex(), "nvs_keys_kcv": nvs_keys_kcv,
        "nvs_size": f"{nvs_size:#x}", "nvs_sha256": hashlib.sha256(nvs).hexdigest(),
    }
    protected = _protect_nvs_keys(st, profile, keys_plain, the_chip, nvs_keys_address,
                                  fe_master, device, info)
    if nvs_address is not None:
        info["nvs_address"] = f"{nvs_address:#x}"
    if previous and not keep_previous:
        revoked = ca.revoke(st, device=device, ca_dir=directory, only_serials=previous,
                            reason="superseded by a new certificate")
        info["revoked_previous"] = revoked["revoked"]
    return DevicePartitions(nvs, protected, info)


# -- checking a presented secret -----------------------------------------------------------------

def parse_secret(data: bytes, source: str) -> bytearray:
    """A presented secret: 64 hex digits (surrounding whitespace ignored) or 32 raw bytes.

    Raises:
        InputError: anything else (the message never quotes the content).
    """
    text = data.strip()
    if len(text) == 2 * SECRET_BYTES and re.fullmatch(rb"[0-9a-fA-F]+", text):
        return bytearray(bytes.fromhex(text.decode("ascii")))
    if len(data) == SECRET_BYTES:
        return bytearray(data)
    raise InputError(f"secret {source}: expected {2 * SECRET_BYTES} hex digits or "
                     f"{SECRET_BYTES} raw bytes")


def verify_credential(st: Station, device: bytes, secret: bytes | bytearray, *,
                      revocations: RevocationList | None = None,
                      settings: CredentialSettings | None = None) -> None:
    """Check a device's presented secret against the token (audited as `credential.check`).

    Returns when the secret is the device's and the device is not in `revocations` (a list the
    caller has verified).

    Raises:
        VerificationFailed: wrong secret for this device, or the device is revoked.
        InputError: bad MAC or secret length. TokenError: missing master or mechanism.
    """
    settings = settings or CredentialSettings.from_policy(st.policy)
    kdf.check_device_id(device)
    if len(secret) != SECRET_BYTES:
        raise InputError(f"a credential secret is {SECRET_BYTES} bytes")
    mac = kdf.format_mac(device)
    master = _master(st, settings.master)
    entry = revocations.entry(device) if revocations is not None else None
    detail: dict[str, Any] = {"scheme": kdf.SCHEME}
    if revocations is not None:
        detail["revocation_list"] = {"sequence": revocations.sequence,
                                     "signer": revocations.signer_fingerprint}
    with st.use("credential.check", master, subject={"device": mac}, detail=detail) as outcome:
        if entry is not None:
            outcome["result"] = "revoked"
        else:
            derived = outcome.derive(device, CREDENTIAL_PURPOSE)
            try:
                nonce = os.urandom(16)
                in_token = derived.ciphers()[0].encrypt_ecb(nonce)
            finally:
                derived.destroy()
            presented = SoftwareAes(secret).encrypt_ecb(nonce)
            outcome["result"] = "valid" if hmac.compare_digest(in_token, presented) else "invalid"
    if entry is not None and revocations is not None:
        raise VerificationFailed(f"device {mac} is revoked (list sequence "
                                 f"{revocations.sequence}, since {entry.get('revoked_at')})")
    if outcome["result"] != "valid":
        raise VerificationFailed(f"the secret is not device {mac}'s credential")


# -- revocation list ---------------------------------------------------------------------------

def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _check_reason(reason: str) -> None:
    if len(reason) > 200 or any(not ch.isprintable() for ch in reason):
        raise InputError("revocation reason must be one printable line of at most 200 "
                         "characters")


def revoke(st: Station, list_path: str | Path, device: bytes, *, reason: str = "",
           settings: CredentialSettings | None = None) -> RevocationList:
    """Add a device to the signed revocation list at `list_path` (created if missing).

    The existing list must verify with the token's revocation key; the new one gets the next
    sequence number, is signed in the token (audited as `credential.revoke`) and replaces the
    file atomically.

    Raises:
        InputError: bad MAC or reason, or the device is already revoked.
        VerificationFailed: the existing list does not verify with the token's key.
        TokenError: the revocation key is missing or not ec-p256 with sign.
    """
    settings = settings or CredentialSettings.from_policy(st.policy)
    kdf.check_device_id(device)
    _check_reason(reason)
    mac = kdf.format_mac(device)
    key = st.key(settings.revocation_key)
    if key.type != "ec-p256" or "sign" not in key.usage:
        raise TokenError(f"revocation key {key.name!r} must be ec-p256 with usage sign")
    with _locked_dir(Path(list_path).parent):  # one read-modify-write at a time
        return _revoke_locked(st, Path(list_path), device, mac, reason, key)


def _locked_dir(directory: Path) -> contextlib.AbstractContextManager[None]:
    return locked_directory(directory, "revocation list directory")


def _revoke_locked(st: Station, list_path: Path, device: bytes, mac: str, reason: str,
                   key: TokenKey) -> RevocationList:
    key_fp = key.fingerprint()
    revoked: list[dict[str, Any]] = []
    sequence = 0
    if list_path.exists():
        current = load_revocation_list(list_path)
        current.verify(key.public_key())
        if (entry := current.entry(device)) is not None:
            raise InputError(f"device {mac} is already revoked in {list_path} "
                             f"(since {entry.get('revoked_at')})")
        revoked, sequence = current.revoked, current.sequence
    now = _now()
    body = {
        "version": LIST_VERSION, "sequence": sequence + 1, "issued": now,
        "revoked": [*revoked, {"device": mac, "revoked_at": now, "reason": reason}],
        "signer": {"key_fp": key_fp, "key": st.uri(key)},
    }
    with st.use("credential.revoke", key, subject={"device": mac},
                detail={"reason": reason, "list": str(list_path),
                        "sequence": sequence + 1}) as outcome:
        doc = sign_list(body, outcome.signer().sign_digest)
        new = RevocationList(doc, str(list_path))
        new.verify(key.public_key())
        atomic_write(list_path, json.dumps(doc, indent=2, sort_keys=True).encode() + b"\n")
        outcome["revoked_count"] = len(new.revoked)
    return new
