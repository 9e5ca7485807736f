"""Test doubles at hsmflash's outer boundaries (never imported by the product itself).

Only the serial boundary is doubled: everything above it is esptool's and espefuse's real code.
"""

from doubles.rom_loader import FakeRomLoader

__all__ = ["FakeRomLoader"]
