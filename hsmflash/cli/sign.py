"""`hsmflash sign`, `verify`, `digest-bootloader`: Secure Boot signatures."""

from pathlib import Path
from typing import Annotated, Any

import typer

from hsmflash.cli.context import ctx_of
from hsmflash.cli.options import ChipOpt
from hsmflash.errors import (
    InputError,
    UsageError,
)


def sign_cmd(
    ctx: typer.Context,
    image: Annotated[
        Path, typer.Argument(help="ESP app or bootloader image (.bin).", metavar="FILE")
    ],
    output: Annotated[
        Path, typer.Option("-o", "--output", help="Signed image to write.", metavar="FILE")
    ],
    key: Annotated[
        str, typer.Option("--key", help="Signing key label or pkcs11: URI.", metavar="KEY")
    ],
    chip: ChipOpt = "",
    scheme: Annotated[
        str | None,
        typer.Option(
            "--scheme",
            help="sbv2 (default; esp32 classic defaults to sbv1) or sbv1.",
            metavar="SCHEME",
        ),
    ] = None,
    append: Annotated[
        bool,
        typer.Option("--append", help="SBv2: add a signature block to an already signed image."),
    ] = False,
) -> None:
    """Sign a firmware image for Secure Boot with a key that never leaves the token.

    The output passes `espsecure verify-signature`; everything but the signature (and, for
    SBv2, the CRC over it) is what espsecure writes, byte for byte. The signature is
    randomised (PSS salt, ECDSA nonce), as espsecure's SBv2 signatures are too.
    The chip is read from the image header when --chip is not given.
    """
    from hsmflash.chips import get_chip
    from hsmflash.fileio import BackgroundWrite, check_output, read_input
    from hsmflash.sign import sign_image

    c = ctx_of(ctx)
    data = read_input(image, "image")
    check_output(output)
    the_chip = get_chip(chip) if chip else _chip_from_image(data, str(image))
    with c.station() as st:
        result = sign_image(st, data, the_chip, st.key(key), scheme, append=append, name=str(image))
        writing = BackgroundWrite(output, result.output)  # while the station checkpoints
    writing.wait()
    s = result.summary()
    s["output_file"] = str(output)
    c.emit(
        s,
        f"signed {image} -> {output}: {result.scheme} {result.chip}, key {result.key} "
        f"({result.fingerprint[:23]}), {result.signatures} signature(s)",
    )


def _chip_from_image(data: bytes, name: str) -> Any:
    from hsmflash.chips import CHIPS
    from hsmflash.formats.images import image_chip_name

    chip_name = image_chip_name(data)
    if chip_name in CHIPS:
        return CHIPS[chip_name]
    raise InputError(f"{name}: cannot tell the chip from the image; pass --chip")


def verify_cmd(
    ctx: typer.Context,
    image: Annotated[Path, typer.Argument(help="Signed image.", metavar="FILE")],
    key: Annotated[
        str | None, typer.Option("--key", help="Token key (no PIN needed).", metavar="KEY")
    ] = None,
    pubkey: Annotated[
        Path | None, typer.Option("--pubkey", help="Public key PEM (no token).", metavar="PEM")
    ] = None,
    scheme: Annotated[
        str | None,
        typer.Option("--scheme", help="sbv2 or sbv1 (default: detected).", metavar="SCHEME"),
    ] = None,
) -> None:
    """Verify a Secure Boot V2/V1 signature (exit 6 when it does not verify)."""

    from hsmflash.fileio import read_input
    from hsmflash.formats.primitives import PublicKey, load_public_key
    from hsmflash.formats.secureboot import verify_image

    c = ctx_of(ctx)
    if (key is None) == (pubkey is None):
        raise UsageError("give exactly one of --key NAME or --pubkey PEM")
    data = read_input(image, "image")
    if pubkey is not None:
        pub: PublicKey = load_public_key(read_input(pubkey, "public key"), str(pubkey))
    else:
        from hsmflash.token.keys import find_key
        from hsmflash.token.session import KeyRef, open_session

        cfg = c.token_config()
        with open_session(cfg, login=False) as session:
            pub = find_key(session, KeyRef.parse(str(key)).label, cfg.label,
                           public_only=True).public_key()
    result = verify_image(data, pub, scheme, name=str(image))
    where = f" (signature block {result['block']})" if "block" in result else ""
    c.emit(result, f"{image}: {result['scheme']} signature OK{where}")


def digest_bootloader_cmd(
    ctx: typer.Context,
    bootloader: Annotated[Path, typer.Argument(help="ESP32 bootloader image.", metavar="FILE")],
    output: Annotated[
        Path,
        typer.Option(
            "-o", "--output", help="Digest + bootloader image (flash at 0x0).", metavar="FILE"
        ),
    ],
    key: Annotated[
        str | None,
        typer.Option("--key", help="aes-256 token key with usage encrypt.", metavar="KEY"),
    ] = None,
    master: Annotated[
        str | None,
        typer.Option(
            "--master",
            help="Derive the device's SECURE_BOOT_V1 key from this master.",
            metavar="KEY",
        ),
    ] = None,
    device: Annotated[
        str | None, typer.Option("--device", help="Device base MAC.", metavar="MAC")
    ] = None,
    iv: Annotated[
        Path | None,
        typer.Option(
            "--iv", help="128-byte IV file (testing only; random by default).", metavar="FILE"
        ),
    ] = None,
) -> None:
    """Secure Boot V1 bootloader digest (as `espsecure digest-secure-bootloader`), AES in
    the token."""
    from hsmflash.fileio import atomic_write, check_output, read_input
    from hsmflash.formats.kdf import parse_mac
    from hsmflash.sign import bootloader_digest

    c = ctx_of(ctx)
    data = read_input(bootloader, "bootloader")
    iv_bytes = read_input(iv, "IV file") if iv else None
    check_output(output)
    mac = parse_mac(device) if device else None
    if (key is None) == (master is None):
        raise UsageError("give --key NAME, or --master NAME with --device MAC")
    with c.station() as st:
        out, kcv = bootloader_digest(
            st,
            data,
            st.key(key) if key else None,
            master=st.key(master) if master else None,
            device=mac,
            iv=iv_bytes,
            name=str(bootloader),
        )
        atomic_write(output, out)
    c.emit({"output": str(output), "kcv": kcv}, f"wrote {output} (key kcv {kcv})")
