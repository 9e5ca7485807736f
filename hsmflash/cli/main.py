"""The command line: parses arguments, supplies the PIN handler, maps errors to exit codes.

Nothing below this module prints, prompts or exits. Annotations are evaluated when the
module loads (no `from __future__ import annotations`): typer reads them per run, and
objects are cheaper to read than strings to evaluate.
"""

import copy
import json
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from hsmflash import __version__
from hsmflash.errors import (
    CHECKPOINT_FAILED,
    Error,
    InputError,
    InternalError,
    TokenError,
    UsageError,
    VerificationFailed,
)
from hsmflash.policy import Policy, check_key_name, load_policy, unrestricted_policy

if TYPE_CHECKING:  # the token layer loads only for commands that use a token
    from hsmflash.keyuse import Station
    from hsmflash.token.session import TokenConfig

DEFAULT_AUDIT_LOG = "hsmflash-audit.jsonl"
MAX_WORKERS = 64

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
keys_app = typer.Typer(help="Create, import, list and export public halves of token keys.",
                       no_args_is_help=True)
token_app = typer.Typer(help="Inspect the PKCS#11 module and token.", no_args_is_help=True)
policy_app = typer.Typer(help="Validate policies and compare the token against them.",
                         no_args_is_help=True)
audit_app = typer.Typer(help="Verify and read the tamper-evident audit log (no token needed).",
                        no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(token_app, name="token")
app.add_typer(policy_app, name="policy")
app.add_typer(audit_app, name="audit")


@dataclass
class Context:
    """Global options, shared by every command."""

    module: str | None = None
    token: str | None = None
    pin_file: Path | None = None
    policy_path: Path | None = None
    audit_log: Path = Path(DEFAULT_AUDIT_LOG)
    json: bool = False
    debug: bool = False
    _policy: Policy | None = field(default=None, repr=False)
    _pin: str | None = field(default=None, repr=False)

    # -- PIN --------------------------------------------------------------------------
    def pin_handler(self, prompt: str) -> str:
        """PIN from HSMFLASH_PIN, --pin-file or an interactive prompt (never argv, never
        retried). Kept in memory for this command only, so a prompt is shown once."""
        if self._pin is not None:
            return self._pin
        self._pin = self._read_pin(prompt)
        return self._pin

    def _read_pin(self, prompt: str) -> str:
        env = os.environ.get("HSMFLASH_PIN")
        if env:
            return env
        if self.pin_file is not None:
            text = _read_pin_file(self.pin_file)
            pin = text.splitlines()[0].strip() if text.strip() else ""
            if not pin:
                raise InputError(f"PIN file {str(self.pin_file)!r} is empty")
            return pin
        if sys.stdin.isatty():
            import getpass

            return getpass.getpass(prompt)
        raise TokenError("no PIN: set HSMFLASH_PIN, pass --pin-file FILE, or run in a terminal")

    # -- policy and token -----------------------------------------------------------------
    @property
    def policy(self) -> Policy:
        if self._policy is None:
            self._policy = (
                load_policy(self.policy_path) if self.policy_path else unrestricted_policy()
            )
        return self._policy

    def token_config(self) -> "TokenConfig":
        from hsmflash.token.session import TokenConfig

        pol = self.policy
        pol.check_token(self.token)  # a policy binds its token
        return TokenConfig(
            module=self.module or pol.token_module,
            token_label=self.token or pol.token_label,
            pin_handler=self.pin_handler,
        )

    @contextmanager
    def station(self) -> Iterator["Station"]:
        from hsmflash.keyuse import Station

        with Station.open(self.token_config(), self.policy, self.audit_log) as st:
            yield st

    # -- output -----------------------------------------------------------------------------
    def emit(self, data: dict[str, Any] | list[Any], human: str | Callable[[], None]) -> None:
        """Print JSON (with --json) or the human form."""
        if self.json:
            typer.echo(json.dumps(data, indent=2, sort_keys=True, default=str))
        elif callable(human):
            human()
        else:
            typer.echo(human)

    def note(self, text: str) -> None:
        """A line for the human on stderr (kept out of --json output)."""
        typer.echo(text, err=True)


def _read_pin_file(path: Path) -> str:
    """A PIN file's text; like ssh with a private key, refused when others may read it.

    Raises:
        InputError: unreadable, not a regular file, readable by group or others, or not UTF-8.
    """
    import stat

    from hsmflash.fileio import open_regular

    fd = open_regular(path, "PIN file")
    try:
        st = os.fstat(fd)
        if st.st_mode & 0o077:
            raise InputError(
                f"PIN file {str(path)!r} is accessible by others (mode "
                f"{stat.S_IMODE(st.st_mode):04o}); run `chmod 600 {path}` and change the PIN")
        raw = os.read(fd, 4096)
    finally:
        os.close(fd)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"PIN file {str(path)!r} is not UTF-8 text") from None


def ctx_of(ctx: typer.Context) -> Context:
    obj = ctx.find_root().obj
    if not isinstance(obj, Context):
        raise InternalError("CLI context missing")
    return obj


def _version(value: bool) -> None:
    if value:
        typer.echo(f"hsmflash {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    ctx: typer.Context,
    module: Annotated[str | None, typer.Option(
        "--module", envvar="HSMFLASH_MODULE", metavar="PATH",
        help="PKCS#11 module (.so). Default: SoftHSM2's library.")] = None,
    token: Annotated[str | None, typer.Option(
        "--token", envvar="HSMFLASH_TOKEN", metavar="LABEL",
        help="Token label (default: the policy's token.label, else 'hsmflash-dev').")] = None,
    pin_file: Annotated[str | None, typer.Option(
        "--pin-file", envvar="HSMFLASH_PIN_FILE", metavar="FILE",
        help="File whose first line is the user PIN (or set HSMFLASH_PIN).")] = None,
    policy: Annotated[str | None, typer.Option(
        "--policy", envvar="HSMFLASH_POLICY", metavar="FILE",
        help="Policy TOML file (policies/*.toml).")] = None,
    audit_log: Annotated[str, typer.Option(
        "--audit-log", envvar="HSMFLASH_AUDIT_LOG", metavar="FILE",
        help="Audit log (JSON Lines).")] =
        DEFAULT_AUDIT_LOG,
    json_out: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
    version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True, help="Show the version.")] = False,
) -> None:
    # paths arrive as str: typer converts Path parameters through pydantic, a slow import
    ctx.obj = Context(module=module, token=token,
                      pin_file=Path(pin_file) if pin_file else None,
                      policy_path=Path(policy) if policy else None,
                      audit_log=Path(audit_log), json=json_out, debug=debug)


# the options of main_options that take a value (tests/unit/test_cli_startup.py holds this
# to the built app)
GLOBAL_VALUE_OPTIONS = frozenset({"--module", "--token", "--pin-file", "--policy", "--audit-log"})


GLOBAL_FLAGS = frozenset({"--json", "--debug"})


