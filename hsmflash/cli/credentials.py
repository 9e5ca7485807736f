"""`hsmflash credentials ...`: issue, check and revoke per-device server credentials (derived
secrets and X.509 certificates: issue --kind x509, sign-csr, revoke, crl).

Registered in `cli/main.py` with `app.add_typer(credentials_app, name="credentials")`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from hsmflash.cli.context import Context
    from hsmflash.credentials import CredentialSettings

credentials_app = typer.Typer(
    help="Per-device server credentials, written to the device's encrypted NVS: a secret "
    "derived in the token (checked by re-derivation, revoked through a signed list) or an "
    "X.509 certificate from the device CA (revoked through its CRL).",
    no_args_is_help=True,
)

DeviceOpt = Annotated[
    str, typer.Option("--device", help="Device base MAC aa:bb:cc:dd:ee:ff.", metavar="MAC")
]
MasterOpt = Annotated[
    str | None,
    typer.Option(
        "--master",
        help="Credential master key (default: the policy's, else 'cred-master').",
        metavar="KEY",
    ),
]
RevKeyOpt = Annotated[
    str | None,
    typer.Option(
        "--key",
        help="Revocation signing key, ec-p256 (default: the policy's, else 'revocation').",
        metavar="KEY",
    ),
]


CaDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--ca-dir",
        help="CA index and CRL directory (default: the policy's [ca] dir).",
        metavar="DIR",
    ),
]


def _context(ctx: typer.Context) -> Context:
    from hsmflash.cli.context import ctx_of

    return ctx_of(ctx)


def _settings(
    c: Context,
    master: str | None = None,
    revocation_key: str | None = None,
    server_url: str | None = None,
) -> CredentialSettings:
    from dataclasses import replace

    from hsmflash.credentials import CredentialSettings

    s = CredentialSettings.from_policy(c.policy)
    if master is not None and master != s.master and c.policy.keys:
        from hsmflash.errors import PolicyRefused

        raise PolicyRefused(
            f"--master {master!r}: policy {c.policy.name!r} issues credentials "
            f"only from its credentials master {s.master!r}"
        )
    changes = {
        k: v
        for k, v in (
            ("master", master),
            ("revocation_key", revocation_key),
            ("server_url", server_url),
        )
        if v is not None
    }
    return replace(s, **changes)


def _addresses(
    table: Path | None,
    nvs_address: str | None,
    nvs_size: str | None,
    nvs_keys_address: str | None,
    *,
    hmac_nvs: bool,
) -> tuple[int, int, int | None]:
    """(nvs address, nvs size, nvs_keys address): from the table, else from the options. With
    the HMAC NVS scheme there is no nvs_keys partition (None)."""
    from hsmflash.credentials import check_nvs_size
    from hsmflash.errors import InputError, UsageError
    from hsmflash.fileio import parse_int, read_input
    from hsmflash.formats import partitions

    if table is not None:
        if nvs_address or nvs_size or nvs_keys_address:
            raise UsageError(
                "--table gives the addresses: drop --nvs-address, --nvs-size and --nvs-keys-address"
            )
        parts = partitions.read_table(read_input(table, "partition table"), str(table))
        nvs, keys = partitions.find_nvs(parts), partitions.find_nvs_keys(parts)
        if nvs is not None and hmac_nvs:
            return nvs.offset, nvs.size, None
        if nvs is None or keys is None or not keys.encrypted:
            problems = partitions.protection_problems(parts, credentials=True)
            raise InputError(f"{table}: {problems[0]}")
        return nvs.offset, nvs.size, keys.offset
    size = parse_int(nvs_size or "0x6000", "--nvs-size")
    check_nvs_size(size)
    if nvs_keys_address is None and not hmac_nvs:
        raise UsageError(
            "give the device's partition table (--table TABLE) or its nvs_keys "
            "address (--nvs-keys-address)"
        )
    return (
        parse_int(nvs_address or "0x9000", "--nvs-address"),
        size,
        parse_int(nvs_keys_address, "--nvs-keys-address") if nvs_keys_address else None,
    )


@credentials_app.command("issue")
def issue_cmd(
    ctx: typer.Context,
    device: DeviceOpt,
    chip: Annotated[
        str, typer.Option("--chip", help="Chip family (a profile of the policy).", metavar="CHIP")
    ],
    nvs_out: Annotated[
        Path | None,
        typer.Option(
            "--nvs-out", help="NVS partition image (default: nvs-<device_id>.bin).", metavar="FILE"
        ),
    ] = None,
    nvs_keys_out: Annotated[
        Path | None,
        typer.Option(
            "--nvs-keys-out",
            help="Encrypted nvs_keys partition (default: nvs_keys-<device_id>.bin).",
            metavar="FILE",
        ),
    ] = None,
    table: Annotated[
        Path | None,
        typer.Option(
            "--table",
            help="The device's partition table (binary or CSV): NVS and nvs_keys "
            "addresses and the NVS size come from it.",
            metavar="FILE",
        ),
    ] = None,
    nvs_address: Annotated[
        str | None,
        typer.Option(
            "--nvs-address",
            help="NVS partition offset, without --table (recorded; NVS "
            "encryption is position-independent; default 0x9000).",
            metavar="ADDR",
        ),
    ] = None,
    nvs_size: Annotated[
        str | None,
        typer.Option(
            "--nvs-size",
            help="NVS partition size, without --table (default 0x6000).",
            metavar="SIZE",
        ),
    ] = None,
    nvs_keys_address: Annotated[
        str | None,
        typer.Option(
            "--nvs-keys-address",
            help="nvs_keys partition offset (its flash-encryption tweak), "
            "without --table. No default: MicroPython's tables have phy_init at 0xF000.",
            metavar="ADDR",
        ),
    ] = None,
    template: Annotated[
        Path | None,
        typer.Option(
            "--template",
            help="NVS CSV (key,type,encoding,value) with {device_id} {mac} "
            "{username} {secret} {server_url} placeholders.",
            metavar="FILE",
        ),
    ] = None,
    server_url: Annotated[
        str | None,
        typer.Option(
            "--server-url", help="Server URL for the device (default: the policy's).", metavar="URL"
        ),
    ] = None,
    master: MasterOpt = None,
    kind: Annotated[
        str,
        typer.Option(
            "--kind",
            help="secret (derived credential) or x509 (a P-256 key and a certificate "
            "from the device CA, as NVS blobs dev_key/dev_cert).",
            metavar="KIND",
        ),
    ] = "secret",
    cert_out: Annotated[
        Path | None,
        typer.Option(
            "--cert-out", help="x509: also write the device certificate (PEM).", metavar="FILE"
        ),
    ] = None,
    keep_previous: Annotated[
        bool,
        typer.Option(
            "--keep-previous", help="x509: do not revoke the device's earlier certificates."
        ),
    ] = False,
    ca_dir: Annotated[
        Path | None,
        typer.Option(
            "--ca-dir",
            help="x509: CA index and CRL directory (default: the policy's [ca] dir).",
            metavar="DIR",
        ),
    ] = None,
) -> None:
    """Write a device's encrypted NVS partition (credential inside) and its nvs_keys partition.

    The credential and NVS keys leave the token only into these images (audited with KCVs);
    the nvs_keys image is encrypted with the device's flash-encryption key at its address.
    With --kind x509 the NVS holds a device key made on the station and its certificate.
    """
    from hsmflash.credentials import (
        build_device_partitions,
        build_x509_partitions,
        check_nvs_size,
        default_template,
        device_id,
        load_template,
    )
    from hsmflash.errors import UsageError
    from hsmflash.fileio import atomic_write, check_output
    from hsmflash.formats.kdf import parse_mac
    from hsmflash.formats.x509 import pem

    c = _context(ctx)
    mac = parse_mac(device)
    if kind not in ("secret", "x509"):
        raise UsageError(f"--kind {kind!r}: one of secret, x509")
    if kind == "x509" and template is not None:
        raise UsageError("--template applies to --kind secret")
    if kind == "secret" and (cert_out or keep_previous or ca_dir):
        raise UsageError("--cert-out, --keep-previous and --ca-dir apply to --kind x509")
    settings = _settings(c, master=master, server_url=server_url)
    profile = c.policy.chips.get(chip)
    hmac_nvs = profile is not None and profile.nvs_encryption == "hmac"
    n_addr, size, k_addr = _addresses(
        table, nvs_address, nvs_size, nvs_keys_address, hmac_nvs=hmac_nvs
    )
    check_nvs_size(size)
    tmpl = load_template(template) if template else default_template(settings)
    nvs_path = nvs_out or Path(f"nvs-{device_id(mac)}.bin")
    keys_path = nvs_keys_out or Path(f"nvs_keys-{device_id(mac)}.bin")
    check_output(nvs_path, "NVS partition")
    check_output(keys_path, "nvs_keys partition")
    if cert_out is not None:
        check_output(cert_out, "certificate")
    with c.station() as st:
        if kind == "x509":
            parts = build_x509_partitions(
                st,
                chip,
                mac,
                nvs_size=size,
                nvs_keys_address=k_addr,
                nvs_address=n_addr,
                settings=settings,
                ca_dir=ca_dir,
                keep_previous=keep_previous,
            )
        else:
            parts = build_device_partitions(
                st,
                chip,
                mac,
                nvs_size=size,
                nvs_keys_address=k_addr,
                nvs_address=n_addr,
                template=tmpl,
                settings=settings,
                kind="secret",
            )
    atomic_write(nvs_path, parts.nvs, mode=0o600)
    try:
        if parts.nvs_keys:  # none with the HMAC scheme: the chip derives its NVS keys
            atomic_write(keys_path, parts.nvs_keys, mode=0o600)
        if cert_out is not None:
            atomic_write(cert_out, pem(bytes.fromhex(parts.info["cert_der"]), "CERTIFICATE"))
    except BaseException:
        nvs_path.unlink(missing_ok=True)
        keys_path.unlink(missing_ok=True)
        raise
    info = {**parts.info, "nvs_out": str(nvs_path)}
    info.pop("cert_der", None)
    if parts.nvs_keys:
        info["nvs_keys_out"] = str(keys_path)
    keys_line = (
        f"{keys_path} (nvs_keys at {info['nvs_keys_address']}, {info['flash_encryption']})"
        if parts.nvs_keys
        else f"no nvs_keys partition: NVS keys from the HMAC_UP key in {info.get('hmac_key_block')}"
    )
    if kind == "x509":
        c.emit(
            info,
            f"{info['device']}: certificate serial {info['serial']} (sha256 "
            f"{info['cert_sha256'][:16]}...), key {info['device_key_fp'][:23]}...\n"
            f"  {nvs_path} (NVS at {info.get('nvs_address', '?')}, {info['nvs_size']})"
            f"\n  {keys_line}",
        )
        return
    c.emit(
        info,
        f"{info['device']}: credential kcv {info['credential_kcv']}, user "
        f"{info['username']}\n  {nvs_path} (NVS at {info['nvs_address']}, "
        f"{info['nvs_size']})\n  {keys_line}",
    )


@credentials_app.command("check")
def check_cmd(
    ctx: typer.Context,
    device: DeviceOpt,
    secret_file: Annotated[
        Path,
        typer.Option(
            "--secret-file", help="The secret the device presented (64 hex digits).", metavar="FILE"
        ),
    ],
    revocations: Annotated[
        Path | None,
        typer.Option(
            "--revocations", help="Signed revocation list: a revoked device fails.", metavar="FILE"
        ),
    ] = None,
    pubkey: Annotated[
        Path | None,
        typer.Option(
            "--pubkey",
            help="PEM key the list must verify with (default: the token's revocation key).",
            metavar="PEM",
        ),
    ] = None,
    min_sequence: Annotated[
        int | None,
        typer.Option(
            "--min-sequence", help="Refuse a revocation list older than this sequence.", metavar="N"
        ),
    ] = None,
    master: MasterOpt = None,
    key: RevKeyOpt = None,
) -> None:
    """Check a presented secret by re-deriving it in the token (exit 0 valid, 6 not)."""
    from hsmflash.credentials import parse_secret, verify_credential
    from hsmflash.errors import UsageError
    from hsmflash.fileio import read_input
    from hsmflash.formats.kdf import format_mac, parse_mac
    from hsmflash.formats.revocation import load_revocation_key, load_revocation_list
    from hsmflash.keyuse import wipe

    c = _context(ctx)
    mac = parse_mac(device)
    if pubkey is not None and revocations is None:
        raise UsageError("--pubkey verifies a --revocations list; give the list too")
    settings = _settings(c, master=master, revocation_key=key)
    lst = load_revocation_list(revocations) if revocations else None
    pub = load_revocation_key(pubkey) if pubkey else None
    secret = parse_secret(read_input(secret_file, "secret file"), str(secret_file))
    try:
        with c.station() as st:
            if lst is not None:
                lst.verify(
                    pub or st.key(settings.revocation_key).public_key(), min_sequence=min_sequence
                )
            verify_credential(st, mac, secret, revocations=lst, settings=settings)
    finally:
        wipe(secret)
    c.emit({"device": format_mac(mac), "valid": True}, f"{format_mac(mac)}: credential valid")


@credentials_app.command("revoke")
def revoke_cmd(
    ctx: typer.Context,
    device: Annotated[
        str | None, typer.Argument(help="Device base MAC aa:bb:cc:dd:ee:ff.", metavar="MAC")
    ] = None,
    list_file: Annotated[
        Path | None,
        typer.Option(
            "--list",
            help="Derived credentials: the signed JSON revocation list (created if "
            "missing). Without it, the device's certificates go into the CA's CRL.",
            metavar="FILE",
        ),
    ] = None,
    reason: Annotated[str, typer.Option("--reason", help="Why (one line).", metavar="TEXT")] = "",
    key: RevKeyOpt = None,
    serial: Annotated[
        str | None,
        typer.Option(
            "--serial",
            help="Certificates: revoke this serial (hex) instead of a device's.",
            metavar="HEX",
        ),
    ] = None,
    ca_dir: CaDirOpt = None,
) -> None:
    """Revoke a device: its derived credential (--list) or its certificates (the CRL)."""
    from hsmflash.credentials import revoke
    from hsmflash.errors import UsageError
    from hsmflash.fileio import check_output
    from hsmflash.formats.kdf import format_mac, parse_mac

    c = _context(ctx)
    if list_file is None:
        _revoke_certs(c, device, serial, reason, ca_dir)
        return
    if device is None or serial is not None or ca_dir is not None:
        raise UsageError(
            "--list revokes a derived credential: give DEVICE, without --serial or --ca-dir"
        )
    mac = parse_mac(device)
    check_output(list_file, "revocation list")
    settings = _settings(c, revocation_key=key)
    with c.station() as st:
        lst = revoke(st, list_file, mac, reason=reason, settings=settings)
    c.emit(
        {
            "device": format_mac(mac),
            "list": str(list_file),
            "sequence": lst.sequence,
            "revoked_count": len(lst.revoked),
        },
        f"revoked {format_mac(mac)}: {list_file} sequence {lst.sequence}, "
        f"{len(lst.revoked)} device(s) revoked",
    )


def _revoke_certs(
    c: Context, device: str | None, serial: str | None, reason: str, ca_dir: Path | None
) -> None:
    from hsmflash import ca
    from hsmflash.errors import InputError, UsageError
    from hsmflash.formats.kdf import parse_mac

    if (device is None) == (serial is None):
        raise UsageError("give a DEVICE or --serial HEX (not both)")
    mac = parse_mac(device) if device is not None else None
    number = None
    if serial is not None:
        try:
            number = int(serial, 16)
        except ValueError:
            raise InputError(f"--serial {serial!r} is not hexadecimal") from None
    if len(reason) > 200 or any(not ch.isprintable() for ch in reason):
        raise InputError("revocation reason must be one printable line of at most 200 characters")
    with c.station() as st:
        out = ca.revoke(st, device=mac, serial=number, ca_dir=ca_dir, reason=reason)
    c.emit(
        out,
        f"revoked {', '.join(out['revoked'])}: CRL number {out['crl_number']} "
        f"({out['revoked_count']} revoked) in {out['crl']}",
    )


@credentials_app.command("crl")
def crl_cmd(
    ctx: typer.Context,
    out: Annotated[
        Path,
        typer.Option(
            "-o", "--output", "--out", help="Write the CRL here (PEM; .der: DER).", metavar="FILE"
        ),
    ],
    ca_dir: CaDirOpt = None,
) -> None:
    """Sign and write a fresh CRL (next CRL number, nextUpdate from the policy)."""
    from hsmflash import ca
    from hsmflash.fileio import atomic_write, check_output
    from hsmflash.formats.x509 import pem

    c = _context(ctx)
    check_output(out, "CRL")
    with c.station() as st:
        der = ca.publish_crl(st, ca_dir=ca_dir)
    atomic_write(out, der if out.suffix == ".der" else pem(der, "X509 CRL"))
    c.emit({"out": str(out)}, f"CRL written to {out}")


@credentials_app.command("sign-csr")
def sign_csr_cmd(
    ctx: typer.Context,
    csr: Annotated[
        Path, typer.Argument(help="CSR made on the device (PEM or DER).", metavar="FILE")
    ],
    device: DeviceOpt,
    out: Annotated[
        Path, typer.Option(
            "-o", "--output", "--out", help="Write the certificate (PEM).", metavar="FILE"
        )
    ],
    ca_dir: CaDirOpt = None,
) -> None:
    """Issue a certificate for a device-made CSR, checked against the policy first."""
    from hsmflash import ca
    from hsmflash.fileio import atomic_write, check_output, read_input
    from hsmflash.formats.kdf import parse_mac
    from hsmflash.formats.x509 import pem

    c = _context(ctx)
    mac = parse_mac(device)
    data = read_input(csr, "CSR")
    check_output(out, "certificate")
    with c.station() as st:
        issued = ca.sign_csr(st, mac, data, str(csr), ca_dir=ca_dir)
    atomic_write(out, pem(issued.der, "CERTIFICATE"))
    c.emit(
        {
            "device": issued.device,
            "serial": f"{issued.serial:x}",
            "cert_sha256": issued.sha256,
            "out": str(out),
        },
        f"{issued.device}: certificate serial {issued.serial:x}\n  {out}",
    )


@credentials_app.command("revoked")
def revoked_cmd(
    ctx: typer.Context,
    list_file: Annotated[
        Path, typer.Option("--list", help="Revocation list file.", metavar="FILE")
    ],
    verify: Annotated[
        bool, typer.Option("--verify", help="Verify the signature (needs --pubkey; no token).")
    ] = False,
    pubkey: Annotated[
        Path | None,
        typer.Option(
            "--pubkey", help="The revocation key's PEM (`hsmflash keys public`).", metavar="PEM"
        ),
    ] = None,
    min_sequence: Annotated[
        int | None,
        typer.Option("--min-sequence", help="Refuse a list older than this sequence.", metavar="N"),
    ] = None,
) -> None:
    """Show the revoked devices; with --verify, exit 6 unless the list is intact and signed."""
    from hsmflash.errors import UsageError
    from hsmflash.formats.revocation import load_revocation_key, load_revocation_list

    c = _context(ctx)
    if verify and pubkey is None:
        raise UsageError("--verify needs --pubkey PEM")
    if not verify and (pubkey is not None or min_sequence is not None):
        raise UsageError("--pubkey and --min-sequence apply with --verify")
    lst = load_revocation_list(list_file)
    if verify:
        assert pubkey is not None  # noqa: S101 - checked above
        lst.verify(load_revocation_key(pubkey), min_sequence=min_sequence)
    data = {
        "list": str(list_file),
        "verified": verify,
        "sequence": lst.sequence,
        "issued": lst.doc["issued"],
        "signer": lst.signer_fingerprint,
        "revoked": lst.revoked,
    }

    def human() -> None:
        state = "verified" if verify else "NOT verified (use --verify --pubkey PEM)"
        typer.echo(f"{list_file}: sequence {lst.sequence}, issued {lst.doc['issued']}, {state}")
        for e in lst.revoked:
            why = f"  {e.get('reason')}" if e.get("reason") else ""
            typer.echo(f"  {e['device']}  {e.get('revoked_at')}{why}")

    c.emit(data, human)
