"""The CLI registers only the command being run (start-up speed); these tests make sure a user
sees no difference: same commands, same help, same errors as with the whole app."""

from __future__ import annotations

import typer

from hsmflash.cli.main import GLOBAL_VALUE_OPTIONS, _app_for, app


def test_global_value_options_are_the_apps() -> None:
    group = typer.main.get_command(app)
    taking_value = {opt: p.metavar for p in group.params if not getattr(p, "is_flag", True)
                    for opt in p.opts}
    assert taking_value == GLOBAL_VALUE_OPTIONS  # names and the metavars errors show


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


def test_global_options_after_the_command_are_hoisted() -> None:
    from hsmflash.cli.main import hoist_global_options

    assert hoist_global_options(["provision", "--policy", "p.toml", "--chip", "esp32s3"]) == [
        "--policy", "p.toml", "provision", "--chip", "esp32s3"]
    assert hoist_global_options(["keys", "create", "--policy=p.toml", "--json"]) == [
        "--policy=p.toml", "--json", "keys", "create"]
    # before the command they stay where they are; after `--` nothing moves
    assert hoist_global_options(["--token", "t", "sign", "--", "--json"]) == [
        "--token", "t", "sign", "--", "--json"]


def test_global_options_work_after_the_command(cli, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from conftest import ROOT

    # given before and after the command, the last one wins (as for any option)
    r = cli("--token", "first-token", "keys", "list", "--token", "last-token")
    assert r.code == 4 and "last-token" in r.err and "first-token" not in r.err
    # a global option at the end without its value is a usage error, not another command
    r = cli("audit", "verify", "log.jsonl", "--audit-log")
    assert r.code == 2 and "--audit-log needs a value" in r.err

    r = cli("policy", "check", ROOT / "policies" / "dev.toml", "--json")
    assert r.code == 0, r.err
    assert '"ok": true' in r.out
    r = cli("keys", "list", "--token", "no-such-token")
    assert r.code == 4 and "no-such-token" in r.err


def _modules_after(*argv: str) -> set[str]:
    """The modules loaded once `hsmflash ARGV` has run; the command must succeed."""
    import subprocess
    import sys

    code = ("import sys\nsys.argv = ['hsmflash', *sys.argv[1:]]\n"
            "from hsmflash.cli.main import main\n"
            "rc = 0\n"
            "try:\n    main()\nexcept SystemExit as e:\n    rc = e.code\n"
            "print(rc, ' '.join(sorted(sys.modules)), file=sys.stderr)\n")
    r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                       check=False)
    rc, *modules = r.stderr.strip().splitlines()[-1].split()
    assert rc in ("0", "None"), (argv, r.stdout, r.stderr)
    return set(modules)


