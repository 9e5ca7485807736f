"""`hsmflash ca ...`: the device CA whose key stays in the token.

Registered in cli/main.py with `app.add_typer(ca_app, name="ca")`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from hsmflash.cli.context import Context

ca_app = typer.Typer(
    help="The device CA: key in the token, self-signed root or subordinate, certificate kept "
    "in the token.",
    no_args_is_help=True,
)

KeyOpt = Annotated[
    str | None,
    typer.Option(
        "--key",
        help="CA key (ec-p256 or rsa-3072, usage sign; default: the policy's "
        "[ca] key, else 'device-ca').",
        metavar="KEY",
    ),
]
SubjectOpt = Annotated[
    str,
    typer.Option(
        "--subject", help='CA subject, e.g. "CN=Example Device CA,O=Example".', metavar="DN"
    ),
]


def _context(ctx: typer.Context) -> Context:
    from hsmflash.cli.context import ctx_of

    return ctx_of(ctx)


@ca_app.command("init")
def init_cmd(
    ctx: typer.Context,
    subject: SubjectOpt,
    out: Annotated[
        Path, typer.Option(
            "-o", "--output", "--out", help="Write the CA certificate (PEM).", metavar="FILE"
        )
    ],
    key: KeyOpt = None,
    days: Annotated[int, typer.Option("--days", help="Validity in days.", metavar="DAYS")] = 3650,
) -> None:
    """Make a self-signed CA certificate for the token key and keep it in the token."""
    from cryptography.hazmat.primitives.serialization import Encoding

    from hsmflash import ca
    from hsmflash.fileio import atomic_write, check_output
    from hsmflash.formats.x509 import parse_name

    c = _context(ctx)
    name = parse_name(subject, "--subject")
    check_output(out, "CA certificate")
    with c.station() as st:
        cert = ca.init(st, ca.ca_key(st, key), name, days)
        atomic_write(out, cert.public_bytes(Encoding.PEM))
        info = ca.show(st, ca.ca_key(st, key))
    c.emit(
        {**info, "out": str(out)},
        f"CA {info['subject']} ({info['type']}), serial {info['serial']}, until "
        f"{info['not_after']}\n  {out}",
    )


@ca_app.command("csr")
def csr_cmd(
    ctx: typer.Context,
    subject: SubjectOpt,
    out: Annotated[
        Path, typer.Option(
            "-o", "--output", "--out", help="Write the CSR (PEM).", metavar="FILE"
        )
    ],
    key: KeyOpt = None,
) -> None:
    """Make a CSR for the token key, for a CA to be signed by another (root) CA."""
    from hsmflash import ca
    from hsmflash.fileio import atomic_write, check_output
    from hsmflash.formats.x509 import parse_name, pem

    c = _context(ctx)
    name = parse_name(subject, "--subject")
    check_output(out, "CSR")
    with c.station() as st:
        der = ca.csr(st, ca.ca_key(st, key), name)
    atomic_write(out, pem(der, "CERTIFICATE REQUEST"))
    c.emit(
        {"subject": name.rfc4514_string(), "out": str(out)},
        f"CSR for {name.rfc4514_string()}\n  {out}",
    )


@ca_app.command("import-cert")
def import_cmd(
    ctx: typer.Context,
    cert_file: Annotated[
        Path, typer.Argument(help="The CA certificate (PEM or DER).", metavar="FILE")
    ],
    key: KeyOpt = None,
) -> None:
    """Keep a CA certificate issued elsewhere for the token key (it must match the key)."""
    from hsmflash import ca
    from hsmflash.fileio import read_input

    c = _context(ctx)
    data = read_input(cert_file, "certificate")
    with c.station() as st:
        k = ca.ca_key(st, key)
        ca.import_cert(st, k, data, str(cert_file))
        info = ca.show(st, k)
    c.emit(info, f"imported CA {info['subject']} issued by {info['issuer']}")


@ca_app.command("show")
def show_cmd(ctx: typer.Context, key: KeyOpt = None) -> None:
    """Show the CA certificate kept in the token."""
    from hsmflash import ca

    c = _context(ctx)
    with c.station() as st:
        info = ca.show(st, ca.ca_key(st, key))
    c.emit(info, "\n".join(f"{k}: {v}" for k, v in info.items()))