def hoist_global_options(argv: list[str]) -> list[str]:
    """Move global options written after the command to the front, where click reads them.

    `hsmflash provision --policy P ...` then means `hsmflash --policy P provision ...`. Only
    the global options' own names move (no command has an option of the same name); nothing
    after a `--` moves.
    """
    head: list[str] = []
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
            head.append(arg)
            if name in GLOBAL_VALUE_OPTIONS and "=" not in arg:
                value = next(args, None)
                if value is not None:
                    head.append(value)
            elif not arg.startswith("-"):
                seen_command = True
            continue
        if name in GLOBAL_VALUE_OPTIONS:
            if "=" in arg:
                head.insert(0, arg)
            else:
                value = next(args, None)
                head[0:0] = [arg] if value is None else [arg, value]
        elif arg in GLOBAL_FLAGS:
            head.insert(0, arg)
        else:
            rest.append(arg)
    return head + rest


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
    """Console entry point: run the app, map hsmflash errors to DESIGN.md exit codes."""
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


def usage_error(message: str) -> NoReturn:
    raise UsageError(message)

# ---------------------------------------------------------------------------------------
# token
# ---------------------------------------------------------------------------------------
@token_app.command("info")
def token_info(
    ctx: typer.Context,
    refresh: Annotated[bool, typer.Option(
        "--refresh", help="Probe the token again instead of using the cached profile.")] = False,
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
            "in-token (CKM_XOR_BASE_AND_DATA)" if profile.has("xor_derivation")
            else "transient export of the per-device key "
            "(needs policy export.esp32_classic_transient)"
            if profile.has("in_token_derivation")
            else "unavailable (no XOR derivation and no per-device derivation in this token)")
        info["capabilities"] = {
            name: {"ok": profile.has(name), "note": profile.notes.get(name, ""),
                   "enables": CAPABILITIES[name][0],
                   **({} if profile.has(name) else {"instead": CAPABILITIES[name][1]})}
            for name in CAPABILITIES}
        info["audit"] = {"key_type": (audit_key or {}).get("type", profile.audit_key_type),
                         "key_exists": audit_key is not None,
                         "head_store": profile.audit_head_store}
        info["profile"] = {"probed_at": profile.probed_at, "cached": profile.cached}
    else:
        info["capabilities"] = None
        info["profile"] = {"probed_at": None, "note": "not probed: needs the PIN once"}

    def human() -> None:
        t = info["token"]
        typer.echo(f"module:   {info['module']}")
        typer.echo(f"library:  {info['library']}")
        typer.echo(f"token:    {t['label']} ({t['manufacturer']} {t['model']}, "
                   f"serial {t['serial']})")
        typer.echo("mechanisms listed by the token (lists can be wrong; see capabilities):")
        for name, ok in info["mechanisms"].items():
            typer.echo(f"  {'yes' if ok else 'NO ':3} CKM_{name:22} {MECHANISMS_THAT_MATTER[name]}")
        caps = info["capabilities"]
        if caps is None:
            typer.echo("capabilities: not probed yet (give the PIN: HSMFLASH_PIN or --pin-file)")
        else:
            when = info["profile"]["probed_at"]
            typer.echo(f"capabilities (tried on the token, {when}"
                       f"{', cached' if info['profile']['cached'] else ''}):")
            typer.echo(f"  {'capability':20} {'works':5}  what it enables / instead")
            for name, cap in caps.items():
                text = cap["enables"] if cap["ok"] else f"instead: {cap['instead']}"
                note = f" [{cap['note']}]" if cap["note"] else ""
                typer.echo(f"  {name:20} {'yes' if cap['ok'] else 'NO':5}  {text}{note}")
            a = info["audit"]
            where = ("a CKO_DATA object" if a["head_store"] == "data-object"
                     else "the CKA_ID of a key object")
            typer.echo(f"audit anchor: key {a['key_type']}"
                       f"{'' if a['key_exists'] else ' (made at the first checkpoint)'}, "
                       f"head in {where}")
        p = info["paths"]
        typer.echo("paths:")
        yes = {True: "yes", False: "NO"}
        typer.echo(f"  per-device derivation in the token: {yes[p['in_token_derivation']]}")
        typer.echo(f"  XTS-AES with keys in the token:     {yes[p['in_token_xts']]}")
        typer.echo(f"  ESP32-classic flash encryption:     {p['esp32_classic']}")

    c.emit(info, human)


def _audit_key_in_use(session: Any, name: str) -> dict[str, Any] | None:
    from hsmflash.token.keys import find_key, key_exists

    if not key_exists(session, name):
        return None
    return {"type": find_key(session, name).type}


# ---------------------------------------------------------------------------------------
# keys
# ---------------------------------------------------------------------------------------
def _key_line(info: dict[str, Any]) -> str:
    ident = f"kcv {info['kcv']}" if "kcv" in info else info.get("fingerprint", "")
    flags = []
    flags.append("sensitive" if info["sensitive"] else "NOT-SENSITIVE")
    flags.append("extractable" if info["extractable"] else "non-extractable")
    return (f"{info['name']:20} {info['type']:12} usage={','.join(info['usage']) or '-':14} "
            f"{' '.join(flags)} {info['origin']:9} {ident}")


UsageOpt = Annotated[list[str] | None, typer.Option(
    "--usage", help="Usage flag (repeat): sign, derive, encrypt, wrap. Default by type.")]


@keys_app.command("generate")
def keys_generate(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Label of the new key.")],
    key_type: Annotated[str, typer.Option("--type", help="aes-128, aes-256, xts-aes-128, "
                                          "xts-aes-256, rsa-3072, ec-p256, ec-p384.")],
    usage: UsageOpt = None,
) -> None:
    """Generate a key inside the token: sensitive, non-extractable, only the usages given."""
    from hsmflash.keytypes import check_type_usage
    from hsmflash.token.keys import generate_key

    c = ctx_of(ctx)
    check_key_name(name)
    flags = check_type_usage(key_type, usage)
    with c.station() as st, st.use("keys.generate", subject={"name": name}, key_name=name,
                                   detail={"type": key_type, "usage": list(flags)}) as out:
        key = generate_key(st.session, name, key_type, flags)
        info = key.describe()
        out.update({k: v for k, v in info.items() if k in ("kcv", "fingerprint")})
    c.emit(info, f"generated {_key_line(info)}")


@keys_app.command("import")
def keys_import(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Label of the imported key.")],
    key_type: Annotated[str, typer.Option("--type", help="Key type (see `keys generate`).")],
    file: Annotated[str, typer.Option("--file", help="espsecure key file: raw AES bytes "
                                       "(32/64) or a PEM private key.")],
    usage: UsageOpt = None,
    wrappable: Annotated[bool, typer.Option(
        "--wrappable", help="aes-256 ESP32-classic flash key for a token without XOR "
        "derivation: may be wrapped out to memory per use (policy "
        "export.esp32_classic_stored_transient).")] = False,
) -> None:
    """Migrate an espsecure key file into the token (it becomes non-extractable).

    Destroy the file afterwards: the token copy is the only one that should remain.
    """
    from hsmflash.fileio import read_input
    from hsmflash.keytypes import check_type_usage
    from hsmflash.keyuse import wipe
    from hsmflash.token.keys import import_key

    c = ctx_of(ctx)
    check_key_name(name)
    flags = check_type_usage(key_type, usage)
    material = bytearray(read_input(file, "key file"))
    try:
        def check() -> None:
            if wrappable:
                c.policy.check_export("esp32_classic_stored_transient")

        with c.station() as st, st.use("keys.import", subject={"name": name}, key_name=name,
                                       detail={"type": key_type, "usage": list(flags),
                                               **({"wrappable": True} if wrappable else {})},
                                       check=check) as out:
            key = import_key(st.session, name, key_type, material, flags, source=str(file),
                             wrappable=wrappable)
            info = key.describe()
            out.update({k: v for k, v in info.items() if k in ("kcv", "fingerprint")})
    finally:
        wipe(material)
    c.emit({**info, "destroy_source": str(file)},
           f"imported {_key_line(info)}\nnow destroy {file} (e.g. shred -u {file}): "
           "the token holds the key from here on")


