"""Module, token and PIN problems: one line, exit 4, nothing written, PIN asked once."""

from __future__ import annotations

import pytest

from conftest import TOKEN_LABEL, run_cli


def test_missing_module(token_env, tmp_path):
    r = run_cli("--module", tmp_path / "nope.so", "keys", "list")
    assert r.code == 4
    assert "nope.so" in r.err and len(r.err.strip().splitlines()) == 1


def test_unknown_token_label(token_env):
    r = run_cli("--token", "no-such-token", "keys", "list")
    assert r.code == 4
    assert "no-such-token" in r.err
    assert TOKEN_LABEL in r.err  # tells the user which tokens exist


def test_wrong_pin_is_asked_once_and_not_retried(token_env, tmp_path, monkeypatch):

    from hsmflash.cli import main as cli_main

    asked = []
    original = cli_main.Context.pin_handler

    def counting(self, prompt):  # type: ignore[no-untyped-def]
        asked.append(prompt)
        return original(self, prompt)

    monkeypatch.setattr(cli_main.Context, "pin_handler", counting)
    monkeypatch.setenv("HSMFLASH_PIN", "definitely-wrong")
    log = tmp_path / "audit.jsonl"
    r = run_cli("keys", "generate", "never-made", "--type", "aes-256")
    assert r.code == 4
    assert "wrong PIN" in r.err
    assert len(asked) == 1
    assert not log.exists() or "never-made" not in log.read_text()
    # the right PIN still works: the token was not locked by retries
    monkeypatch.delenv("HSMFLASH_PIN")
    pin = tmp_path / "pin"
    pin.write_text(token_env["HSMFLASH_PIN"] + "\n")
    pin.chmod(0o600)  # a PIN file others can read is refused, as ssh refuses such a key
    assert run_cli("--pin-file", pin, "keys", "list").code == 0


def test_no_pin_source_non_interactive(token_env, monkeypatch):
    monkeypatch.delenv("HSMFLASH_PIN")
    r = run_cli("keys", "list")
    assert r.code == 4
    assert "HSMFLASH_PIN" in r.err


@pytest.mark.parametrize("flag", ["--pin", "--user-pin"])
def test_pin_is_not_accepted_on_the_command_line(token_env, flag):
    r = run_cli(flag, "1234", "keys", "list")
    assert r.code == 2


def test_looking_up_a_missing_token_leaves_open_sessions_working(session) -> None:  # type: ignore[no-untyped-def]
    # the lookup retries (a station worker may be rewriting the token) but must not
    # re-initialise the module under a session this process holds open
    from hsmflash.errors import TokenError
    from hsmflash.token.session import TokenConfig

    with pytest.raises(TokenError, match="no token labelled 'no-such-token'"):
        TokenConfig(token_label="no-such-token").token()
    assert len(session.generate_random(128)) == 16  # the session still answers


def test_an_unusable_audit_key_stops_the_command_before_any_key_use(cli, tmp_path, uniq):
    """A policy whose audit key cannot sign (an AES key): every record must be tagged and every
    command checkpointed, so the command is refused before the key it names is used (a
    failing checkpoint after a key use is tested in test_audit_trust.py)."""
    assert cli("keys", "generate", f"{uniq}-notsign", "--type", "aes-256",
               "--usage", "encrypt").code == 0
    policy = tmp_path / "p.toml"
    policy.write_text(f'name = "t"\n[token]\nlabel = "{TOKEN_LABEL}"\n'
                      f'[audit]\nkey = "{uniq}-notsign"\n')
    log = tmp_path / "own.jsonl"
    r = cli("--policy", policy, "--audit-log", log, "derive", "--master", f"{uniq}-notsign",
            "--device", "24:0a:c4:01:02:03", "--purpose", "XTS_AES_128_KEY")
    assert r.code == 4, r.output
    assert "audit key" in r.err and f"{uniq}-notsign" in r.err
    assert not log.exists() or '"op":"derive"' not in log.read_text()
