"""`hsmflash app ...`: build and verify signed MicroPython app images, write the boot verifier.

Registered by `cli/main.py` with `app.add_typer(app_app, name="app")`; `main` is imported lazily
inside the commands so either module may be imported first.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from hsmflash.cli.context import Context

app_app = typer.Typer(
    help="The MicroPython app: signed ROMFS app images (hsmflash-app-v1) and the boot verifier "
    "frozen into the firmware.",
    no_args_is_help=True,
)


def _context(ctx: typer.Context) -> Context:
    from hsmflash.cli.context import ctx_of

    return ctx_of(ctx)


@app_app.command("build")
def build_cmd(
    ctx: typer.Context,
    src_dir: Annotated[
        Path, typer.Argument(help="App source directory (main.py at its top).", metavar="DIR")
    ],
    output: Annotated[
        Path, typer.Option("-o", "--output", help="Signed app image to write.", metavar="FILE")
    ],
    key: Annotated[
        str,
        typer.Option(
            "--key",
            help="Signing key (rsa-3072 for the boot verifier) label or pkcs11: URI.",
            metavar="KEY",
        ),
    ],
    app_version: Annotated[
        int,
        typer.Option(
            "--app-version", help="App version in the descriptor (anti-rollback).", metavar="N"
        ),
    ] = 0,
    mpy_version: Annotated[
        int,
        typer.Option(
            "--mpy-version",
            help="6 (MicroPython >= 1.25) or 4 (Pycom MicroPython 1.11).",
            metavar="N",
        ),
    ] = 6,
    include_source: Annotated[
        bool,
        typer.Option("--include-source", help="Also ship the .py sources (default: .mpy only)."),
    ] = False,
) -> None:
    """Compile the app directory DIR with mpy-cross, pack it as ROMFS and sign it with a token key.

    Output passes `espsecure verify-signature --version 2` and `hsmflash app verify`.
    """
    from hsmflash.app.build import build_app, check_signing_key, find_compiler
    from hsmflash.fileio import BackgroundWrite, check_output

    c = _context(ctx)
    check_output(output, "app image")
    find_compiler(mpy_version)  # refuse an unsupported version before the PIN is asked
    with c.station() as st:
        token_key = st.key(key)
        check_signing_key(token_key)
        result = build_app(
            st,
            Path(src_dir),
            token_key,
            app_version=app_version,
            mpy_version=mpy_version,
            include_source=include_source,
        )
        writing = BackgroundWrite(output, result.output)
    writing.wait()
    s = {**result.summary, "output": str(output)}
    c.emit(
        s,
        f"built {output}: {s['modules']} module(s) as .mpy v{mpy_version}, app version "
        f"{app_version}, ROMFS {s['romfs_length']} bytes, signed by {s['key']} "
        f"({s['key_fp'][:23]})",
    )


@app_app.command("verify")
def verify_cmd(
    ctx: typer.Context,
    image: Annotated[Path, typer.Argument(help="Signed app image.", metavar="FILE")],
    pubkey: Annotated[
        Path, typer.Option("--pubkey", help="App-signing public key PEM.", metavar="PEM")
    ],
    min_version: Annotated[
        int | None,
        typer.Option(
            "--min-version",
            help="Refuse an app version below this (as the boot module does).",
            metavar="N",
        ),
    ] = None,
) -> None:
    """Verify an app image without a token: signature, ROMFS digest, version (exit 6 if not)."""
    from hsmflash.fileio import read_input
    from hsmflash.formats.appimage import verify_app_image
    from hsmflash.formats.primitives import load_public_key

    c = _context(ctx)
    pub = load_public_key(read_input(pubkey, "public key"), str(pubkey))
    app_image, block = verify_app_image(
        read_input(image, "app image"), pub, min_version=min_version, name=str(image)
    )
    s: dict[str, Any] = {**app_image.summary(), "verified_block": block, "ok": True}
    c.emit(
        s,
        f"{image}: app version {app_image.app_version}, .mpy v{app_image.mpy_version}, "
        f"ROMFS {app_image.image_length} bytes: signature OK (block {block})",
    )


@app_app.command("bootcode")
def bootcode_cmd(
    ctx: typer.Context,
    output: Annotated[
        Path, typer.Option("-o", "--output", help="Directory to write into.", metavar="DIR")
    ],
    key: Annotated[
        str | None,
        typer.Option(
            "--key", help="App-signing key in the token (public half only; no PIN).", metavar="KEY"
        ),
    ] = None,
    pubkey: Annotated[
        Path | None,
        typer.Option("--pubkey", help="Or its public key PEM (no token).", metavar="PEM"),
    ] = None,
    min_version: Annotated[
        int,
        typer.Option("--min-version", help="Lowest app version the device will run.", metavar="N"),
    ] = 0,
    variant: Annotated[
        str,
        typer.Option(
            "--variant",
            help="upstream (MicroPython >= 1.25, ESP32 chips) or pycom "
            "(frozen/Base/_boot.py of Pycom's MicroPython 1.11).",
            metavar="VARIANT",
        ),
    ] = "upstream",
) -> None:
    """Write the boot verifier to freeze into the firmware, with the app key pinned."""
    from hsmflash.app.bootcode import make_bootcode
    from hsmflash.errors import InputError, UsageError
    from hsmflash.fileio import atomic_write, read_input
    from hsmflash.formats.primitives import PublicKey, load_public_key
    from hsmflash.token.keys import find_key
    from hsmflash.token.session import KeyRef, open_session

    c = _context(ctx)
    if (key is None) == (pubkey is None):
        raise UsageError("give exactly one of --key NAME or --pubkey PEM")
    out_dir = Path(output)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"output {output!r} is not a directory")
    if not out_dir.parent.is_dir():
        raise InputError(f"output {output!r}: directory {str(out_dir.parent)!r} does not exist")
    if pubkey is not None:
        pub: PublicKey = load_public_key(read_input(pubkey, "public key"), str(pubkey))
        name = Path(pubkey).stem
    else:
        cfg = c.token_config()
        with open_session(cfg, login=False) as session:
            name = KeyRef.parse(str(key)).label
            pub = find_key(session, name, cfg.label, public_only=True).public_key()
    code = make_bootcode(
        pub,
        key_name=name,
        min_version=min_version,
        variant=variant,
        base_path=str(out_dir.resolve()),
    )
    out_dir.mkdir(exist_ok=True)
    written: list[Path] = []
    try:
        for file_name, text in code.files.items():
            atomic_write(out_dir / file_name, text.encode())
            written.append(out_dir / file_name)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    s = {**code.summary, "output": str(out_dir)}
    c.emit(
        s,
        f"wrote {', '.join(code.summary['files'])} to {out_dir} ({variant}; key "
        f"{name}, digest {s['key_digest'][:16]}..., minimum version {min_version})\n"
        f"freeze them as {code.summary['manifest']} says",
    )