@keys_app.command("create")
def keys_create(ctx: typer.Context) -> None:
    """Create every key the policy declares that the token lacks (idempotent)."""
    from hsmflash.token.keys import generate_key, key_exists

    c = ctx_of(ctx)
    pol = c.policy
    if not pol.keys:
        raise UsageError("keys create needs a policy with [keys] (pass --policy FILE)")
    results = []
    with c.station() as st:
        for spec in pol.keys.values():
            if key_exists(st.session, spec.name):
                results.append({**st.key(spec.name).describe(), "action": "exists"})
                continue
            with st.use("keys.generate", subject={"name": spec.name}, key_name=spec.name,
                        detail={"type": spec.type, "usage": list(spec.usage),
                                "policy": pol.name}) as out:
                key = generate_key(st.session, spec.name, spec.type, spec.usage)
                info = key.describe()
                out.update({k: v for k, v in info.items() if k in ("kcv", "fingerprint")})
            results.append({**info, "action": "created"})

    def human() -> None:
        for r in results:
            typer.echo(f"{r['action']:8} {_key_line(r)}")

    c.emit(results, human)


@keys_app.command("list")
def keys_list(ctx: typer.Context) -> None:
    """List the token's keys: type, usage, attributes, KCV or public-key fingerprint."""
    from hsmflash.token.keys import list_keys
    from hsmflash.token.session import open_session

    c = ctx_of(ctx)
    with open_session(c.token_config()) as session:
        infos = [k.describe() for k in list_keys(session)]

    def human() -> None:
        if not infos:
            typer.echo("no keys (create them with `hsmflash keys create --policy FILE`)")
        for i in infos:
            typer.echo(_key_line(i))

    c.emit(infos, human)


@keys_app.command("public")
def keys_public(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Key label or pkcs11: URI.")],
    output: Annotated[str, typer.Option("-o", "--output", help="PEM file to write.")],
) -> None:
    """Write the public half of a signing key as PEM (for espsecure, auditors, eFuse digests)."""
    from cryptography.hazmat.primitives import serialization

    from hsmflash.fileio import atomic_write
    from hsmflash.token.keys import find_key
    from hsmflash.token.session import KeyRef, open_session

    c = ctx_of(ctx)
    cfg = c.token_config()
    with open_session(cfg) as session:
        key = find_key(session, KeyRef.parse(name).label, cfg.label)
        pub = key.public_key()
        fp = key.fingerprint()
    pem = pub.public_bytes(serialization.Encoding.PEM,
                           serialization.PublicFormat.SubjectPublicKeyInfo)
    atomic_write(output, pem)
    c.emit({"name": key.name, "type": key.type, "fingerprint": fp, "output": str(output)},
           f"wrote {output} ({key.type}, {fp})")


# ---------------------------------------------------------------------------------------
# policy
# ---------------------------------------------------------------------------------------
@policy_app.command("check")
def policy_check(
    ctx: typer.Context,
    file: Annotated[str, typer.Argument(help="Policy TOML file.")],
) -> None:
    """Validate a policy file; errors name the field at fault (exit 3)."""
    from hsmflash.provision.proof import check_policy_efuses

    c = ctx_of(ctx)
    pol = load_policy(file)
    check_policy_efuses(pol)
    data = {
        "policy": pol.name, "path": str(file), "ok": True,
        "keys": {k: {"type": v.type, "usage": list(v.usage)} for k, v in pol.keys.items()},
        "chips": {k: {"flash_encryption": v.flash_encryption,
                      "secure_boot": v.secure_boot.scheme if v.secure_boot else None,
                      "release_mode": v.release_mode} for k, v in pol.chips.items()},
        "export": {"efuse_burn": pol.export.efuse_burn,
                   "esp32_classic_transient": pol.export.esp32_classic_transient,
                   "decrypt": pol.export.decrypt},
    }
    c.emit(data, f"policy {pol.name!r} ({file}) is valid: {len(pol.keys)} keys, "
                 f"chips {', '.join(pol.chips) or 'none'}")


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
        raise PolicyRefused(f"token departs from policy {pol.name!r}: {errors[0].key}: "
                            f"{errors[0].message}")


# ---------------------------------------------------------------------------------------
# signing
# ---------------------------------------------------------------------------------------
ChipOpt = Annotated[str, typer.Option("--chip", help="esp32, esp32s2, esp32s3, esp32c3, "
                                      "esp32c6, esp32h2, esp32c5, esp32p4.")]


