"""`hsmflash token ...`: the PKCS#11 module and token, and what it can do."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer

from hsmflash.cli.context import ctx_of
from hsmflash.errors import (
    InputError,
    TokenError,
)

if TYPE_CHECKING:
    import pkcs11.types as p11t

token_app = typer.Typer(help="Inspect the PKCS#11 module and token.", no_args_is_help=True)


@token_app.command("info")
def token_info(
    ctx: typer.Context,
    refresh: Annotated[
        bool,
        typer.Option(
            "--refresh", help="Probe the token again instead of using the cached profile."
        ),
    ] = False,
) -> None:
    """Show the module, the token and what it can do for hsmflash, found by trying each path
    (probed once per token and cached; needs the PIN the first time).
    """
    from hsmflash.token.profile import CAPABILITIES, cached_profile, load_profile
    from hsmflash.token.session import MECHANISMS_THAT_MATTER, open_session, token_summary

    c = ctx_of(ctx)
    cfg = c.token_config()
    info = token_summary(cfg)
    profile = None if refresh else cached_profile(cfg)
    audit_key: dict[str, Any] | None = None
    if profile is None or refresh:
        try:
            c.pin_handler("")
        except (TokenError, InputError):
            if refresh:
                raise
        else:
            with open_session(cfg, rw=True) as session:
                profile = load_profile(cfg, session, refresh=refresh)
                audit_key = _audit_key_in_use(session, c.policy.audit_key)
    if profile is not None:
        paths = info["paths"]
        paths["in_token_derivation"] = profile.has("in_token_derivation")
        paths["in_token_xts"] = profile.has("in_token_xts")
        paths["esp32_classic"] = (
            "in-token (CKM_XOR_BASE_AND_DATA)"
            if profile.has("xor_derivation")
            else "transient export of the per-device key "
            "(needs policy export.esp32_classic_transient)"
            if profile.has("in_token_derivation")
            else "unavailable (no XOR derivation and no per-device derivation in this token)"
        )
        info["capabilities"] = {
            name: {
                "ok": profile.has(name),
                "note": profile.notes.get(name, ""),
                "enables": CAPABILITIES[name][0],
                **({} if profile.has(name) else {"instead": CAPABILITIES[name][1]}),
            }
            for name in CAPABILITIES
        }
        info["audit"] = {
            "key_type": (audit_key or {}).get("type", profile.audit_key_type),
            "key_exists": audit_key is not None,
            "head_store": profile.audit_head_store,
        }
        info["profile"] = {"probed_at": profile.probed_at, "cached": profile.cached}
    else:
        info["capabilities"] = None
        info["profile"] = {"probed_at": None, "note": "not probed: needs the PIN once"}

    def human() -> None:
        t = info["token"]
        typer.echo(f"module:   {info['module']}")
        typer.echo(f"library:  {info['library']}")
        typer.echo(
            f"token:    {t['label']} ({t['manufacturer']} {t['model']}, serial {t['serial']})"
        )
        typer.echo("mechanisms listed by the token (lists can be wrong; see capabilities):")
        for name, ok in info["mechanisms"].items():
            typer.echo(f"  {'yes' if ok else 'NO ':3} CKM_{name:22} {MECHANISMS_THAT_MATTER[name]}")
        caps = info["capabilities"]
        if caps is None:
            typer.echo("capabilities: not probed yet (give the PIN: HSMFLASH_PIN or --pin-file)")
        else:
            when = info["profile"]["probed_at"]
            typer.echo(
                f"capabilities (tried on the token, {when}"
                f"{', cached' if info['profile']['cached'] else ''}):"
            )
            typer.echo(f"  {'capability':20} {'works':5}  what it enables / instead")
            for name, cap in caps.items():
                text = cap["enables"] if cap["ok"] else f"instead: {cap['instead']}"
                note = f" [{cap['note']}]" if cap["note"] else ""
                typer.echo(f"  {name:20} {'yes' if cap['ok'] else 'NO':5}  {text}{note}")
            a = info["audit"]
            where = (
                "a CKO_DATA object"
                if a["head_store"] == "data-object"
                else "the CKA_ID of a key object"
            )
            typer.echo(
                f"audit anchor: key {a['key_type']}"
                f"{'' if a['key_exists'] else ' (made at the first checkpoint)'}, "
                f"head in {where}"
            )
        p = info["paths"]
        typer.echo("paths:")
        yes = {True: "yes", False: "NO"}
        typer.echo(f"  per-device derivation in the token: {yes[p['in_token_derivation']]}")
        typer.echo(f"  XTS-AES with keys in the token:     {yes[p['in_token_xts']]}")
        typer.echo(f"  ESP32-classic flash encryption:     {p['esp32_classic']}")

    c.emit(info, human)


def _audit_key_in_use(session: p11t.Session, name: str) -> dict[str, Any] | None:
    from hsmflash.token.keys import find_key, key_exists

    if not key_exists(session, name):
        return None
    return {"type": find_key(session, name).type}
