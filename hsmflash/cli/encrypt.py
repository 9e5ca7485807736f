"""`hsmflash derive`, `encrypt`, `decrypt`: per-device keys and flash encryption."""

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from hsmflash.cli.context import Context, ctx_of
from hsmflash.cli.options import ChipOpt
from hsmflash.errors import (
    UsageError,
)


def derive_cmd(
    ctx: typer.Context,
    master: Annotated[
        str, typer.Option("--master", help="aes-256 master key (CKA_DERIVE).", metavar="KEY")
    ],
    device: Annotated[
        str | None,
        typer.Option("--device", help="Device base MAC aa:bb:cc:dd:ee:ff.", metavar="MAC"),
    ] = None,
    purpose: Annotated[
        str,
        typer.Option(
            "--purpose",
            help="XTS_AES_128_KEY, XTS_AES_256_KEY, FLASH_ENCRYPTION, SECURE_BOOT_V1, ...",
            metavar="PURPOSE",
        ),
    ] = "XTS_AES_128_KEY",
    devices: Annotated[
        Path | None,
        typer.Option(
            "--devices", help="Batch: CSV of MACs; writes a KCV manifest (-o).", metavar="CSV"
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "-o",
            "--output",
            help="Batch: KCV manifest CSV to write (mac,purpose,kcv).",
            metavar="FILE",
        ),
    ] = None,
    workers: Annotated[
        int,
        typer.Option(
            "--workers",
            help="Batch: worker processes (0: one per CPU for large lots).",
            metavar="N",
        ),
    ] = 0,
) -> None:
    """Derive a device's key inside the token (aes-ecb-v1) and print its KCV, never the key.

    With --devices, derive a whole lot and write its KCV manifest (audited as one batch).
    """
    from hsmflash.derive import derive_kcv
    from hsmflash.fileio import check_output
    from hsmflash.formats.kdf import format_mac, key_length, parse_mac

    c = ctx_of(ctx)
    key_length(purpose)
    if devices is not None:
        if output is None:
            raise UsageError("--devices needs -o/--output for the KCV manifest")
        check_output(output, "KCV manifest")
        _derive_batch(c, master, purpose, devices, output, workers)
        return
    if device is None:
        raise UsageError("give --device MAC, or --devices CSV -o OUT")
    mac = parse_mac(device)
    with c.station() as st:
        kcv = derive_kcv(st, st.key(master), mac, purpose)
    c.emit(
        {
            "device": format_mac(mac),
            "purpose": purpose,
            "master": master,
            "kcv": kcv,
            "scheme": "aes-ecb-v1",
        },
        f"{format_mac(mac)} {purpose}: kcv {kcv}",
    )


def _crypt_command(
    ctx: typer.Context,
    decrypt: bool,
    input_file: Path,
    output: Path | None,
    chip: str,
    address: str,
    key: str | None,
    master: str | None,
    device: str | None,
    devices: Path | None,
    out_dir: Path | None,
    scheme: str | None,
) -> None:
    from hsmflash.chips import get_chip
    from hsmflash.encrypt import check_data, crypt_image
    from hsmflash.fileio import atomic_write, check_output, parse_int, read_input
    from hsmflash.formats.kdf import parse_mac

    c = ctx_of(ctx)
    the_chip = get_chip(chip)
    addr = parse_int(address, "address")
    data = read_input(input_file, "input file")
    check_data(data, addr, str(input_file))
    if devices is not None:
        if decrypt:
            raise UsageError("--devices is for batch encryption")
        if master is None or out_dir is None:
            raise UsageError("--devices needs --master NAME and --out-dir DIR")
        _batch(
            c, data, the_chip, addr, master, Path(devices), Path(out_dir), scheme, str(input_file)
        )
        return
    if output is None:
        raise UsageError("missing -o/--output")
    check_output(output)
    if (key is None) == (master is None):
        raise UsageError("give either --key NAME or --master NAME with --device MAC")
    if master is not None and device is None:
        raise UsageError("--master needs --device MAC")
    mac = parse_mac(device) if device else None
    with c.station() as st:
        result = crypt_image(
            st,
            data,
            the_chip,
            addr,
            key=st.key(key) if key else None,
            master=st.key(master) if master else None,
            device=mac,
            scheme=scheme,
            decrypt=decrypt,
            name=str(input_file),
        )
        atomic_write(output, result.output)
    s = result.summary()
    s["output_file"] = str(output)
    verb = "decrypted" if decrypt else "encrypted"
    c.emit(
        s,
        f"{verb} {input_file} -> {output}: {result.scheme} at {addr:#x}, "
        f"path {result.path}, kcv {result.kcv}",
    )


