"""ESP-IDF partition tables (the binary format gen_esp32part.py writes at 0x8000).

Each entry is 32 bytes: magic 0x50AA, type, subtype, offset, size, a 16-byte label, flags
(bit 0: encrypted). An MD5 entry (0xEBEB) may follow; 0xFF ends the table. App partitions and
the bootloader/partition-table regions are always flash-encrypted when encryption is on.
"""

from __future__ import annotations

import hashlib
import itertools
import struct
from dataclasses import dataclass

from hsmflash.errors import InputError

TABLE_ADDRESS = 0x8000
TABLE_SIZE = 0xC00
_ENTRY = struct.Struct("<2sBBII16sI")
_MAGIC = b"\xaa\x50"
_MD5_MAGIC = b"\xeb\xeb"
TYPE_APP = 0x00
TYPE_DATA = 0x01
SUBTYPE_NVS = 0x02
SUBTYPE_NVS_KEYS = 0x04


@dataclass(frozen=True)
class Partition:
    label: str
    type: int
    subtype: int
    offset: int
    size: int
    encrypted_flag: bool

    @property
    def encrypted(self) -> bool:
        """What flash encryption covers: app partitions always, others when flagged."""
        return self.type == TYPE_APP or self.encrypted_flag

    def contains(self, address: int, length: int) -> bool:
        return self.offset <= address and address + length <= self.offset + self.size


def parse(data: bytes, name: str = "partition table") -> list[Partition]:
    """Parse a partition table.

    Raises:
        InputError: no valid entries, a bad MD5 entry, or overlapping partitions.
    """
    parts: list[Partition] = []
    for off in range(0, min(len(data), TABLE_SIZE) - _ENTRY.size + 1, _ENTRY.size):
        raw = data[off:off + _ENTRY.size]
        if raw[:2] == _MD5_MAGIC:
            if raw[16:32] != hashlib.md5(data[:off]).digest():  # noqa: S324 - the format's
                raise InputError(f"{name}: MD5 entry does not match the table")
            break
        if raw[:2] != _MAGIC:
            break
        _magic, ptype, subtype, offset, size, label, flags = _ENTRY.unpack(raw)
        parts.append(Partition(label.rstrip(b"\x00").decode("ascii", "replace"), ptype,
                               subtype, offset, size, bool(flags & 1)))
    if not parts:
        raise InputError(f"{name}: no partition entries (magic 0xAA50 not found)")
    ordered = sorted(parts, key=lambda p: p.offset)
    for a, b in itertools.pairwise(ordered):
        if a.offset + a.size > b.offset:
            raise InputError(f"{name}: partitions {a.label!r} and {b.label!r} overlap")
    return parts


def build(parts: list[Partition]) -> bytes:
    """A partition table binary with its MD5 entry, padded with 0xFF to 0xC00 bytes."""
    body = b"".join(
        _ENTRY.pack(_MAGIC, p.type, p.subtype, p.offset, p.size,
                    p.label.encode("ascii")[:16].ljust(16, b"\x00"), int(p.encrypted_flag))
        for p in parts
    )
    body += _MD5_MAGIC + b"\xff" * 14 + hashlib.md5(body).digest()  # noqa: S324
    return body + b"\xff" * (TABLE_SIZE - len(body))


def default_layout() -> list[Partition]:
    """The layout hsmflash's demo and tests use (ESP-IDF's 'single factory app' plus
    nvs_keys), matching policies/dev.toml's credential addresses."""
    return [
        Partition("nvs", TYPE_DATA, SUBTYPE_NVS, 0x9000, 0x6000, False),
        Partition("nvs_keys", TYPE_DATA, SUBTYPE_NVS_KEYS, 0xF000, 0x1000, True),
        Partition("factory", TYPE_APP, 0x00, 0x10000, 0x1F0000, False),
    ]


TABLE_REGION_END = TABLE_ADDRESS + 0x1000  # the table's sector; partitions start after it
APP_ALIGN = 0x10000  # app partitions are mapped by the MMU in 64 KiB pages


def parse_checked(data: bytes, flash_size: int, name: str = "partition table") -> list[Partition]:
    """Parse a partition table that is about to be written (or that a device holds) and
    hold it to what ESP-IDF's bootloader accepts: the 0xAA50 entries, an MD5 row that
    matches, no overlaps, every partition after the table, aligned (apps to 64 KiB, others
    to 4 KiB) and inside the flash.

    Raises:
        InputError: naming the table and the entry at fault.
    """
    if len(data) > 0x1000:
        raise InputError(f"{name}: {len(data)} bytes; a partition table is at most 4096")
    parts = parse(data, name)
    md5_at = len(parts) * _ENTRY.size
    if data[md5_at:md5_at + 2] != _MD5_MAGIC:
        raise InputError(f"{name}: no MD5 row after the {len(parts)} entries "
                         "(gen_esp32part.py writes one; the bootloader checks it)")
    for p in parts:
        align = APP_ALIGN if p.type == TYPE_APP else 0x1000
        if p.size <= 0:
            raise InputError(f"{name}: partition {p.label!r} has size 0")
        if p.offset < TABLE_REGION_END:
            raise InputError(f"{name}: partition {p.label!r} at {p.offset:#x} overlaps the "
                             f"bootloader or the table (partitions start at "
                             f"{TABLE_REGION_END:#x} or later)")
        if p.offset % align:
            raise InputError(f"{name}: partition {p.label!r} at {p.offset:#x} is not "
                             f"{align // 1024} KiB aligned")
        if p.offset + p.size > flash_size:
            raise InputError(f"{name}: partition {p.label!r} ({p.offset:#x}+{p.size:#x}) runs "
                             f"past the end of the {flash_size // 1024} KiB flash")
    return parts
