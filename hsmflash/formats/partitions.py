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
                               subtype, offset, size, bool(flags & FLAG_ENCRYPTED)))
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
                    p.label.encode("ascii")[:16].ljust(16, b"\x00"),
                    FLAG_ENCRYPTED if p.encrypted_flag else 0)
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


# ---------------------------------------------------------------------------------------
# ESP-IDF CSV tables, protection rules, the MicroPython template (issue 13)
# ---------------------------------------------------------------------------------------

SUBTYPE_ROMFS = 0x8F  # MicroPython's ROMFS partition (ports/esp32: `romfs, data, 0x8f`)
SUBTYPE_FAT = 0x81
FLAG_ENCRYPTED = 0x1  # flags bit 0
DATA_ALIGN = 0x1000

# gen_esp32part.py's names
TYPE_NAMES = {"app": TYPE_APP, "data": TYPE_DATA}
APP_SUBTYPES = {"factory": 0x00, "test": 0x20, **{f"ota_{i}": 0x10 + i for i in range(16)}}
DATA_SUBTYPES = {"ota": 0x00, "phy": 0x01, "nvs": SUBTYPE_NVS, "coredump": 0x03,
                 "nvs_keys": SUBTYPE_NVS_KEYS, "efuse": 0x05, "undefined": 0x06,
                 "esphttpd": 0x80, "fat": SUBTYPE_FAT, "spiffs": 0x82, "littlefs": 0x83}



def _csv_int(text: str, what: str, name: str, lineno: int) -> int:
    t = text.strip().lower()
    mult = 1
    if t.endswith("k"):
        t, mult = t[:-1], 1024
    elif t.endswith("m"):
        t, mult = t[:-1], 1024 * 1024
    try:
        return int(t, 0) * mult
    except ValueError:
        raise InputError(f"{name}: line {lineno}: {what} {text.strip()!r} is not a "
                         "number") from None


