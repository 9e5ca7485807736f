"""`hsmflash app check`: the lockdown report (registered on 13a's `app` group from here, so the
two modules merge without touching each other)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hsmflash.cli.app import app_app

_MARK = {"closed": "closed ", "open": "OPEN   ", "unknown": "unknown"}


@app_app.command("check")
def check_cmd(
    ctx: typer.Context,
    chip: Annotated[
        str | None,
        typer.Option("--chip", help="Chip family (needed with --virtual-efuses).", metavar="CHIP"),
    ] = None,
    firmware: Annotated[
        Path | None,
        typer.Option(
            "--firmware",
            help="The MicroPython firmware image (plaintext, as built).",
            metavar="FILE",
        ),
    ] = None,
    table: Annotated[
        Path | None,
        typer.Option(
            "--table",
            help="Partition table (binary or CSV); default: read from "
            "--virtual-flash where it is readable.",
            metavar="FILE",
        ),
    ] = None,
    app_image: Annotated[
        Path | None, typer.Option("--app", help="Signed app image.", metavar="FILE")
    ] = None,
    pubkey: Annotated[
        list[Path] | None,
        typer.Option("--pubkey", help="App-signing public key PEM (repeat).", metavar="PEM"),
    ] = None,
    min_version: Annotated[
        int | None,
        typer.Option(
            "--min-version", help="Minimum app version the boot module pins.", metavar="N"
        ),
    ] = None,
    virtual_efuses: Annotated[
        Path | None,
        typer.Option(
            "--virtual-efuses",
            help="A (virtual) chip's eFuse file, read with espefuse.",
            metavar="FILE",
        ),
    ] = None,
    virtual_flash: Annotated[
        Path | None, typer.Option("--virtual-flash", help="Its flash file.", metavar="FILE")
    ] = None,
    production: Annotated[
        bool,
        typer.Option(
            "--production",
            help="Exit 5 when a channel is open (implied by a --policy whose "
            "chip profile has release_mode).",
        ),
    ] = False,
) -> None:
    """The lockdown report: every channel through which the app or its credentials can be
    read or altered (REPL, Ctrl-C, WebREPL, Telnet/FTP, safe boot, filesystem at rest, import
    path, app signature, Secure Boot, download mode, JTAG, NVS credentials), each closed, open
    or unknown with its evidence and how to close it. Never "closed" without evidence."""
    from hsmflash.app import lockdown
    from hsmflash.chips import get_chip
    from hsmflash.cli.context import ctx_of
    from hsmflash.errors import PolicyRefused, UsageError
    from hsmflash.fileio import read_input
    from hsmflash.formats import partitions
    from hsmflash.formats.primitives import load_public_key

    c = ctx_of(ctx)
    chip_obj = get_chip(chip) if chip else None
    inputs = lockdown.Inputs(chip=chip_obj)
    if firmware is not None:
        inputs.firmware, inputs.firmware_name = read_input(firmware, "firmware"), str(firmware)
    if table is not None:
        inputs.table = partitions.read_table(read_input(table, "partition table"), str(table))
        inputs.table_name = str(table)
    if app_image is not None:
        inputs.app, inputs.app_name = read_input(app_image, "app image"), str(app_image)
    for p in pubkey or []:
        inputs.app_keys.append((str(p), load_public_key(read_input(p, "public key"), str(p))))
    inputs.min_version = min_version
    if virtual_flash is not None and virtual_efuses is None:
        raise UsageError("--virtual-flash needs its --virtual-efuses")
    if virtual_efuses is not None:
        if chip_obj is None:
            raise UsageError("--virtual-efuses needs --chip")
        from hsmflash.device.virtual import open_virtual

        flash_path = virtual_flash or virtual_efuses.with_name(virtual_efuses.name + ".none")
        with open_virtual(chip_obj, virtual_efuses, flash_path) as device:
            inputs.efuses, inputs.revision_major = lockdown.efuses_and_revision(device)
        inputs.efuse_name = str(virtual_efuses)
        if virtual_flash is not None and virtual_flash.exists():
            inputs.flash, inputs.flash_name = virtual_flash.read_bytes(), str(virtual_flash)
            if inputs.table is None:
                how: list[str] = []
                inputs.table = lockdown.table_from_flash(
                    inputs.flash, inputs.efuses, chip_obj, how.append
                )
                if inputs.table is not None:
                    inputs.table_name = f"{virtual_flash}@0x8000 ({how[0]})"
    if c.policy_path is not None:
        if chip_obj is not None and chip_obj.name in c.policy.chips:
            production = production or c.policy.profile(chip_obj.name).release_mode
        elif chip_obj is None:  # no chip named: any release-mode profile makes it production
            production = production or any(p.release_mode for p in c.policy.chips.values())
    report = lockdown.check(inputs)

    def human() -> None:
        for ch in report.channels:
            typer.echo(f"{_MARK[ch.status]}  {ch.name}")
            for e in ch.evidence:
                typer.echo(f"           - {e}")
            if ch.status != "closed":
                typer.echo(f"           close: {ch.close}")

    c.emit({**report.as_dict(), "production": production}, human)
    if production and report.open:
        raise PolicyRefused(
            f"{len(report.open)} channel(s) open under a production policy: "
            + ", ".join(ch.id for ch in report.open)
        )
