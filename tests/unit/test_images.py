"""inspect_image on real esptool-built images: what it accepts, what it reports, what it refuses."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import espsecure
import esptool.cmds
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ helpers

from hsmflash.chips import CHIPS
from hsmflash.errors import InputError
from hsmflash.images import inspect_image
from imagebuilder import build_app, build_bootloader, build_micropython_app
from softsigner import SoftwareSigner, espsecure_key

CHIP_NAMES = ["esp32", "esp32s3", "esp32c3", "esp32c6"]


@pytest.fixture(scope="module")
def keydir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("keys")


@pytest.fixture(scope="module")
def rsa_key(keydir: Path) -> tuple[Path, SoftwareSigner]:
    path = keydir / "rsa.pem"
    return path, espsecure_key(path, "2", "rsa3072")


@pytest.mark.parametrize("chip", CHIP_NAMES)
def test_app_is_reported_as_esptool_sees_it(chip: str, capsys: pytest.CaptureFixture[str]) -> None:
    data = build_app(chip, 100 * 1024, seed=1)
    info = inspect_image(data, CHIPS[chip], "app.bin")

    esptool.cmds.image_info(data, chip=chip)  # the reference parser accepts it too
    out = capsys.readouterr().out
    assert "Checksum:" in out and "(valid)" in out
    assert "Application Information" in out
    assert info.kind == "app"
    assert info.chip == chip
    assert info.size == len(data) == info.image_size
    assert info.sha256 == hashlib.sha256(data).hexdigest()
    assert info.has_sha256_digest
    assert not info.sbv2_signed and not info.sbv1_signed


@pytest.mark.parametrize("chip", CHIP_NAMES)
def test_bootloader_is_reported_as_bootloader(chip: str) -> None:
    data = build_bootloader(chip)
    info = inspect_image(data, CHIPS[chip], "bootloader.bin")
    assert info.kind == "bootloader"
    assert not info.sbv2_signed


def test_micropython_frozen_app_is_a_valid_image() -> None:
    data, mpy = build_micropython_app("esp32")
    assert mpy.startswith(b"M")  # a real .mpy from mpy-cross
    assert mpy in data
    assert inspect_image(data, CHIPS["esp32"]).kind == "app"


def test_espsecure_signatures_are_reported(
    rsa_key: tuple[Path, SoftwareSigner], tmp_path: Path
) -> None:
    key_path, _ = rsa_key
    image = tmp_path / "app.bin"
    image.write_bytes(build_app("esp32s3", seed=2))
    signed = tmp_path / "app-signed.bin"
    with image.open("rb") as data, key_path.open("rb") as key:
        espsecure.sign_data("2", [key], str(signed), False, False, None, [], [], data)

    info = inspect_image(signed.read_bytes(), CHIPS["esp32s3"], "app-signed.bin")

    assert info.sbv2_signed
    assert [b.algorithm for b in info.sbv2_blocks] == ["rsa-3072"]
    assert info.size % 4096 == 0 and info.image_size < info.size


def test_espsecure_v1_signature_is_reported(keydir: Path, tmp_path: Path) -> None:
    key_path = keydir / "v1.pem"
    espsecure_key(key_path, "1", None)
    image = tmp_path / "app.bin"
    image.write_bytes(build_app("esp32", seed=3))
    signed = tmp_path / "app-signed.bin"
    with image.open("rb") as data, key_path.open("rb") as key:
        espsecure.sign_data("1", [key], str(signed), False, False, None, [], [], data)

    info = inspect_image(signed.read_bytes(), CHIPS["esp32"])

    assert info.sbv1_signed and not info.sbv2_signed


def test_not_an_image_names_the_file_and_magic() -> None:
    with pytest.raises(InputError, match=r"firmware\.elf: not an ESP image \(magic 0x7f != 0xE9\)"):
        inspect_image(b"\x7fELF" + bytes(100), CHIPS["esp32"], "firmware.elf")
    with pytest.raises(InputError, match=r"empty"):
        inspect_image(b"", CHIPS["esp32"], "empty.bin")


def test_wrong_chip_names_both_chips() -> None:
    data = build_app("esp32c3")
    with pytest.raises(InputError, match=r"app\.bin: image is for esp32c3, not esp32s3") as e:
        inspect_image(data, CHIPS["esp32s3"], "app.bin")
    assert e.value.exit_code == 3


_SMALL_APP = build_app("esp32c6", 6 * 1024, seed=4)


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(cut=st.integers(min_value=1, max_value=len(_SMALL_APP) - 1))
def test_any_truncation_is_reported_as_truncated(cut: int) -> None:
    with pytest.raises(InputError, match=r"^app\.bin: truncated: "):
        inspect_image(_SMALL_APP[:cut], CHIPS["esp32c6"], "app.bin")


def test_truncation_inside_a_segment_names_the_segment() -> None:
    # header (24) + segment 0 header (8) + a little of segment 0
    with pytest.raises(InputError, match=r"segment 0 .* runs past end of file"):
        inspect_image(_SMALL_APP[:40], CHIPS["esp32c6"], "app.bin")


@settings(max_examples=100)
@given(position=st.integers(min_value=24 + 8, max_value=len(_SMALL_APP) - 1), bit=st.integers(0, 7))
def test_corrupted_content_is_refused(position: int, bit: int) -> None:
    corrupted = bytearray(_SMALL_APP)
    corrupted[position] ^= 1 << bit
    with pytest.raises(InputError, match=r"app\.bin: "):
        inspect_image(bytes(corrupted), CHIPS["esp32c6"], "app.bin")
