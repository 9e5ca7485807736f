"""Policies (`policies/*.toml`): which token, which keys, which chips, what may leave the token.

The CLI enforces the policy; the token's own attributes (sensitive, non-extractable, usage
flags) are the hard guarantee. `load_policy` validates everything and names the field at fault.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hsmflash.chips import SBV1, SBV2, XTS_AES_128, XTS_AES_256, get_chip
from hsmflash.errors import Error, InputError, PolicyRefused
from hsmflash.keytypes import ALLOWED_USAGES, KeyTypeName, check_key_type, check_type_usage

if TYPE_CHECKING:
    from hsmflash.token.keys import TokenKey

KDF_SCHEMES = ("aes-ecb-v1",)
# what a development profile may name in `unsigned_images`
IMAGE_KINDS = ("bootloader", "app")
# key names: what a PKCS#11 label, a TOML key and a file name all carry without quoting
KEY_NAME_MAX = 64
_KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_RESERVED_SUFFIXES = (".k1", ".k2")  # the halves of an XTS key in the token
PARTITION_TABLE_END = 0x9000  # bootloader and partition table live below


def check_key_name(name: str, where: str = "key name") -> None:
    """Raise InputError unless `name` can name a key: 1..64 of [A-Za-z0-9_.-], starting with
    a letter or digit, not ending in `.k1`/`.k2` (reserved for the halves of XTS keys)."""
    if not name or len(name) > KEY_NAME_MAX:
        raise InputError(f"{where} {name!r}: must be 1 to {KEY_NAME_MAX} characters")
    if not _KEY_NAME.fullmatch(name):
        raise InputError(f"{where} {name!r}: only letters, digits, '_', '.', '-' allowed, "
                         "starting with a letter or digit")
    if name.endswith(_RESERVED_SUFFIXES):
        raise InputError(f"{where} {name!r}: names ending in .k1/.k2 are reserved for the "
                         "halves of XTS keys")
# NVS encryption key protection: the nvs_keys partition under flash encryption, or ESP-IDF's
# CONFIG_NVS_SEC_KEY_PROTECT_USING_HMAC (an HMAC_UP eFuse key), on chips with an HMAC peripheral
NVS_SCHEMES = ("nvs-keys", "hmac")
HMAC_CHIPS = ("esp32s2", "esp32s3", "esp32c3", "esp32c5", "esp32c6", "esp32h2", "esp32p4")


@dataclass(frozen=True)
class KeySpec:
    name: str
    type: KeyTypeName
    usage: tuple[str, ...]
    extractable: bool = False
    description: str = ""


@dataclass(frozen=True)
class SecureBootSpec:
    scheme: str
    keys: tuple[str, ...]
    # SBv1 only: where the bootloader digest key comes from; only "derived" (per device,
    # from the profile's master) is implemented, so the loader refuses anything else
    bootloader_key: str = "derived"
    # ECDSA Secure Boot V2 on a chip where Espressif marks it insecure (C5, C61, H2, P4)
    allow_insecure_ecdsa: bool = False


@dataclass(frozen=True)
class ChipProfile:
    """How one chip family is provisioned under this policy."""

    chip: str
    flash_encryption: str
    derive_master: str
    derive_scheme: str = "aes-ecb-v1"
    secure_boot: SecureBootSpec | None = None
    flash_crypt_config: int = 0xF
    key_block: str | None = None
    readable_keys: bool = False
    release_mode: bool = True
    harden: tuple[str, ...] = ()
    revisions: tuple[int, ...] = ()
    flash_size: int = 4 * 1024 * 1024
    images: dict[str, str] = field(default_factory=dict)
    # development only: image kinds ("bootloader", "app") written without a verified signature
    unsigned_images: tuple[str, ...] = ()
    nvs_encryption: str = "nvs-keys"  # one of NVS_SCHEMES
    nvs_hmac_key_block: str = "BLOCK_KEY5"  # hmac: CONFIG_NVS_SEC_HMAC_EFUSE_KEY_ID = 5
    min_secure_version: int = 0  # anti-rollback: apps below this secure_version are refused


@dataclass(frozen=True)
class ExportRules:
    efuse_burn: bool = False
    esp32_classic_transient: bool = False
    esp32_classic_stored_transient: bool = False  # a migrated ESP32 key, wrapped out per use
    decrypt: bool = False
    device_secrets: bool = False
    efuse128_transient: bool = False  # ESP32-C2: 128-bit key expanded with SHA-256 in memory


@dataclass(frozen=True)
class CredentialRules:
    """Per-device server credentials (issue/check/revoke) and where provisioning puts them."""

    master: str = "cred-master"
    revocation_key: str = "revocation"
    server_url: str = ""
    username_template: str = "{device_id}"
    namespace: str = "hsmflash"
    nvs_address: int | None = None
    nvs_size: int = 0x6000
    nvs_keys_address: int | None = None
    kind: str = "secret"  # what provisioning writes: "secret" (derived) or "x509"
    # provisioning writes credentials into the nvs/nvs_keys partitions of the device's table
    provision: bool = False


@dataclass(frozen=True)
class CaRules:
    """The device CA (`hsmflash ca ...`, `credentials issue --kind x509`, the CRL)."""

    key: str = "device-ca"
    subject: str = "CN={mac}"       # device certificate subject template
    days: int = 3650                # device certificate validity
    crl_days: int = 30              # CRL nextUpdate
    dir: str = "hsmflash-ca"        # issued-certificate index and current CRL


@dataclass(frozen=True)
class Limits:
    max_devices_per_batch: int = 100_000


@dataclass(frozen=True)
class Policy:
    """A loaded, validated policy."""

    name: str
    path: str
    token_label: str | None
    token_module: str | None
    keys: dict[str, KeySpec]
    chips: dict[str, ChipProfile]
    export: ExportRules
    audit_key: str = "audit"
    limits: Limits = field(default_factory=Limits)
    description: str = ""
    credentials: CredentialRules | None = None
    # [token] allow_other_token: --token / HSMFLASH_TOKEN may name another token than label
    allow_other_token: bool = False
    ca: CaRules | None = None

    # -- enforcement -----------------------------------------------------------------
    def check_token(self, label: str | None) -> None:
        """Raise PolicyRefused when `label` (--token / HSMFLASH_TOKEN) is not the policy's
        token, unless the policy allows other tokens ([token] allow_other_token = true)."""
        if (label is None or self.token_label is None or label == self.token_label
                or self.allow_other_token):
            return
        raise PolicyRefused(
            f"token {label!r} (--token/HSMFLASH_TOKEN) is not the token of policy "
            f"{self.name!r} ({self.token_label!r}); drop --token, or set [token] "
            f"allow_other_token = true in {self.path}"
        )

    def profile(self, chip: str) -> ChipProfile:
        """The chip profile, or PolicyRefused when the policy does not cover the chip."""
        try:
            return self.chips[chip]
        except KeyError:
            raise PolicyRefused(
                f"policy {self.name!r} has no profile for chip {chip} "
                f"(covers: {', '.join(self.chips) or 'none'})"
            ) from None

    def check_sign(self, key: str, chip: str, scheme: str) -> None:
        """Raise PolicyRefused unless `key` may sign `scheme` images for `chip`."""
        prof = self.profile(chip)
        if prof.secure_boot is None or prof.secure_boot.scheme != scheme:
            have = prof.secure_boot.scheme if prof.secure_boot else "none"
            raise PolicyRefused(
                f"policy {self.name!r}: chip {chip} uses Secure Boot {have}, not {scheme}"
            )
        if key not in prof.secure_boot.keys:
            raise PolicyRefused(
                f"policy {self.name!r}: key {key!r} may not sign {chip} images "
                f"(allowed: {', '.join(prof.secure_boot.keys)})"
            )

    def check_master(self, master: str, chip: str | None = None) -> None:
        """Raise PolicyRefused unless `master` is a derivation master of this policy (for
        `chip`, when given). A policy without chip profiles restricts no master (any
        aes-256 derive key will do; its type is checked where it derives).

        Checked before a use opens, in every command that derives, so the same wrong master
        is the same refusal everywhere; the key's type is checked where it derives.
        """
        if not self.chips:
            return
        masters = {p.derive_master for p in self.chips.values()}
        if chip is not None:
            masters = {self.profile(chip).derive_master}
        if master not in masters:
            raise PolicyRefused(
                f"policy {self.name!r}: {master!r} is not a derivation master"
                + (f" for {chip}" if chip else "")
                + f" (allowed: {', '.join(sorted(masters)) or 'none'})"
            )

    def check_batch(self, devices: int, source: str) -> None:
        """Raise PolicyRefused when a lot is larger than `limits.max_devices_per_batch`."""
        limit = self.limits.max_devices_per_batch
        if devices > limit:
            raise PolicyRefused(f"{source}: {devices} devices exceed the policy's "
                                f"max_devices_per_batch ({limit})")

    def check_export(self, purpose: str) -> None:
        """Raise PolicyRefused unless per-device keys may leave the token for `purpose`.

        `purpose` is `efuse_burn` or `esp32_classic_transient`.
        """
        allowed = getattr(self.export, purpose, False)
        if not allowed:
            what = {
                "efuse_burn": "burning it into the chip's eFuses",
                "esp32_classic_transient": (
                    "ESP32-classic flash encryption on a token without CKM_XOR_BASE_AND_DATA"
                ),
                "esp32_classic_stored_transient": (
                    "ESP32-classic flash encryption with a stored (migrated) key on a token "
                    "without CKM_XOR_BASE_AND_DATA (the key is imported wrappable and wrapped "
                    "out to memory per use)"
                ),
                "efuse128_transient": (
                    "ESP32-C2 flash encryption (its 128-bit key is expanded with SHA-256 in "
                    "memory)"
                ),
                "device_secrets": (
                    "writing a device's credential and NVS keys into its NVS partitions"
                ),
            }.get(purpose, purpose)
            raise PolicyRefused(
                f"policy {self.name!r} forbids exporting a per-device key for {what}; "
                f"set [export] {purpose} = true in {self.path} to allow it, or use a token "
                "that supports the in-token path"
            )

    def check_decrypt(self) -> None:
        if not self.export.decrypt:
            raise PolicyRefused(
                f"policy {self.name!r} forbids decryption; set [export] decrypt = true "
                f"in {self.path} for an inspection/RMA station"
            )


def unrestricted_policy() -> Policy:
    """What applies without --policy: any key may be used as its token flags allow, but no
    per-device key leaves the token and nothing is decrypted."""
    return Policy(
        name="(none)", path="--policy", token_label=None, token_module=None, keys={},
        chips={}, export=ExportRules(),
    )


# -- loading ------------------------------------------------------------------------------

class _Fields:
    """Reads a TOML table, remembering its dotted path so errors name the field."""

    def __init__(self, table: Any, where: str, source: str) -> None:
        if not isinstance(table, dict):
            raise InputError(f"{source}: {where} must be a table")
        self.table = table
        self.where = where
        self.source = source
        self.seen: set[str] = set()

    def _err(self, key: str, msg: str) -> InputError:
        dotted = f"{self.where}.{key}" if self.where else key
        return InputError(f"{self.source}: {dotted}: {msg}")

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = None,
            required: bool = False) -> Any:
        self.seen.add(key)
        if key not in self.table:
            if required:
                raise self._err(key, "missing (required)")
            return default
        value = self.table[key]
        if kind is int and isinstance(value, bool):
            raise self._err(key, "must be an integer")
        if not isinstance(value, kind):
            names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
            raise self._err(key, f"must be a {names}, not {type(value).__name__}")
        return value

    def strings(self, key: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
        value = self.get(key, list, None)
        if value is None:
            return default
        if not all(isinstance(v, str) for v in value):
            raise self._err(key, "must be a list of strings")
        return tuple(value)

    def done(self) -> None:
        unknown = sorted(set(self.table) - self.seen)
        if unknown:
            raise self._err(unknown[0], "unknown field")

    def error(self, key: str, msg: str) -> InputError:
        return self._err(key, msg)


def load_policy(path: str | Path) -> Policy:
    """Load and validate a policy file.

    Raises:
        InputError: unreadable file, TOML syntax, or a field that is wrong, unknown or
            contradicts another (the message names the field).
    """
    import tomllib  # here: only commands given a policy file pay for the parser

    source = str(path)
    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"policy file {source!r} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"policy file {source!r} unreadable: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"{source}: TOML syntax error: {e}") from None
    return parse_policy(raw, source)


def parse_policy(raw: dict[str, Any], source: str) -> Policy:
    """Validate an already parsed policy document (see `load_policy`)."""
    top = _Fields(raw, "", source)
    name = top.get("name", str, Path(source).stem)
    description = top.get("description", str, "")

    tok = _Fields(top.get("token", dict, {}), "token", source)
    token_label = tok.get("label", str)
    token_module = tok.get("module", str)
    allow_other_token = tok.get("allow_other_token", bool, False)
    tok.done()

    keys: dict[str, KeySpec] = {}
    for key_name, table in top.get("keys", dict, {}).items():
        try:
            check_key_name(key_name)
        except InputError as e:
            raise InputError(f"{source}: keys.{key_name}: {e}") from None
        f = _Fields(table, f"keys.{key_name}", source)
        try:
            key_type = check_key_type(f.get("type", str, required=True))
        except InputError as e:
            raise f.error("type", str(e)) from None
        usage = f.strings("usage")
        try:
            usage = check_type_usage(key_type, usage)
        except InputError:
            raise f.error(
                "usage", f"{list(usage)} not possible for {key_type} "
                f"(allowed: {', '.join(ALLOWED_USAGES[key_type])})"
            ) from None
        extractable = f.get("extractable", bool, False)
        if extractable and ({"sign", "derive"} & set(usage)):
            raise f.error("extractable", "signing and master keys must never be extractable")
        keys[key_name] = KeySpec(key_name, key_type, usage, extractable,
                                 f.get("description", str, ""))
        f.done()

    aud = _Fields(top.get("audit", dict, {}), "audit", source)
    audit_key = aud.get("key", str, "audit")
    aud.done()
    if keys and audit_key in keys:
        spec = keys[audit_key]
        # ECDSA P-256 where the token makes it, else RSA-3072-PSS (`token info` says which)
        if spec.type not in ("ec-p256", "rsa-3072") or "sign" not in spec.usage:
            raise InputError(f"{source}: keys.{audit_key}: the audit key must be ec-p256 or "
                             "rsa-3072 with sign")

    chips: dict[str, ChipProfile] = {}
    for chip_name, table in top.get("chips", dict, {}).items():
        chips[chip_name] = _parse_chip(chip_name, table, keys, source)

    ex = _Fields(top.get("export", dict, {}), "export", source)
    export = ExportRules(
        efuse_burn=ex.get("efuse_burn", bool, False),
        esp32_classic_transient=ex.get("esp32_classic_transient", bool, False),
        esp32_classic_stored_transient=ex.get("esp32_classic_stored_transient", bool, False),
        decrypt=ex.get("decrypt", bool, False),
        device_secrets=ex.get("device_secrets", bool, False),
        efuse128_transient=ex.get("efuse128_transient", bool, False),
    )
    ex.done()
    credentials = None
    cred_raw = top.get("credentials", dict, None)
    if cred_raw is not None:
        cr = _Fields(cred_raw, "credentials", source)
        master = cr.get("master", str, "cred-master")
        _need_key(cr, "master", master, keys, ("aes-256",), "derive")
        rkey = cr.get("revocation_key", str, "revocation")
        _need_key(cr, "revocation_key", rkey, keys, ("ec-p256",), "sign")
        namespace = cr.get("namespace", str, "hsmflash")
        if not 1 <= len(namespace) <= 15:
            raise cr.error("namespace", "must be 1 to 15 characters (an NVS namespace)")
        nvs_address = cr.get("nvs_address", int, None)
        nvs_keys_address = cr.get("nvs_keys_address", int, None)
        nvs_size = cr.get("nvs_size", int, 0x6000)
        for fname, value in (("nvs_address", nvs_address), ("nvs_keys_address",
                                                             nvs_keys_address)):
            if value is not None and value % 0x1000:
                raise cr.error(fname, f"{value:#x} is not 4 KiB aligned")
        if nvs_size < 0x3000 or nvs_size % 0x1000:
            raise cr.error("nvs_size", "must be a multiple of 4 KiB, at least 0x3000")
        kind = cr.get("kind", str, "secret")
        if kind not in ("secret", "x509"):
            raise cr.error("kind", f"{kind!r} is not 'secret' or 'x509'")
        credentials = CredentialRules(
            master, rkey, cr.get("server_url", str, ""),
            cr.get("username_template", str, "{device_id}"), namespace, nvs_address, nvs_size,
            nvs_keys_address, kind, cr.get("provision", bool, False))
        cr.done()
    ca = _parse_ca(top.get("ca", dict, None), keys, source)

    lim = _Fields(top.get("limits", dict, {}), "limits", source)
    limits = Limits(max_devices_per_batch=lim.get("max_devices_per_batch", int, 100_000))
    if limits.max_devices_per_batch < 1:
        raise lim.error("max_devices_per_batch", "must be at least 1")
    lim.done()
    top.done()

    for chip_name in chips:
        if not export.efuse_burn:
            raise InputError(
                f"{source}: export.efuse_burn: chip profile {chip_name!r} burns per-device keys "
                "into eFuses, which needs efuse_burn = true"
            )
    for chip_name, prof in chips.items():
        _check_consistency(chip_name, prof, credentials, source)
    if credentials is not None and credentials.kind == "x509" and ca is None:
        raise InputError(f"{source}: credentials.kind: 'x509' needs a [ca] table")
    return Policy(name, source, token_label, token_module, keys, chips, export, audit_key,
                  limits, description, credentials, allow_other_token, ca)


def _check_consistency(chip_name: str, prof: ChipProfile,
                       credentials: CredentialRules | None, source: str) -> None:
    """Cross-table checks: the NVS regions the plan writes itself against the flash size and
    the image table. (The exports a plan needs depend on the token too, so provisioning
    checks them, before any key use.)"""
    where = f"{source}: chips.{chip_name}"
    if credentials is None or credentials.nvs_address is None \
            or credentials.nvs_keys_address is None:
        return
    regions = [("credentials.nvs_address", credentials.nvs_address, credentials.nvs_size),
               ("credentials.nvs_keys_address", credentials.nvs_keys_address, 0x1000)]
    for fname, start, size in regions:
        if start < PARTITION_TABLE_END:
            raise InputError(f"{source}: {fname}: {start:#x} is inside the bootloader and "
                             f"partition table region (below {PARTITION_TABLE_END:#x})")
        if start + size > prof.flash_size:
            raise InputError(f"{source}: {fname}: {start:#x}+{size:#x} runs past the "
                             f"{prof.flash_size:#x}-byte flash of chips.{chip_name}")
    (_, a, asize), (_, b, bsize) = regions
    if a < b + bsize and b < a + asize:
        raise InputError(f"{source}: credentials.nvs_keys_address: {b:#x} overlaps the NVS "
                         f"partition {a:#x}+{asize:#x}")
    for addr_text in prof.images:
        addr = int(addr_text, 0)
        for fname, start, size in regions:
            if start <= addr < start + size:
                raise InputError(f"{where}.images: image at {addr:#x} lies in the region "
                                 f"provisioning writes itself ({fname} {start:#x}+{size:#x})")


# the attributes formats.x509.parse_name knows (tests/unit/test_x509_formats.py holds them
# equal); checked here without importing cryptography's x509 on every command
SUBJECT_ATTRIBUTES = ("CN", "O", "OU", "C", "ST", "L", "SERIALNUMBER", "DC")


def _subject_template_problem(template: str) -> str:
    filled = template.replace("{mac}", "m").replace("{device_id}", "d")
    if "{" in filled or "}" in filled:
        return "unknown placeholder (known: {mac}, {device_id})"
    for part in filled.replace("\\,", "").split(","):
        name, sep, value = part.partition("=")
        if not sep or name.strip().upper() not in SUBJECT_ATTRIBUTES or not value.strip():
            return (f"{part.strip()!r} is not ATTR=value with ATTR one of "
                    f"{', '.join(SUBJECT_ATTRIBUTES)}")
    return ""


def _parse_ca(raw: Any, keys: dict[str, KeySpec], source: str) -> CaRules | None:
    if raw is None:
        return None
    f = _Fields(raw, "ca", source)
    key = f.get("key", str, "device-ca")
    _need_key(f, "key", key, keys, ("ec-p256", "rsa-3072"), "sign")
    rules = CaRules(key, f.get("subject", str, "CN={mac}"), f.get("days", int, 3650),
                    f.get("crl_days", int, 30), f.get("dir", str, "hsmflash-ca"))
    for name in ("days", "crl_days"):
        if not 1 <= getattr(rules, name) <= 36500:
            raise f.error(name, "must be 1 to 36500 days")
    problem = _subject_template_problem(rules.subject)
    if problem:
        raise f.error("subject", f"{rules.subject!r}: {problem}")
    f.done()
    return rules


def _need_key(f: _Fields, field_name: str, key: str, keys: dict[str, KeySpec],
              types: tuple[str, ...], usage: str) -> None:
    spec = keys.get(key)
    if spec is None:
        raise f.error(field_name, f"key {key!r} is not declared under [keys]")
    if spec.type not in types:
        raise f.error(field_name, f"key {key!r} is {spec.type}; needs {' or '.join(types)}")
    if usage not in spec.usage:
        raise f.error(field_name, f"key {key!r} lacks usage {usage!r}")


def _parse_chip(chip_name: str, table: Any, keys: dict[str, KeySpec], source: str) -> ChipProfile:
    f = _Fields(table, f"chips.{chip_name}", source)
    try:
        chip = get_chip(chip_name)
    except Error:
        raise InputError(f"{source}: chips.{chip_name}: unknown chip") from None
    fe = f.get("flash_encryption", str, chip.default_flash_encryption())
    if fe not in chip.flash_encryption:
        raise f.error("flash_encryption",
                      f"{fe!r} not supported by {chip_name} ({', '.join(chip.flash_encryption)})")

    d = _Fields(f.get("derive", dict, {}), f"chips.{chip_name}.derive", source)
    master = d.get("master", str, required=True)
    scheme = d.get("scheme", str, "aes-ecb-v1")
    if scheme not in KDF_SCHEMES:
        raise d.error("scheme", f"unknown scheme {scheme!r} (one of: {', '.join(KDF_SCHEMES)})")
    _need_key(d, "master", master, keys, ("aes-256",), "derive")
    d.done()

    sb: SecureBootSpec | None = None
    sb_raw = f.get("secure_boot", dict, None)
    if sb_raw is not None:
        s = _Fields(sb_raw, f"chips.{chip_name}.secure_boot", source)
        sb_scheme = s.get("scheme", str, required=True)
        sb_keys = s.strings("keys")
        if sb_scheme not in (SBV1, SBV2):
            raise s.error("scheme", f"must be {SBV1!r} or {SBV2!r}")
        if not sb_keys:
            raise s.error("keys", "name at least one signing key")
        bootloader_key = s.get("bootloader_key", str, "derived")
        allow_insecure_ecdsa = s.get("allow_insecure_ecdsa", bool, False)
        if bootloader_key != "derived":
            raise s.error("bootloader_key", f"{bootloader_key!r}: only \"derived\" (a per-device "
                          "key from the profile's master) is supported")
        if sb_scheme == SBV1:
            if not chip.sbv1:
                raise s.error("scheme", f"{chip_name} has no Secure Boot V1")
            if len(sb_keys) != 1:
                raise s.error("keys", "Secure Boot V1 takes exactly one ECDSA P-256 key")
            _need_key(s, "keys", sb_keys[0], keys, ("ec-p256",), "sign")
        else:
            if len(sb_keys) > chip.sbv2_max_signatures:
                raise s.error("keys", f"{chip_name} takes at most {chip.sbv2_max_signatures} "
                              "Secure Boot V2 key(s)")
            for k in sb_keys:
                _need_key(s, "keys", k, keys, chip.sbv2_algorithms, "sign")
            ecdsa = [k for k in sb_keys if keys[k].type.startswith("ec-")]
            if ecdsa and chip.ecdsa_sbv2_insecure and not allow_insecure_ecdsa:
                raise s.error("keys", f"{ecdsa[0]!r}: Espressif marks ECDSA Secure Boot V2 "
                              f"insecure on {chip_name}; use rsa-3072, or set "
                              "allow_insecure_ecdsa = true to accept the risk")
        if allow_insecure_ecdsa and not (sb_scheme == SBV2 and chip.ecdsa_sbv2_insecure):
            raise s.error("allow_insecure_ecdsa", f"has no effect on {chip_name} {sb_scheme}; "
                          "remove it")
        s.done()
        sb = SecureBootSpec(sb_scheme, sb_keys, bootloader_key, allow_insecure_ecdsa)

    crypt_config = f.get("flash_crypt_config", int, 0xF)
    if not 0 <= crypt_config <= 0xF:
        raise f.error("flash_crypt_config", "must be 0..15")
    key_block = f.get("key_block", str, None)
    if key_block is not None and key_block not in chip.key_blocks:
        raise f.error("key_block", f"{key_block!r} is not a key block of {chip_name} "
                      f"({', '.join(chip.key_blocks)})")
    if fe in (XTS_AES_128, XTS_AES_256) and chip.key_blocks:
        first = key_block or chip.key_blocks[0]
        index = chip.key_blocks.index(first)
        fe_blocks = chip.key_blocks[index:index + (2 if fe == XTS_AES_256 else 1)]
        if len(fe_blocks) < (2 if fe == XTS_AES_256 else 1):
            raise f.error("key_block", f"{first} is the last key block: {fe} needs two "
                          "consecutive blocks")
        bad = [b for b in fe_blocks if b in chip.no_xts_key_blocks]
        if bad:
            raise f.error("key_block", f"{bad[0]} of {chip_name} cannot hold an XTS key")
    revisions = tuple(f.get("revisions", list, []))
    if not all(isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in revisions):
        raise f.error("revisions", "must be a list of non-negative integers")
    flash_size = f.get("flash_size", int, 4 * 1024 * 1024)
    if flash_size <= 0 or flash_size % 0x10000:
        raise f.error("flash_size", f"{flash_size:#x} must be a positive multiple of 64 KiB")
    images_raw = f.get("images", dict, {})
    images: dict[str, str] = {}
    for addr, img in images_raw.items():
        if not isinstance(img, str) or not img:
            raise f.error("images", f"image for {addr} must be a file name")
        try:
            address = int(addr, 0)
        except ValueError:
            raise f.error("images", f"address {addr!r} is not a number") from None
        if address < 0 or address % 0x1000 or address >= flash_size:
            raise f.error("images", f"address {addr!r} must be 4 KiB aligned, inside the "
                          f"{flash_size:#x}-byte flash")
        images[addr] = img
    unsigned = f.strings("unsigned_images")
    for kind in unsigned:
        if kind not in IMAGE_KINDS:
            raise f.error("unsigned_images", f"{kind!r} is not an image kind "
                          f"({', '.join(IMAGE_KINDS)})")
    if sb is not None and any(keys[k].type == "ec-p384" for k in sb.keys) \
            and chip.sha384_min_revision:
        if not revisions or min(revisions) < chip.sha384_min_revision:
            raise f.error("revisions", f"P-384 Secure Boot on {chip_name} needs chip "
                          f"v{chip.sha384_min_revision}.0 or later (SECURE_BOOT_SHA384_EN); "
                          f"set revisions = [{chip.sha384_min_revision}, ...]")
    nvs_scheme = f.get("nvs_encryption", str, "nvs-keys")
    if nvs_scheme not in NVS_SCHEMES:
        raise f.error("nvs_encryption", f"{nvs_scheme!r} is not one of {', '.join(NVS_SCHEMES)}")
    if nvs_scheme == "hmac" and chip_name not in HMAC_CHIPS:
        raise f.error("nvs_encryption", f"{chip_name} has no HMAC peripheral; use 'nvs-keys'")
    hmac_block = f.get("nvs_hmac_key_block", str, "BLOCK_KEY5")
    if nvs_scheme == "hmac" and hmac_block not in chip.key_blocks:
        raise f.error("nvs_hmac_key_block", f"{hmac_block!r} is not a key block of {chip_name}")
    min_secure_version = f.get("min_secure_version", int, 0)
    if not 0 <= min_secure_version <= 0xFFFF:
        raise f.error("min_secure_version", "must be 0..65535")
    prof = ChipProfile(
        chip=chip_name,
        flash_encryption=fe,
        derive_master=master,
        derive_scheme=scheme,
        secure_boot=sb,
        flash_crypt_config=crypt_config,
        key_block=key_block,
        readable_keys=f.get("readable_keys", bool, False),
        release_mode=f.get("release_mode", bool, True),
        harden=f.strings("harden"),
        revisions=revisions,
        flash_size=flash_size,
        images=images,
        unsigned_images=unsigned,
        nvs_encryption=nvs_scheme,
        nvs_hmac_key_block=hmac_block,
        min_secure_version=min_secure_version,
    )
    if prof.readable_keys and prof.release_mode:
        raise f.error("readable_keys", "a release-mode profile must read-protect its keys")
    if prof.release_mode and prof.unsigned_images:
        raise f.error("unsigned_images", "a release-mode profile writes signed images only")
    if sb is None and set(unsigned) != set(IMAGE_KINDS):
        raise f.error("secure_boot", "missing: without Secure Boot no image can be proven; "
                      "add secure_boot, or (development) unsigned_images = "
                      "[\"bootloader\", \"app\"]")
    f.done()
    return prof


@dataclass
class Finding:
    severity: str  # "error" | "warning" | "info"
    key: str
    message: str


def audit_token(policy: Policy, token_keys: list[TokenKey]) -> list[Finding]:
    """Compare the live token against the policy's key declarations."""
    findings: list[Finding] = []
    live = {k.name: k for k in token_keys}
    for name, spec in policy.keys.items():
        key = live.get(name)
        if key is None:
            findings.append(Finding("error", name, "declared in the policy but missing from the "
                                    "token (run `hsmflash keys create`)"))
            continue
        if key.type != spec.type:
            findings.append(Finding("error", name, f"is {key.type} in the token, policy says "
                                    f"{spec.type}"))
        if key.extractable and not spec.extractable:
            findings.append(Finding("error", name, "is extractable in the token; the policy "
                                    "requires non-extractable"))
        if not key.sensitive:
            findings.append(Finding("error", name, "is not sensitive in the token"))
        extra = set(key.usage) - set(spec.usage)
        if extra:
            findings.append(Finding("error", name, f"allows {', '.join(sorted(extra))} which "
                                    "the policy does not grant"))
        missing = set(spec.usage) - set(key.usage)
        if missing:
            findings.append(Finding("warning", name, f"lacks usage {', '.join(sorted(missing))} "
                                    "that the policy declares"))
        if key.origin == "imported":
            findings.append(Finding("info", name, "was imported, not generated in the token; "
                                    "make sure the source file was destroyed"))
    for name in sorted(set(live) - set(policy.keys) - {policy.audit_key}):
        findings.append(Finding("info", name, "is in the token but not declared in the policy"))
    return findings