def test_commands_without_a_token_load_no_pkcs11_code(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Each token-free command runs to its end on real inputs (a signed image, a signed audit
    log and revocation list, the shipped policy) without loading any PKCS#11 code."""
    from conftest import ROOT
    from hsmflash.chips import get_chip
    from hsmflash.formats import primitives, revocation, secureboot
    from imagebuilder import build_app
    from softsigner import SoftwareSigner, public_pem

    signer = SoftwareSigner.generate("ec-p256")
    pem = tmp_path / "p.pem"
    pem.write_bytes(public_pem(signer))
    image = tmp_path / "app.signed"
    image.write_bytes(secureboot.sign_sbv2(build_app("esp32c6", 16 * 1024), signer,
                                           get_chip("esp32c6")))
    body = {"version": revocation.LIST_VERSION, "sequence": 1, "issued": "2026-01-01T00:00:00Z",
            "revoked": [{"device": "24:0a:c4:00:00:01", "revoked_at": "2026-01-01T00:00:00Z",
                         "reason": ""}],
            "signer": {"key_fp": primitives.fingerprint(signer.public_key())}}
    lst = tmp_path / "revoked.json"
    lst.write_bytes(revocation.canonical_json(revocation.sign_list(body, signer.sign_digest)))
    from hsmflash.audit import AuditLog

    class Head:  # the token's head object, in memory
        head: tuple[int, str] | None = None

        def read(self) -> tuple[int, str] | None:
            return self.head

        def write(self, seq: int, hash: str) -> None:
            self.head = (seq, hash)

    log = tmp_path / "a.jsonl"
    audit = AuditLog(log, station="s", actor="a")
    audit.append("sign", "ok", subject={"image": "fw.bin"})
    audit.checkpoint(signer, Head())
    for argv in (("audit", "verify", str(log), "--pubkey", str(pem)),
                 ("verify", str(image), "--pubkey", str(pem)),
                 ("policy", "check", str(ROOT / "policies" / "dev.toml")),
                 ("credentials", "revoked", "--list", str(lst), "--verify", "--pubkey",
                  str(pem))):
        loaded = _modules_after(*argv)
        assert not {m for m in loaded if m == "pkcs11" or m.startswith("pkcs11.")}, argv
        assert "hsmflash.keyuse" not in loaded, argv


def test_shell_completion_completes_commands_and_options() -> None:
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    exe = shutil.which("hsmflash", path=str(Path(sys.executable).parent))
    assert exe is not None
    env = {**os.environ, "_HSMFLASH_COMPLETE": "complete_bash"}
    r = subprocess.run([exe], env={**env, "COMP_WORDS": "hsmflash prov", "COMP_CWORD": "1"},
                       capture_output=True, text=True, check=False)
    assert r.stdout.split() == ["provision"]
    r = subprocess.run([exe], env={**env, "COMP_WORDS": "hsmflash sign --ap", "COMP_CWORD": "2"},
                       capture_output=True, text=True, check=False)
    assert r.stdout.split() == ["--append"]


def test_help_names_parameters_the_way_a_person_reads_them(cli) -> None:  # type: ignore[no-untyped-def]
    for argv, expected in ((("sign", "--help"), ("FILE", "--output FILE", "--key KEY")),
                           (("provision", "--help"), ("--image ADDR=FILE", "--port PORT",
                                                      "--virtual-efuses FILE")),
                           (("flash", "--help"), ("--device MAC", "--allow-rewrite REGION")),
                           (("derive", "--help"), ("--device MAC", "--devices CSV")),
                           (("encrypt", "--help"), ("--address ADDR", "--master KEY"))):
        r = cli(*argv)
        assert r.code == 0, r.output
        for text in expected:
            assert text in r.out, (argv, text)
        assert "<str>" not in r.out and "<path>" not in r.out, argv


def test_policy_check_defaults_to_the_global_policy(cli) -> None:  # type: ignore[no-untyped-def]
    from conftest import ROOT

    r = cli("policy", "check", "--policy", ROOT / "policies" / "dev.toml")
    assert r.code == 0 and "is valid" in r.out, r.output
    r = cli("policy", "check")
    assert r.code == 2 and "policy check FILE" in r.err


def test_template_written_to_a_bin_file_is_the_binary_table(cli, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from hsmflash.formats import partitions

    out = tmp_path / "pt.bin"
    r = cli("partitions", "template", "--chip", "esp32s3", "-o", out)
    assert r.code == 0, r.output
    labels = [p.label for p in partitions.parse(out.read_bytes())]
    assert {"nvs_keys", "romfs", "vfs"} <= set(labels)


def test_app_check_under_a_production_policy_without_a_chip_fails_on_an_open_channel(
        cli, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A CI gate written as the README shows it must fail when the filesystem is open."""
    import dataclasses

    from conftest import ROOT
    from hsmflash.formats import partitions

    open_table = [dataclasses.replace(p, encrypted_flag=False)
                  for p in partitions.micropython_template()]
    table = tmp_path / "open.bin"
    table.write_bytes(partitions.build(open_table))
    r = cli("app", "check", "--table", table,
            "--policy", ROOT / "policies" / "esp32s3-production.toml")
    assert r.code == 5, r.output
    assert "open under a production policy" in r.err


def test_every_command_names_its_values_the_same_way() -> None:
    """Walk every command: each option or argument that takes a value shows an upper-case
    metavar a person reads (FILE, DIR, ADDR, MAC ...), never a Python name or a type, and `-o`
    is always `--output`."""
    from collections.abc import Iterator
    from typing import Any

    def walk(cmd: Any, path: str) -> Iterator[tuple[str, Any]]:  # typer's own click classes
        for p in cmd.params:
            yield path, p
        for name, sub in getattr(cmd, "commands", {}).items():
            yield from walk(sub, f"{path} {name}")

    seen = 0
    for where, p in walk(typer.main.get_command(app), "hsmflash"):
        option = p.param_type_name == "option"
        if option and (p.is_flag or p.count):
            continue
        if p.name in ("install_completion", "show_completion", "help"):
            continue
        seen += 1
        metavar = p.metavar or ""
        assert metavar and metavar == metavar.upper() and "_" not in metavar.strip("[]"), (
            where, p.name, metavar)
        if option and "-o" in p.opts:
            assert "--output" in p.opts, (where, p.opts)
    assert seen > 100  # the walk saw the whole app
