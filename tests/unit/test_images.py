"""inspect_image on real esptool-built images: what it accepts, what it reports, what it refuses."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import espsecure
import esptool.cmds
import pytest
from esptool.bin_image import ESP32FirmwareImage, ImageSegment, LoadFirmwareImage
from esptool.targets import CHIP_DEFS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ helpers

from hsmflash.chips import CHIPS
from hsmflash.errors import InputError
from hsmflash.formats.images import esp_checksum, inspect_image
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


# -- esptool's parser as the oracle -------------------------------------------------------------
# inspect_image re-states esptool's image-parser rules (importing esptool costs ~100 ms per
# signature). These tests hold it to esptool's LoadFirmwareImage: on every chip's app and
# bootloader, and on mutated images, inspect_image accepts exactly what esptool's parser
# accepts with a valid checksum, a valid appended SHA-256 and the expected chip id, and reports
# the same segments, entry point and kind.

ORACLE_CHIPS = sorted(CHIPS)
KINDS = ["app", "bootloader", "app without SHA-256"]


def _without_digest(data: bytes) -> bytes:
    """The image as `esptool elf2image --dont-append-digest` would write it."""
    return data[:23] + b"\x00" + data[24:-32]


_BASES = {(chip, kind): (build_app(chip, 6 * 1024, seed=5) if kind == "app"
                         else _without_digest(build_app(chip, 5 * 1024, seed=6))
                         if kind == "app without SHA-256"
                         else build_bootloader(chip, 3 * 1024, seed=5))
          for chip in ORACLE_CHIPS for kind in KINDS}


def _esptool_verdict(data: bytes, chip: str) -> tuple[int, int, str] | None:
    """(segments, entry, kind) if esptool's parser takes the image and its own checksum and
    digest fields agree, else None."""
    try:
        image = LoadFirmwareImage(chip, data)
        checksum_ok = image.checksum == image.calculate_checksum()
    except Exception:  # any failure of esptool's parser is a refusal
        return None
    if not checksum_ok or image.chip_id != CHIP_DEFS[chip].IMAGE_CHIP_ID:
        return None
    if image.append_digest and image.stored_digest != image.calc_digest:
        return None
    kind = "app" if any(image.is_flash_addr(s.addr) for s in image.segments) else "bootloader"
    return len(image.segments), image.entrypoint, kind


def _ours(data: bytes, chip: str) -> tuple[int, int, str] | None:
    try:
        info = inspect_image(data, CHIPS[chip], "img.bin")
    except InputError as e:
        assert str(e).startswith("img.bin: ")  # every refusal names the file
        return None
    return info.segments, info.entry, info.kind


@pytest.mark.parametrize("chip", ORACLE_CHIPS)
@pytest.mark.parametrize("kind", KINDS)
def test_unmodified_images_read_as_esptool_reads_them(chip: str, kind: str) -> None:
    data = _BASES[chip, kind]
    verdict = _esptool_verdict(data, chip)
    assert verdict is not None and verdict[2] == kind.split()[0]
    assert _ours(data, chip) == verdict
    assert inspect_image(data, CHIPS[chip]).has_sha256_digest == (kind != "app without SHA-256")


@pytest.mark.parametrize("flag", [2, 0x80, 0xFF])
def test_hash_appended_flag_other_than_0_or_1_is_refused(flag: int) -> None:
    data = bytearray(_BASES["esp32c3", "app without SHA-256"])
    data[23] = flag
    data += hashlib.sha256(data).digest()  # a digest that matches, as if the flag were 1
    assert _esptool_verdict(bytes(data), "esp32c3") is None
    with pytest.raises(InputError, match=rf"hash-appended flag is {flag:#04x}, not 0 or 1"):
        inspect_image(bytes(data), CHIPS["esp32c3"], "app.bin")


@st.composite
def _mutated(draw: st.DrawFn) -> tuple[str, bytes]:
    chip = draw(st.sampled_from(ORACLE_CHIPS))
    data = bytearray(_BASES[chip, draw(st.sampled_from(KINDS))])
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["header", "segment-header", "byte", "truncate", "append",
                                   "count"]))
        if op == "header" and len(data) > 23:  # magic, count, chip id, hash flag, any other
            at = draw(st.one_of(st.sampled_from([0, 1, 12, 13, 23]), st.integers(0, 23)))
            data[at] = draw(st.one_of(st.sampled_from([0, 1, 2, 0xE9, 0xFF]),
                                      st.integers(0, 255)))
        elif op == "segment-header" and len(data) > 32:  # first segment's address and length
            data[draw(st.integers(24, 31))] = draw(st.integers(0, 255))
        elif op == "byte" and data:
            data[draw(st.integers(0, len(data) - 1))] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del data[draw(st.integers(0, len(data))):]
        elif op == "append":
            data += draw(st.binary(min_size=1, max_size=64))
        elif op == "count" and len(data) > 1:
            data[1] = draw(st.integers(0, 20))
    return chip, bytes(data)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=_mutated())
def test_mutated_images_are_judged_as_esptool_judges_them(case: tuple[str, bytes]) -> None:
    chip, data = case
    assert _ours(data, chip) == _esptool_verdict(data, chip)


def test_seventeen_segments_are_refused_as_esptool_refuses_them() -> None:
    data = bytearray(_BASES["esp32s3", "app"])
    data[1] = 17
    assert _esptool_verdict(bytes(data) + bytes(200), "esp32s3") is None
    with pytest.raises(InputError, match=r"17 segments; an ESP image has at most 16"):
        inspect_image(bytes(data) + bytes(200), CHIPS["esp32s3"], "app.bin")


@settings(max_examples=60, deadline=None)
@given(segments=st.lists(st.binary(min_size=0, max_size=70_000), max_size=4))
def test_checksum_is_esptools(segments: list[bytes]) -> None:
    image = ESP32FirmwareImage()
    image.segments = [ImageSegment(0x3FC88000 + i * 0x20000, data)
                      for i, data in enumerate(segments)]
    assert esp_checksum(s.data for s in image.segments) == image.calculate_checksum()
