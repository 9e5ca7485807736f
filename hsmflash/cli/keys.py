"""`hsmflash keys ...`: create, generate, import, list keys; public halves and digests."""

from pathlib import Path
from typing import Annotated, Any

import typer

from hsmflash.cli.context import ctx_of
from hsmflash.cli.options import ChipOpt
from hsmflash.errors import (
    UsageError,
)
from hsmflash.policy import check_key_name

keys_app = typer.Typer(
    help="Create, import, list and export public halves of token keys.", no_args_is_help=True
)


def _key_line(info: dict[str, Any]) -> str:
    ident = f"kcv {info['kcv']}" if "kcv" in info else info.get("fingerprint", "")
    flags = []
    flags.append("sensitive" if info["sensitive"] else "NOT-SENSITIVE")
    flags.append("extractable" if info["extractable"] else "non-extractable")
    return (
        f"{info['name']:20} {info['type']:12} usage={','.join(info['usage']) or '-':14} "
        f"{' '.join(flags)} {info['origin']:9} {ident}"
    )


UsageOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--usage",
        help="Usage flag (repeat): sign, derive, encrypt, wrap. Default by type.",
        metavar="USAGE",
    ),
]


@keys_app.command("generate")
def keys_generate(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Label of the new key.", metavar="NAME")],
    key_type: Annotated[
        str,
        typer.Option(
            "--type",
            help="aes-128, aes-256, xts-aes-128, xts-aes-256, rsa-3072, ec-p256, ec-p384.",
            metavar="TYPE",
        ),
    ],
    usage: UsageOpt = None,
) -> None:
    """Generate a key inside the token: sensitive, non-extractable, only the usages given."""
    from hsmflash.keys import generate
    from hsmflash.keytypes import check_type_usage

    c = ctx_of(ctx)
    check_key_name(name)
    check_type_usage(key_type, usage)  # bad input before the token (and its PIN)
    with c.station() as st:
        info = generate(st, name, key_type, usage)
    c.emit(info, f"generated {_key_line(info)}")


@keys_app.command("import")
def keys_import(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Label of the imported key.", metavar="NAME")],
    key_type: Annotated[
        str, typer.Option("--type", help="Key type (see `keys generate`).", metavar="TYPE")
    ],
    file: Annotated[
        Path,
        typer.Option(
            "--file",
            help="espsecure key file: raw AES bytes (32/64) or a PEM private key.",
            metavar="FILE",
        ),
    ],
    usage: UsageOpt = None,
    wrappable: Annotated[
        bool,
        typer.Option(
            "--wrappable",
            help="aes-256 ESP32-classic flash key for a token without XOR "
            "derivation: may be wrapped out to memory per use (policy "
            "export.esp32_classic_stored_transient).",
        ),
    ] = False,
) -> None:
    """Migrate an espsecure key file into the token (it becomes non-extractable).

    Destroy the file afterwards: the token copy is the only one that should remain.
    """
    from hsmflash.fileio import read_input
    from hsmflash.keys import import_material
    from hsmflash.keytypes import check_type_usage
    from hsmflash.keyuse import wipe

    c = ctx_of(ctx)
    check_key_name(name)
    check_type_usage(key_type, usage)  # bad input before the token (and its PIN)
    material = bytearray(read_input(file, "key file"))
    try:
        with c.station() as st:
            info = import_material(st, name, key_type, material, usage, source=str(file),
                                   wrappable=wrappable)
    finally:
        wipe(material)
    c.emit(
        {**info, "destroy_source": str(file)},
        f"imported {_key_line(info)}\nnow destroy {file} (e.g. shred -u {file}): "
        "the token holds the key from here on",
    )


@keys_app.command("create")
def keys_create(ctx: typer.Context) -> None:
    """Create every key the policy declares that the token lacks (idempotent)."""
    from hsmflash.keys import create_policy_keys

    c = ctx_of(ctx)
    if not c.policy.keys:
        raise UsageError("keys create needs a policy with [keys] (pass --policy FILE)")
    with c.station() as st:
        results = create_policy_keys(st)

    def human() -> None:
        for r in results:
            typer.echo(f"{r['action']:8} {_key_line(r)}")

    c.emit(results, human)


@keys_app.command("list")
def keys_list(ctx: typer.Context) -> None:
    """List the token's keys: type, usage, attributes, KCV or public-key fingerprint."""
    from hsmflash.token.keys import list_keys
    from hsmflash.token.session import open_session

    c = ctx_of(ctx)
    with open_session(c.token_config()) as session:
        infos = [k.describe() for k in list_keys(session)]

    def human() -> None:
        if not infos:
            typer.echo("no keys (create them with `hsmflash keys create --policy FILE`)")
        for i in infos:
            typer.echo(_key_line(i))

    c.emit(infos, human)


@keys_app.command("public")
def keys_public(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Key label or pkcs11: URI.", metavar="NAME")],
    output: Annotated[
        Path, typer.Option("-o", "--output", help="PEM file to write.", metavar="FILE")
    ],
) -> None:
    """Write the public half of a signing key as PEM (for espsecure, auditors, eFuse digests)."""
    from cryptography.hazmat.primitives import serialization

    from hsmflash.fileio import atomic_write
    from hsmflash.token.keys import find_key
    from hsmflash.token.session import KeyRef, open_session

    c = ctx_of(ctx)
    cfg = c.token_config()
    with open_session(cfg) as session:
        key = find_key(session, KeyRef.parse(name).label, cfg.label)
        pub = key.public_key()
        fp = key.fingerprint()
    pem = pub.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    atomic_write(output, pem)
    c.emit(
        {"name": key.name, "type": key.type, "fingerprint": fp, "output": str(output)},
        f"wrote {output} ({key.type}, {fp})",
    )


@keys_app.command("digest")
def keys_digest(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Signing key label or pkcs11: URI.", metavar="NAME")],
    chip: ChipOpt,
    output: Annotated[
        Path | None,
        typer.Option("-o", "--output", help="Also write the raw bytes here.", metavar="FILE"),
    ] = None,
) -> None:
    """The eFuse value for a signing key: the SBv2 public-key digest, or the SBv1 public key."""
    from hsmflash.chips import get_chip
    from hsmflash.fileio import atomic_write
    from hsmflash.sign import key_digest
    from hsmflash.token.keys import find_key
    from hsmflash.token.session import KeyRef, open_session

    c = ctx_of(ctx)
    the_chip = get_chip(chip)
    cfg = c.token_config()
    with open_session(cfg, login=False) as session:
        key = find_key(session, KeyRef.parse(name).label, cfg.label, public_only=True)
        info = key_digest(key, the_chip)
    raw = info.pop("bytes")
    if output is not None:
        atomic_write(output, raw)
        info["output"] = str(output)
    c.emit(info, f"{info['digest']}\n({info['what']})")