def parse_csv(text: str, name: str = "partition table CSV") -> list[Partition]:
    """Parse an ESP-IDF partition CSV (Name, Type, SubType, Offset, Size, Flags).

    Empty offsets follow the previous partition (apps aligned to 64 KiB, data to 4 KiB), as
    gen_esp32part.py places them; sizes take K/M suffixes.

    Raises:
        InputError: a malformed line (named by number), unknown type/subtype/flag, a bad
            alignment, overlapping partitions.
    """
    parts: list[Partition] = []
    cursor = TABLE_ADDRESS + 0x1000
    for lineno, raw_line in enumerate(text.splitlines(), start=1):
        line = raw_line.split("#", 1)[0].strip()
        if not line:
            continue
        cols = [c.strip() for c in line.split(",")]
        cols += [""] * (6 - len(cols))
        if len(cols) > 6 and any(cols[6:]):
            raise InputError(f"{name}: line {lineno}: more than 6 columns")
        label, type_text, sub_text, off_text, size_text, flags_text = cols[:6]
        if not label or not type_text or not sub_text or not size_text:
            raise InputError(f"{name}: line {lineno}: expected Name, Type, SubType, Offset, "
                             "Size[, Flags]")
        if len(label.encode("ascii", "replace")) > 16:
            raise InputError(f"{name}: line {lineno}: label {label!r} is longer than 16 bytes")
        ptype = TYPE_NAMES.get(type_text.lower())
        if ptype is None:
            ptype = _csv_int(type_text, "type", name, lineno)
        names = APP_SUBTYPES if ptype == TYPE_APP else DATA_SUBTYPES
        subtype = names.get(sub_text.lower())
        if subtype is None:
            subtype = _csv_int(sub_text, "subtype", name, lineno)
        if not 0 <= ptype <= 0xFE or not 0 <= subtype <= 0xFE:
            raise InputError(f"{name}: line {lineno}: type/subtype out of range")
        align = APP_ALIGN if ptype == TYPE_APP else DATA_ALIGN
        if off_text:
            offset = _csv_int(off_text, "offset", name, lineno)
        else:
            offset = -(-cursor // align) * align
        size = _csv_int(size_text, "size", name, lineno)
        if offset % align:
            raise InputError(f"{name}: line {lineno}: {label!r} offset {offset:#x} is not "
                             f"aligned to {align:#x}")
        if size <= 0 or size % DATA_ALIGN:
            raise InputError(f"{name}: line {lineno}: {label!r} size {size:#x} is not a "
                             "positive multiple of 4 KiB")
        encrypted = False
        for flag in filter(None, (f.strip().lower() for f in flags_text.split(":"))):
            if flag == "encrypted":
                encrypted = True
            elif flag != "readonly":
                raise InputError(f"{name}: line {lineno}: unknown flag {flag!r}")
        parts.append(Partition(label, ptype, subtype, offset, size, encrypted))
        cursor = offset + size
    if not parts:
        raise InputError(f"{name}: no partitions")
    check_layout(parts, name)
    return parts


def check_layout(parts: list[Partition], name: str) -> None:
    """Refuse overlaps, duplicate labels, and partitions over the table itself.

    Raises:
        InputError: naming the partitions.
    """
    labels = [p.label for p in parts]
    for label in labels:
        if labels.count(label) > 1:
            raise InputError(f"{name}: label {label!r} is used twice")
    ordered = sorted(parts, key=lambda p: p.offset)
    if ordered[0].offset < TABLE_ADDRESS + TABLE_SIZE:
        raise InputError(f"{name}: {ordered[0].label!r} at {ordered[0].offset:#x} overlaps the "
                         f"bootloader or the partition table at {TABLE_ADDRESS:#x}")
    for a, b in itertools.pairwise(ordered):
        if a.offset + a.size > b.offset:
            raise InputError(f"{name}: partitions {a.label!r} and {b.label!r} overlap")


def _type_name(p: Partition) -> tuple[str, str]:
    if p.type == TYPE_APP:
        sub = {v: k for k, v in APP_SUBTYPES.items()}.get(p.subtype, f"{p.subtype:#x}")
        return "app", sub
    if p.type == TYPE_DATA:
        sub = {v: k for k, v in DATA_SUBTYPES.items()}.get(p.subtype, f"{p.subtype:#x}")
        return "data", sub
    return f"{p.type:#x}", f"{p.subtype:#x}"


def to_csv(parts: list[Partition]) -> str:
    """The table as ESP-IDF CSV (explicit offsets), readable by gen_esp32part.py."""
    lines = ["# Name,   Type, SubType, Offset,  Size, Flags"]
    for p in parts:
        ptype, sub = _type_name(p)
        flags = "encrypted" if p.encrypted_flag else ""
        lines.append(f"{p.label + ',':10}{ptype + ',':6}{sub + ',':10}{p.offset:#x}, "
                     f"{p.size:#x}, {flags}".rstrip())
    return "\n".join(lines) + "\n"


def read_table(data: bytes, name: str) -> list[Partition]:
    """A partition table from a file's bytes: the binary format or ESP-IDF CSV.

    Raises:
        InputError: neither format parses.
    """
    if data[:2] in (_MAGIC, _MD5_MAGIC):
        return parse(data, name)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{name}: neither a binary partition table (magic 0xAA50) nor a "
                         "CSV") from None
    return parse_csv(text, name)


def find(parts: list[Partition], label: str) -> Partition | None:
    """The partition with this label, if any."""
    return next((p for p in parts if p.label == label), None)


def find_romfs(parts: list[Partition]) -> Partition | None:
    """MicroPython's ROMFS partition: label `romfs`, else the first data partition 0x8F."""
    return find(parts, "romfs") or next(
        (p for p in parts if p.type == TYPE_DATA and p.subtype == SUBTYPE_ROMFS), None)


