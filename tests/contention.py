"""Worker functions for the token-contention test (module level: spawned processes import them)."""

from __future__ import annotations

import time


def keep_logging_in(label: str, pin: str, seconds: float) -> int:
    """Log in and out again and again (SoftHSM rewrites the token file on each login)."""
    from hsmflash.token.session import TokenConfig, open_session

    config = TokenConfig(token_label=label, pin_handler=lambda _prompt: pin)
    stop, count = time.monotonic() + seconds, 0
    while time.monotonic() < stop:
        with open_session(config):
            count += 1
    return count


def look_up(label: str, times: int) -> list[str]:
    """Find the token by label `times` times, as each station worker does once; return the
    errors."""
    from hsmflash.errors import TokenError
    from hsmflash.token.session import TokenConfig

    errors = []
    for _ in range(times):
        try:
            TokenConfig(token_label=label).token()
        except TokenError as e:
            errors.append(str(e))
    return errors