def _batch(
    c: Context,
    data: bytes,
    chip: Any,
    addr: int,
    master: str,
    devices: Path,
    out_dir: Path,
    scheme: str | None,
    name: str,
) -> None:
    from hsmflash.derive import read_device_csv
    from hsmflash.encrypt import encrypt_batch, make_out_dir

    macs = read_device_csv(devices)
    c.policy.check_batch(len(macs), str(devices))  # refused before the token (and its PIN)
    make_out_dir(out_dir)
    results = []
    with (
        c.station() as st,
        typer.progressbar(length=len(macs), label="encrypting", file=sys.stderr,
                          show_pos=True) as bar,
    ):
        for row in encrypt_batch(st, data, chip, addr, st.key(master), macs, out_dir,
                                 scheme=scheme, name=name, source=str(devices)):
            results.append(row)
            bar.update(1)
    done = sum(r["status"] == "encrypted" for r in results)
    skipped = len(results) - done
    c.emit(
        {"encrypted": done, "skipped": skipped, "devices": results},
        f"{done} device image(s) encrypted, {skipped} already done, in {out_dir}",
    )


InputArg = Annotated[Path, typer.Argument(help="The image to encrypt.", metavar="FILE")]
CipherArg = Annotated[
    Path, typer.Argument(help="The flash contents to decrypt (as read from the chip).",
                         metavar="FILE")
]


OutOpt = Annotated[
    Path | None, typer.Option("-o", "--output", help="File to write.", metavar="FILE")
]


AddrOpt = Annotated[
    str, typer.Option("--address", help="Flash address (0x...), a multiple of 16.", metavar="ADDR")
]


KeyOpt = Annotated[
    str | None, typer.Option("--key", help="Stored xts-aes key in the token.", metavar="KEY")
]


MasterOpt = Annotated[
    str | None,
    typer.Option(
        "--master", help="Master key: derive the device's key (aes-ecb-v1).", metavar="KEY"
    ),
]


DeviceOpt = Annotated[str | None, typer.Option("--device", help="Device base MAC.", metavar="MAC")]


SchemeOpt = Annotated[
    str | None,
    typer.Option(
        "--scheme",
        help="xts-aes-128, xts-aes-256 or esp32-aes-256 (default: the --key's type where "
        "the chip has it, else the policy's, else the chip's).",
        metavar="SCHEME",
    ),
]


def encrypt_cmd(
    ctx: typer.Context,
    input_file: InputArg,
    chip: ChipOpt,
    address: AddrOpt,
    output: OutOpt = None,
    key: KeyOpt = None,
    master: MasterOpt = None,
    device: DeviceOpt = None,
    devices: Annotated[
        Path | None,
        typer.Option(
            "--devices",
            help="Batch: CSV of device MACs (column 'mac' or the first column).",
            metavar="CSV",
        ),
    ] = None,
    out_dir: Annotated[
        Path | None,
        typer.Option(
            "--out-dir",
            help="Batch: one output per device here; existing ones are skipped.",
            metavar="DIR",
        ),
    ] = None,
    scheme: SchemeOpt = None,
) -> None:
    """Encrypt an image for a device and flash address with the key inside the token.

    Output equals `espsecure encrypt-flash-data` for the same key. ESP32 classic on a token
    without CKM_XOR_BASE_AND_DATA exports the per-device key to memory for the operation,
    only if the policy allows it ([export] esp32_classic_transient), and audits it.
    """
    _crypt_command(
        ctx, False, input_file, output, chip, address, key, master, device, devices, out_dir, scheme
    )


def decrypt_cmd(
    ctx: typer.Context,
    input_file: CipherArg,
    chip: ChipOpt,
    address: AddrOpt,
    output: OutOpt = None,
    key: KeyOpt = None,
    master: MasterOpt = None,
    device: DeviceOpt = None,
    scheme: SchemeOpt = None,
) -> None:
    """Decrypt flash contents for inspection or RMA (needs [export] decrypt = true; audited)."""
    _crypt_command(
        ctx, True, input_file, output, chip, address, key, master, device, None, None, scheme
    )


def _derive_batch(
    c: Context, master: str, purpose: str, devices: Path, output: Path, workers: int
) -> None:
    import time

    from hsmflash.derive import check_workers, derive_batch, read_device_csv

    check_workers(workers)
    macs = read_device_csv(devices)
    c.policy.check_batch(len(macs), str(devices))  # refused before the token (and its PIN)
    started = time.perf_counter()
    with c.station() as st:
        workers = derive_batch(st, st.key(master), purpose, macs, output, source=str(devices),
                               workers=workers, pin=c.pin_handler(""))
    seconds = time.perf_counter() - started
    c.emit(
        {
            "devices": len(macs),
            "purpose": purpose,
            "output": output,
            "workers": workers,
            "seconds": round(seconds, 3),
        },
        f"{len(macs)} device keys derived ({purpose}), KCVs in {output} "
        f"({len(macs) / max(seconds, 1e-9):.0f}/s)",
    )
