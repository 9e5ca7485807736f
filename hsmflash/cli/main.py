"""The command line's edge: the Typer app, global options, error -> exit-code mapping.

Each command group lives in its own module (`cli/keys.py`, `cli/sign.py`, ...) and is registered
below; nothing under `cli/` but parsing, prompting and printing, nothing below `cli/` prints.
"""

import copy
import sys
import traceback
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from hsmflash import __version__
from hsmflash.cli.context import DEFAULT_AUDIT_LOG, Context
from hsmflash.errors import (
    CHECKPOINT_FAILED,
    Error,
    UsageError,
)

app = typer.Typer(
    name="hsmflash",
    help=(
        "Keep ESP32 Secure Boot and flash-encryption keys in a PKCS#11 token: sign images, "
        "derive per-device keys, encrypt for a device, provision eFuses, audit every key use.\n\n"
        "The PIN comes from HSMFLASH_PIN, --pin-file or a prompt; never from the command line."
    ),
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"hsmflash {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    ctx: typer.Context,
    module: Annotated[
        str | None,
        typer.Option(
            "--module",
            envvar="HSMFLASH_MODULE",
            metavar="PATH",
            help="PKCS#11 module (.so). Default: SoftHSM2's library.",
        ),
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            envvar="HSMFLASH_TOKEN",
            metavar="LABEL",
            help="Token label (default: the policy's token.label, else 'hsmflash-dev').",
        ),
    ] = None,
    pin_file: Annotated[
        Path | None,
        typer.Option(
            "--pin-file",
            envvar="HSMFLASH_PIN_FILE",
            metavar="FILE",
            help="File whose first line is the user PIN (or set HSMFLASH_PIN).",
        ),
    ] = None,
    policy: Annotated[
        str | None,
        typer.Option(
            "--policy",
            envvar="HSMFLASH_POLICY",
            metavar="FILE",
            help="Policy TOML file (policies/*.toml).",
        ),
    ] = None,
    audit_log: Annotated[
        Path,
        typer.Option(
            "--audit-log",
            envvar="HSMFLASH_AUDIT_LOG",
            metavar="FILE",
            help="Audit log (JSON Lines).",
        ),
    ] = Path(DEFAULT_AUDIT_LOG),
    json_out: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
) -> None:
    ctx.obj = Context(
        module=module,
        token=token,
        pin_file=Path(pin_file) if pin_file else None,
        policy_path=Path(policy) if policy else None,
        audit_log=Path(audit_log),
        json=json_out,
        debug=debug,
    )


GLOBAL_VALUE_OPTIONS = {"--module": "PATH", "--token": "LABEL", "--pin-file": "FILE",
                        "--policy": "FILE", "--audit-log": "FILE"}


GLOBAL_FLAGS = frozenset({"--json", "--debug"})


def hoist_global_options(argv: list[str]) -> list[str]:
    """Move global options written after the command to the front, where click reads them.

    `hsmflash provision --policy P ...` then means `hsmflash --policy P provision ...`. Only
    the global options' own names move (no command has an option of the same name); nothing
    after a `--` moves. They go in after those written before the command, so, as for any
    option, the last one given wins.

    Raises:
        UsageError: a global option after the command without its value.
    """
    head: list[str] = []  # up to the command name
    late: list[str] = []  # global options written after it, in order
    rest: list[str] = []
    seen_command = False
    args = iter(argv)
    for arg in args:
        if arg == "--":
            rest.append(arg)
            rest.extend(args)
            break
        name = arg.split("=", 1)[0]
        if not seen_command:
            if name in GLOBAL_VALUE_OPTIONS and "=" not in arg:
                head.append(arg)
                value = next(args, None)
                if value is not None:
                    head.append(value)
            else:
                seen_command = not arg.startswith("-")
                (rest if seen_command else head).append(arg)
            continue
        if name in GLOBAL_VALUE_OPTIONS:
            if "=" in arg:
                late.append(arg)
                continue
            value = next(args, None)
            if value is None:
                raise UsageError(f"option {arg} needs a value: {arg} {GLOBAL_VALUE_OPTIONS[arg]}")
            late += [arg, value]
        elif arg in GLOBAL_FLAGS:
            late.append(arg)
        else:
            rest.append(arg)
    return head + late + rest


