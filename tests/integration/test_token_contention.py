"""Station workers start together: every login rewrites a SoftHSM token's file, and a process
looking the token up just then sees no token or CKR_GENERAL_ERROR. The lookup must ride that
out; a user would see a station device fail with "PKCS#11 error GeneralError"."""

from __future__ import annotations

import multiprocessing

from contention import keep_logging_in, look_up

from conftest import TOKEN_LABEL, USER_PIN


def test_token_lookup_survives_other_processes_logging_in() -> None:
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(4) as pool:
        logins = [pool.apply_async(keep_logging_in, (TOKEN_LABEL, USER_PIN, 4.0))
                  for _ in range(2)]
        lookups = [pool.apply_async(look_up, (TOKEN_LABEL, 150)) for _ in range(2)]
        errors = [e for r in lookups for e in r.get(timeout=120)]
        logged_in = sum(r.get(timeout=120) for r in logins)
    assert logged_in > 50  # the token really was being rewritten meanwhile
    assert errors == []
