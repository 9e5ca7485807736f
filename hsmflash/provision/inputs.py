"""What provisioning is asked to write: images at addresses, the app and filesystem placed by
the partition table written to the device, and where credentials go in that table.

Pure: files are read by the caller (`read`), nothing here touches a token or a device.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hsmflash.errors import InputError, PolicyRefused
from hsmflash.fileio import parse_int
from hsmflash.formats import partitions, vfs
from hsmflash.formats.appimage import parse_app_image
from hsmflash.formats.images import ESP_IMAGE_MAGIC
from hsmflash.policy import Policy

SECTOR = 0x1000


@dataclass(frozen=True)
class ImageSpec:
    """One file to write at one flash address (plaintext, as the user gave it)."""

    address: int  # -1: the start of `partition` in the device's own table (re-flash)
    path: str
    data: bytes = field(repr=False)
    partition: str = ""  # the table partition this image fills (romfs, vfs), if any

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def is_esp_image(self) -> bool:
        return bool(self.data) and self.data[0] == ESP_IMAGE_MAGIC


def parse_image_args(args: list[str], read: Callable[[str], bytes]) -> list[ImageSpec]:
    """Parse `ADDR=FILE` arguments.

    Raises:
        InputError: malformed argument, unaligned address, unreadable file, overlaps.
    """
    specs = []
    for arg in args:
        addr_text, sep, path = arg.partition("=")
        if not sep or not path:
            raise InputError(f"--image {arg!r}: expected ADDR=FILE, e.g. 0x10000=app.bin")
        address = parse_int(addr_text, f"--image {arg!r}: address")
        if address % SECTOR:
            raise InputError(f"--image {arg!r}: address {address:#x} is not 4 KiB aligned")
        data = read(path)
        if not data:
            raise InputError(f"image {path!r} is empty")
        specs.append(ImageSpec(address, path, data))
    return _in_order(specs)


def _in_order(images: list[ImageSpec]) -> list[ImageSpec]:
    """The images by address.

    Raises:
        InputError: two of them overlap.
    """
    images = sorted(images, key=lambda s: s.address)
    for a, b in itertools.pairwise(images):
        if a.address + len(a.data) > b.address:
            raise InputError(f"images {a.path!r} at {a.address:#x} and {b.path!r} at "
                             f"{b.address:#x} overlap")
    return images


def table_of(images: list[ImageSpec]) -> tuple[ImageSpec, list[partitions.Partition]] | None:
    """The partition table the images write to the device (the image at 0x8000), parsed.

    Raises:
        InputError: the image at 0x8000 is not a partition table.
    """
    spec = next((i for i in images if i.address == partitions.TABLE_ADDRESS), None)
    if spec is None:
        return None
    return spec, partitions.parse(spec.data, f"partition table {spec.path!r}")


def add_partition_images(images: list[ImageSpec], *, app: tuple[str, bytes] | None = None,
                         vfs_dir: Path | None = None) -> list[ImageSpec]:
    """Place the app image at the `romfs` partition and a formatted LittleFS (the blocks in
    use, from `vfs_dir` if given) at the `vfs` partition of the table the images write.

    Every address comes from that table, never from a default.

    Raises:
        InputError: no table among the images, no romfs/vfs partition, an app image that is
            not one or is larger than its partition, files that do not fit the vfs.
    """
    found = table_of(images)
    if found is None:
        if app is not None or vfs_dir is not None:
            raise InputError("--app and --vfs-dir go to partitions of the table written to the "
                             "device: give it with --image 0x8000=TABLE.bin")
        return images
    table_spec, table = found
    out = list(images)
    if app is not None:
        path, data = app
        romfs = partitions.find_romfs(table)
        if romfs is None:
            raise InputError(f"partition table {table_spec.path!r} has no romfs partition "
                             "(data, subtype 0x8f) for the app image")
        parse_app_image(data, path)
        if len(data) > romfs.size:
            raise InputError(f"app image {path!r} is {len(data)} bytes, larger than the romfs "
                             f"partition ({romfs.size} bytes at {romfs.offset:#x})")
        out.append(ImageSpec(romfs.offset, path, data, "romfs"))
    vfs_part = partitions.find(table, "vfs")
    if vfs_dir is not None and vfs_part is None:
        raise InputError(f"--vfs-dir: partition table {table_spec.path!r} has no vfs partition")
    if vfs_part is not None and vfs_part.type == partitions.TYPE_DATA:
        image = vfs.build(vfs_part.size, vfs_dir)
        what = f"vfs (LittleFS{', ' + str(vfs_dir) if vfs_dir else ''})"
        for offset, data in image.regions():
            out.append(ImageSpec(vfs_part.offset + offset, f"{what} +{offset:#x}", data, "vfs"))
    return _in_order(out)


@dataclass(frozen=True)
class CredentialPlacement:
    """Where provisioning writes a device's credentials: from the table, never defaults."""

    nvs_address: int
    nvs_size: int
    nvs_keys_address: int | None  # None: NVS keys from an HMAC_UP eFuse key (no nvs_keys)


def credentials_asked(policy: Policy) -> bool:
    """Whether provisioning writes per-device credentials under this policy."""
    cred = policy.credentials
    return cred is not None and (cred.provision or cred.nvs_address is not None
                                 or cred.nvs_keys_address is not None)


def credential_placement(policy: Policy, found: tuple[ImageSpec, list[partitions.Partition]]
                         | None, *, hmac_nvs: bool = False) -> CredentialPlacement | None:
    """The nvs and nvs_keys partitions of the table written to the device.

    Raises:
        InputError: credentials are asked for but no table is written, or the policy's
            (legacy) addresses disagree with the table.
        PolicyRefused: the table lacks an nvs or an encrypted nvs_keys partition.
    """
    if not credentials_asked(policy):
        return None
    cred = policy.credentials
    assert cred is not None  # noqa: S101 - credentials_asked checked
    if found is None:
        raise InputError(f"policy {policy.name!r} writes credentials into the device's nvs and "
                         "nvs_keys partitions: give the partition table written to the device "
                         "with --image 0x8000=TABLE.bin (addresses never come from defaults)")
    spec, table = found
    nvs, keys = partitions.find_nvs(table), partitions.find_nvs_keys(table)
    if hmac_nvs and nvs is not None:  # the chip derives its NVS keys: no nvs_keys partition
        if cred.nvs_address is not None and cred.nvs_address != nvs.offset:
            raise InputError(f"policy {policy.name!r}: credentials.nvs_address "
                             f"{cred.nvs_address:#x} disagrees with partition table "
                             f"{spec.path!r} ({nvs.offset:#x}); the table decides: drop the "
                             "address from the policy")
        return CredentialPlacement(nvs.offset, nvs.size, None)
    if nvs is None or keys is None or not keys.encrypted:
        problems = partitions.protection_problems(table, credentials=True)
        raise PolicyRefused(f"partition table {spec.path!r}: {problems[0]}")
    for what, want, got in (("nvs_address", cred.nvs_address, nvs.offset),
                            ("nvs_keys_address", cred.nvs_keys_address, keys.offset)):
        if want is not None and want != got:
            raise InputError(f"policy {policy.name!r}: credentials.{what} {want:#x} disagrees "
                             f"with partition table {spec.path!r} ({got:#x}); the table "
                             "decides: drop the address from the policy")
    return CredentialPlacement(nvs.offset, nvs.size, keys.offset)


