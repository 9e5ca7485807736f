"""Irreversible eFuse writes (keys, digests, hardening bits) and a read-only state snapshot.

Every write goes through espefuse's own field machinery - `field.save`, `disable_read`,
`disable_write`, `EspEfuses.burn_all` - the calls espefuse's `burn-key`, `burn-efuse`,
`read-protect-efuse` and `write-protect-efuse` commands make, so write-once bits, protection
and coding schemes stay Espressif's. What hsmflash adds:

- an explicit `confirm=True` on every write (never a prompt: espefuse runs `do_not_confirm`);
- a complete check before anything is queued: a request that contradicts what is burned
  (other key, other purpose, bits that would have to be cleared, write-protected fields)
  raises `DeviceError` and burns nothing;
- idempotence, so a re-run after an interruption finishes the job: what is already burned is
  skipped, what is missing is burned, in one `burn_all` per call (espefuse burns key blocks
  first and BLOCK0's protection and enable bits last);
- a read-back check after the burn.

Byte order of keys (`key` is always the key file espsecure takes):
- ESP32 BLOCK1 (flash encryption) and BLOCK2 (Secure Boot V1 key) are burned byte-reversed,
  exactly as `espefuse burn-key flash_encryption|secure_boot_v1 KEYFILE` does, which is the
  pairing Espressif documents with `espsecure encrypt-flash-data/digest-secure-bootloader
  --keyfile KEYFILE`. BLOCK3 and Secure Boot V2 digests are not reversed.
- XTS chips: reversed when espefuse's key purpose table says "Reverse" (the XTS_AES purposes),
  as `espefuse burn-key`. A 64-byte XTS_AES_256_KEY is two `KeyBurn`s: bytes 0-31 with
  XTS_AES_256_KEY_1 and bytes 32-63 with XTS_AES_256_KEY_2 (what espefuse splits it into).
`stored_key_order` converts both ways (it is its own inverse).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hsmflash.device.base import Device, espressif_call
from hsmflash.errors import DeviceError, InputError, UsageError

FieldValue = int | bool | str | bytes

_ESP32_REVERSED_BLOCKS = ("BLOCK1", "BLOCK2")  # espefuse aliases flash_encryption, secure_boot_v1


# ---------------------------------------------------------------------------------------
# Snapshot
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyBlockState:
    """One key block as the chip reads it back.

    `data` is the block in espefuse's order (the bytes `field.save` takes); a read-protected
    block reads as zeros. Never log it.
    """

    name: str
    purpose: str | None  # KEY_PURPOSE_n on XTS chips; None on ESP32 (fixed by block)
    read_protected: bool
    write_protected: bool
    purpose_write_protected: bool
    data: bytes = field(repr=False)

    @property
    def used(self) -> bool:
        """True when anything is burned: data, a purpose other than USER, or protection."""
        return (
            any(self.data)
            or self.purpose not in (None, "USER")
            or self.read_protected
            or self.write_protected
        )


@dataclass(frozen=True)
class EfuseState:
    """A read-only snapshot of a chip's security-relevant eFuses.

    `field(name)` gives any named eFuse's raw value (int, bool or bytes); key blocks are in
    `key_blocks` only.
    """

    chip: str
    key_blocks: Mapping[str, KeyBlockState]
    flash_crypt_cnt: int  # FLASH_CRYPT_CNT (ESP32) or SPI_BOOT_CRYPT_CNT
    flash_crypt_config: int | None  # ESP32 only
    secure_boot_v1: bool  # ESP32 ABS_DONE_0
    secure_boot_v2: bool  # ESP32 ABS_DONE_1, others SECURE_BOOT_EN
    secure_boot_key_revoked: tuple[bool, ...]
    _values: Mapping[str, Any] = field(repr=False)
    _read_protected: frozenset[str] = field(repr=False)
    _write_protected: frozenset[str] = field(repr=False)

    @property
    def flash_encryption_enabled(self) -> bool:
        """An odd number of bits in the crypt counter means flash encryption is on."""
        return bin(self.flash_crypt_cnt).count("1") % 2 == 1

    def field(self, name: str) -> Any:
        """Raw value of eFuse `name` (int, bool or bytes).

        Raises:
            InputError: the chip has no such eFuse (or it is a key block: see `key_blocks`).
        """
        try:
            return self._values[name]
        except KeyError:
            raise InputError(f"eFuse {name!r} is not a field of {self.chip}") from None

    def is_read_protected(self, name: str) -> bool:
        """True when eFuse or block `name` is read-protected."""
        return name in self._read_protected

    def is_write_protected(self, name: str) -> bool:
        """True when eFuse or block `name` is write-protected."""
        return name in self._write_protected


def read_state(device: Device) -> EfuseState:
    """Snapshot the eFuses of `device` as last read (espefuse reads them at open and after burns).

    Raises:
        DeviceError: espefuse could not interpret the eFuses.
    """
    efuses = device.efuses
    chip = device.chip
    with espressif_call(f"reading eFuses of {chip.name}"):
        key_blocks: dict[str, KeyBlockState] = {}
        for name in chip.key_blocks:
            key_blocks[name] = _key_block_state(efuses, name)
        values: dict[str, Any] = {}
        read_protected: set[str] = set()
        write_protected: set[str] = set()
        for e in efuses:
            if not e.is_writeable():
                write_protected.add(e.name)
            if not e.is_readable():
                read_protected.add(e.name)
            if e.efuse_class == "keyblock" or e.is_field_calculated():
                continue
            values[e.name] = e.get_raw()
        if chip.is_esp32_classic:
            crypt_cnt = int(efuses["FLASH_CRYPT_CNT"].get_raw())
            crypt_config: int | None = int(efuses["FLASH_CRYPT_CONFIG"].get_raw())
            sbv1 = bool(efuses["ABS_DONE_0"].get_raw())
            sbv2 = bool(efuses["ABS_DONE_1"].get_raw())
            revoked: tuple[bool, ...] = ()
        else:
            crypt_cnt = int(efuses["SPI_BOOT_CRYPT_CNT"].get_raw())
            crypt_config = None
            sbv1 = False
            sbv2 = bool(efuses["SECURE_BOOT_EN"].get_raw())
            revoked = tuple(
                bool(values[f"SECURE_BOOT_KEY_REVOKE{i}"])
                for i in range(3)
                if f"SECURE_BOOT_KEY_REVOKE{i}" in values
            )
    return EfuseState(
        chip=chip.name,
        key_blocks=key_blocks,
        flash_crypt_cnt=crypt_cnt,
        flash_crypt_config=crypt_config,
        secure_boot_v1=sbv1,
        secure_boot_v2=sbv2,
        secure_boot_key_revoked=revoked,
        _values=values,
        _read_protected=frozenset(read_protected),
        _write_protected=frozenset(write_protected),
    )


def _key_block_state(efuses: Any, name: str) -> KeyBlockState:
    key_field = efuses[name]
    purpose_name = efuses.blocks[key_field.block].key_purpose_name
    purpose_field = efuses[purpose_name] if purpose_name else None
    return KeyBlockState(
        name=name,
        purpose=str(purpose_field.get()) if purpose_field is not None else None,
        read_protected=not key_field.is_readable(),
        write_protected=not key_field.is_writeable(),
        purpose_write_protected=(
            not purpose_field.is_writeable() if purpose_field is not None else False
        ),
        data=bytes(key_field.get_bitstring().bytes[::-1]),
    )


# ---------------------------------------------------------------------------------------
# Burning
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyBurn:
    """One key or digest for one key block. `key` is the key file / digest bytes; never logged.

    `purpose`: XTS chips a KEY_PURPOSE name (XTS_AES_128_KEY, XTS_AES_256_KEY_1/2,
    SECURE_BOOT_DIGESTn, ...); ESP32 None (the block fixes the purpose).
    """

    block: str
    key: bytes = field(repr=False)
    purpose: str | None
    read_protect: bool
    write_protect: bool = True
    digest: bool = False  # an SBv2 public-key digest: never reversed, never read-protected


@dataclass(frozen=True)
class BurnReport:
    """What one call did: eFuses burned, already in place, and key blocks taken on trust.

    `unverified` lists read-protected key blocks with the right purpose whose content cannot be
    compared any more (a re-run after the key was burned); the caller decides if that is enough.
    """

    burned: tuple[str, ...]
    already: tuple[str, ...]
    unverified: tuple[str, ...]

    @property
    def changed(self) -> bool:
        return bool(self.burned)


def stored_key_order(device: Device, block: str, purpose: str | None, key: bytes) -> bytes:
    """Convert between a key file's byte order and the block order espefuse stores (involution).

    Raises:
        InputError: unknown block or purpose for this chip.
    """
    if device.chip.is_esp32_classic:
        _check_block(device, block)
        return key[::-1] if block in _ESP32_REVERSED_BLOCKS else key
    if device.chip.name in HALF_BLOCK_CHIPS:
        _check_block(device, block)
        return key[::-1] if (purpose or "").startswith("XTS_AES_") else key  # espefuse's rule
    purpose_field = _purpose_field(device, block)
    if purpose is None or purpose not in purpose_field.KEY_PURPOSES_NAME:
        raise InputError(f"key purpose {purpose!r} is not one of {device.chip.name}'s")
    return key[::-1] if purpose_field.need_reverse(purpose) else key


def burn_key(
    device: Device,
    block: str,
    key: bytes,
    purpose: str | None,
    read_protect: bool,
    *,
    write_protect: bool = True,
    confirm: bool = False,
) -> BurnReport:
    """Burn a secret key (flash encryption, SBv1 key, HMAC ...) into `block`; see module doc.

    Idempotent: the same key already in place (or read-protected with the same purpose) is
    not burned again; missing purpose or protection bits are added.

    Raises:
        UsageError: `confirm=True` not given.
        InputError: unknown block/purpose, wrong key length, read protection asked for a
            purpose that must stay readable.
        DeviceError: the block holds another key or purpose, is write-protected, or the burn
            did not read back as asked. Nothing is burned when refused.
    """
    return burn(device, keys=[KeyBurn(block, key, purpose, read_protect, write_protect)],
                confirm=confirm)


def burn_key_digest(
    device: Device,
    block: str,
    digest: bytes,
    purpose: str | None,
    *,
    confirm: bool = False,
) -> BurnReport:
    """Burn a Secure Boot V2 public-key digest (32 bytes): write-protected, readable.

    ESP32: `block` BLOCK2, `purpose` None, chip v3.0 or later. XTS chips: a BLOCK_KEYn with
    purpose SECURE_BOOT_DIGESTn.

    Raises:
        UsageError: `confirm=True` not given.
        InputError: unknown block/purpose, digest not 32 bytes.
        DeviceError: wrong chip revision, the block holds something else, or the burn failed.
    """
    if device.chip.is_esp32_classic:
        if block != "BLOCK2":
            raise InputError(f"ESP32 keeps the Secure Boot V2 digest in BLOCK2, not {block}")
        if device.revision.as_int < 300:
            raise DeviceError(
                f"ESP32 {device.revision} has no Secure Boot V2 (needs v3.0 or later)"
            )
    elif purpose is None or not purpose.startswith("SECURE_BOOT_DIGEST"):
        raise InputError(f"digest purpose {purpose!r} is not SECURE_BOOT_DIGESTn")
    if len(digest) != 32:
        raise InputError(f"Secure Boot V2 digest for {block} is {len(digest)} bytes, not 32")
    return burn(
        device,
        keys=[KeyBurn(block, digest, purpose, read_protect=False, write_protect=True, digest=True)],
        confirm=confirm,
    )


def burn_fields(
    device: Device,
    values: Mapping[str, FieldValue],
    *,
    write_protect: Iterable[str] = (),
    read_protect: Iterable[str] = (),
    confirm: bool = False,
) -> BurnReport:
    """Burn hardening bits and counters (`{"SPI_BOOT_CRYPT_CNT": 7, "DIS_PAD_JTAG": True}`).

    A value is the field's final value; bits already set are skipped, and a value that would
    need a burned bit cleared is refused. `write_protect` / `read_protect` name eFuses or
    blocks to protect (skipped when already protected).

    Raises:
        UsageError: `confirm=True` not given.
        InputError: unknown eFuse name or a value that does not fit the field.
        DeviceError: a value contradicts what is burned, the field is write-protected, or the
            burn did not read back. Nothing is burned when refused.
    """
    return burn(
        device,
        fields=values,
        write_protect=write_protect,
        read_protect=read_protect,
        confirm=confirm,
    )


def burn(
    device: Device,
    *,
    keys: Sequence[KeyBurn] = (),
    fields: Mapping[str, FieldValue] | None = None,
    write_protect: Iterable[str] = (),
    read_protect: Iterable[str] = (),
    confirm: bool = False,
) -> BurnReport:
    """Burn keys, field values and protection bits together, in a single espefuse burn.

    The whole request is checked against the chip first; then everything missing is queued and
    burned with one `burn_all` (key blocks first, BLOCK0 protection/enable bits last), then
    read back. See `burn_key` and `burn_fields` for the rules.

    Raises:
        UsageError: `confirm=True` not given.
        InputError: a malformed request.
        DeviceError: the request contradicts the chip, or the burn failed.
    """
    if confirm is not True:
        raise UsageError("burning eFuses is irreversible: pass confirm=True to do it")
    plan = _Plan(device)
    for k in keys:
        plan.add_key(k)
    for name, value in (fields or {}).items():
        plan.add_field(name, value)
    for name in write_protect:
        plan.add_write_protect(name)
    for name in read_protect:
        plan.add_read_protect(name)
    return plan.execute()


# ---------------------------------------------------------------------------------------
# Planning and execution
# ---------------------------------------------------------------------------------------


# chips whose key block is used in halves, without a purpose field (espefuse's burn-key rules)
HALF_BLOCK_CHIPS = ("esp32c2",)
HALF_BLOCK_PURPOSES = {"BLOCK_KEY0_LOW_128": "XTS_AES_128_KEY_DERIVED_FROM_128_EFUSE_BITS",
                       "BLOCK_KEY0_HI_128": "SECURE_BOOT_DIGEST"}


def _check_block(device: Device, block: str) -> None:
    if block not in device.chip.key_blocks:
        raise InputError(
            f"{block!r} is not a key block of {device.chip.name} "
            f"({', '.join(device.chip.key_blocks)})"
        )


def _purpose_field(device: Device, block: str) -> Any:
    _check_block(device, block)
    efuses = device.efuses
    purpose_name = efuses.blocks[efuses[block].block].key_purpose_name
    if purpose_name is None:
        raise InputError(f"block {block} of {device.chip.name} has no key purpose")
    return efuses[purpose_name]


def _field(device: Device, name: str) -> Any:
    try:
        return device.efuses[name]
    except KeyError:
        raise InputError(f"eFuse {name!r} does not exist on {device.chip.name}") from None


@dataclass
class _Plan:
    device: Device
    # (field object, value to save, label) queued in order
    saves: list[tuple[Any, Any, str]] = field(default_factory=list)
    disable_read: list[Any] = field(default_factory=list)
    disable_write: list[Any] = field(default_factory=list)
    # read-back checks after the burn: (label, callable returning True when right)
    checks: list[tuple[str, Any]] = field(default_factory=list)
    burned: list[str] = field(default_factory=list)
    already: list[str] = field(default_factory=list)
    unverified: list[str] = field(default_factory=list)

    # -- keys ----------------------------------------------------------------------------
    def add_key(self, k: KeyBurn) -> None:
        device = self.device
        efuses = device.efuses
        _check_block(device, k.block)
        key_field = efuses[k.block]
        classic = device.chip.is_esp32_classic
        halves = device.chip.name in HALF_BLOCK_CHIPS
        purpose_field = None if classic or halves else _purpose_field(device, k.block)
        if halves:
            # ESP32-C2: no purpose field; the half of BLOCK_KEY0 fixes the purpose
            if k.purpose != HALF_BLOCK_PURPOSES.get(k.block):
                raise InputError(f"{device.chip.name} {k.block} takes "
                                 f"{HALF_BLOCK_PURPOSES.get(k.block)}, not {k.purpose!r}")
            if k.read_protect and k.digest:
                raise InputError(f"{k.block} holds a Secure Boot digest: it must stay readable")
            stored = stored_key_order(device, k.block, k.purpose, k.key)
        elif classic:
            if k.purpose is not None:
                raise InputError(f"ESP32 {k.block} takes no key purpose (got {k.purpose!r})")
            stored = k.key if k.digest else stored_key_order(device, k.block, None, k.key)
            if k.read_protect and k.block == "BLOCK2" and efuses["ABS_DONE_1"].get():
                raise DeviceError("ESP32 Secure Boot V2 is on: BLOCK2 must stay readable")
        else:
            assert purpose_field is not None  # noqa: S101 - set above for XTS chips
            if k.purpose in (None, "USER") or k.purpose not in purpose_field.KEY_PURPOSES_NAME:
                raise InputError(
                    f"key purpose {k.purpose!r} for {k.block} is not a {device.chip.name} purpose"
                )
            if purpose_field.KEY_PURPOSES[purpose_field.KEY_PURPOSES_NAME.index(k.purpose)][1] < 0:
                raise InputError(
                    f"{k.purpose} is two blocks: burn {k.purpose}_1 and {k.purpose}_2 halves"
                )
            if k.read_protect and not purpose_field.need_rd_protect(k.purpose):
                raise InputError(f"{k.block} with purpose {k.purpose} must stay readable")
            stored = stored_key_order(device, k.block, k.purpose, k.key)
        size = key_field.bit_len // 8
        if len(stored) != size:
            raise InputError(
                f"key for {k.block} is {len(stored)} bytes; the block takes {size} bytes"
            )

        # purpose
        if purpose_field is not None:
            current = str(purpose_field.get())
            if current == k.purpose:
                self.already.append(purpose_field.name)
            elif current == "USER" and purpose_field.is_writeable():
                self.saves.append((purpose_field, k.purpose, purpose_field.name))
            else:
                raise DeviceError(
                    f"{k.block} has key purpose {current}, not {k.purpose}"
                    + ("" if current != "USER" else " (purpose is write-protected)")
                )
            if purpose_field.is_writeable():
                self.disable_write.append(purpose_field)  # espefuse burn-key locks the purpose

        # data
        if not key_field.is_readable():
            if not k.read_protect:
                raise DeviceError(f"{k.block} is read-protected, but must stay readable")
            self.unverified.append(k.block)
        else:
            current_data = bytes(key_field.get_bitstring().bytes[::-1])
            if current_data == stored:
                self.already.append(k.block)
            elif any(current_data):
                raise DeviceError(f"{k.block} already holds a different key")
            elif not key_field.is_writeable():
                raise DeviceError(f"{k.block} is empty but write-protected: it cannot take a key")
            else:
                self.saves.append((key_field, stored, k.block))
            self.checks.append(
                (k.block, lambda f=key_field, s=stored, rp=k.read_protect:
                 (not f.is_readable()) if rp else bytes(f.get_bitstring().bytes[::-1]) == s)
            )
            if k.read_protect:
                self.disable_read.append(key_field)
        if k.write_protect and key_field.is_writeable():
            self.disable_write.append(key_field)
        if purpose_field is not None:
            self.checks.append(
                (purpose_field.name, lambda f=purpose_field, p=k.purpose: str(f.get()) == p)
            )

    # -- fields --------------------------------------------------------------------------
    def add_field(self, name: str, value: FieldValue) -> None:
        f = _field(self.device, name)
        if f.efuse_class == "keyblock":
            raise InputError(f"{name} is a key block: use burn_key")
        if f.is_field_calculated():
            raise InputError(f"eFuse {name} is calculated from others and cannot be burned")
        raw: Any = value
        with espressif_call(f"value {value!r} for eFuse {name}"):
            try:
                if isinstance(value, str):
                    raw = f.check_format(value)
                    raw = int(raw, 0) if isinstance(raw, str) else raw
                elif isinstance(value, bool) or f.efuse_type.startswith("bool"):
                    raw = bool(value) if f.efuse_type.startswith("bool") else int(value)
                wanted = f.convert_to_bitstring(raw)
            except Exception as e:  # bitstring's CreationError, ValueError
                raise InputError(
                    f"value {value!r} does not fit eFuse {name} ({f.efuse_type})"
                ) from e
        if wanted.len != f.get_bitstring().len:
            raise InputError(f"value {value!r} does not fit eFuse {name} ({f.efuse_type})")
        if not f.is_readable():
            raise DeviceError(f"eFuse {name} is read-protected: its value cannot be checked")
        current = f.get_bitstring().copy()
        if (current | wanted) != wanted:  # a burned bit the new value lacks
            raise DeviceError(
                f"eFuse {name} is {f.get_raw()} on the chip; {value!r} would need burned bits "
                "cleared"
            )
        if current == wanted:
            self.already.append(name)
            return
        if not f.is_writeable():
            raise DeviceError(f"eFuse {name} is write-protected; cannot burn {value!r}")
        self.saves.append((f, raw, name))
        self.checks.append((name, lambda f=f, w=wanted: f.get_bitstring() == w))

    def add_write_protect(self, name: str) -> None:
        f = _field(self.device, name)
        if f.write_disable_bit is None:
            raise InputError(f"eFuse {name} cannot be write-protected")
        if not f.is_writeable():
            self.already.append(f"write-protect {name}")
            return
        self.disable_write.append(f)

    def add_read_protect(self, name: str) -> None:
        f = _field(self.device, name)
        if f.read_disable_bit is None:
            raise InputError(f"eFuse {name} cannot be read-protected")
        if not f.is_readable():
            self.already.append(f"read-protect {name}")
            return
        if (
            self.device.chip.is_esp32_classic
            and name == "BLOCK2"
            and self.device.efuses["ABS_DONE_1"].get()
        ):
            raise DeviceError("ESP32 Secure Boot V2 is on: BLOCK2 must stay readable")
        self.disable_read.append(f)

    # -- execution -----------------------------------------------------------------------
    def execute(self) -> BurnReport:
        device = self.device
        efuses = device.efuses
        for guard_name, targets in (("WR_DIS", self.disable_write), ("RD_DIS", self.disable_read)):
            if targets and not efuses[guard_name].is_writeable():
                raise DeviceError(
                    f"{guard_name} is write-protected: cannot protect {targets[0].name}"
                )
        if not self.saves and not self.disable_read and not self.disable_write:
            return BurnReport((), tuple(self.already), tuple(self.unverified))

        queued = False
        try:
            with espressif_call(f"queueing eFuse burn on {device.chip.name}"):
                for f, value, label in self.saves:
                    f.save(value)
                    self.burned.append(label)
                for f in self.disable_read:
                    if f.is_readable():
                        f.disable_read()
                        self.burned.append(f"read-protect {f.name}")
                for f in _unique(self.disable_write):
                    f.disable_write()
                    self.burned.append(f"write-protect {f.name}")
                if efuses.is_efuses_incompatible_for_burn():
                    raise DeviceError(
                        f"espefuse finds this combination of eFuses incompatible on "
                        f"{device.chip.name}"
                    )
                queued = True
        finally:
            if not queued:
                device.reload_efuses()  # drop what was queued: nothing was burned
        try:
            with espressif_call(f"burning eFuses on {device.chip.name}"):
                efuses.burn_all()
        finally:
            device.efuses_burned()
        failed = [label for label, check in self.checks if not check()]
        failed += [f"read-protect {f.name}" for f in self.disable_read if f.is_readable()]
        failed += [f"write-protect {f.name}" for f in self.disable_write if f.is_writeable()]
        if failed:
            raise DeviceError(f"eFuse burn did not read back as written: {', '.join(failed)}")
        return BurnReport(tuple(self.burned), tuple(self.already), tuple(self.unverified))


def _unique(items: list[Any]) -> list[Any]:
    seen: list[Any] = []
    for item in items:
        if not any(item is s for s in seen):
            seen.append(item)
    return seen
