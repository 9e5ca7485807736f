"""Files an attacker (or a typo) can plant: outputs never replace or write through a symbolic
link, device node, FIFO or directory; inputs must be regular files of sane size; secrets are
0600; PIN files readable by others are refused; CSV cells cannot become formulas; file names
need not be UTF-8."""

from __future__ import annotations

import ctypes
import json
import os
import resource
import stat
import threading
import time
from pathlib import Path

import pytest

from conftest import TOKEN_LABEL, USER_PIN, run_cli
from imagebuilder import build_app

CHIP = "esp32c6"


@pytest.fixture
def signer(cli, uniq, tmp_path):  # type: ignore[no-untyped-def]
    key = f"{uniq}-ec"
    assert cli("keys", "generate", key, "--type", "ec-p256").code == 0
    image = tmp_path / "app.bin"
    image.write_bytes(build_app(CHIP, 8 * 1024, seed=7))
    log = Path(os.environ["HSMFLASH_AUDIT_LOG"])

    def sign(src: Path | str, out: Path | str):  # type: ignore[no-untyped-def]
        return cli("sign", src, "-o", out, "--key", key, "--chip", CHIP)

    return sign, image, log


def test_output_symlink_is_refused_not_followed(signer, tmp_path):
    sign, image, log = signer
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    link = tmp_path / "signed.bin"
    link.symlink_to(victim)
    before = log.read_bytes()
    r = sign(image, link)
    assert r.code == 3 and "symbolic link" in r.err, r.output
    assert link.is_symlink() and victim.read_text() == "keep me"
    assert log.read_bytes() == before  # refused before any key use


def test_output_fifo_and_device_node_are_not_replaced(signer, tmp_path):
    sign, image, _ = signer
    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    r = sign(image, fifo)
    assert r.code == 3 and "FIFO" in r.err, r.output
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    node = tmp_path / "null"
    try:
        os.mknod(node, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("needs CAP_MKNOD to make a device node")
    r = sign(image, node)
    assert r.code == 3, r.output
    assert stat.S_ISCHR(os.lstat(node).st_mode)


def test_dev_zero_and_fifo_inputs_are_refused_without_hanging(signer, tmp_path):
    sign, image, _ = signer
    r = sign("/dev/zero", tmp_path / "z.bin")
    assert r.code == 3 and "not a regular file" in r.err, r.output
    r = run_cli("audit", "show", "/dev/zero")
    assert r.code == 3 and "not a regular file" in r.err, r.output
    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)
    data = image.read_bytes()

    def late_writer() -> None:  # feeds a reader that blocked on the FIFO, so nothing hangs
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                time.sleep(0.05)
                continue
            os.set_blocking(fd, True)
            os.write(fd, data)
            os.close(fd)
            return

    t = threading.Thread(target=late_writer)
    t.start()
    r = sign(fifo, tmp_path / "f.bin")
    t.join()
    assert r.code == 3 and "not a regular file" in r.err, r.output
    assert not (tmp_path / "f.bin").exists()


def test_non_utf8_file_names_work(signer, tmp_path):
    sign, image, log = signer
    raw_dir = os.fsencode(tmp_path)
    src = os.fsdecode(raw_dir + b"/app\xff.bin")
    out = os.fsdecode(raw_dir + b"/signed\xfe.bin")
    Path(src).write_bytes(image.read_bytes())
    r = sign(src, out)
    assert r.code == 0, r.output
    assert os.path.exists(os.fsencode(out))
    assert "\\xff" in log.read_text(encoding="utf-8")  # the name, readable in the log


def test_huge_workers_and_nvs_size_are_clear_errors(cli, tmp_path):
    devices = tmp_path / "devices.csv"
    devices.write_text("mac\n24:0a:c4:00:00:01\n")
    r = cli("derive", "--master", "m", "--purpose", "XTS_AES_128_KEY", "--devices", devices,
            "-o", tmp_path / "kcv.csv", "--workers", str(10**9))
    assert r.code == 2 and "--workers" in r.err, r.output
    r = cli("credentials", "issue", "--chip", "esp32s3", "--device", "24:0a:c4:00:00:01",
            "--nvs-size", "0x100000000", "--nvs-out", tmp_path / "nvs.bin")
    assert r.code in (2, 3) and "0x100000000" in r.err, r.output


def _pin_file(tmp_path: Path, mode: int) -> Path:
    p = tmp_path / "user.pin"
    p.write_text(USER_PIN + "\n")
    p.chmod(mode)
    return p


def test_pin_file_readable_by_others_is_refused(token_env, monkeypatch, tmp_path):
    monkeypatch.delenv("HSMFLASH_PIN")
    pin = _pin_file(tmp_path, 0o644)
    r = run_cli("--pin-file", pin, "keys", "list")
    assert r.code == 3 and "chmod 600" in r.err and "user.pin" in r.err, r.output
    pin.chmod(0o600)  # as softhsm/ writes it for the quick start
    r = run_cli("--pin-file", pin, "keys", "list")
    assert r.code == 0, r.output


