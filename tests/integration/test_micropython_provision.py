"""Provisioning a MicroPython product: the table decides every address, the app image goes to
`romfs` and a formatted LittleFS to `vfs`, both encrypted for the device.

Read back with independent tools only: the device key re-derived by the spec text, espsecure's
decrypt, littlefs-python on the decrypted partition (unwritten blocks included, as the chip's
flash-encryption engine would present them), mpremote's ROMFS writer for the app's payload.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from mpremote.romfs import VfsRomWriter
from test_provision import (
    BAD_INPUT,
    MACS,
    REFUSED,
    Bench,
    espsecure_decrypt,
    make_bench,
    snapshot,
)

from conftest import TOKEN_LABEL, USER_PIN, Result, run_cli
from hsmflash.formats import partitions
from hsmflash.formats.appimage import build_unsigned, sign_app_image

CHIP = "esp32s3"
TEMPLATE = partitions.micropython_template()
ROMFS = partitions.find(TEMPLATE, "romfs")
VFS = partitions.find(TEMPLATE, "vfs")
NVS_KEYS = partitions.find(TEMPLATE, "nvs_keys")
assert ROMFS and VFS and NVS_KEYS


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Bench:
    return make_bench(tmp_path_factory.mktemp("mpbench"))


def sign_app(bench: Bench, content: bytes, key: str) -> bytes:
    """Sign an app image with a token key, through the key-use choke point."""
    from hsmflash.keyuse import Station
    from hsmflash.policy import load_policy
    from hsmflash.token.session import TokenConfig

    cfg = TokenConfig(token_label=TOKEN_LABEL, pin_handler=lambda _p: USER_PIN)
    with Station.open(cfg, load_policy(bench.policy), bench.audit_log) as st:
        token_key = st.key(key)
        with st.use("app.sign", token_key) as use:
            return sign_app_image(content, use.signer())


@pytest.fixture(scope="module")
def app_image(bench: Bench) -> Path:
    writer = VfsRomWriter()
    writer.mkfile("main.py", b"print('hello from romfs')\n")
    content = build_unsigned(bytes(writer.finalise()), app_version=3, mpy_version=6)
    path = bench.dir / "app.img"
    path.write_bytes(sign_app(bench, content, f"{bench.uniq}-sb-release"))
    return path


def table_file(tmp: Path, parts: list[partitions.Partition], name: str = "table.bin") -> Path:
    path = tmp / name
    path.write_bytes(partitions.build(parts))
    return path


def images_with(bench: Bench, table: Path) -> list[str]:
    """The bench's signed bootloader and app, with `table` at 0x8000."""
    args = []
    for img in bench.images[CHIP]:
        path = table if img.address == partitions.TABLE_ADDRESS else img.path
        args += ["--image", f"{img.address:#x}={path}"]
    return args


