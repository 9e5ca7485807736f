"""The lockdown report: every channel through which a MicroPython app or its credentials can be
read or altered, each closed, open or unknown, with the evidence that says so.

Evidence comes only from what the caller hands in: the firmware image (strings and frozen module
names it contains), the partition table (flags), the app image (its signature against given
public keys), the eFuses (espefuse's reading of a chip or of its virtual eFuse file) and the
flash contents. A channel is never "closed" without evidence; where the inputs cannot decide,
it is "unknown" and the evidence says what is missing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from hsmflash.chips import Chip
from hsmflash.formats import partitions
from hsmflash.formats.primitives import PublicKey
from hsmflash.hazmat.efuse import EfuseState

Status = Literal["closed", "open", "unknown"]
CLOSED: Status = "closed"
OPEN: Status = "open"
UNKNOWN: Status = "unknown"

# strings a firmware image carries (case-sensitive byte markers)
MICROPYTHON = (b"MicroPython",)
REPL = (b'Type "help()" for more information', b"raw REPL; CTRL-B to exit")
PYCOM = (b"Pycom MicroPython", b"pycom")
TELNET = (b"Login as:", b"telnet")
FTP = (b"FTP Server", b"ftp")
WEBREPL = (b"webrepl",)
USB_CONSOLE = (b"usb_serial_jtag", b"USB_SERIAL_JTAG", b"TinyUSB", b"tinyusb")
SAFE_BOOT = (b"safe boot", b"Safe boot", b"safeboot")
BOOT_MODULE = (b"hsmboot",)  # hsmflash's frozen boot verifier (`hsmflash app bootcode`)

REBUILD = "firmware rebuild"  # the `close` text of channels only a new firmware closes


@dataclass
class Channel:
    id: str
    name: str
    status: Status
    evidence: list[str]
    close: str

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "status": self.status,
                "evidence": self.evidence, "close": self.close}


@dataclass
class Inputs:
    """What the report may use; anything missing makes the channels that need it unknown."""

    chip: Chip | None = None
    revision_major: int | None = None
    firmware: bytes | None = field(default=None, repr=False)
    firmware_name: str = "firmware"
    table: list[partitions.Partition] | None = None
    table_name: str = "partition table"
    app: bytes | None = field(default=None, repr=False)
    app_name: str = "app image"
    app_keys: list[tuple[str, PublicKey]] = field(default_factory=list)
    min_version: int | None = None
    efuses: EfuseState | None = None
    efuse_name: str = "eFuses"
    flash: bytes | None = field(default=None, repr=False)
    flash_name: str = "flash"


@dataclass
class Report:
    channels: list[Channel]
    inputs: dict[str, Any]

    @property
    def open(self) -> list[Channel]:
        return [c for c in self.channels if c.status == OPEN]

    def as_dict(self) -> dict[str, Any]:
        return {"inputs": self.inputs, "channels": [c.as_dict() for c in self.channels],
                "open": [c.id for c in self.open]}


class _Firmware:
    def __init__(self, data: bytes | None, name: str) -> None:
        self.data = data
        self.name = name

    def found(self, markers: tuple[bytes, ...]) -> list[str]:
        if self.data is None:
            return []
        return [m.decode() for m in markers if m in self.data]

    def says(self, markers: tuple[bytes, ...], what: str) -> str:
        hits = self.found(markers)
        if hits:
            return f"{self.name} contains {', '.join(repr(h) for h in hits)} ({what})"
        return f"{self.name} contains none of {', '.join(repr(m.decode()) for m in markers)}"

    @property
    def micropython(self) -> bool:
        return bool(self.found(MICROPYTHON))

    @property
    def pycom(self) -> bool:
        return bool(self.found(PYCOM))

    @property
    def boot_module(self) -> bool:
        return bool(self.found(BOOT_MODULE))


def _efuse(state: EfuseState, name: str) -> int | None:
    try:
        value = state.field(name)
    except Exception:
        return None
    return int(value) if not isinstance(value, bytes) else None


def check(inputs: Inputs) -> Report:
    """Evaluate every channel from the inputs (pure: nothing is read or written here)."""
    fw = _Firmware(inputs.firmware, inputs.firmware_name)
    channels = [
        _repl_uart(fw),
        _repl_usb(fw, inputs),
        _ctrl_c(fw),
        _webrepl(fw),
        _telnet_ftp(fw),
        _safe_boot(fw),
        _filesystem(inputs),
        _import_path(fw),
        _app_signature(fw, inputs),
        _secure_boot(inputs),
        _download_mode(inputs),
        _jtag(inputs),
    ]
    channels.append(_nvs_credentials(channels, inputs))
    given = {"chip": inputs.chip.name if inputs.chip else None,
             "firmware": inputs.firmware_name if inputs.firmware is not None else None,
             "partition_table": inputs.table_name if inputs.table is not None else None,
             "app": inputs.app_name if inputs.app is not None else None,
             "app_keys": [n for n, _ in inputs.app_keys],
             "efuses": inputs.efuse_name if inputs.efuses is not None else None,
             "flash": inputs.flash_name if inputs.flash is not None else None}
    return Report(channels, given)


_NO_FIRMWARE = "no firmware image given (--firmware): its strings and frozen modules decide this"


def _console(fw: _Firmware, cid: str, name: str, markers: tuple[bytes, ...], fix: str,
             what: str) -> Channel:
    if fw.data is None:
        return Channel(cid, name, UNKNOWN, [_NO_FIRMWARE], fix)
    evidence = [fw.says(markers, what)]
    if not fw.found(markers):
        if not fw.micropython:
            evidence.append(f"{fw.name} has no 'MicroPython' string: is it a MicroPython "
                            "firmware?")
            return Channel(cid, name, UNKNOWN, evidence, fix)
        return Channel(cid, name, CLOSED, evidence, fix)
    if fw.boot_module:
        evidence.append(fw.says(BOOT_MODULE, "the boot verifier is frozen: it runs the app "
                                "with Ctrl-C off and dupterm detached, and resets instead of "
                                "returning to the REPL"))
        evidence.append("the REPL code is still in the firmware, reachable if the app returns "
                        "to it")
        return Channel(cid, name, UNKNOWN, evidence, fix)
    evidence.append(fw.says(BOOT_MODULE, "boot verifier"))
    return Channel(cid, name, OPEN, evidence, fix)


def _repl_uart(fw: _Firmware) -> Channel:
    return _console(fw, "repl-uart", "REPL on UART", REPL,
                    f"{REBUILD}: build without the UART REPL (MICROPY_HW_ENABLE_UART_REPL=0, "
                    "CONFIG_ESP_CONSOLE_NONE) and freeze the boot module "
                    "(`hsmflash app bootcode`)", "the REPL is compiled in")


def _repl_usb(fw: _Firmware, inputs: Inputs) -> Channel:
    fix = (f"{REBUILD}: build without the USB console (MICROPY_HW_USB_CDC=0, "
           "MICROPY_HW_ESP_USB_SERIAL_JTAG=0), or burn DIS_USB_SERIAL_JTAG")
    chip = inputs.chip
    if chip is not None and chip.is_esp32_classic:
        return Channel("repl-usb", "REPL on USB", CLOSED,
                       [f"{chip.name} has no USB peripheral: its console is UART only"], fix)
    if inputs.efuses is not None and _efuse(inputs.efuses, "DIS_USB_SERIAL_JTAG") == 1:
        usb_otg = fw.found((b"TinyUSB", b"tinyusb"))
        if not usb_otg and fw.data is not None:
            return Channel("repl-usb", "REPL on USB", CLOSED,
                           [f"{inputs.efuse_name}: DIS_USB_SERIAL_JTAG = 1",
                            fw.says((b"TinyUSB", b"tinyusb"), "USB OTG CDC")], fix)
    return _console(fw, "repl-usb", "REPL on USB", USB_CONSOLE, fix,
                    "a USB console is compiled in")


def _ctrl_c(fw: _Firmware) -> Channel:
    fix = "freeze the boot module: it calls micropython.kbd_intr(-1) before the app runs"
    if fw.data is None:
        return Channel("ctrl-c", "Ctrl-C to the REPL", UNKNOWN, [_NO_FIRMWARE], fix)
    if fw.boot_module:
        return Channel("ctrl-c", "Ctrl-C to the REPL", CLOSED,
                       [fw.says(BOOT_MODULE, "boot verifier frozen: micropython.kbd_intr(-1) "
                                "before the app runs")], fix)
    if fw.micropython and not fw.found(REPL):
        return Channel("ctrl-c", "Ctrl-C to the REPL", CLOSED,
                       [fw.says(REPL, "REPL"), "no REPL to interrupt into"], fix)
    return Channel("ctrl-c", "Ctrl-C to the REPL", OPEN if fw.micropython else UNKNOWN,
                   [fw.says(BOOT_MODULE, "boot verifier"), fw.says(REPL, "REPL")], fix)


def _webrepl(fw: _Firmware) -> Channel:
    fix = (f"{REBUILD}: leave webrepl out of the frozen manifest; never ship webrepl_cfg.py")
    if fw.data is None:
        return Channel("webrepl", "WebREPL", UNKNOWN, [_NO_FIRMWARE], fix)
    evidence = [fw.says(WEBREPL, "the WebREPL module is frozen in")]
    if not fw.found(WEBREPL):
        status = CLOSED if fw.micropython else UNKNOWN
        return Channel("webrepl", "WebREPL", status, evidence, fix)
    if fw.boot_module:
        evidence.append(fw.says(BOOT_MODULE, "boot verifier frozen: boot.py on the writable "
                                "filesystem never runs, so only the signed app could start it"))
        return Channel("webrepl", "WebREPL", UNKNOWN, evidence, fix)
    evidence.append("a boot.py on the writable filesystem can start it")
    return Channel("webrepl", "WebREPL", OPEN, evidence, fix)


def _telnet_ftp(fw: _Firmware) -> Channel:
    fix = (f"{REBUILD} only: Pycom's firmware starts its Telnet and FTP servers (default login "
           "micro/python) from C; the boot module's network.Server().deinit() stops them at "
           "run time, it does not remove them")
    if fw.data is None:
        return Channel("telnet-ftp", "Pycom Telnet/FTP servers", UNKNOWN, [_NO_FIRMWARE], fix)
    hits = fw.found(TELNET) + fw.found(FTP)
    evidence = [fw.says(TELNET + FTP, "Telnet/FTP servers")]
    if hits or fw.pycom:
        if fw.pycom:
            evidence.append(fw.says(PYCOM, "Pycom firmware"))
        return Channel("telnet-ftp", "Pycom Telnet/FTP servers", OPEN, evidence, fix)
    status = CLOSED if fw.micropython else UNKNOWN
    return Channel("telnet-ftp", "Pycom Telnet/FTP servers", status, evidence, fix)


def _safe_boot(fw: _Firmware) -> Channel:
    fix = (f"{REBUILD} only: Pycom's firmware skips boot.py/main.py and starts the REPL when "
           "the safe-boot pin (P12) is high at reset; upstream MicroPython has no such pin")
    if fw.data is None:
        return Channel("safe-boot", "safe-boot pin", UNKNOWN, [_NO_FIRMWARE], fix)
    evidence = [fw.says(SAFE_BOOT, "safe boot"), fw.says(PYCOM, "Pycom firmware")]
    if fw.pycom or fw.found(SAFE_BOOT):
        return Channel("safe-boot", "safe-boot pin", OPEN, evidence, fix)
    status = CLOSED if fw.micropython else UNKNOWN
    return Channel("safe-boot", "safe-boot pin", status, evidence, fix)


def _flash_encryption(inputs: Inputs) -> tuple[bool | None, str]:
    state = inputs.efuses
    if state is None:
        return None, "no eFuses given (--virtual-efuses): flash encryption state unknown"
    counter = "FLASH_CRYPT_CNT" if state.chip == "esp32" else "SPI_BOOT_CRYPT_CNT"
    on = state.flash_encryption_enabled
    return on, (f"{inputs.efuse_name}: {counter} = {state.flash_crypt_cnt:#x} "
                f"({'odd: flash encryption on' if on else 'even: flash encryption off'})")


def _filesystem(inputs: Inputs) -> Channel:
    fix = ("set the `encrypted` flag on romfs and vfs (`hsmflash partitions template`), enable "
           "flash encryption, and build the firmware to mount the table's vfs partition (not "
           "esp_partition_register_external, which bypasses encryption)")
    name = "app and filesystem at rest (romfs, vfs)"
    if inputs.table is None:
        return Channel("filesystem", name, UNKNOWN,
                       ["no partition table given (--table, or a readable one in --virtual-"
                        "flash)"], fix)
    evidence: list[str] = []
    status: Status = CLOSED
    targets = [p for p in (partitions.find_romfs(inputs.table),
                           partitions.find(inputs.table, "vfs")) if p is not None]
    if not targets:
        return Channel("filesystem", name, UNKNOWN,
                       [f"{inputs.table_name} has no romfs or vfs partition"], fix)
    for p in targets:
        if p.encrypted:
            evidence.append(f"{inputs.table_name}: {p.label} at {p.offset:#x} has the "
                            "`encrypted` flag")
        else:
            evidence.append(f"{inputs.table_name}: {p.label} at {p.offset:#x} lacks the "
                            "`encrypted` flag: stored as plaintext")
            status = OPEN
        if inputs.flash is not None:
            head = inputs.flash[p.offset:p.offset + 0x1000]
            if head[:3] == b"\xd2\xcd\x31" or b"littlefs" in head:
                evidence.append(f"{inputs.flash_name}: {p.label} at {p.offset:#x} reads as a "
                                "plaintext filesystem")
                status = OPEN
            elif head.strip(b"\xff"):
                evidence.append(f"{inputs.flash_name}: {p.label} holds no readable filesystem "
                                "header (ciphertext or empty)")
    on, text = _flash_encryption(inputs)
    evidence.append(text)
    if on is False:
        status = OPEN
    elif on is None and status == CLOSED:
        status = UNKNOWN
    return Channel("filesystem", name, status, evidence, fix)


def _import_path(fw: _Firmware) -> Channel:
    fix = "freeze the boot module: it sets sys.path to frozen code and /rom only"
    name = "import-path override (/app.py, /lib on the writable filesystem)"
    if fw.data is None:
        return Channel("import-path", name, UNKNOWN, [_NO_FIRMWARE], fix)
    if fw.boot_module:
        return Channel("import-path", name, CLOSED,
                       [fw.says(BOOT_MODULE, "boot verifier frozen: sys.path is frozen code "
                                "and /rom only, the working directory is /rom")], fix)
    evidence = [fw.says(BOOT_MODULE, "boot verifier"),
                "MicroPython's default sys.path puts the writable filesystem ('' and /lib) "
                "before frozen code"]
    return Channel("import-path", name, OPEN if fw.micropython else UNKNOWN, evidence, fix)


def _app_signature(fw: _Firmware, inputs: Inputs) -> Channel:
    from hsmflash.formats.appimage import parse_app_image, verify_app_image

    fix = ("ship the app as a signed image (`hsmflash app build`), freeze the boot module "
           "pinning its key and minimum version, and enable Secure Boot so the verifier itself "
           "cannot be replaced")
    name = "app signature and rollback"
    evidence: list[str] = []
    status: Status = CLOSED
    if inputs.app is None:
        evidence.append("no app image given (--app)")
        status = UNKNOWN
    else:
        try:
            image = parse_app_image(inputs.app, inputs.app_name)
        except Exception as e:
            evidence.append(f"{inputs.app_name}: {e}")
            return Channel("app-signature", name, OPEN, evidence, fix)
        if not inputs.app_keys:
            evidence.append(f"{inputs.app_name}: app version {image.app_version}, "
                            f"{'signed' if image.signed else 'UNSIGNED'}; no --pubkey to "
                            "verify it against")
            status = OPEN if not image.signed else UNKNOWN
        else:
            verified = None
            problems = []
            for key_name, key in inputs.app_keys:
                try:
                    verify_app_image(inputs.app, key, min_version=inputs.min_version,
                                     name=inputs.app_name)
                    verified = key_name
                    break
                except Exception as e:
                    problems.append(f"{key_name}: {e}")
            if verified is None:
                evidence.append(f"{inputs.app_name} does not verify: {'; '.join(problems)}")
                status = OPEN
            else:
                evidence.append(f"{inputs.app_name}: version {image.app_version}, signature "
                                f"verifies with {verified}")
    if fw.data is None:
        evidence.append(_NO_FIRMWARE)
        status = UNKNOWN if status == CLOSED else status
    elif fw.boot_module:
        evidence.append(fw.says(BOOT_MODULE, "the boot verifier checks signature and minimum "
                                "version at every boot"))
    else:
        evidence.append(fw.says(BOOT_MODULE, "nothing verifies the app at boot"))
        status = OPEN
    sb = _secure_boot(inputs)
    if sb.status == OPEN:
        evidence.append("Secure Boot is off: the firmware and the verifier in it can be replaced")
        status = OPEN
    elif sb.status == UNKNOWN and status == CLOSED:
        evidence.append("Secure Boot state unknown (no eFuses given)")
        status = UNKNOWN
    else:
        evidence.extend(sb.evidence)
    return Channel("app-signature", name, status, evidence, fix)


def _secure_boot(inputs: Inputs) -> Channel:
    fix = "provision with a policy that enables Secure Boot (`hsmflash provision`)"
    name = "Secure Boot (firmware replacement)"
    state = inputs.efuses
    if state is None:
        return Channel("secure-boot", name, UNKNOWN, ["no eFuses given (--virtual-efuses)"], fix)
    if state.chip == "esp32":
        on = state.secure_boot_v1 or state.secure_boot_v2
        text = (f"{inputs.efuse_name}: ABS_DONE_0 = {int(state.secure_boot_v1)}, "
                f"ABS_DONE_1 = {int(state.secure_boot_v2)}")
    else:
        on = state.secure_boot_v2
        text = f"{inputs.efuse_name}: SECURE_BOOT_EN = {int(on)}"
    return Channel("secure-boot", name, CLOSED if on else OPEN, [text], fix)


def _download_mode(inputs: Inputs) -> Channel:
    name = "ROM download mode (serial bootloader)"
    state = inputs.efuses
    if state is None:
        return Channel("download-mode", name, UNKNOWN, ["no eFuses given (--virtual-efuses)"],
                       "burn the eFuses that disable download mode")
    if state.chip == "esp32":
        dis = _efuse(state, "UART_DOWNLOAD_DIS")
        mitigations = ", ".join(f"{n} = {_efuse(state, n)}" for n in
                                ("DISABLE_DL_ENCRYPT", "DISABLE_DL_DECRYPT", "DISABLE_DL_CACHE"))
        rev = inputs.revision_major
        if dis == 1 and (rev is None or rev >= 3):
            return Channel("download-mode", name, CLOSED,
                           [f"{inputs.efuse_name}: UART_DOWNLOAD_DIS = 1 (ESP32 v3+)"],
                           "burn UART_DOWNLOAD_DIS")
        if rev is not None and rev < 3:
            return Channel(
                "download-mode", name, OPEN,
                [f"ESP32 v{rev}: UART_DOWNLOAD_DIS takes effect only from v3.0; download "
                 "mode cannot be disabled on this chip",
                 f"{inputs.efuse_name}: {mitigations} (with flash encryption these keep the "
                 "ROM from reading plaintext, but it can still write and erase flash)"],
                "cannot be closed on ESP32 rev0-1: choose ESP32 v3 (ECO3) or newer; burn "
                "DISABLE_DL_ENCRYPT/DECRYPT/CACHE to limit it")
        return Channel("download-mode", name, OPEN,
                       [f"{inputs.efuse_name}: UART_DOWNLOAD_DIS = {dis}", mitigations],
                       "burn UART_DOWNLOAD_DIS (ESP32 v3+)")
    dis = _efuse(state, "DIS_DOWNLOAD_MODE")
    secure = _efuse(state, "ENABLE_SECURITY_DOWNLOAD")
    fix = "burn DIS_DOWNLOAD_MODE (provisioning burns it last)"
    if dis == 1:
        return Channel("download-mode", name, CLOSED,
                       [f"{inputs.efuse_name}: DIS_DOWNLOAD_MODE = 1"], fix)
    if secure == 1:
        return Channel("download-mode", name, OPEN,
                       [f"{inputs.efuse_name}: DIS_DOWNLOAD_MODE = 0, ENABLE_SECURITY_DOWNLOAD "
                        "= 1: the ROM refuses reads but still writes flash (an older signed "
                        "app image could be written back; the boot module's minimum version "
                        "is what stops that)"], fix)
    return Channel("download-mode", name, OPEN,
                   [f"{inputs.efuse_name}: DIS_DOWNLOAD_MODE = {dis}, ENABLE_SECURITY_DOWNLOAD "
                    f"= {secure}"], fix)


def _jtag(inputs: Inputs) -> Channel:
    name = "JTAG"
    state = inputs.efuses
    if state is None:
        return Channel("jtag", name, UNKNOWN, ["no eFuses given (--virtual-efuses)"],
                       "burn the JTAG-disable eFuses")
    if state.chip == "esp32":
        v = _efuse(state, "JTAG_DISABLE")
        return Channel("jtag", name, CLOSED if v == 1 else OPEN,
                       [f"{inputs.efuse_name}: JTAG_DISABLE = {v}"], "burn JTAG_DISABLE")
    names = [n for n in ("DIS_PAD_JTAG", "DIS_USB_JTAG") if _efuse(state, n) is not None]
    values = {n: _efuse(state, n) for n in names}
    closed = bool(names) and all(v == 1 for v in values.values())
    return Channel("jtag", name, CLOSED if closed else OPEN,
                   [f"{inputs.efuse_name}: " + ", ".join(f"{n} = {v}" for n, v in
                                                        values.items())],
                   "burn " + " and ".join(names))


_RUNS_CODE = ("repl-uart", "repl-usb", "ctrl-c", "webrepl", "telnet-ftp", "safe-boot",
              "import-path", "app-signature")


def _nvs_credentials(channels: list[Channel], inputs: Inputs) -> Channel:
    name = "NVS credentials readable by running code"
    fix = "close every channel that runs code of someone else's choosing (above)"
    by_id = {c.id: c for c in channels}
    evidence = []
    if inputs.table is not None:
        keys = partitions.find_nvs_keys(inputs.table)
        if keys is None:
            evidence.append(f"{inputs.table_name} has no nvs_keys partition: NVS is stored "
                            "unencrypted")
            return Channel("nvs-credentials", name, OPEN, evidence, fix)
        evidence.append(f"{inputs.table_name}: nvs_keys at {keys.offset:#x} "
                        f"{'encrypted' if keys.encrypted else 'NOT encrypted'}")
        if not keys.encrypted:
            return Channel("nvs-credentials", name, OPEN, evidence, fix)
    opened = [i for i in _RUNS_CODE if by_id[i].status == OPEN]
    unknown = [i for i in _RUNS_CODE if by_id[i].status == UNKNOWN]
    if opened:
        evidence.append("code of an attacker's choosing runs through: " + ", ".join(opened)
                        + " (esp32.NVS reads the credentials in clear)")
        return Channel("nvs-credentials", name, OPEN, evidence, fix)
    if unknown or inputs.table is None:
        evidence.append("undecided channels: " + ", ".join(unknown or ["partition table"]))
        return Channel("nvs-credentials", name, UNKNOWN, evidence, fix)
    evidence.append("every channel that runs code is closed; only the signed app reads them")
    return Channel("nvs-credentials", name, CLOSED, evidence, fix)


def efuses_and_revision(device: Any) -> tuple[EfuseState, int]:
    """eFuse snapshot and chip revision major of an open Device (espefuse's reading)."""
    from hsmflash.hazmat.efuse import read_state

    return read_state(device), device.revision.major


def table_from_flash(flash: bytes, efuses: EfuseState | None, chip: Chip,
                     note: Callable[[str], None]) -> list[partitions.Partition] | None:
    """The partition table at 0x8000 of a flash image: as plaintext, or decrypted with a
    flash-encryption key the eFuses leave readable (development mode); None otherwise."""
    raw = flash[partitions.TABLE_ADDRESS:partitions.TABLE_ADDRESS + partitions.TABLE_SIZE]
    try:
        table = partitions.parse(raw)
        note("plaintext in flash")
        return table
    except Exception:  # noqa: S110 - not plaintext: try the readable key below
        pass
    if efuses is None:
        return None
    from hsmflash.formats import flashcrypt

    block = "BLOCK1" if chip.is_esp32_classic else "BLOCK_KEY0"
    state = efuses.key_blocks.get(block)
    if state is None or state.read_protected or not any(state.data):
        return None
    key = bytes(state.data)[::-1]  # espefuse stores key files byte-reversed
    try:
        if chip.is_esp32_classic:
            plain = flashcrypt.esp32_decrypt(raw, partitions.TABLE_ADDRESS, key,
                                             efuses.flash_crypt_config or 0xF)
        elif state.purpose == "XTS_AES_128_KEY" and len(key) == 32:
            k1, k2 = flashcrypt.software_xts_pair(key)
            plain = flashcrypt.xts_decrypt(raw, partitions.TABLE_ADDRESS, k1, k2)
        else:
            return None
        table = partitions.parse(plain)
    except Exception:
        return None
    note(f"decrypted with the readable {block} key (development mode)")
    return table