def test_virtual_efuse_files_are_private_and_temp_links_are_not_followed(cli, tmp_path):
    from hsmflash.device.virtual import open_virtual

    efuse = tmp_path / "chip.efuse"
    r = cli("virtual", "create", "--chip", "esp32s3", "--mac", "24:0a:c4:00:00:42",
            "--efuse-file", efuse)
    assert r.code == 0, r.output
    assert stat.S_IMODE(os.stat(efuse).st_mode) == 0o600  # dev-mode keys are readable there
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (tmp_path / "chip.efuse.tmp").symlink_to(victim)  # the old fixed temp name
    dev = open_virtual("esp32s3", efuse, tmp_path / "chip.flash", 0x400000)
    dev.commands.esp.save_to_file()
    assert victim.read_text() == "keep me"
    assert not efuse.is_symlink() and stat.S_IMODE(os.stat(efuse).st_mode) == 0o600
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".chip.efuse.")]


def test_virtual_flash_symlink_is_refused(cli, tmp_path):
    from hsmflash.device.virtual import open_virtual
    from hsmflash.errors import InputError

    efuse = tmp_path / "chip.efuse"
    assert cli("virtual", "create", "--chip", "esp32s3", "--mac", "24:0a:c4:00:00:43",
               "--efuse-file", efuse).code == 0
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"\xff" * 0x400000)
    flash = tmp_path / "chip.flash"
    flash.symlink_to(victim)
    with pytest.raises(InputError, match="symbolic link"):
        open_virtual("esp32s3", efuse, flash, 0x400000)


def _row(error: str) -> dict[str, object]:
    return {"time": "t", "mac": "24:0a:c4:00:00:01", "chip": "esp32s3", "revision": "0.0",
            "fe_kcv": "", "sb_kcv": "", "images": [], "result": "failed", "error": error,
            "seconds": 0}


def test_csv_manifest_neutralises_formulas_and_refuses_links(tmp_path):
    import csv

    from hsmflash.errors import InputError
    from hsmflash.provision.manifest import write_manifest

    out = tmp_path / "m.csv"
    write_manifest(out, [_row('=HYPERLINK("http://evil","x")'), _row("+1"), _row("@SUM(1)"),
                          _row("-2"), _row("plain")])
    cells = [r["error"] for r in csv.DictReader(out.open(encoding="utf-8"))]
    assert cells == ["'=HYPERLINK(\"http://evil\",\"x\")", "'+1", "'@SUM(1)", "'-2", "plain"]
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    link = tmp_path / "link.jsonl"
    link.symlink_to(victim)
    with pytest.raises(InputError, match="symbolic link"):
        write_manifest(link, [_row("x")])
    assert victim.read_text() == "keep me"


def test_no_core_dumps_once_a_key_is_exported(cli, uniq, policy_file, tmp_path):
    from hsmflash.keyuse import Station, wipe
    from hsmflash.policy import load_policy
    from hsmflash.token.session import TokenConfig

    master = f"{uniq}-m"
    assert cli("keys", "generate", master, "--type", "aes-256", "--usage", "derive").code == 0
    cfg = TokenConfig(token_label=TOKEN_LABEL, pin_handler=lambda _p: USER_PIN)
    with Station.open(cfg, load_policy(policy_file), tmp_path / "a.jsonl") as st:
        with st.use("test.export", st.key(master), exports=["efuse_burn"]) as use:
            d = use.derive(bytes.fromhex("240ac4000001"), "FLASH_ENCRYPTION", exportable=True)
            key = use.export(d, "efuse_burn")
            assert resource.getrlimit(resource.RLIMIT_CORE) == (0, 0)
            pr_get_dumpable = 3
            assert ctypes.CDLL(None).prctl(pr_get_dumpable, 0, 0, 0, 0) == 0
            assert isinstance(key, bytearray) and len(key) == 32
            wipe(key)
            assert key == bytearray(32)
            d.destroy()
    assert json.loads(Path(tmp_path / "a.jsonl").read_text().splitlines()[-1])["op"] \
        == "checkpoint"


def test_espefuse_errors_never_carry_block_contents(tmp_path):
    """espefuse quotes a read-protected block's hex when it is not all zeros; that text must
    not reach an error line (nor, through it, the audit log)."""
    import esptool

    from hsmflash.device.base import espressif_call
    from hsmflash.errors import DeviceError

    key = "c0ffee" * 10 + "1234"
    with pytest.raises(DeviceError) as caught:
        with espressif_call("burning BLOCK_KEY0"):
            raise esptool.FatalError(f"The BLOCK_KEY0 is read-protected but not all '0' "
                                     f"({key})")
    message = caught.value.diagnostics()
    assert key not in message and key[:16] not in message
    assert message.startswith("burning BLOCK_KEY0: The BLOCK_KEY0 is read-protected")
    assert caught.value.__cause__ is None and caught.value.__suppress_context__  # --debug too


def test_audit_log_symlink_is_refused_before_key_use(signer, tmp_path, monkeypatch):
    sign, image, _ = signer
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    link = tmp_path / "log-link.jsonl"
    link.symlink_to(victim)
    monkeypatch.setenv("HSMFLASH_AUDIT_LOG", str(link))
    r = sign(image, tmp_path / "s.bin")
    assert r.code == 3 and "symbolic link" in r.err, r.output
    assert victim.read_text() == "keep me" and not (tmp_path / "s.bin").exists()