def find_nvs_keys(parts: list[Partition]) -> Partition | None:
    """The NVS-keys partition (type data, subtype nvs_keys), by subtype as ESP-IDF finds it."""
    return next((p for p in parts if p.type == TYPE_DATA and p.subtype == SUBTYPE_NVS_KEYS),
                None)


def find_nvs(parts: list[Partition]) -> Partition | None:
    """The default NVS partition: label `nvs` (ESP-IDF's nvs_flash_init), type data/nvs."""
    p = find(parts, "nvs")
    return p if p is not None and p.type == TYPE_DATA and p.subtype == SUBTYPE_NVS else None


def protection_problems(parts: list[Partition], *, credentials: bool = False) -> list[str]:
    """Why this table would leave code or secrets readable in flash (empty: none).

    `romfs`, `vfs` and `nvs_keys` must carry the `encrypted` flag (ESP-IDF encrypts app
    partitions whatever their flag, other data partitions only when flagged); with
    `credentials`, an `nvs` and an `nvs_keys` partition must exist.
    """
    problems = []
    romfs = find_romfs(parts)
    candidates = [("romfs", romfs), ("vfs", find(parts, "vfs")),
                  ("nvs_keys", find_nvs_keys(parts))]
    for what, p in candidates:
        if p is not None and not p.encrypted:
            problems.append(f"{what} partition {p.label!r} at {p.offset:#x} lacks the "
                            "`encrypted` flag: its contents would sit in flash as plaintext")
    if credentials:
        if find_nvs_keys(parts) is None:
            problems.append("no nvs_keys partition (data, nvs_keys, encrypted): credentials "
                            "need one to hold the NVS encryption keys")
        if find_nvs(parts) is None:
            problems.append("no nvs partition (label `nvs`, data, nvs): credentials need one")
    return problems


# flash size (bytes) -> (factory app size, romfs size); the rest after them is `vfs`
_TEMPLATE_SIZES = {
    2 * 1024 * 1024: (0x160000, 0x40000),
    4 * 1024 * 1024: (0x1D0000, 0x80000),
    8 * 1024 * 1024: (0x200000, 0x100000),
    16 * 1024 * 1024: (0x200000, 0x200000),
    32 * 1024 * 1024: (0x200000, 0x200000),
}


def micropython_template(flash_size: int = 4 * 1024 * 1024) -> list[Partition]:
    """A MicroPython table that protects the app: upstream's 4MiB-romfs layout with an
    encrypted `nvs_keys` next to `nvs`, and `romfs` and `vfs` (LittleFS) encrypted.

    Upstream ports/esp32 keeps `nvs` at 0x9000 and `phy_init` at 0xF000; `nvs` gives up
    4 KiB for `nvs_keys` so `phy_init` stays where MicroPython's tables have it.

    Raises:
        InputError: a flash size without a template.
    """
    sizes = _TEMPLATE_SIZES.get(flash_size)
    if sizes is None:
        raise InputError(f"no MicroPython template for {flash_size // (1024 * 1024)} MiB flash "
                         f"(have: {', '.join(f'{s >> 20}MB' for s in _TEMPLATE_SIZES)})")
    app_size, romfs_size = sizes
    romfs_at = 0x10000 + app_size
    vfs_at = romfs_at + romfs_size
    return [
        Partition("nvs", TYPE_DATA, SUBTYPE_NVS, 0x9000, 0x5000, False),
        Partition("nvs_keys", TYPE_DATA, SUBTYPE_NVS_KEYS, 0xE000, 0x1000, True),
        Partition("phy_init", TYPE_DATA, 0x01, 0xF000, 0x1000, False),
        Partition("factory", TYPE_APP, 0x00, 0x10000, app_size, False),
        Partition("romfs", TYPE_DATA, SUBTYPE_ROMFS, romfs_at, romfs_size, True),
        Partition("vfs", TYPE_DATA, SUBTYPE_FAT, vfs_at, flash_size - vfs_at, True),
    ]