@app.command("sign")
def sign_cmd(
    ctx: typer.Context,
    image: Annotated[str, typer.Argument(help="ESP app or bootloader image (.bin).")],
    output: Annotated[str, typer.Option("-o", "--output", help="Signed image to write.")],
    key: Annotated[str, typer.Option("--key", help="Signing key label or pkcs11: URI.")],
    chip: ChipOpt = "",
    scheme: Annotated[str | None, typer.Option(
        "--scheme", help="sbv2 (default; esp32 classic defaults to sbv1) or sbv1.")] = None,
    append: Annotated[bool, typer.Option(
        "--append", help="SBv2: add a signature block to an already signed image.")] = False,
) -> None:
    """Sign a firmware image for Secure Boot with a key that never leaves the token.

    The output passes `espsecure verify-signature`; its block layout is espsecure's, byte for
    byte (the signature itself is randomised: PSS salt, ECDSA nonce).
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
        result = sign_image(st, data, the_chip, st.key(key), scheme, append=append,
                            name=str(image))
        writing = BackgroundWrite(output, result.output)  # while the station checkpoints
    writing.wait()
    s = result.summary()
    s["output_file"] = str(output)
    c.emit(s, f"signed {image} -> {output}: {result.scheme} {result.chip}, key {result.key} "
              f"({result.fingerprint[:23]}), {result.signatures} signature(s)")


def _chip_from_image(data: bytes, name: str) -> Any:
    from hsmflash.chips import CHIPS
    from hsmflash.formats.images import image_chip_name

    chip_name = image_chip_name(data)
    if chip_name in CHIPS:
        return CHIPS[chip_name]
    raise InputError(f"{name}: cannot tell the chip from the image; pass --chip")


@app.command("verify")
def verify_cmd(
    ctx: typer.Context,
    image: Annotated[str, typer.Argument(help="Signed image.")],
    key: Annotated[str | None, typer.Option("--key", help="Token key (no PIN needed).")] = None,
    pubkey: Annotated[str | None, typer.Option("--pubkey", help="Public key PEM (no token).")]
        = None,
    scheme: Annotated[str | None, typer.Option("--scheme", help="sbv2 or sbv1 (default: "
                                               "detected).")] = None,
) -> None:
    """Verify a Secure Boot V2/V1 signature (exit 6 when it does not verify)."""

    from hsmflash.fileio import read_input
    from hsmflash.formats.primitives import load_public_key
    from hsmflash.formats.secureboot import verify_image

    c = ctx_of(ctx)
    if (key is None) == (pubkey is None):
        raise UsageError("give exactly one of --key NAME or --pubkey PEM")
    data = read_input(image, "image")
    if pubkey is not None:
        pub: Any = load_public_key(read_input(pubkey, "public key"), str(pubkey))
    else:
        from hsmflash.token.keys import find_key
        from hsmflash.token.session import KeyRef, open_session

        cfg = c.token_config()
        with open_session(cfg, login=False) as session:
            pub = find_key(session, KeyRef.parse(str(key)).label, cfg.label).public_key()
    result = verify_image(data, pub, scheme, name=str(image))
    where = f" (signature block {result['block']})" if "block" in result else ""
    c.emit(result, f"{image}: {result['scheme']} signature OK{where}")


@keys_app.command("digest")
def keys_digest(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Signing key label or pkcs11: URI.")],
    chip: ChipOpt,
    output: Annotated[str | None, typer.Option("-o", "--output", help="Also write the raw "
                                                "bytes here.")] = None,
) -> None:
    """The eFuse value for a signing key: the SBv2 public-key digest, or the SBv1 public key."""
    from hsmflash.chips import get_chip
    from hsmflash.fileio import atomic_write
    from hsmflash.sign import key_digest
    from hsmflash.token.keys import find_key
    from hsmflash.token.session import KeyRef, open_session

    c = ctx_of(ctx)
    the_chip = get_chip(chip)
    cfg = c.token_config()
    with open_session(cfg, login=False) as session:
        info = key_digest(find_key(session, KeyRef.parse(name).label, cfg.label), the_chip)
    raw = info.pop("bytes")
    if output is not None:
        atomic_write(output, raw)
        info["output"] = str(output)
    c.emit(info, f"{info['digest']}\n({info['what']})")


@app.command("digest-bootloader")
def digest_bootloader_cmd(
    ctx: typer.Context,
    bootloader: Annotated[str, typer.Argument(help="ESP32 bootloader image.")],
    output: Annotated[str, typer.Option("-o", "--output", help="Digest + bootloader image "
                                         "(flash at 0x0).")],
    key: Annotated[str | None, typer.Option("--key", help="aes-256 token key with usage "
                                            "encrypt.")] = None,
    master: Annotated[str | None, typer.Option("--master", help="Derive the device's "
                                               "SECURE_BOOT_V1 key from this master.")] = None,
    device: Annotated[str | None, typer.Option("--device", help="Device base MAC.")] = None,
    iv: Annotated[str | None, typer.Option("--iv", help="128-byte IV file (testing only; "
                                            "random by default).")] = None,
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
            st, data, st.key(key) if key else None, master=st.key(master) if master else None,
            device=mac, iv=iv_bytes, name=str(bootloader))
        atomic_write(output, out)
    c.emit({"output": str(output), "kcv": kcv}, f"wrote {output} (key kcv {kcv})")


# ---------------------------------------------------------------------------------------
# per-device keys and flash encryption
# ---------------------------------------------------------------------------------------
@app.command("derive")
def derive_cmd(
    ctx: typer.Context,
    master: Annotated[str, typer.Option("--master", help="aes-256 master key (CKA_DERIVE).")],
    device: Annotated[str | None, typer.Option("--device", help="Device base MAC "
                                               "aa:bb:cc:dd:ee:ff.")] = None,
    purpose: Annotated[str, typer.Option("--purpose", help="XTS_AES_128_KEY, XTS_AES_256_KEY, "
                                         "FLASH_ENCRYPTION, SECURE_BOOT_V1, ...")] =
        "XTS_AES_128_KEY",
    devices: Annotated[str | None, typer.Option(
        "--devices", help="Batch: CSV of MACs; writes a KCV manifest (-o).")] = None,
    output: Annotated[str | None, typer.Option("-o", "--output", help="Batch: KCV manifest "
                                               "CSV to write (mac,purpose,kcv).")] = None,
    workers: Annotated[int, typer.Option("--workers", help="Batch: worker processes (0: one "
                                         "per CPU for large lots).")] = 0,
) -> None:
    """Derive a device's key inside the token (aes-ecb-v1) and print its KCV, never the key.

    With --devices, derive a whole lot and write its KCV manifest (audited as one batch).
    """
    from hsmflash.encrypt import derive_kcv
    from hsmflash.fileio import check_output
    from hsmflash.formats.kdf import format_mac, key_length, parse_mac

    c = ctx_of(ctx)
    key_length(purpose)
    if devices is not None:
        if output is None:
            raise UsageError("--devices needs -o/--output for the KCV manifest")
        check_output(output, "KCV manifest")
        _derive_batch(c, master, purpose, devices, output, workers)
        return
    if device is None:
        raise UsageError("give --device MAC, or --devices CSV -o OUT")
    mac = parse_mac(device)
    with c.station() as st:
        kcv = derive_kcv(st, st.key(master), mac, purpose)
    c.emit({"device": format_mac(mac), "purpose": purpose, "master": master, "kcv": kcv,
            "scheme": "aes-ecb-v1"}, f"{format_mac(mac)} {purpose}: kcv {kcv}")


def _crypt_command(ctx: typer.Context, decrypt: bool, input_file: str, output: str | None,
                   chip: str, address: str, key: str | None, master: str | None,
                   device: str | None, devices: str | None, out_dir: str | None,
                   scheme: str | None) -> None:
    from hsmflash.chips import get_chip
    from hsmflash.encrypt import check_data, crypt_image
    from hsmflash.fileio import atomic_write, check_output, parse_int, read_input
    from hsmflash.formats.kdf import parse_mac

    c = ctx_of(ctx)
    the_chip = get_chip(chip)
    addr = parse_int(address, "address")
    data = read_input(input_file, "input file")
    check_data(data, addr, str(input_file))
    if devices is not None:
        if decrypt:
            raise UsageError("--devices is for batch encryption")
        if master is None or out_dir is None:
            raise UsageError("--devices needs --master NAME and --out-dir DIR")
        _batch(c, data, the_chip, addr, master, Path(devices), Path(out_dir), scheme,
               str(input_file))
        return
    if output is None:
        raise UsageError("missing -o/--output")
    check_output(output)
    if (key is None) == (master is None):
        raise UsageError("give either --key NAME or --master NAME with --device MAC")
    if master is not None and device is None:
        raise UsageError("--master needs --device MAC")
    mac = parse_mac(device) if device else None
    with c.station() as st:
        result = crypt_image(st, data, the_chip, addr, key=st.key(key) if key else None,
                             master=st.key(master) if master else None, device=mac,
                             scheme=scheme, decrypt=decrypt, name=str(input_file))
        atomic_write(output, result.output)
    s = result.summary()
    s["output_file"] = str(output)
    verb = "decrypted" if decrypt else "encrypted"
    c.emit(s, f"{verb} {input_file} -> {output}: {result.scheme} at {addr:#x}, "
              f"path {result.path}, kcv {result.kcv}")


def _batch(c: Context, data: bytes, chip: Any, addr: int, master: str, devices: Path,
           out_dir: Path, scheme: str | None, name: str) -> None:
    from hsmflash.encrypt import crypt_image, read_device_csv
    from hsmflash.fileio import atomic_write
    from hsmflash.formats.kdf import format_mac

    macs = read_device_csv(devices)
    if len(macs) > c.policy.limits.max_devices_per_batch:
        from hsmflash.errors import PolicyRefused

        raise PolicyRefused(f"{devices}: {len(macs)} devices exceed the policy's "
                            f"max_devices_per_batch ({c.policy.limits.max_devices_per_batch})")
    if not out_dir.is_dir():
        try:
            out_dir.mkdir(parents=True)
        except OSError as e:
            raise InputError(f"--out-dir {str(out_dir)!r}: {e.strerror}") from None
    done = skipped = 0
    results = []
    with c.station() as st:
        mkey = st.key(master)
        with typer.progressbar(macs, label="encrypting", file=sys.stderr,
                               show_pos=True) as bar:
            for mac in bar:
                target = out_dir / f"{format_mac(mac).replace(':', '')}-{addr:#x}.bin"
                if target.exists():  # written atomically: present means complete
                    skipped += 1
                    results.append({"device": format_mac(mac), "output": str(target),
                                    "status": "skipped"})
                    continue
                r = crypt_image(st, data, chip, addr, master=mkey, device=mac, scheme=scheme,
                                name=name)
                atomic_write(target, r.output)
                done += 1
                results.append({"device": format_mac(mac), "output": str(target),
                                "kcv": r.kcv, "status": "encrypted"})
    c.emit({"encrypted": done, "skipped": skipped, "devices": results},
           f"{done} device image(s) encrypted, {skipped} already done, in {out_dir}")


InputArg = Annotated[str, typer.Argument(help="Plaintext (or ciphertext for decrypt) file.")]
OutOpt = Annotated[str | None, typer.Option("-o", "--output", help="File to write.")]
AddrOpt = Annotated[str, typer.Option("--address", help="Flash address (0x...), a multiple "
                                      "of 16.")]
KeyOpt = Annotated[str | None, typer.Option("--key", help="Stored xts-aes key in the token.")]
MasterOpt = Annotated[str | None, typer.Option("--master", help="Master key: derive the "
                                               "device's key (aes-ecb-v1).")]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="Device base MAC.")]
SchemeOpt = Annotated[str | None, typer.Option("--scheme", help="xts-aes-128, xts-aes-256 or "
                                               "esp32-aes-256 (default: policy, else chip).")]


@app.command("encrypt")
def encrypt_cmd(
    ctx: typer.Context,
    input_file: InputArg,
    chip: ChipOpt,
    address: AddrOpt,
    output: OutOpt = None,
    key: KeyOpt = None,
    master: MasterOpt = None,
    device: DeviceOpt = None,
    devices: Annotated[str | None, typer.Option(
        "--devices", help="Batch: CSV of device MACs (column 'mac' or the first column).")]
        = None,
    out_dir: Annotated[str | None, typer.Option(
        "--out-dir", help="Batch: one output per device here; existing ones are skipped.")]
        = None,
    scheme: SchemeOpt = None,
) -> None:
    """Encrypt an image for a device and flash address with the key inside the token.

    Output equals `espsecure encrypt-flash-data` for the same key. ESP32 classic on a token
    without CKM_XOR_BASE_AND_DATA exports the per-device key to memory for the operation,
    only if the policy allows it ([export] esp32_classic_transient), and audits it.
    """
    _crypt_command(ctx, False, input_file, output, chip, address, key, master, device, devices,
                   out_dir, scheme)


@app.command("decrypt")
def decrypt_cmd(
    ctx: typer.Context,
    input_file: InputArg,
    chip: ChipOpt,
    address: AddrOpt,
    output: OutOpt = None,
    key: KeyOpt = None,
    master: MasterOpt = None,
    device: DeviceOpt = None,
    scheme: SchemeOpt = None,
) -> None:
    """Decrypt flash contents for inspection or RMA (needs [export] decrypt = true; audited)."""
    _crypt_command(ctx, True, input_file, output, chip, address, key, master, device, None,
                   None, scheme)


# ---------------------------------------------------------------------------------------
# audit
# ---------------------------------------------------------------------------------------
LogArg = Annotated[str | None, typer.Argument(help="Audit log (default: --audit-log).")]


@audit_app.command("verify")
def audit_verify(
    ctx: typer.Context,
    log: LogArg = None,
    pubkey: Annotated[str | None, typer.Option(
        "--pubkey", help="Audit public key PEM (`hsmflash keys public audit -o audit.pem`): "
        "checks every checkpoint signature, no token needed.")] = None,
    with_token: Annotated[bool, typer.Option(
        "--with-token", help="Also compare with the head stored in the token (detects a cut "
        "or rolled-back log) and use the token's audit key.")] = False,
) -> None:
    """Verify the hash chain, checkpoints and (with the token) the head; exit 6 names the
    first bad record."""
    from cryptography.hazmat.primitives import serialization

    from hsmflash.audit import verify_log
    from hsmflash.fileio import read_input

    c = ctx_of(ctx)
    path = Path(log) if log else c.audit_log
    if not path.is_file():
        raise InputError(f"audit log {str(path)!r} not found")
    pub: Any = None
    head = None
    if pubkey is not None:
        try:
            pub = serialization.load_pem_public_key(read_input(pubkey, "public key"))
        except ValueError:
            raise InputError(f"public key {str(pubkey)!r} is not a PEM public key") from None
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
                    f"{bound}, this file is log {ident}): it was replaced")
            if ident is not None:
                head = find_head_store(session, ident).read()
                if head is None:
                    raise VerificationFailed(
                        f"the token holds no head for audit log {path} (another token, or the "
                        "log was replaced)")
            if pub is None:
                pub = find_key(session, c.policy.audit_key, cfg.label).public_key()
    report = verify_log(path, pub, head)
    if pub is None:  # an intact chain anyone can rebuild proves nothing
        raise VerificationFailed(
            f"audit log {path}: its {report.records} records chain, but nothing authenticates "
            "them; give the audit public key (--pubkey audit.pem, made by `hsmflash keys public "
            "audit -o audit.pem`) or --with-token")
    data = {
        "log": str(path), "ok": True, "records": report.records,
        "checkpoints": report.checkpoints, "last_seq": report.last_seq,
        "signatures_checked": report.signatures_checked, "head_checked": report.head_checked,
        "unsigned_tail": report.unsigned_tail, "repairs": report.repairs,
        "first_ts": report.first_ts, "last_ts": report.last_ts,
        "interrupted": [{"seq": i.seq, "line": i.line, "op": i.op, "ts": i.ts, "key": i.key}
                        for i in report.open_intents],
    }

    def human() -> None:
        typer.echo(f"{path}: OK, {report.records} records, {report.checkpoints} checkpoints, "
                   f"last seq {report.last_seq}")
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
    op: Annotated[str | None, typer.Option("--op", help="sign, derive, encrypt, ...")] = None,
    key: Annotated[str | None, typer.Option("--key", help="Key label or URI.")] = None,
    device: Annotated[str | None, typer.Option("--device", help="Device MAC.")] = None,
    since: Annotated[str | None, typer.Option("--since", help="ISO time, inclusive.")] = None,
    until: Annotated[str | None, typer.Option("--until", help="ISO time, inclusive.")] = None,
) -> None:
    """Show audit records, filtered by operation, key, device and time."""
    from hsmflash.audit import filter_records, iter_records

    c = ctx_of(ctx)
    path = Path(log) if log else c.audit_log
    records = list(filter_records(iter_records(path), op=op, key=key, device=device,
                                  since=_parse_time(since, "--since"),
                                  until=_parse_time(until, "--until")))

    def human() -> None:
        for r in records:
            subj = r.get("subject") or {}
            who = subj.get("device") or subj.get("image") or subj.get("name") or ""
            ident = r.get("kcv") or (r.get("key_fp") or "")[:23]
            key_label = str(r.get("key", "")).rsplit("object=", 1)[-1]
            typer.echo(f"{r['seq']:6} {r['ts']} {r['op']:14} {r['phase']:6} "
                       f"{key_label:18} {ident:23} {who}")
        typer.echo(f"{len(records)} record(s)", err=True)

    c.emit(records, human)


@audit_app.command("report")
def audit_report(ctx: typer.Context, log: LogArg = None) -> None:
    """Summarise the log: operations by outcome, devices, exports, interrupted operations."""
    from collections import Counter

    from hsmflash.audit import iter_records

    c = ctx_of(ctx)
    path = Path(log) if log else c.audit_log
    ops: Counter[str] = Counter()
    keys: Counter[str] = Counter()
    devices: set[str] = set()
    exports = 0
    intents: dict[int, dict[str, Any]] = {}
    for r in iter_records(path):
        if r["phase"] == "intent":
            intents[r["seq"]] = r
            continue
        intents.pop(r["detail"].get("intent_seq", -1), None)
        ops[f"{r['op']}:{r['phase']}"] += 1
        if r.get("key"):
            keys[str(r["key"]).rsplit("object=", 1)[-1]] += 1
        dev = (r.get("subject") or {}).get("device")
        if dev:
            devices.add(dev)
        if "exported" in r["detail"]:
            exports += 1
    data = {"log": str(path), "operations": dict(ops), "keys": dict(keys),
            "devices": len(devices), "exports": exports,
            "interrupted": [{"seq": s, "op": r["op"], "ts": r["ts"]} for s, r in intents.items()]}

    def human() -> None:
        typer.echo(f"{path}")
        for k, n in sorted(ops.items()):
            typer.echo(f"  {k:28} {n}")
        typer.echo(f"  devices: {len(devices)}; per-device key exports: {exports}")
        for k, n in keys.most_common():
            typer.echo(f"  key {k}: {n} use(s)")
        for s, r in intents.items():
            typer.echo(f"  interrupted: seq {s} {r['op']} at {r['ts']}")

    c.emit(data, human)


# ---------------------------------------------------------------------------------------
# devices: virtual chips, provisioning, re-flashing
# ---------------------------------------------------------------------------------------
virtual_app = typer.Typer(help="Virtual chips (espefuse's eFuse emulator + a flash file) for "
                          "development and tests.", no_args_is_help=True)
app.add_typer(virtual_app, name="virtual")


@virtual_app.command("create")
def virtual_create(
    ctx: typer.Context,
    chip: ChipOpt,
    mac: Annotated[str, typer.Option("--mac", help="The chip's factory base MAC.")],
    efuse_file: Annotated[str, typer.Option("--efuse-file", help="Virtual eFuse file to "
                                             "create.")],
    revision: Annotated[str, typer.Option("--revision", help="Chip revision MAJOR.MINOR "
                                          "(esp32: 1.0 for FiPy-era, 3.0 for ECO3).")] = "0.0",
) -> None:
    """Create a blank virtual chip with its own MAC and revision."""
    from hsmflash.device.virtual import create_virtual_chip
    from hsmflash.formats.kdf import format_mac, parse_mac

    c = ctx_of(ctx)
    try:
        major, minor = (int(x) for x in revision.split("."))
    except ValueError:
        raise InputError(f"--revision {revision!r} is not MAJOR.MINOR") from None
    mac_bytes = parse_mac(mac)
    create_virtual_chip(chip, Path(efuse_file), mac_bytes, (major, minor))
    c.emit({"chip": chip, "mac": format_mac(mac_bytes), "efuse_file": str(efuse_file),
            "revision": revision}, f"created virtual {chip} v{revision} {format_mac(mac_bytes)} "
           f"in {efuse_file}")


PortOpt = Annotated[list[str] | None, typer.Option(
    "--port", help="Serial port of a chip in download mode (repeat for station mode).")]
VEfuseOpt = Annotated[list[str] | None, typer.Option(
    "--virtual-efuses", help="Virtual chip's eFuse file (repeat, paired with --virtual-flash).")]
VFlashOpt = Annotated[list[str] | None, typer.Option(
    "--virtual-flash", help="Virtual chip's flash file (created erased at the first write).")]
ImageOpt = Annotated[list[str] | None, typer.Option(
    "--image", help="ADDR=FILE to write encrypted (repeat); default: the policy's images.")]
ManifestOpt = Annotated[str | None, typer.Option(
    "--manifest", help="Append one record per device (.csv, else JSON Lines).")]
BaudOpt = Annotated[int, typer.Option(
    "--baud", help="Serial baud rate after connecting at 115200 (falls back to 115200 when "
    "the change fails).")]
NoStubOpt = Annotated[bool, typer.Option(
    "--no-stub", help="Use the chip's ROM loader only, not esptool's flasher stub (slower).")]


def _device_specs(ports: list[str] | None, efuses: list[str] | None,
                  flashes: list[str] | None) -> list[dict[str, Any]]:
    ports, efuses, flashes = ports or [], efuses or [], flashes or []
    if ports and (efuses or flashes):
        raise UsageError("give --port, or --virtual-efuses with --virtual-flash, not both")
    if len(efuses) != len(flashes):
        raise UsageError("each --virtual-efuses needs its --virtual-flash (same count, in order)")
    if not ports and not efuses:
        raise UsageError("no device: give --port DEV, or --virtual-efuses F --virtual-flash F")
    if ports:
        return [{"port": p, "name": p} for p in ports]
    return [{"efuse_file": Path(e), "flash_file": Path(f), "name": e}
            for e, f in zip(efuses, flashes, strict=True)]


def _images_for(c: Context, chip: str, images: list[str] | None) -> list[Any]:
    from hsmflash.fileio import read_input
    from hsmflash.provision.provisioner import parse_image_args

    args = list(images or [])
    if not args:
        prof = c.policy.profile(chip)
        base = Path(c.policy.path).parent
        args = [f"{addr}={(base / f) if not Path(f).is_absolute() else f}"
                for addr, f in prof.images.items()]
    return parse_image_args(args, lambda p: read_input(p, "image"))


def _csv_cell(value: Any) -> Any:
    """A cell a spreadsheet shows as text: a leading = + - @ (or tab/CR) would make it a
    formula (CSV injection), so such cells get a leading '."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def _write_manifest(path: Path, rows: list[dict[str, Any]]) -> None:
    import csv
    import fcntl
    import io

    from hsmflash.fileio import open_append

    fd = open_append(path, "manifest")
    with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        new = os.fstat(fd).st_size == 0
        if path.suffix == ".csv":
            cols = ["time", "mac", "chip", "revision", "fe_kcv", "sb_kcv", "images", "result",
                    "error", "seconds", "cert_serial", "cert_sha256"]
            buf = io.StringIO()
            w = csv.DictWriter(buf, fieldnames=cols)
            if new:
                w.writeheader()
            for r in rows:
                w.writerow({k: _csv_cell(v) for k, v in {**r, "images": ";".join(
                    f"{i['address']}:{i['sha256']}" for i in r["images"])}.items()})
            f.write(buf.getvalue())
        else:
            for r in rows:
                f.write(json.dumps(r, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _run_devices(c: Context, kind: str, chip: str, specs: list[dict[str, Any]], baud: int,
                 images: list[Any], dry_run: bool, manifest: str | None,
                 allow_rewrite: tuple[str, ...] = (), *, stub: bool = True,
                 device_mac: str | None = None) -> list[Any]:
    """Provision or re-flash each device; several run in parallel worker processes."""
    from hsmflash.cli.progress import DeviceTable
    from hsmflash.provision.pool import DeviceJob, run_jobs

    cfg = c.token_config()
    pin = c.pin_handler(f"User PIN for token {cfg.label!r}: ")
    jobs = [DeviceJob(kind=kind, chip=chip, name=s["name"], policy_path=c.policy.path,
                      audit_log=str(c.audit_log), module=cfg.module, token=cfg.token_label,
                      pin=pin, images=images, dry_run=dry_run, port=s.get("port"),
                      efuse_file=str(s["efuse_file"]) if s.get("efuse_file") else None,
                      flash_file=str(s["flash_file"]) if s.get("flash_file") else None,
                      baud=baud, debug=c.debug, allow_rewrite=allow_rewrite, stub=stub,
                      device_mac=device_mac, manifest=manifest if kind == "flash" else None)
            for s in specs]
    with DeviceTable([s["name"] for s in specs], enabled=not c.json) as table:
        results = run_jobs(jobs, table.update)
        for spec, r in zip(specs, results, strict=True):
            table.update(spec["name"], f"FAILED: {r.diagnostics()}" if isinstance(r, Error)
                         else r.result)
    if manifest is not None:
        rows = []
        for spec, r in zip(specs, results, strict=True):
            if isinstance(r, Error):
                rows.append({"time": "", "mac": "", "chip": chip, "revision": "", "fe_kcv": "",
                             "sb_kcv": "", "images": [], "result": "failed",
                             "error": f"{spec['name']}: {r.diagnostics()}", "seconds": 0})
            else:
                rows.append(r.manifest_row())
        _write_manifest(Path(manifest), rows)
    return results


def _device_command(ctx: typer.Context, kind: str, chip: str, port: list[str] | None,
                    virtual_efuses: list[str] | None, virtual_flash: list[str] | None,
                    image: list[str] | None, dry_run: bool, manifest: str | None,
                    baud: int, allow_rewrite: tuple[str, ...] = (), *, stub: bool = True,
                    device_mac: str | None = None, app_image: Path | None = None,
                    vfs_dir: Path | None = None) -> None:
    """provision / flash: check policy and images once, then run every device."""
    from hsmflash.chips import get_chip
    from hsmflash.fileio import check_output
    from hsmflash.provision.provisioner import Provisioner
    from hsmflash.provision.reflash import Reflasher

    c = ctx_of(ctx)
    if not c.policy.chips:
        raise UsageError(f"{kind} needs --policy FILE with a [chips] profile")
    c.policy.profile(chip)
    specs = _device_specs(port, virtual_efuses, virtual_flash)
    if manifest is not None:
        check_output(manifest, "manifest")
    # flash --app alone writes just the app, not the policy's default images
    images = _images_for(c, chip, image) if image or app_image is None else []
    images = _partition_images(kind, images, app_image, vfs_dir)
    # refuse bad images, unsigned images and policy problems before any device is touched
    with c.station() as st:
        if kind == "flash":
            Reflasher(st, st.policy, get_chip(chip), images, allow_rewrite=allow_rewrite)
        else:
            Provisioner(st, st.policy, get_chip(chip), images)
    results = _run_devices(c, kind, chip, specs, baud, images, dry_run, manifest,
                           allow_rewrite, stub=stub, device_mac=device_mac)
    _finish_devices(c, specs, results)


def _partition_images(kind: str, images: list[Any], app_image: Path | None,
                      vfs_dir: Path | None) -> list[Any]:
    """--app goes to the romfs partition, the vfs LittleFS to vfs: addresses from the table
    written (provision) or the device's own (flash)."""
    from hsmflash.fileio import read_input
    from hsmflash.provision.provisioner import ImageSpec, add_partition_images

    app = (str(app_image), read_input(app_image, "app image")) if app_image else None
    if kind == "provision":
        return add_partition_images(images, app=app, vfs_dir=vfs_dir)
    if vfs_dir is not None:
        raise UsageError("--vfs-dir is for provision: re-flash keeps the device's filesystem")
    return images + ([ImageSpec(-1, app[0], app[1], "romfs")] if app else [])


AppOpt = Annotated[Path | None, typer.Option(
    "--app", help="Signed app image (`hsmflash app build`): written encrypted to the romfs "
    "partition of the device's table, after its signature checks against the policy's keys.")]
VfsDirOpt = Annotated[Path | None, typer.Option(
    "--vfs-dir", help="Files for the vfs partition: provisioning writes it as a formatted "
    "LittleFS, encrypted for the device (empty without this option).")]


def _finish_devices(c: Context, specs: list[dict[str, Any]], results: list[Any]) -> None:
    failures = [(s, r) for s, r in zip(specs, results, strict=True) if isinstance(r, Error)]
    data = []
    for s, r in zip(specs, results, strict=True):
        if isinstance(r, Error):
            data.append({"device": s["name"], "result": "failed", "error": r.diagnostics(),
                         "exit_code": r.exit_code})
        else:
            data.append({"device": s["name"], **{k: v for k, v in r.__dict__.items()}})

    def human() -> None:
        for _s, r in zip(specs, results, strict=True):
            if isinstance(r, Error):
                continue
            if r.result == "planned":
                typer.echo(json.dumps(r.plan, indent=2))
                continue
            extra = f", burned {len(r.burned)} eFuse(s)" if getattr(r, "burned", None) else ""
            typer.echo(f"{r.mac} {r.chip} {r.revision}: {r.result} (fe kcv {r.fe_kcv}"
                       f"{extra}, {r.seconds:.1f}s)")
            for note in getattr(r, "notes", []):
                typer.echo(f"  note: {note}")

    c.emit(data, human)
    if failures:
        spec, err = failures[0]
        if len(specs) > 1:
            raise type(err)(f"{len(failures)} of {len(specs)} device(s) failed; first: "
                            f"{spec['name']}: {err.diagnostics()}")
        raise err


@app.command("provision")
def provision_cmd(
    ctx: typer.Context,
    chip: ChipOpt,
    port: PortOpt = None,
    virtual_efuses: VEfuseOpt = None,
    virtual_flash: VFlashOpt = None,
    image: ImageOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan; touch "
                                          "nothing.")] = False,
    manifest: ManifestOpt = None,
    baud: BaudOpt = 921600,
    no_stub: NoStubOpt = False,
    app_image: AppOpt = None,
    vfs_dir: VfsDirOpt = None,
) -> None:
    """Turn blank chips into locked devices: per-device keys burned, Secure Boot enabled,
    images encrypted for each device, debug and download paths closed as the policy says.

    Needs --policy. Safe to re-run: an interrupted device is finished, a finished one is
    reported as such with nothing burned. Several --port (or virtual pairs) run in parallel.
    """
    _device_command(ctx, "provision", chip, port, virtual_efuses, virtual_flash, image, dry_run,
                    manifest, baud, stub=not no_stub, app_image=app_image, vfs_dir=vfs_dir)


