"""hsmflash's chip table against esptool's own targets: the image chip ids and the flash-mapped
windows that decide app vs bootloader are esptool's numbers, not ours."""

from __future__ import annotations

import pytest
from esptool.targets import CHIP_DEFS

from hsmflash.chips import CHIPS, IMAGE_CHIP_NAMES


@pytest.mark.parametrize("name", sorted(CHIPS))
def test_chip_image_id_and_flash_maps_are_esptools(name: str) -> None:
    chip, rom = CHIPS[name], CHIP_DEFS[name]
    assert chip.image_chip_id == rom.IMAGE_CHIP_ID
    windows = {(rom.IROM_MAP_START, rom.IROM_MAP_END), (rom.DROM_MAP_START, rom.DROM_MAP_END)}
    assert set(chip.flash_maps) == windows


def test_every_image_chip_name_is_esptools() -> None:
    esptool_ids = {rom.IMAGE_CHIP_ID: name for name, rom in CHIP_DEFS.items()
                   if getattr(rom, "IMAGE_CHIP_ID", None) is not None}
    for chip_id, name in IMAGE_CHIP_NAMES.items():
        assert esptool_ids.get(chip_id) == name
    for chip in CHIPS.values():
        assert IMAGE_CHIP_NAMES[chip.image_chip_id] == chip.name
