"""The CLI registers only the command being run (start-up speed); these tests make sure a user
sees no difference: same commands, same help, same errors as with the whole app."""

from __future__ import annotations

import typer

from hsmflash.cli.main import GLOBAL_VALUE_OPTIONS, _app_for, app


def test_global_value_options_are_the_apps() -> None:
    group = typer.main.get_command(app)
    taking_value = {opt for p in group.params if not getattr(p, "is_flag", True)
                    for opt in p.opts}
    assert taking_value == GLOBAL_VALUE_OPTIONS


def _names(a: typer.Typer) -> list[str | None]:
    return [c.name for c in a.registered_commands] + [g.name for g in a.registered_groups]


def test_only_the_named_command_is_built() -> None:
    assert _names(_app_for(["sign", "x.bin"])) == ["sign"]
    # "sign" is the value of --token here, not a command
    assert _names(_app_for(["--token", "sign", "keys", "list"])) == ["keys"]
    assert _names(_app_for(["--audit-log=a.jsonl", "--json", "audit", "verify"])) == ["audit"]
    assert _names(_app_for(["--", "verify"])) == ["verify"]


def test_help_and_unknown_names_get_the_whole_app() -> None:
    assert _app_for([]) is app
    assert _app_for(["--help"]) is app
    assert _app_for(["--help", "sign"]) is app
    assert _names(_app_for(["sign", "--help"])) == ["sign"]
    assert _app_for(["sgin"]) is app
    assert len(_names(app)) > 10


def test_typo_still_gets_a_suggestion(cli) -> None:  # type: ignore[no-untyped-def]
    r = cli("--token", "x", "sgin")
    assert r.code == 2
    assert "No such command 'sgin'" in r.err and "sign" in r.err


def test_command_help_is_complete(cli) -> None:  # type: ignore[no-untyped-def]
    r = cli("sign", "--help")
    assert r.code == 0
    for option in ("--output", "--key", "--chip", "--scheme", "--append"):
        assert option in r.out