# per-device credentials live in their own module; registered here, at the edge
from hsmflash.cli.credentials import credentials_app  # noqa: E402

app.add_typer(credentials_app, name="credentials")
from hsmflash.cli.ca import ca_app  # noqa: E402

app.add_typer(ca_app, name="ca")

from hsmflash.cli.partitions import partitions_app  # noqa: E402

app.add_typer(partitions_app, name="partitions")

# the MicroPython app (signed app images, boot verifier), likewise
from hsmflash.cli.app import app_app  # noqa: E402

app.add_typer(app_app, name="app")
import hsmflash.cli.app_check  # noqa: E402, F401 - registers `app check` on the app group


@app.command("flash")
def flash_cmd(
    ctx: typer.Context,
    chip: ChipOpt,
    port: PortOpt = None,
    virtual_efuses: VEfuseOpt = None,
    virtual_flash: VFlashOpt = None,
    image: ImageOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Check and plan; write "
                                          "nothing.")] = False,
    manifest: ManifestOpt = None,
    baud: BaudOpt = 921600,
    no_stub: NoStubOpt = False,
    device: Annotated[str | None, typer.Option(
        "--device", help="The device's MAC, for a chip in Secure Download Mode (its MAC "
        "cannot be read); checked against --manifest when that file exists.")] = None,
    allow_rewrite: Annotated[list[str] | None, typer.Option(
        "--allow-rewrite", help="Also write this protected region: table, nvs or nvs_keys "
        "(repeat; recorded in the audit log).")] = None,
    app_image: AppOpt = None,
) -> None:
    """Re-flash provisioned devices (field update, RMA): each device's key is re-derived in the
    token from the MAC it reports; no key files exist anywhere.

    Refused before writing when the device was provisioned under another master key or
    policy, an image is not signed by a key the device holds, or an address is outside the
    device's encrypted partitions. Never writes eFuses. Re-run to complete an interrupted write.

    In Secure Download Mode (production policies end there) the chip allows writes only: name
    it with --device MAC; every region is rewritten whole and nothing can be read back or
    verified, which the output says.
    """
    if not image and app_image is None:
        raise UsageError("give the images to write: --image ADDR=FILE (repeat) or --app")
    regions = tuple(allow_rewrite or ())
    for region in regions:
        if region not in ("table", "nvs", "nvs_keys"):
            raise UsageError(f"--allow-rewrite {region!r}: one of table, nvs, nvs_keys")
    if device is not None and len(port or []) + len(virtual_efuses or []) != 1:
        raise UsageError("--device names one device: give exactly one --port")
    _device_command(ctx, "flash", chip, port, virtual_efuses, virtual_flash, image, dry_run,
                    manifest, baud, regions, stub=not no_stub, device_mac=device,
                    app_image=app_image)


