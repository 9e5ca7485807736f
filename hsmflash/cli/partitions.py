"""`hsmflash partitions ...`: check that a partition table protects the app, print a template.

Registered in `cli/main.py` with `app.add_typer(partitions_app, name="partitions")`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

partitions_app = typer.Typer(
    help="Partition tables that protect the app: check flags, print a MicroPython template.",
    no_args_is_help=True,
)

_SIZES = {"2MB": 2, "4MB": 4, "8MB": 8, "16MB": 16, "32MB": 32}


@partitions_app.command("check")
def check_cmd(
    ctx: typer.Context,
    table: Annotated[
        Path,
        typer.Argument(
            help="Partition table: binary (as written at 0x8000) or ESP-IDF CSV.", metavar="FILE"
        ),
    ],
) -> None:
    """Refuse a table that leaves code or secrets in plaintext: `romfs`, `vfs` or `nvs_keys`
    without the `encrypted` flag, or (when --policy asks for credentials) no `nvs_keys`.

    Exit 5 when refused, 3 when the table does not parse.
    """
    from hsmflash.cli.context import ctx_of
    from hsmflash.errors import PolicyRefused
    from hsmflash.fileio import read_input
    from hsmflash.formats import partitions

    c = ctx_of(ctx)
    parts = partitions.read_table(read_input(table, "partition table"), str(table))
    from hsmflash.provision.inputs import credentials_asked

    credentials = c.policy_path is not None and credentials_asked(c.policy)
    problems = partitions.protection_problems(parts, credentials=credentials)
    rows = [
        {
            "label": p.label,
            "type": p.type,
            "subtype": p.subtype,
            "offset": f"{p.offset:#x}",
            "size": f"{p.size:#x}",
            "encrypted_flag": p.encrypted_flag,
            "encrypted": p.encrypted,
        }
        for p in parts
    ]

    def human() -> None:
        for p in parts:
            state = "encrypted" if p.encrypted else "PLAINTEXT"
            why = "" if p.encrypted_flag or not p.encrypted else " (app: always)"
            typer.echo(f"{p.label:16} {p.offset:#9x} {p.size:#9x}  {state}{why}")

    c.emit(
        {"table": str(table), "partitions": rows, "problems": problems, "ok": not problems}, human
    )
    if problems:
        raise PolicyRefused(
            f"{table}: {problems[0]}"
            + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
        )


@partitions_app.command("template")
def template_cmd(
    ctx: typer.Context,
    chip: Annotated[
        str,
        typer.Option("--chip", help="Chip family (esp32, esp32s3, esp32c2, ...).", metavar="CHIP"),
    ],
    output: Annotated[
        Path | None,
        typer.Option(
            "-o", "--output", help="Write here instead of standard output.", metavar="FILE"
        ),
    ] = None,
    fmt: Annotated[
        str | None,
        typer.Option(
            "--format",
            help="csv (ESP-IDF) or bin (as flashed at 0x8000); default: bin for an -o FILE "
            "ending in .bin, else csv.",
            metavar="FORMAT",
        ),
    ] = None,
    flash_size: Annotated[
        str, typer.Option("--flash-size", help="2MB, 4MB, 8MB, 16MB or 32MB.", metavar="SIZE")
    ] = "4MB",
) -> None:
    """A MicroPython partition table with `nvs_keys`, `romfs` (data 0x8F) and `vfs`, the last
    three encrypted."""
    from hsmflash.chips import get_chip
    from hsmflash.cli.context import ctx_of
    from hsmflash.errors import InputError, UsageError
    from hsmflash.fileio import atomic_write, check_output
    from hsmflash.formats import partitions

    c = ctx_of(ctx)
    get_chip(chip)
    if fmt is None:
        fmt = "bin" if output is not None and output.suffix == ".bin" else "csv"
    if fmt not in ("csv", "bin"):
        raise UsageError(f"--format {fmt!r}: use csv or bin")
    size = _SIZES.get(flash_size.upper().replace("IB", "B").replace("MB", "MB"))
    if size is None:
        raise InputError(f"--flash-size {flash_size!r}: use one of {', '.join(_SIZES)}")
    parts = partitions.micropython_template(size * 1024 * 1024)
    text = partitions.to_csv(parts)
    data = text.encode() if fmt == "csv" else partitions.build(parts)
    if output is None:
        if fmt == "bin":
            raise UsageError("--format bin needs -o FILE")
        typer.echo(text, nl=False)
        return
    check_output(output, "partition table")
    atomic_write(output, data)
    c.note(f"wrote {output} ({fmt}, {flash_size} flash)")
