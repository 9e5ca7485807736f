"""The embedded default: a SoftHSM2 development token under the checkout.

`python -m hsmflash.devtools.devtoken [DIR]` creates, idempotently, `DIR/softhsm2.conf` (from
`softhsm2.conf.in`), the token directory `DIR/tokens/` and a token labelled `hsmflash-dev`,
with random PINs kept in `DIR/pins` (mode 0600, ignored by git). The PINs never appear on a
command line: softhsm2-util is driven through a pseudo-terminal.
"""

from __future__ import annotations

import os
import pty
import secrets
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

from hsmflash.errors import TokenError
from hsmflash.token.session import DEFAULT_TOKEN_LABEL

TEMPLATE = "softhsm2.conf.in"


def write_conf(directory: Path, tokendir: Path) -> Path:
    """Write a softhsm2.conf pointing at `tokendir` (from the template if present)."""
    template = directory / TEMPLATE
    text = (
        template.read_text(encoding="utf-8")
        if template.is_file()
        else "directories.tokendir = @TOKENDIR@\nobjectstore.backend = file\nlog.level = ERROR\n"
             "slots.removable = false\n"
    )
    conf = directory / "softhsm2.conf"
    conf.write_text(text.replace("@TOKENDIR@", str(tokendir)), encoding="utf-8")
    tokendir.mkdir(parents=True, exist_ok=True, mode=0o700)
    return conf


def _softhsm_util() -> str:
    path = shutil.which("softhsm2-util")
    if path is None:
        raise TokenError("softhsm2-util not found: apt-get install softhsm2")
    return path


def token_exists(conf: Path, label: str) -> bool:
    env = {**os.environ, "SOFTHSM2_CONF": str(conf)}
    argv = [_softhsm_util(), "--show-slots"]
    out = subprocess.run(argv, env=env, capture_output=True, text=True,  # noqa: S603
                         check=False).stdout
    return any(line.split(":", 1)[1].strip() == label
               for line in out.splitlines() if line.strip().startswith("Label:"))


def init_token(conf: Path, label: str, so_pin: str, user_pin: str) -> None:
    """Initialise a free SoftHSM2 slot, answering the PIN prompts through a pty.

    Raises:
        TokenError: softhsm2-util failed.
    """
    env = {**os.environ, "SOFTHSM2_CONF": str(conf)}
    argv = [_softhsm_util(), "--init-token", "--free", "--label", label]
    pid, fd = pty.fork()
    if pid == 0:  # child
        os.execve(argv[0], argv, env)  # noqa: S606 - fixed argv, no PIN in it
    answers = [so_pin, so_pin, user_pin, user_pin]
    output = b""
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.5)
            if not ready:
                continue
            try:
                chunk = os.read(fd, 1024)
            except OSError:
                break
            if not chunk:
                break
            output += chunk
            while answers and output.count(b"PIN:") > 4 - len(answers):
                os.write(fd, answers.pop(0).encode() + b"\n")
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    if os.waitstatus_to_exitcode(status) != 0:
        last = output.decode(errors="replace").strip().splitlines()[-1:] or [""]
        raise TokenError(f"softhsm2-util could not initialise token {label!r}: {last[0]}")


def ensure_dev_token(directory: Path, label: str = DEFAULT_TOKEN_LABEL) -> dict[str, str]:
    """Create the config, PIN file and token if missing; return paths and whether created."""
    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    conf = write_conf(directory, directory / "tokens")
    pins = directory / "pins"
    if not pins.exists():
        fd = os.open(pins, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"{secrets.token_hex(8)}\n{secrets.token_hex(8)}\n")
    user_pin, so_pin = pins.read_text(encoding="utf-8").split()[:2]
    created = "no"
    if not token_exists(conf, label):
        init_token(conf, label, so_pin, user_pin)
        created = "yes"
    user_pin_file = directory / "user.pin"
    if not user_pin_file.exists():
        fd = os.open(user_pin_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(user_pin + "\n")
    return {"conf": str(conf), "label": label, "pin_file": str(user_pin_file),
            "created": created}


def main() -> None:
    default = Path(__file__).resolve().parent.parent / "softhsm"
    directory = Path(sys.argv[1]) if len(sys.argv) > 1 else default
    try:
        info = ensure_dev_token(directory)
    except TokenError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(4)
    state = "created" if info["created"] == "yes" else "already present"
    print(f"dev token {info['label']!r}: {state}")
    print(f"  export SOFTHSM2_CONF={info['conf']}")
    print(f"  user PIN file: {info['pin_file']} (use --pin-file or HSMFLASH_PIN_FILE)")


if __name__ == "__main__":
    main()