def test_romfs_and_vfs_are_written_encrypted_where_the_table_says(
        bench: Bench, cli: Callable[..., Result], tmp_path: Path, app_image: Path) -> None:
    from hsmflash.formats.vfs import BLOCK_SIZE, littlefs

    files = tmp_path / "files"
    (files / "cfg").mkdir(parents=True)
    (files / "cfg" / "settings.json").write_text('{"interval": 60}')
    (files / "boot.txt").write_bytes(b"\xff" * 5000)  # a block of 0xFF must still be written
    efuse, flash = bench.new_chip(tmp_path, CHIP)
    table = table_file(tmp_path, TEMPLATE)
    r = bench.provision(CHIP, efuse, flash, "--app", app_image, "--vfs-dir", files,
                        images=images_with(bench, table))
    assert r.code == 0, r.output
    data = flash.read_bytes()
    key = bench.spec_key(MACS[CHIP], "XTS_AES_128_KEY")

    # romfs: ciphertext in flash, the signed app image after decryption
    app = app_image.read_bytes()
    stored = data[ROMFS.offset:ROMFS.offset + len(app)]
    assert stored != app and b"hello from romfs" not in data
    assert espsecure_decrypt(key, stored, ROMFS.offset, xts=True) == app

    # vfs: the whole partition as the chip reads it (unwritten, erased blocks decrypt to noise)
    raw = data[VFS.offset:VFS.offset + VFS.size]
    assert b"interval" not in raw
    plain = bytearray(espsecure_decrypt(key, raw, VFS.offset, xts=True))
    erased = [i for i in range(VFS.size // BLOCK_SIZE)
              if raw[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE] == b"\xff" * BLOCK_SIZE]
    assert erased, "only the blocks in use are written"
    noise = plain[erased[0] * BLOCK_SIZE:(erased[0] + 1) * BLOCK_SIZE]
    assert noise != b"\xff" * BLOCK_SIZE  # no erased-looking flash for LittleFS to rely on
    fs, _ctx = littlefs(plain, block_count=VFS.size // BLOCK_SIZE)
    with fs.open("cfg/settings.json", "r") as f:
        assert f.read() == '{"interval": 60}'
    with fs.open("boot.txt", "rb") as f:
        assert f.read() == b"\xff" * 5000
    big = bytes(range(256)) * 400  # spans allocations into noise blocks
    with fs.open("new.bin", "wb") as f:
        f.write(big)
    fs.unmount()
    fs2, _ = littlefs(plain, block_count=VFS.size // BLOCK_SIZE)
    with fs2.open("new.bin", "rb") as f:
        assert f.read() == big
    assert sorted(fs2.listdir("/")) == ["boot.txt", "cfg", "new.bin"]

    # credentials went to the table's nvs_keys (0xE000), and MicroPython's phy_init is untouched
    assert data[NVS_KEYS.offset:NVS_KEYS.offset + 0x1000] != b"\xff" * 0x1000
    assert data[0xF000:0x10000] == b"\xff" * 0x1000


def _refused(bench: Bench, tmp: Path, code: int, needle: str, *extra: str | Path,
             table: Path) -> None:
    efuse, flash = bench.new_chip(tmp, CHIP)
    before = snapshot(efuse, flash)
    r = bench.provision(CHIP, efuse, flash, *extra, images=images_with(bench, table))
    assert r.code == code, r.output
    assert needle in r.err and len(r.err.strip().splitlines()) == 1, r.err
    assert snapshot(efuse, flash) == before, "something was burned or written"


def test_app_without_a_romfs_partition_is_refused(bench: Bench, cli: Callable[..., Result],
                                                  tmp_path: Path, app_image: Path) -> None:
    table = table_file(tmp_path, partitions.default_layout())
    _refused(bench, tmp_path, BAD_INPUT, "no romfs partition", "--app", app_image, table=table)


def test_app_larger_than_its_partition_is_refused(bench: Bench, cli: Callable[..., Result],
                                                  tmp_path: Path, app_image: Path) -> None:
    small = [p if p.label != "romfs" else partitions.Partition(
        "romfs", p.type, p.subtype, p.offset, 0x1000, True) for p in TEMPLATE]
    table = table_file(tmp_path, small)
    _refused(bench, tmp_path, BAD_INPUT, "larger than the romfs partition", "--app", app_image,
             table=table)


def test_table_without_encrypted_flags_is_refused(bench: Bench, cli: Callable[..., Result],
                                                  tmp_path: Path, app_image: Path) -> None:
    plain = [partitions.Partition(p.label, p.type, p.subtype, p.offset, p.size, False)
             for p in TEMPLATE]
    _refused(bench, tmp_path, REFUSED, "lacks the `encrypted` flag", "--app", app_image,
             table=table_file(tmp_path, plain))


def test_app_signed_by_a_key_outside_the_policy_is_refused(
        bench: Bench, cli: Callable[..., Result], tmp_path: Path, app_image: Path) -> None:
    r = run_cli("keys", "generate", f"{bench.uniq}-stranger", "--type", "rsa-3072")
    assert r.code == 0, r.output
    content = app_image.read_bytes()[:-0x1000]
    other = tmp_path / "other.img"
    other.write_bytes(sign_app(bench, content, f"{bench.uniq}-stranger"))
    _refused(bench, tmp_path, REFUSED, "not signed by a key of policy", "--app", other,
             table=table_file(tmp_path, TEMPLATE))


def test_credentials_without_a_table_are_refused(bench: Bench, cli: Callable[..., Result],
                                                 tmp_path: Path) -> None:
    efuse, flash = bench.new_chip(tmp_path, CHIP)
    before = snapshot(efuse, flash)
    args = [a for img in bench.images[CHIP] if img.address != partitions.TABLE_ADDRESS
            for a in ("--image", f"{img.address:#x}={img.path}")]
    r = bench.provision(CHIP, efuse, flash, images=args)
    assert r.code == BAD_INPUT and "0x8000=TABLE" in r.err, r.output
    assert snapshot(efuse, flash) == before


def test_provisioned_romfs_boots_in_micropython_and_reflash_takes_the_devices_table(
        bench: Bench, cli: Callable[..., Result], tmp_path: Path) -> None:
    """`app build` -> provision -> the romfs partition as the chip decrypts it, whole (noise
    after the image), boots through the boot module in a real MicroPython; `flash --app`
    writes a new version at the address of the device's own table."""
    from mpwasm import copy_bootcode, run_micropython, stage

    key = f"{bench.uniq}-sb-release"
    src = tmp_path / "src"
    src.mkdir()
    (src / "main.py").write_text("import meter\nprint('APP RUNNING', meter.VERSION)\n")
    (src / "meter.py").write_text("VERSION = 'v1'\n")
    app1 = tmp_path / "app1.img"
    r = bench.cli("--policy", bench.policy, "app", "build", src, "-o", app1, "--key", key,
                  "--app-version", "1")
    assert r.code == 0, r.output
    efuse, flash = bench.new_chip(tmp_path, CHIP)
    r = bench.provision(CHIP, efuse, flash, "--app", app1,
                        images=images_with(bench, table_file(tmp_path, TEMPLATE)))
    assert r.code == 0, r.output
    device_key = bench.spec_key(MACS[CHIP], "XTS_AES_128_KEY")

    def romfs_as_the_chip_reads_it() -> bytes:
        raw = flash.read_bytes()[ROMFS.offset:ROMFS.offset + ROMFS.size]
        return espsecure_decrypt(device_key, raw, ROMFS.offset, xts=True)

    boot_dir = tmp_path / "boot"
    r = bench.cli("--policy", bench.policy, "app", "bootcode", "--key", key, "-o", boot_dir,
                  "--min-version", "1")
    assert r.code == 0, r.output
    guest = tmp_path / "guest"
    copy_bootcode(boot_dir, guest)
    stage(guest, {"romfs.bin": romfs_as_the_chip_reads_it()})
    out = run_micropython("import hsmboot_key as k\n"
                          "hsmboot.boot(BytesPartition('/input/romfs.bin'), k.N, k.E, "
                          "k.MIN_VERSION)\n", guest)
    assert "APP RUNNING v1" in out, out

    # field update: the new app goes where the device's table puts romfs
    (src / "meter.py").write_text("VERSION = 'v2'\n")
    app2 = tmp_path / "app2.img"
    assert bench.cli("--policy", bench.policy, "app", "build", src, "-o", app2, "--key", key,
                     "--app-version", "2").code == 0
    r = bench.cli("--policy", bench.policy, "flash", "--chip", CHIP, "--virtual-efuses", efuse,
                  "--virtual-flash", flash, "--app", app2)
    assert r.code == 0, r.output
    plain = romfs_as_the_chip_reads_it()
    assert plain.startswith(app2.read_bytes())
    stage(guest, {"romfs.bin": plain})
    out = run_micropython("import hsmboot_key as k\n"
                          "hsmboot.boot(BytesPartition('/input/romfs.bin'), k.N, k.E, "
                          "k.MIN_VERSION)\n", guest)
    assert "APP RUNNING v2" in out, out