def _derive_batch(c: Context, master: str, purpose: str, devices: str, output: str,
                  workers: int) -> None:
    import hashlib
    import time

    from hsmflash.encrypt import read_device_csv
    from hsmflash.fileio import atomic_write
    from hsmflash.formats.kdf import format_mac
    from hsmflash.keyuse import check_master
    from hsmflash.token.rawderive import RawDeriver, kcvs_in_workers

    if workers > MAX_WORKERS:
        raise UsageError(f"--workers {workers} is more than {MAX_WORKERS} (each worker is a "
                         "process with its own token session)")
    macs = read_device_csv(devices)
    limit = c.policy.limits.max_devices_per_batch
    if len(macs) > limit:
        from hsmflash.errors import PolicyRefused

        raise PolicyRefused(f"{devices}: {len(macs)} devices exceed the policy's "
                            f"max_devices_per_batch ({limit})")
    if workers <= 0:
        workers = min(os.cpu_count() or 1, 4) if len(macs) >= 5000 else 1
    list_sha = hashlib.sha256(b"".join(macs)).hexdigest()
    started = time.perf_counter()
    with c.station() as st:
        mkey = st.key(master)
        check_master(mkey)

        def check() -> None:
            if st.policy.chips:
                st.policy.check_master(mkey.name)

        with st.use("derive.batch", mkey, subject={"devices": len(macs), "list_sha256": list_sha},
                    detail={"purpose": purpose, "source": devices}, check=check) as out:
            if workers > 1:
                kcvs = kcvs_in_workers(st.config.module_path, st.config.label,
                                       c.pin_handler(""), mkey.name, purpose, macs, workers)
            else:
                raw = RawDeriver(st.config.module_path, st.session, out.raw_object(),
                                 st.config.label, st.config.lib())
                kcvs = [raw.kcv(m, purpose) for m in macs]
            lines = ["mac,purpose,kcv"] + [f"{format_mac(m)},{purpose},{k}"
                                           for m, k in zip(macs, kcvs, strict=True)]
            manifest = ("\n".join(lines) + "\n").encode()
            atomic_write(output, manifest)
            out.update({"manifest_sha256": hashlib.sha256(manifest).hexdigest(),
                        "workers": workers})
    seconds = time.perf_counter() - started
    c.emit({"devices": len(macs), "purpose": purpose, "output": output, "workers": workers,
            "seconds": round(seconds, 3)},
           f"{len(macs)} device keys derived ({purpose}), KCVs in {output} "
           f"({len(macs) / max(seconds, 1e-9):.0f}/s)")
