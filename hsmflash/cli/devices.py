"""`hsmflash virtual`, `provision`, `flash`: devices, virtual or on serial ports."""

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from hsmflash.cli.context import Context, ctx_of
from hsmflash.cli.options import ChipOpt
from hsmflash.errors import (
    Error,
    InputError,
    UsageError,
)

virtual_app = typer.Typer(
    help="Virtual chips (espefuse's eFuse emulator + a flash file) for development and tests.",
    no_args_is_help=True,
)


@virtual_app.command("create")
def virtual_create(
    ctx: typer.Context,
    chip: ChipOpt,
    mac: Annotated[str, typer.Option("--mac", help="The chip's factory base MAC.", metavar="MAC")],
    efuse_file: Annotated[
        Path, typer.Option("--efuse-file", help="Virtual eFuse file to create.", metavar="FILE")
    ],
    revision: Annotated[
        str,
        typer.Option(
            "--revision",
            help="Chip revision MAJOR.MINOR (esp32: 1.0 for FiPy-era, 3.0 for ECO3).",
            metavar="MAJOR.MINOR",
        ),
    ] = "0.0",
) -> None:
    """Create a blank virtual chip with its own MAC and revision."""
    from hsmflash.device.virtual import create_virtual_chip
    from hsmflash.formats.kdf import format_mac, parse_mac

    c = ctx_of(ctx)
    try:
        major, minor = (int(x) for x in revision.split("."))
    except ValueError:
        raise InputError(f"--revision {revision!r} is not MAJOR.MINOR") from None
    mac_bytes = parse_mac(mac)
    create_virtual_chip(chip, Path(efuse_file), mac_bytes, (major, minor))
    c.emit(
        {
            "chip": chip,
            "mac": format_mac(mac_bytes),
            "efuse_file": str(efuse_file),
            "revision": revision,
        },
        f"created virtual {chip} v{revision} {format_mac(mac_bytes)} in {efuse_file}",
    )


PortOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--port",
        help="Serial port of a chip in download mode (repeat for station mode).",
        metavar="PORT",
    ),
]


VEfuseOpt = Annotated[
    list[Path] | None,
    typer.Option(
        "--virtual-efuses",
        help="Virtual chip's eFuse file (repeat, paired with --virtual-flash).",
        metavar="FILE",
    ),
]


VFlashOpt = Annotated[
    list[Path] | None,
    typer.Option(
        "--virtual-flash",
        help="Virtual chip's flash file (created erased at the first write).",
        metavar="FILE",
    ),
]


ImageOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--image",
        help="ADDR=FILE to write encrypted (repeat); default: the policy's images.",
        metavar="ADDR=FILE",
    ),
]


ManifestOpt = Annotated[
    Path | None,
    typer.Option(
        "--manifest", help="Append one record per device (.csv, else JSON Lines).", metavar="FILE"
    ),
]


BaudOpt = Annotated[
    int,
    typer.Option(
        "--baud",
        help="Serial baud rate after connecting at 115200 (falls back to 115200 when "
        "the change fails).",
        metavar="BAUD",
    ),
]


NoStubOpt = Annotated[
    bool,
    typer.Option(
        "--no-stub", help="Use the chip's ROM loader only, not esptool's flasher stub (slower)."
    ),
]


def _device_specs(
    ports: list[str] | None, efuses: list[Path] | None, flashes: list[Path] | None
) -> list[dict[str, Any]]:
    ports, efuses, flashes = ports or [], efuses or [], flashes or []
    if ports and (efuses or flashes):
        raise UsageError("give --port, or --virtual-efuses with --virtual-flash, not both")
    if len(efuses) != len(flashes):
        raise UsageError("each --virtual-efuses needs its --virtual-flash (same count, in order)")
    if not ports and not efuses:
        raise UsageError("no device: give --port DEV, or --virtual-efuses F --virtual-flash F")
    if ports:
        return [{"port": p, "name": p} for p in ports]
    return [
        {"efuse_file": Path(e), "flash_file": Path(f), "name": str(e)}
        for e, f in zip(efuses, flashes, strict=True)
    ]


def _images_for(c: Context, chip: str, images: list[str] | None) -> list[Any]:
    from hsmflash.fileio import read_input
    from hsmflash.provision.inputs import parse_image_args

    args = list(images or [])
    if not args:
        prof = c.policy.profile(chip)
        base = Path(c.policy.path).parent
        args = [
            f"{addr}={(base / f) if not Path(f).is_absolute() else f}"
            for addr, f in prof.images.items()
        ]
    return parse_image_args(args, lambda p: read_input(p, "image"))


