"""An output that cannot be written is refused before any key is used: exit 3, the message
names the path, and the audit log shows no key use."""

from __future__ import annotations

import json

import pytest

from imagebuilder import build_app, build_bootloader

MAC = "7c:df:a1:00:20:01"


@pytest.fixture
def keys(cli, uniq):  # type: ignore[no-untyped-def]
    names = {"sign": f"{uniq}-sb", "master": f"{uniq}-fe", "rev": f"{uniq}-rev"}
    assert cli("keys", "generate", names["sign"], "--type", "rsa-3072").code == 0
    assert cli("keys", "generate", names["master"], "--type", "aes-256").code == 0
    assert cli("keys", "generate", names["rev"], "--type", "ec-p256").code == 0
    return names


def _commands(tmp, keys, out):  # type: ignore[no-untyped-def]
    app, boot, devices = tmp / "app.bin", tmp / "boot.bin", tmp / "devices.csv"
    app.write_bytes(build_app("esp32s3", 20 * 1024, seed=7))
    boot.write_bytes(build_bootloader("esp32", seed=7))
    devices.write_text(f"mac\n{MAC}\n")
    return {
        "sign": ("sign", app, "-o", out, "--key", keys["sign"], "--chip", "esp32s3"),
        "encrypt": ("encrypt", app, "-o", out, "--chip", "esp32s3", "--address", "0x10000",
                    "--master", keys["master"], "--device", MAC),
        "derive": ("derive", "--master", keys["master"], "--devices", devices, "-o", out),
        "digest-bootloader": ("digest-bootloader", boot, "-o", out, "--master", keys["master"],
                              "--device", MAC),
        "credentials revoke": ("credentials", "revoke", MAC, "--list", out, "--key",
                               keys["rev"]),
    }


@pytest.mark.parametrize("command", ["sign", "encrypt", "derive", "digest-bootloader",
                                     "credentials revoke"])
@pytest.mark.parametrize("where", ["missing directory", "a directory"])
def test_unwritable_output_is_refused_before_key_use(cli, token_env, tmp_path, keys, command,
                                                     where):  # type: ignore[no-untyped-def]
    out = tmp_path / "no-such-dir" / "out.bin" if where == "missing directory" else tmp_path
    log = tmp_path / "audit.jsonl"
    before = log.read_bytes() if log.exists() else b""
    r = cli(*_commands(tmp_path, keys, out)[command])
    assert r.code == 3, r.output
    assert str(out) in r.err and len(r.err.strip().splitlines()) == 1
    added = log.read_bytes()[len(before):] if log.exists() else b""
    assert [json.loads(line)["phase"] for line in added.splitlines()] == []
