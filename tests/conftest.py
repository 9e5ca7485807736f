"""Shared fixtures: one real SoftHSM2 token per test session, a CLI runner, clean environment.

SOFTHSM2_CONF is set here, at import, before anything loads the PKCS#11 library.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOKEN_LABEL = "hsmflash-test"
USER_PIN = "test-user-" + uuid.uuid4().hex[:8]
SO_PIN = "test-so-" + uuid.uuid4().hex[:8]

_SESSION_DIR = Path(tempfile.mkdtemp(prefix="hsmflash-softhsm-"))
os.environ["SOFTHSM2_CONF"] = str(_SESSION_DIR / "softhsm2.conf")
# token capability profiles are cached per token; tests keep theirs out of the user's cache
os.environ["XDG_CACHE_HOME"] = str(_SESSION_DIR / "cache")
for _var in [v for v in os.environ if v.startswith("HSMFLASH_")]:
    del os.environ[_var]


def pytest_sessionstart(session: pytest.Session) -> None:
    from hsmflash.devtools.devtoken import init_token, write_conf

    if shutil.which("softhsm2-util") is None:
        raise pytest.UsageError("softhsm2-util not found: apt-get install softhsm2")
    conf = write_conf(_SESSION_DIR, _SESSION_DIR / "tokens")
    init_token(conf, TOKEN_LABEL, SO_PIN, USER_PIN)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    shutil.rmtree(_SESSION_DIR, ignore_errors=True)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts without hsmflash variables; the token is the session's."""
    for var in [v for v in os.environ if v.startswith("HSMFLASH_")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("SOFTHSM2_CONF", str(_SESSION_DIR / "softhsm2.conf"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(_SESSION_DIR / "cache"))


@pytest.fixture
def token_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, str]:
    """Environment for CLI calls against the session token, with a per-test audit log."""
    env = {
        "HSMFLASH_TOKEN": TOKEN_LABEL,
        "HSMFLASH_PIN": USER_PIN,
        "HSMFLASH_AUDIT_LOG": str(tmp_path / "audit.jsonl"),
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


@pytest.fixture
def token_config():  # type: ignore[no-untyped-def]
    from hsmflash.token.session import TokenConfig

    return TokenConfig(token_label=TOKEN_LABEL, pin_handler=lambda _prompt: USER_PIN)


@pytest.fixture
def session(token_config):  # type: ignore[no-untyped-def]
    from hsmflash.token.session import open_session

    with open_session(token_config, rw=True) as s:
        yield s


@pytest.fixture
def uniq() -> str:
    """A unique key-name prefix: the token is shared by the whole session."""
    return "t" + uuid.uuid4().hex[:10]


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def output(self) -> str:
        return self.out + self.err


def run_cli(*args: str | os.PathLike[str]) -> Result:
    """Run `hsmflash ARGS` in-process through the real entry point (exit-code mapping
    included)."""
    from hsmflash.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    argv = ["hsmflash", *[str(a) for a in args]]
    code = 0
    old_argv = sys.argv
    sys.argv = argv
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = old_argv
    return Result(code, out.getvalue(), err.getvalue())


@pytest.fixture
def cli(token_env: dict[str, str]):  # type: ignore[no-untyped-def]
    """`cli("keys", "list")` -> Result(code, out, err), against the session token."""
    return run_cli


@pytest.fixture
def policy_file(tmp_path: Path, uniq: str) -> Iterator[Path]:
    """dev.toml with key names made unique for this test (the token is shared)."""
    text = (ROOT / "policies" / "dev.toml").read_text()
    text = text.replace('label = "hsmflash-dev"', f'label = "{TOKEN_LABEL}"')
    for name in ("sb-release", "sb-ecdsa", "sbv1-app", "fe-master", "cred-master",
                 "revocation"):
        text = text.replace(f'"{name}"', f'"{uniq}-{name}"')
        text = text.replace(f"[keys.{name}]", f"[keys.{uniq}-{name}]")
    path = tmp_path / "policy.toml"
    path.write_text(text)
    yield path
