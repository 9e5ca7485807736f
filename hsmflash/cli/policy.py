"""`hsmflash policy ...`: validate a policy, compare the live token against it."""

import dataclasses
from pathlib import Path
from typing import Annotated

import typer

from hsmflash.cli.context import ctx_of
from hsmflash.errors import (
    UsageError,
)
from hsmflash.policy import load_policy

policy_app = typer.Typer(
    help="Validate policies and compare the token against them.", no_args_is_help=True
)


@policy_app.command("check")
def policy_check(
    ctx: typer.Context,
    file: Annotated[
        Path | None,
        typer.Argument(
            help="Policy TOML file (default: --policy / HSMFLASH_POLICY).", metavar="FILE"
        ),
    ] = None,
) -> None:
    """Validate a policy file; errors name the field at fault (exit 3)."""
    from hsmflash.provision.proof import check_policy_efuses

    c = ctx_of(ctx)
    if file is None:
        if c.policy_path is None:
            raise UsageError("give the policy file: policy check FILE (or --policy FILE)")
        file = c.policy_path
    pol = load_policy(file)
    check_policy_efuses(pol)
    data = {
        "policy": pol.name,
        "path": str(file),
        "ok": True,
        "keys": {k: {"type": v.type, "usage": list(v.usage)} for k, v in pol.keys.items()},
        "chips": {
            k: {
                "flash_encryption": v.flash_encryption,
                "secure_boot": v.secure_boot.scheme if v.secure_boot else None,
                "release_mode": v.release_mode,
            }
            for k, v in pol.chips.items()
        },
        "export": dataclasses.asdict(pol.export),  # every rule, as the policy sets it
    }
    c.emit(
        data,
        f"policy {pol.name!r} ({file}) is valid: {len(pol.keys)} keys, "
        f"chips {', '.join(pol.chips) or 'none'}",
    )


@policy_app.command("audit")
def policy_audit(ctx: typer.Context) -> None:
    """Compare the live token with the policy; exit 5 when it departs (errors found)."""
    from hsmflash.errors import PolicyRefused
    from hsmflash.policy import audit_token
    from hsmflash.token.keys import list_keys
    from hsmflash.token.session import open_session

    c = ctx_of(ctx)
    pol = c.policy
    if not pol.keys:
        raise UsageError("policy audit needs --policy FILE")
    with open_session(c.token_config()) as session:
        findings = audit_token(pol, list_keys(session))
    rows = [{"severity": f.severity, "key": f.key, "message": f.message} for f in findings]
    errors = [f for f in findings if f.severity == "error"]

    def human() -> None:
        for f in findings:
            typer.echo(f"{f.severity:7} {f.key}: {f.message}")
        typer.echo(f"{len(errors)} error(s), {len(findings) - len(errors)} other finding(s)")

    c.emit({"policy": pol.name, "findings": rows, "ok": not errors}, human)
    if errors:
        raise PolicyRefused(
            f"token departs from policy {pol.name!r}: {errors[0].key}: {errors[0].message}"
        )
