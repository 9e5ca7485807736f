"""`hsmflash audit ...`: verify and read the audit log (no token needed)."""

from pathlib import Path
from typing import Annotated, Any

import typer

from hsmflash.cli.context import ctx_of
from hsmflash.errors import (
    InputError,
    VerificationFailed,
)

audit_app = typer.Typer(
    help="Verify and read the tamper-evident audit log (no token needed).", no_args_is_help=True
)


LogArg = Annotated[
    Path | None, typer.Argument(help="Audit log (default: --audit-log).", metavar="LOG")
]


@audit_app.command("verify")
def audit_verify(
    ctx: typer.Context,
    log: LogArg = None,
    pubkey: Annotated[
        Path | None,
        typer.Option(
            "--pubkey",
            help="Audit public key PEM (`hsmflash keys public audit -o audit.pem`): "
            "checks every checkpoint signature, no token needed.",
            metavar="PEM",
        ),
    ] = None,
    with_token: Annotated[
        bool,
        typer.Option(
            "--with-token",
            help="Also compare with the head stored in the token (detects a cut "
            "or rolled-back log) and use the token's audit key.",
        ),
    ] = False,
) -> None:
    """Verify the hash chain, checkpoints and (with the token) the head; exit 6 names the
    first bad record."""
    from hsmflash.audit import verify_log
    from hsmflash.fileio import read_input
    from hsmflash.formats.primitives import PublicKey, load_public_key

    c = ctx_of(ctx)
    path = Path(log) if log else c.audit_log
    if not path.is_file():
        raise InputError(f"audit log {str(path)!r} not found")
    pub: PublicKey | None = None
    head = None
    if pubkey is not None:
        pub = load_public_key(read_input(pubkey, "public key"), str(pubkey))
    if with_token:
        from hsmflash.keyuse import TokenLogBinding, find_head_store, log_id
        from hsmflash.token.keys import find_key
        from hsmflash.token.session import open_session

        cfg = c.token_config()
        with open_session(cfg) as session:
            ident = log_id(path)
            bound = TokenLogBinding(session, path).read()
            if bound is not None and bound != ident:
                raise VerificationFailed(
                    f"audit log {path} is not the log the token keeps at this path (log "
                    f"{bound}, this file is log {ident}): it was replaced"
                )
            if ident is not None:
                head = find_head_store(session, ident).read()
                if head is None:
                    raise VerificationFailed(
                        f"the token holds no head for audit log {path} (another token, or the "
                        "log was replaced)"
                    )
            if pub is None:
                pub = find_key(session, c.policy.audit_key, cfg.label).public_key()
    report = verify_log(path, pub, head)
    if pub is None:  # an intact chain anyone can rebuild proves nothing
        raise VerificationFailed(
            f"audit log {path}: its {report.records} records chain, but nothing authenticates "
            "them; give the audit public key (--pubkey audit.pem, made by `hsmflash keys public "
            "audit -o audit.pem`) or --with-token"
        )
    data = {
        "log": str(path),
        "ok": True,
        "records": report.records,
        "checkpoints": report.checkpoints,
        "last_seq": report.last_seq,
        "signatures_checked": report.signatures_checked,
        "head_checked": report.head_checked,
        "unsigned_tail": report.unsigned_tail,
        "repairs": report.repairs,
        "first_ts": report.first_ts,
        "last_ts": report.last_ts,
        "interrupted": [
            {"seq": i.seq, "line": i.line, "op": i.op, "ts": i.ts, "key": i.key}
            for i in report.open_intents
        ],
    }

    def human() -> None:
        typer.echo(
            f"{path}: OK, {report.records} records, {report.checkpoints} checkpoints, "
            f"last seq {report.last_seq}"
        )
        head_state = "matches" if report.head_checked else "not checked (give --with-token)"
        typer.echo(f"  signatures: verified; token head: {head_state}")
        if report.unsigned_tail:
            typer.echo(f"  {report.unsigned_tail} record(s) after the last checkpoint")
        for i in report.open_intents:
            typer.echo(f"  interrupted: seq {i.seq} {i.op} at {i.ts} (intent without outcome)")

    c.emit(data, human)


def _parse_time(text: str | None, what: str) -> Any:
    from datetime import datetime

    if text is None:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise InputError(f"{what} {text!r} is not an ISO 8601 time") from None


@audit_app.command("show")
def audit_show(
    ctx: typer.Context,
    log: LogArg = None,
    op: Annotated[
        str | None, typer.Option("--op", help="sign, derive, encrypt, ...", metavar="OP")
    ] = None,
    key: Annotated[
        str | None, typer.Option("--key", help="Key label or URI.", metavar="KEY")
    ] = None,
    device: Annotated[
        str | None, typer.Option("--device", help="Device MAC.", metavar="MAC")
    ] = None,
    since: Annotated[
        str | None, typer.Option("--since", help="ISO time, inclusive.", metavar="TIME")
    ] = None,
    until: Annotated[
        str | None, typer.Option("--until", help="ISO time, inclusive.", metavar="TIME")
    ] = None,
) -> None:
    """Show audit records, filtered by operation, key, device and time."""
    from hsmflash.audit import filter_records, iter_records
    from hsmflash.formats.kdf import format_mac, parse_mac

    c = ctx_of(ctx)
    path = Path(log) if log else c.audit_log
    if device is not None:
        device = format_mac(parse_mac(device))  # a malformed MAC is an error, not 0 records
    records = list(
        filter_records(
            iter_records(path),
            op=op,
            key=key,
            device=device,
            since=_parse_time(since, "--since"),
            until=_parse_time(until, "--until"),
        )
    )

    def human() -> None:
        for r in records:
            subj = r.get("subject") or {}
            who = subj.get("device") or subj.get("image") or subj.get("name") or ""
            ident = r.get("kcv") or (r.get("key_fp") or "")[:23]
            key_label = str(r.get("key", "")).rsplit("object=", 1)[-1]
            typer.echo(
                f"{r['seq']:6} {r['ts']} {r['op']:14} {r['phase']:6} "
                f"{key_label:18} {ident:23} {who}"
            )
        typer.echo(f"{len(records)} record(s)", err=True)

    c.emit(records, human)


@audit_app.command("report")
def audit_report(ctx: typer.Context, log: LogArg = None) -> None:
    """Summarise the log: operations by outcome, devices, exports, interrupted operations."""
    from hsmflash.audit import iter_records, report

    c = ctx_of(ctx)
    path = Path(log) if log else c.audit_log
    data = {"log": str(path), **report(iter_records(path))}

    def human() -> None:
        typer.echo(f"{path}")
        for k, n in sorted(data["operations"].items()):
            typer.echo(f"  {k:28} {n}")
        typer.echo(f"  devices: {data['devices']}; per-device key exports: {data['exports']}")
        for k, n in data["keys"].items():
            typer.echo(f"  key {k}: {n} use(s)")
        for r in data["interrupted"]:
            typer.echo(f"  interrupted: seq {r['seq']} {r['op']} at {r['ts']}")

    c.emit(data, human)