def _run_devices(
    c: Context,
    kind: str,
    chip: str,
    specs: list[dict[str, Any]],
    baud: int,
    images: list[Any],
    dry_run: bool,
    manifest: Path | None,
    allow_rewrite: tuple[str, ...] = (),
    *,
    stub: bool = True,
    device_mac: str | None = None,
) -> list[Any]:
    """Provision or re-flash each device; several run in parallel worker processes."""
    from hsmflash.cli.progress import DeviceTable
    from hsmflash.provision.pool import DeviceJob, run_jobs

    cfg = c.token_config()
    pin = c.pin_handler(f"User PIN for token {cfg.label!r}: ")
    jobs = [
        DeviceJob(
            kind=kind,
            chip=chip,
            name=s["name"],
            policy_path=c.policy.path,
            audit_log=str(c.audit_log),
            module=cfg.module,
            token=cfg.token_label,
            pin=pin,
            images=images,
            dry_run=dry_run,
            port=s.get("port"),
            efuse_file=str(s["efuse_file"]) if s.get("efuse_file") else None,
            flash_file=str(s["flash_file"]) if s.get("flash_file") else None,
            baud=baud,
            debug=c.debug,
            allow_rewrite=allow_rewrite,
            stub=stub,
            device_mac=device_mac,
            manifest=str(manifest) if manifest is not None and kind == "flash" else None,
        )
        for s in specs
    ]
    with DeviceTable([s["name"] for s in specs], enabled=not c.json) as table:
        results = run_jobs(jobs, table.update)
        for spec, r in zip(specs, results, strict=True):
            table.update(
                spec["name"], f"FAILED: {r.diagnostics()}" if isinstance(r, Error) else r.result
            )
    if manifest is not None:
        rows = []
        for spec, r in zip(specs, results, strict=True):
            if isinstance(r, Error):
                rows.append(
                    {
                        "time": "",
                        "mac": "",
                        "chip": chip,
                        "revision": "",
                        "fe_kcv": "",
                        "sb_kcv": "",
                        "images": [],
                        "result": "failed",
                        "error": f"{spec['name']}: {r.diagnostics()}",
                        "seconds": 0,
                    }
                )
            else:
                rows.append(r.manifest_row())
        from hsmflash.provision.manifest import write_manifest

        write_manifest(Path(manifest), rows)
    return results


def _device_command(
    ctx: typer.Context,
    kind: str,
    chip: str,
    port: list[str] | None,
    virtual_efuses: list[Path] | None,
    virtual_flash: list[Path] | None,
    image: list[str] | None,
    dry_run: bool,
    manifest: Path | None,
    baud: int,
    allow_rewrite: tuple[str, ...] = (),
    *,
    stub: bool = True,
    device_mac: str | None = None,
    app_image: Path | None = None,
    vfs_dir: Path | None = None,
) -> None:
    """provision / flash: check policy and images once, then run every device."""
    from hsmflash.chips import get_chip
    from hsmflash.fileio import check_output
    from hsmflash.provision.provisioner import Provisioner
    from hsmflash.provision.reflash import Reflasher

    c = ctx_of(ctx)
    if not c.policy.chips:
        raise UsageError(f"{kind} needs --policy FILE with a [chips] profile")
    c.policy.profile(chip)
    specs = _device_specs(port, virtual_efuses, virtual_flash)
    if manifest is not None:
        check_output(manifest, "manifest")
    # flash --app alone writes just the app, not the policy's default images
    images = _images_for(c, chip, image) if image or app_image is None else []
    images = _partition_images(kind, images, app_image, vfs_dir)
    # refuse bad images, unsigned images and policy problems before any device is touched
    with c.station() as st:
        if kind == "flash":
            Reflasher(st, st.policy, get_chip(chip), images, allow_rewrite=allow_rewrite)
        else:
            Provisioner(st, st.policy, get_chip(chip), images)
    results = _run_devices(
        c,
        kind,
        chip,
        specs,
        baud,
        images,
        dry_run,
        manifest,
        allow_rewrite,
        stub=stub,
        device_mac=device_mac,
    )
    _finish_devices(c, specs, results)


def _partition_images(
    kind: str, images: list[Any], app_image: Path | None, vfs_dir: Path | None
) -> list[Any]:
    """--app goes to the romfs partition, the vfs LittleFS to vfs: addresses from the table
    written (provision) or the device's own (flash)."""
    from hsmflash.fileio import read_input
    from hsmflash.provision.inputs import ImageSpec, add_partition_images

    app = (str(app_image), read_input(app_image, "app image")) if app_image else None
    if kind == "provision":
        return add_partition_images(images, app=app, vfs_dir=vfs_dir)
    if vfs_dir is not None:
        raise UsageError("--vfs-dir is for provision: re-flash keeps the device's filesystem")
    return images + ([ImageSpec(-1, app[0], app[1], "romfs")] if app else [])


AppOpt = Annotated[
    Path | None,
    typer.Option(
        "--app",
        help="Signed app image (`hsmflash app build`): written encrypted to the romfs "
        "partition of the device's table, after its signature checks against the policy's keys.",
        metavar="FILE",
    ),
]


VfsDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--vfs-dir",
        help="Files for the vfs partition: provisioning writes it as a formatted "
        "LittleFS, encrypted for the device (empty without this option).",
        metavar="DIR",
    ),
]


def _finish_devices(c: Context, specs: list[dict[str, Any]], results: list[Any]) -> None:
    failures = [(s, r) for s, r in zip(specs, results, strict=True) if isinstance(r, Error)]
    data = []
    for s, r in zip(specs, results, strict=True):
        if isinstance(r, Error):
            data.append(
                {
                    "device": s["name"],
                    "result": "failed",
                    "error": r.diagnostics(),
                    "exit_code": r.exit_code,
                }
            )
        else:
            data.append({"device": s["name"], **{k: v for k, v in r.__dict__.items()}})

    def human() -> None:
        for _s, r in zip(specs, results, strict=True):
            if isinstance(r, Error):
                continue
            if r.result == "planned":
                typer.echo(json.dumps(r.plan, indent=2))
                continue
            extra = f", burned {len(r.burned)} eFuse(s)" if getattr(r, "burned", None) else ""
            typer.echo(
                f"{r.mac} {r.chip} {r.revision}: {r.result} (fe kcv {r.fe_kcv}"
                f"{extra}, {r.seconds:.1f}s)"
            )
            for note in getattr(r, "notes", []):
                typer.echo(f"  note: {note}")

    c.emit(data, human)
    if failures:
        spec, err = failures[0]
        if len(specs) > 1:
            raise type(err)(
                f"{len(failures)} of {len(specs)} device(s) failed; first: "
                f"{spec['name']}: {err.diagnostics()}"
            )
        raise err


def provision_cmd(
    ctx: typer.Context,
    chip: ChipOpt,
    port: PortOpt = None,
    virtual_efuses: VEfuseOpt = None,
    virtual_flash: VFlashOpt = None,
    image: ImageOpt = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the plan; touch nothing.")
    ] = False,
    manifest: ManifestOpt = None,
    baud: BaudOpt = 921600,
    no_stub: NoStubOpt = False,
    app_image: AppOpt = None,
    vfs_dir: VfsDirOpt = None,
) -> None:
    """Turn blank chips into locked devices: per-device keys burned, Secure Boot enabled,
    images encrypted for each device, debug and download paths closed as the policy says.

    Needs --policy. Safe to re-run: an interrupted device is finished, a finished one is
    reported as such with nothing burned. Several --port (or virtual pairs) run in parallel.
    """
    _device_command(
        ctx,
        "provision",
        chip,
        port,
        virtual_efuses,
        virtual_flash,
        image,
        dry_run,
        manifest,
        baud,
        stub=not no_stub,
        app_image=app_image,
        vfs_dir=vfs_dir,
    )


def flash_cmd(
    ctx: typer.Context,
    chip: ChipOpt,
    port: PortOpt = None,
    virtual_efuses: VEfuseOpt = None,
    virtual_flash: VFlashOpt = None,
    image: ImageOpt = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Check and plan; write nothing.")
    ] = False,
    manifest: ManifestOpt = None,
    baud: BaudOpt = 921600,
    no_stub: NoStubOpt = False,
    device: Annotated[
        str | None,
        typer.Option(
            "--device",
            help="The device's MAC, for a chip in Secure Download Mode (its MAC "
            "cannot be read); checked against --manifest when that file exists.",
            metavar="MAC",
        ),
    ] = None,
    allow_rewrite: Annotated[
        list[str] | None,
        typer.Option(
            "--allow-rewrite",
            help="Also write this protected region: table, nvs or nvs_keys "
            "(repeat; recorded in the audit log).",
            metavar="REGION",
        ),
    ] = None,
    app_image: AppOpt = None,
) -> None:
    """Re-flash provisioned devices (field update, RMA): each device's key is re-derived in the
    token from the MAC it reports; no key files exist anywhere.

    Refused before writing when the device was provisioned under another master key or
    policy, an image is not signed by a key the device holds, or an address is outside the
    device's encrypted partitions. Never writes eFuses. Re-run to complete an interrupted write.

    In Secure Download Mode (production policies end there) the chip allows writes only: name
    it with --device MAC; every region is rewritten whole and nothing can be read back or
    verified, which the output says.
    """
    if not image and app_image is None:
        raise UsageError("give the images to write: --image ADDR=FILE (repeat) or --app")
    regions = tuple(allow_rewrite or ())
    for region in regions:
        if region not in ("table", "nvs", "nvs_keys"):
            raise UsageError(f"--allow-rewrite {region!r}: one of table, nvs, nvs_keys")
    if device is not None and len(port or []) + len(virtual_efuses or []) != 1:
        raise UsageError("--device names one device: give exactly one --port")
    _device_command(
        ctx,
        "flash",
        chip,
        port,
        virtual_efuses,
        virtual_flash,
        image,
        dry_run,
        manifest,
        baud,
        regions,
        stub=not no_stub,
        device_mac=device,
        app_image=app_image,
    )
