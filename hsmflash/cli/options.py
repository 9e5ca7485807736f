"""Options shared by several command modules."""

from typing import Annotated

import typer

ChipOpt = Annotated[
    str,
    typer.Option(
        "--chip",
        help="esp32, esp32s2, esp32s3, esp32c2, esp32c3, esp32c6, esp32h2, esp32c5, esp32p4.",
        metavar="CHIP",
    ),
]