def _app_for(argv: list[str]) -> typer.Typer:
    """The app with only the command being run registered.

    Typer turns every registered command's signature into click parameters on each start
    (about 50 ms for all of hsmflash's), and a process runs one command. `--help`, no
    command, or an unknown name get the whole app, so listings and suggestions are complete.
    """
    args = iter(argv)
    name = None
    for arg in args:
        if arg == "--":
            name = next(args, None)
            break
        if not arg.startswith("-"):
            name = arg
            break
        if arg == "--help":  # before the command: the app's help, every command listed
            return app
        if arg in GLOBAL_VALUE_OPTIONS:
            next(args, None)
    commands = [c for c in app.registered_commands if c.name == name]
    groups = [g for g in app.registered_groups if g.name == name]
    if not commands and not groups:
        return app
    lean = copy.copy(app)
    lean.registered_commands, lean.registered_groups = commands, groups
    return lean


def main() -> NoReturn:
    """Console entry point: run the app, map hsmflash errors to their exit codes."""
    debug = "--debug" in sys.argv
    try:
        argv = hoist_global_options(sys.argv[1:])
        rc = _app_for(argv)(args=argv, standalone_mode=False)
    except Error as e:
        if debug:
            traceback.print_exc()
        typer.echo(f"error: {e.diagnostics()}", err=True)
        _second_lines(e)
        sys.exit(e.exit_code)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(1)
    except Exception as e:  # click usage errors and the unexpected
        show, exit_code = getattr(e, "show", None), getattr(e, "exit_code", None)
        if callable(show) and isinstance(exit_code, int):  # click's usage errors (exit 2)
            show()
            sys.exit(exit_code)
        if debug:
            traceback.print_exc()
        first = str(e).splitlines()[0] if str(e) else ""
        typer.echo(f"internal error: {type(e).__name__}: {first} (rerun with --debug)", err=True)
        _second_lines(e)
        sys.exit(1)
    sys.exit(rc if isinstance(rc, int) else 0)


def _second_lines(e: BaseException) -> None:
    """After the command's own error: what failed while closing (the audit checkpoint)."""
    for note in getattr(e, "__notes__", ()):
        if isinstance(note, str) and note.startswith(CHECKPOINT_FAILED):
            typer.echo(f"error: {note}", err=True)


# The command groups, registered here at the edge: one module each under cli/.
from hsmflash.cli import (  # noqa: E402
    app_check,  # noqa: F401 - registers `app check` on the app group
    audit,
    devices,
    encrypt,
    keys,
    policy,
    sign,
    token,
)
from hsmflash.cli.app import app_app  # noqa: E402
from hsmflash.cli.ca import ca_app  # noqa: E402
from hsmflash.cli.credentials import credentials_app  # noqa: E402
from hsmflash.cli.partitions import partitions_app  # noqa: E402

app.command("sign")(sign.sign_cmd)
app.command("verify")(sign.verify_cmd)
app.command("digest-bootloader")(sign.digest_bootloader_cmd)
app.command("derive")(encrypt.derive_cmd)
app.command("encrypt")(encrypt.encrypt_cmd)
app.command("decrypt")(encrypt.decrypt_cmd)
app.command("provision")(devices.provision_cmd)
app.command("flash")(devices.flash_cmd)
app.add_typer(keys.keys_app, name="keys")
app.add_typer(token.token_app, name="token")
app.add_typer(policy.policy_app, name="policy")
app.add_typer(audit.audit_app, name="audit")
app.add_typer(devices.virtual_app, name="virtual")
app.add_typer(credentials_app, name="credentials")
app.add_typer(ca_app, name="ca")
app.add_typer(partitions_app, name="partitions")
app.add_typer(app_app, name="app")
