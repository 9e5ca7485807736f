"""The CLI context: global options, the PIN handler, policy and token access, output."""

import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import typer

from hsmflash.errors import (
    InputError,
    InternalError,
    TokenError,
    UsageError,
)
from hsmflash.policy import Policy, load_policy, unrestricted_policy

if TYPE_CHECKING:  # the token layer loads only for commands that use a token
    from hsmflash.keyuse import Station
    from hsmflash.token.session import TokenConfig


DEFAULT_AUDIT_LOG = "hsmflash-audit.jsonl"


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
                f"{stat.S_IMODE(st.st_mode):04o}); run `chmod 600 {path}` and change the PIN"
            )
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


def usage_error(message: str) -> NoReturn:
    raise UsageError(message)
