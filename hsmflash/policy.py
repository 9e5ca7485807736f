"""Policies (`policies/*.toml`): which token, which keys, which chips, what may leave the token.

The CLI enforces the policy; the token's own attributes (sensitive, non-extractable, usage
flags) are the hard guarantee. `load_policy` validates everything and names the field at fault.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hsmflash.chips import SBV1, SBV2, get_chip
from hsmflash.errors import Error, InputError, PolicyRefused
from hsmflash.token.keys import ALLOWED_USAGES, KEY_TYPES, TokenKey, check_type_usage

KDF_SCHEMES = ("aes-ecb-v1",)


@dataclass(frozen=True)
class KeySpec:
    name: str
    type: str
    usage: tuple[str, ...]
    extractable: bool = False
    description: str = ""


@dataclass(frozen=True)
class SecureBootSpec:
    scheme: str
    keys: tuple[str, ...]
    # SBv1 only: where the bootloader digest key comes from ("derived" per device, or a key name)
    bootloader_key: str = "derived"


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


@dataclass(frozen=True)
class ExportRules:
    efuse_burn: bool = False
    esp32_classic_transient: bool = False
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
    # provisioning writes credentials into the nvs/nvs_keys partitions of the device's table
    provision: bool = False


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

    # -- enforcement -----------------------------------------------------------------
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
        """Raise PolicyRefused unless `master` is a derivation master of this policy."""
        masters = {p.derive_master for p in self.chips.values()}
        if chip is not None:
            masters = {self.profile(chip).derive_master}
        if master not in masters:
            raise PolicyRefused(
                f"policy {self.name!r}: {master!r} is not a derivation master"
                + (f" for {chip}" if chip else "")
                + f" (allowed: {', '.join(sorted(masters)) or 'none'})"
            )

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
    tok.done()

    keys: dict[str, KeySpec] = {}
    for key_name, table in top.get("keys", dict, {}).items():
        f = _Fields(table, f"keys.{key_name}", source)
        key_type = f.get("type", str, required=True)
        if key_type not in KEY_TYPES:
            raise f.error("type", f"unknown key type {key_type!r} (one of: {', '.join(KEY_TYPES)})")
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
        if spec.type != "ec-p256" or "sign" not in spec.usage:
            raise InputError(f"{source}: keys.{audit_key}: the audit key must be ec-p256 with sign")

    chips: dict[str, ChipProfile] = {}
    for chip_name, table in top.get("chips", dict, {}).items():
        chips[chip_name] = _parse_chip(chip_name, table, keys, source)

    ex = _Fields(top.get("export", dict, {}), "export", source)
    export = ExportRules(
        efuse_burn=ex.get("efuse_burn", bool, False),
        esp32_classic_transient=ex.get("esp32_classic_transient", bool, False),
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
        credentials = CredentialRules(
            master, rkey, cr.get("server_url", str, ""),
            cr.get("username_template", str, "{device_id}"), namespace, nvs_address, nvs_size,
            nvs_keys_address, cr.get("provision", bool, False))
        cr.done()

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
    return Policy(name, source, token_label, token_module, keys, chips, export, audit_key,
                  limits, description, credentials)


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
        if sb_scheme == SBV1:
            if not chip.sbv1:
                raise s.error("scheme", f"{chip_name} has no Secure Boot V1")
            if len(sb_keys) != 1:
                raise s.error("keys", "Secure Boot V1 takes exactly one ECDSA P-256 key")
            _need_key(s, "keys", sb_keys[0], keys, ("ec-p256",), "sign")
            if bootloader_key != "derived":
                _need_key(s, "bootloader_key", bootloader_key, keys, ("aes-256",), "encrypt")
        else:
            if len(sb_keys) > chip.sbv2_max_signatures:
                raise s.error("keys", f"{chip_name} takes at most {chip.sbv2_max_signatures} "
                              "Secure Boot V2 key(s)")
            for k in sb_keys:
                _need_key(s, "keys", k, keys, chip.sbv2_algorithms, "sign")
        s.done()
        sb = SecureBootSpec(sb_scheme, sb_keys, bootloader_key)

    crypt_config = f.get("flash_crypt_config", int, 0xF)
    if not 0 <= crypt_config <= 0xF:
        raise f.error("flash_crypt_config", "must be 0..15")
    key_block = f.get("key_block", str, None)
    if key_block is not None and key_block not in chip.key_blocks:
        raise f.error("key_block", f"{key_block!r} is not a key block of {chip_name} "
                      f"({', '.join(chip.key_blocks)})")
    revisions = tuple(f.get("revisions", list, []))
    if not all(isinstance(r, int) for r in revisions):
        raise f.error("revisions", "must be a list of integers")
    images_raw = f.get("images", dict, {})
    images: dict[str, str] = {}
    for addr, img in images_raw.items():
        if not isinstance(img, str):
            raise f.error("images", f"image for {addr} must be a file name")
        images[addr] = img
    flash_size = f.get("flash_size", int, 4 * 1024 * 1024)
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
    )
    if prof.readable_keys and prof.release_mode:
        raise f.error("readable_keys", "a release-mode profile must read-protect its keys")
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
