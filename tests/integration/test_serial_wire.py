"""The serial path at wire speed: flasher stub or ROM loader, baud changes that fail, and
re-flash in Secure Download Mode, through esptool's and espefuse's real code.

On the other end of the port is `FakeRomLoader` (tests/doubles/rom_loader.py), a TEST DOUBLE of a
chip at the serial boundary only: it accepts esptool's own stub upload, models the link's rate,
enforces Secure Download Mode once its eFuse says so, and keeps eFuse semantics in espefuse's
emulator. What the flash holds afterwards is judged by espsecure with the key derived by the
aes-ecb-v1 spec from the bench's known master, as for the virtual chips.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
from collections.abc import Callable
from pathlib import Path

import espsecure
import pytest
from test_provision import MACS, Bench, check_provisioned, efuse_summary, make_bench

from conftest import Result, run_cli
from doubles import FakeRomLoader
from hsmflash.formats.partitions import build, default_layout
from imagebuilder import build_app

REVISION = {"esp32s3": 2, "esp32": 100}
MEM_END, FLASH_BEGIN, READ_REG, SPI_FLASH_MD5 = 0x06, 0x02, 0x0A, 0x13


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Bench:
    return make_bench(tmp_path_factory.mktemp("wire-bench"))


@pytest.fixture(autouse=True)
def _one_write_attempt(monkeypatch: pytest.MonkeyPatch) -> None:
    """esptool retries a lost connection by reopening the port for ~7 s; fail at once."""
    from esptool.loader import ESPLoader

    monkeypatch.setattr(ESPLoader, "WRITE_FLASH_ATTEMPTS", 1)


def _double(chip: str, efuse: Path, **kw: object) -> FakeRomLoader:
    return FakeRomLoader(chip, mac=MACS[chip], revision=REVISION.get(chip), efuse_file=efuse,
                         **kw)  # type: ignore[arg-type]


def _provision(bench: Bench, chip: str, port: str, *extra: str | Path,
               policy: Path | None = None) -> Result:
    return run_cli("--json", "--policy", policy or bench.policy, "provision", "--chip", chip,
                   "--port", port, *bench.image_args(chip), *map(str, extra))


def _decrypt(key: bytes, data: bytes, address: int) -> bytes:
    out = io.BytesIO()
    espsecure.decrypt_flash_data(io.BytesIO(key), out, address, 0xF, True, io.BytesIO(data))
    return out.getvalue()


@pytest.mark.parametrize("stub", [True, False], ids=["stub", "no-stub"])
@pytest.mark.parametrize("chip", ["esp32s3", "esp32"])
def test_provision_with_and_without_the_stub(bench: Bench, cli: Callable[..., Result],
                                             tmp_path: Path, chip: str, stub: bool) -> None:
    efuse = tmp_path / "chip.efuse"
    with _double(chip, efuse) as dev:
        r = _provision(bench, chip, dev.port, *([] if stub else ["--no-stub"]))
    assert r.code == 0, r.output
    assert dev.stub is stub and (MEM_END in dev.commands) is stub
    assert dev.baud == 921600  # connected at 115200, then moved to the default --baud
    check_provisioned(bench, chip, efuse_summary(chip, efuse), bytes(dev.flash), MACS[chip],
                      tmp_path)


def test_lost_baud_change_falls_back_to_115200(bench: Bench, cli: Callable[..., Result],
                                               tmp_path: Path) -> None:
    efuse = tmp_path / "chip.efuse"
    with _double("esp32s3", efuse, lose_baud_change=True) as dev:
        r = _provision(bench, "esp32s3", dev.port)
    assert r.code == 0, r.output
    assert dev.baud == 115200
    (result,) = json.loads(r.out)
    assert any("fell back to 115200" in n for n in result["notes"]), result["notes"]
    check_provisioned(bench, "esp32s3", efuse_summary("esp32s3", efuse), bytes(dev.flash),
                      MACS["esp32s3"], tmp_path)


def test_chip_lost_at_a_rate_the_link_garbles_then_rerun(bench: Bench,
                                                         cli: Callable[..., Result],
                                                         tmp_path: Path) -> None:
    efuse = tmp_path / "chip.efuse"
    with _double("esp32s3", efuse, max_baud=460800) as dev:
        before = efuse.read_bytes()
        r = _provision(bench, "esp32s3", dev.port)  # --baud 921600 by default
    assert r.code == 7, r.output
    assert "reset it" in r.err and "--baud 115200" in r.err and "Traceback" not in r.err
    assert efuse.read_bytes() == before and FLASH_BEGIN not in dev.commands  # nothing done
    with _double("esp32s3", efuse, max_baud=460800) as reset:  # reset or replugged
        r = _provision(bench, "esp32s3", reset.port, "--baud", "460800")
    assert r.code == 0, r.output
    check_provisioned(bench, "esp32s3", efuse_summary("esp32s3", efuse), bytes(reset.flash),
                      MACS["esp32s3"], tmp_path)


def test_erased_sectors_are_not_sent(bench: Bench, cli: Callable[..., Result],
                                     tmp_path: Path) -> None:
    """A region whose middle sectors are all 0xFF: those are erased, not sent."""
    from hsmflash.device.serial import open_serial

    data = b"\x11" * 0x1000 + b"\xff" * 0x10000 + b"\x22" * 0x800
    with _double("esp32s3", tmp_path / "e.efuse") as dev:
        dev.flash[0x20000:0x40000] = b"\x00" * 0x20000  # stale data where the gap lands
        device = open_serial(dev.port, "esp32s3", 921600)
        try:
            sent = dev.wire_bytes
            device.write_flash(0x20000, data)
            sent = dev.wire_bytes - sent
            assert device.flash_md5(0x20000, len(data)) == __import__("hashlib").md5(
                data, usedforsecurity=False).hexdigest()
        finally:
            device.close()
    assert bytes(dev.flash[0x20000:0x20000 + len(data)]) == data
    assert sent < 0x1000 + 0x800 + 0x4000 * 2  # two padded 16 KiB blocks, not 17 sectors


# ---------------------------------------------------------------------------------------
# Secure Download Mode
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sdm_device(bench: Bench, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """An ESP32-S3 provisioned over serial under the release policy (download mode secured)."""
    tmp = tmp_path_factory.mktemp("sdm")
    efuse, manifest, table = tmp / "s3.efuse", tmp / "manifest.csv", tmp / "pt.bin"
    table.write_bytes(build(default_layout()))
    with _double("esp32s3", efuse) as dev:
        with pytest.MonkeyPatch.context() as mp:
            for k, v in bench.env.items():
                mp.setenv(k, v)
            r = _provision(bench, "esp32s3", dev.port,  # the bench's images hold this table
                           "--manifest", manifest, policy=bench.release_policy)
    assert r.code == 0, r.output
    return {"dir": tmp, "efuse": efuse, "flash": bytes(dev.flash), "manifest": manifest,
            "table": table}


def _signed_app(bench: Bench, tmp: Path, name: str, secure_version: int) -> Path:
    plain, signed = tmp / f"{name}.bin", tmp / f"{name}.signed"
    plain.write_bytes(build_app("esp32s3", 80 * 1024, seed=secure_version + 40,
                                secure_version=secure_version))
    r = run_cli("--policy", bench.release_policy, "sign", plain, "-o", signed, "--key",
                f"{bench.uniq}-sb-release", "--chip", "esp32s3")
    assert r.code == 0, r.output
    return signed


def _flash_sdm(bench: Bench, dev: FakeRomLoader, sdm: dict[str, object], *args: str | Path,
               policy: Path | None = None) -> Result:
    return run_cli("--json", "--policy", policy or bench.release_policy, "flash", "--chip",
                   "esp32s3", "--port", dev.port, "--image", f"0x8000={sdm['table']}",
                   "--allow-rewrite", "table", *map(str, args))


def test_reflash_in_secure_download_mode_decrypts_to_the_new_image(
        bench: Bench, cli: Callable[..., Result], sdm_device: dict[str, object]) -> None:
    sdm, mac = sdm_device, MACS["esp32s3"]
    tmp = sdm["dir"]
    assert isinstance(tmp, Path)
    new = _signed_app(bench, tmp, "app-v2", secure_version=2)
    efuse = sdm["efuse"]
    assert isinstance(efuse, Path)
    before = efuse.read_bytes()
    with _double("esp32s3", efuse) as dev:
        dev.flash[:] = sdm["flash"]  # type: ignore[index]
        assert dev.secure_download
        r = _flash_sdm(bench, dev, sdm, "--device", mac, "--manifest", sdm["manifest"],
                       "--image", f"0x10000={new}")
    assert r.code == 0, r.output
    (result,) = json.loads(r.out)
    assert result["result"] == "written-unverified" and result["verified"] is False
    assert any("nothing can be read back" in n for n in result["notes"])
    assert not dev.stub and READ_REG not in dev.commands and SPI_FLASH_MD5 not in dev.commands
    data = new.read_bytes()
    key = bench.spec_key(mac, "XTS_AES_128_KEY")
    region = bytes(dev.flash[0x10000:0x10000 + len(data) + (-len(data) % 16)])
    assert _decrypt(key, region, 0x10000)[:len(data)] == data
    assert efuse.read_bytes() == before
    rows = list(csv.DictReader(Path(str(sdm["manifest"])).open()))
    assert rows[-1]["result"] == "written-unverified" and rows[-1]["mac"] == mac

    # the human output says it too
    with _double("esp32s3", efuse) as dev2:
        dev2.flash[:] = dev.flash
        r = run_cli("--policy", bench.release_policy, "flash", "--chip", "esp32s3", "--port",
                    dev2.port, "--image", f"0x8000={sdm['table']}", "--allow-rewrite", "table",
                    "--device", mac, "--image", f"0x10000={new}")
    assert r.code == 0, r.output
    assert "nothing can be read back" in r.out and "written-unverified" in r.out


def test_secure_download_mode_places_the_app_by_the_table_written(
        bench: Bench, cli: Callable[..., Result], sdm_device: dict[str, object]) -> None:
    """`flash --app` on a chip in Secure Download Mode: the app goes to the romfs partition of
    the table being written (the device's own cannot be read), encrypted for the device."""
    from hsmflash.formats.partitions import find_romfs, micropython_template

    sdm, mac = sdm_device, MACS["esp32s3"]
    tmp = sdm["dir"]
    assert isinstance(tmp, Path)
    src = tmp / "mpapp"
    src.mkdir()
    (src / "main.py").write_text("print('v3')\n")
    app = tmp / "app.img"
    r = run_cli("--policy", bench.release_policy, "app", "build", src, "-o", app, "--key",
                f"{bench.uniq}-sb-release")
    assert r.code == 0, r.output
    layout = micropython_template()
    table = tmp / "mp-table.bin"
    table.write_bytes(build(layout))
    romfs = find_romfs(layout)
    assert romfs is not None
    with _double("esp32s3", sdm["efuse"]) as dev:  # type: ignore[arg-type]
        dev.flash[:] = sdm["flash"]  # type: ignore[index]
        r = run_cli("--json", "--policy", bench.release_policy, "flash", "--chip", "esp32s3",
                    "--port", dev.port, "--image", f"0x8000={table}", "--allow-rewrite",
                    "table", "--device", mac, "--manifest", sdm["manifest"], "--app", app)
    assert r.code == 0, r.output
    data = app.read_bytes()
    key = bench.spec_key(mac, "XTS_AES_128_KEY")
    region = bytes(dev.flash[romfs.offset:romfs.offset + len(data) + (-len(data) % 16)])
    assert _decrypt(key, region, romfs.offset)[:len(data)] == data


def test_secure_download_mode_refusals_write_nothing(
        bench: Bench, cli: Callable[..., Result], sdm_device: dict[str, object]) -> None:
    sdm = sdm_device
    tmp = sdm["dir"]
    assert isinstance(tmp, Path)
    old = _signed_app(bench, tmp, "app-v1", secure_version=1)
    unsigned = tmp / "unsigned.bin"
    unsigned.write_bytes(build_app("esp32s3", 80 * 1024, seed=77))
    floor = tmp / "floor.toml"
    floor.write_text(bench.release_policy.read_text().replace(
        "[chips.esp32s3]\n", "[chips.esp32s3]\nmin_secure_version = 2\n"))
    cases: list[tuple[list[str | Path], Path | None, int, str]] = [
        (["--image", f"0x10000={old}"], None, 2, "--device"),
        (["--device", "7c:df:a1:99:99:99", "--manifest", sdm["manifest"],  # type: ignore[list-item]
          "--image", f"0x10000={old}"], None, 7, "not a provisioned"),
        (["--device", MACS["esp32s3"], "--image", f"0x10000={old}"], floor, 5,
         "min_secure_version"),
        # the device's digests cannot be read: the policy's keys still decide
        (["--device", MACS["esp32s3"], "--image", f"0x10000={unsigned}"], None, 5,
         "not signed for Secure Boot"),
    ]
    for args, policy, code, needle in cases:
        with _double("esp32s3", sdm["efuse"]) as dev:  # type: ignore[arg-type]
            dev.flash[:] = sdm["flash"]  # type: ignore[index]
            r = _flash_sdm(bench, dev, sdm, *args, policy=policy)
        assert r.code == code, (args, r.output)
        assert needle in r.err, r.err
        assert FLASH_BEGIN not in dev.commands


# ---------------------------------------------------------------------------------------
# Native USB: the port goes away and comes back
# ---------------------------------------------------------------------------------------

def test_port_that_comes_back_is_followed(bench: Bench, cli: Callable[..., Result],
                                          tmp_path: Path) -> None:
    """A USB-Serial-JTAG chip drops off the bus mid-write and re-enumerates: provisioning given
    the stable /dev/serial/by-id-style name (a symlink) reconnects, checks the MAC and finishes
    in the same run."""
    import threading

    efuse = tmp_path / "chip.efuse"
    by_id = tmp_path / "usb-Espressif_USB_JTAG_serial_debug_unit_7C:DF:A1:00:00:01-if00"
    first = _double("esp32s3", efuse, drop_after_flash_blocks=3).start()
    by_id.symlink_to(first.port)
    second: list[FakeRomLoader] = []

    def replug() -> None:
        while not first.dropped:
            if first.error is not None or first._stop.is_set():
                return
            threading.Event().wait(0.02)
        chip = _double("esp32s3", efuse).start()  # same chip after its reset
        chip.flash[:] = first.flash
        second.append(chip)
        tmp_link = tmp_path / "link.tmp"
        tmp_link.symlink_to(chip.port)
        tmp_link.replace(by_id)

    watcher = threading.Thread(target=replug, daemon=True)
    watcher.start()
    try:
        r = _provision(bench, "esp32s3", str(by_id))
    finally:
        watcher.join(timeout=10)
        first.stop()
        for chip in second:
            chip.stop()
    assert first.dropped and second, r.output
    assert r.code == 0, r.output
    check_provisioned(bench, "esp32s3", efuse_summary("esp32s3", efuse), bytes(second[0].flash),
                      MACS["esp32s3"], tmp_path)


def test_usb_link_efuses_burn_in_the_last_step(bench: Bench, cli: Callable[..., Result],
                                               tmp_path: Path) -> None:
    """DIS_USB_SERIAL_JTAG cuts the link a native-USB station talks over: planned last, with
    the download-mode eFuses, never with the hardening step before them."""
    policy = tmp_path / "usb.toml"
    policy.write_text(bench.release_policy.read_text().replace(
        '"ENABLE_SECURITY_DOWNLOAD"]', '"DIS_USB_SERIAL_JTAG", "USB_PHY_SEL", '
        '"ENABLE_SECURITY_DOWNLOAD"]', 1))
    assert "DIS_USB_SERIAL_JTAG" in policy.read_text()
    efuse, flash = bench.new_chip(tmp_path, "esp32s3")
    r = run_cli("--json", *bench.provision_args("esp32s3", efuse, flash, "--dry-run",
                                                policy=policy))
    assert r.code == 0, r.output
    plan = json.loads(r.out)[0]["plan"]
    assert {"DIS_USB_SERIAL_JTAG", "USB_PHY_SEL", "ENABLE_SECURITY_DOWNLOAD"} <= set(plan["last"])
    assert not {"DIS_USB_SERIAL_JTAG", "USB_PHY_SEL"} & set(plan["enable"])
    assert "DIS_USB_JTAG" in plan["enable"]  # JTAG only: the serial link stays


def test_provision_rerun_on_a_secured_chip_says_so(
        bench: Bench, cli: Callable[..., Result], sdm_device: dict[str, object]) -> None:
    """docs/real-boards.md: a finished ESP32-S3 answers only in Secure Download Mode."""
    with _double("esp32s3", sdm_device["efuse"]) as dev:  # type: ignore[arg-type]
        dev.flash[:] = sdm_device["flash"]  # type: ignore[index]
        r = run_cli("--policy", bench.release_policy, "provision", "--chip", "esp32s3",
                    "--port", dev.port, *bench.image_args("esp32s3"))
    assert r.code == 7, r.output
    assert "Secure Download Mode" in r.err and "Traceback" not in r.err
    assert FLASH_BEGIN not in dev.commands


@pytest.mark.parametrize("stub", [True, False], ids=["stub", "no-stub"])
def test_reflash_with_and_without_the_stub(bench: Bench, cli: Callable[..., Result],
                                           tmp_path: Path, stub: bool) -> None:
    """Provision, then `flash` a new app (key re-derived from the MAC the chip reports, MD5
    read back), then again: up to date. Half the runs through the ROM loader only."""
    efuse, table = tmp_path / "chip.efuse", tmp_path / "pt.bin"
    table.write_bytes(build(default_layout()))
    no_stub = [] if stub else ["--no-stub"]
    with _double("esp32s3", efuse) as dev:
        r = _provision(bench, "esp32s3", dev.port, *no_stub)  # the bench writes the table
    assert r.code == 0, r.output
    new = _signed_app(bench, tmp_path, "app-new", secure_version=0)
    for expected in ("flashed", "up-to-date"):
        with _double("esp32s3", efuse) as again:
            again.flash[:] = dev.flash
            r = run_cli("--json", "--policy", bench.policy, "flash", "--chip", "esp32s3",
                        "--port", again.port, "--image", f"0x10000={new}", *no_stub)
        assert r.code == 0, r.output
        assert json.loads(r.out)[0]["result"] == expected
        assert again.stub is stub and json.loads(r.out)[0]["verified"] is True
        dev = again
    data = new.read_bytes()
    key = bench.spec_key(MACS["esp32s3"], "XTS_AES_128_KEY")
    region = bytes(dev.flash[0x10000:0x10000 + len(data) + (-len(data) % 16)])
    assert _decrypt(key, region, 0x10000)[:len(data)] == data


def test_cable_pulled_mid_write_on_the_rom_loader_then_rerun(
        bench: Bench, cli: Callable[..., Result], tmp_path: Path) -> None:
    efuse = tmp_path / "chip.efuse"
    with _double("esp32", efuse, drop_after_flash_blocks=5) as dev:
        r = _provision(bench, "esp32", dev.port, "--no-stub")
    assert dev.dropped and r.code == 7, r.output
    assert "re-run" in r.err and "Traceback" not in r.err
    with _double("esp32", efuse) as replugged:
        replugged.flash[:] = dev.flash
        r = _provision(bench, "esp32", replugged.port, "--no-stub")
    assert r.code == 0, r.output
    check_provisioned(bench, "esp32", efuse_summary("esp32", efuse), bytes(replugged.flash),
                      MACS["esp32"], tmp_path)


def test_rollback_below_the_chips_secure_version_is_refused(
        bench: Bench, cli: Callable[..., Result], tmp_path: Path) -> None:
    """Anti-rollback where the chip can be read: its SECURE_VERSION eFuse (bits set) is the
    floor; an app with a lower secure_version is refused before anything is written."""
    from espefuse import init_commands

    table = tmp_path / "pt.bin"
    table.write_bytes(build(default_layout()))
    efuse, flash = bench.new_chip(tmp_path, "esp32s3")
    r = bench.provision("esp32s3", efuse, flash)  # the bench's images hold this table
    assert r.code == 0, r.output
    with contextlib.redirect_stdout(io.StringIO()):
        chip = init_commands(chip="esp32s3", virt=True, virt_efuse_file=str(efuse),
                             do_not_confirm=True)
        chip.burn_efuse({"SECURE_VERSION": "7"})  # three bits: the chip is at version 3
    old = _signed_app(bench, tmp_path, "app-sv2", secure_version=2)
    current = _signed_app(bench, tmp_path, "app-sv3", secure_version=3)
    before = flash.read_bytes()
    args = ["--policy", bench.policy, "flash", "--chip", "esp32s3", "--virtual-efuses", efuse,
            "--virtual-flash", flash, "--image"]
    r = run_cli(*args, f"0x10000={old}")
    assert r.code == 5, r.output
    assert "secure_version 2" in r.err and "SECURE_VERSION" in r.err
    assert flash.read_bytes() == before
    r = run_cli(*args, f"0x10000={current}")
    assert r.code == 0, r.output
