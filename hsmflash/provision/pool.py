"""Station mode: provision or re-flash several devices at once, one process per device.

Processes, not threads: python-pkcs11 initialises the module without locking (so concurrent
calls from threads are unsafe in SoftHSM and many HSM libraries), and closing a logged-in
session logs the whole process out. Each worker process opens its own Station (session, login,
audit log appends under the log's file lock) and its own device; progress comes back over a
queue, results (or the hsmflash error) as return values. Workers are spawned, never forked:
PKCS#11 state must not cross a fork.
"""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hsmflash.errors import Error, InternalError

if TYPE_CHECKING:
    from hsmflash.provision.plan import DeviceResult


@dataclass(frozen=True)
class DeviceJob:
    """Everything a worker needs; picklable (the PIN travels over a pipe, never argv)."""

    kind: str  # "provision" | "flash"
    chip: str
    name: str
    policy_path: str
    audit_log: str
    module: str | None
    token: str | None
    pin: str = field(repr=False)
    images: list[Any] = field(repr=False)
    dry_run: bool = False
    port: str | None = None
    efuse_file: str | None = None
    flash_file: str | None = None
    baud: int = 921600
    stub: bool = True  # esptool's flasher stub on serial ports (False: ROM loader only)
    device_mac: str | None = None  # flash in Secure Download Mode: the MAC the user names
    manifest: str | None = None  # flash: the provisioning manifest to check device_mac against
    debug: bool = False  # --debug: the worker prints the traceback of its error
    allow_rewrite: tuple[str, ...] = ()  # flash: protected regions the user named


def run_job(job: DeviceJob, progress: Callable[[str], None]) -> DeviceResult | Error:
    """Provision or re-flash one device; returns its DeviceResult or the hsmflash Error."""
    from hsmflash.chips import get_chip
    from hsmflash.device import open_device
    from hsmflash.keyuse import Station
    from hsmflash.policy import load_policy
    from hsmflash.provision.provisioner import Provisioner
    from hsmflash.provision.reflash import Reflasher
    from hsmflash.token.session import TokenConfig

    try:
        policy = load_policy(job.policy_path)
        cfg = TokenConfig(module=job.module, token_label=job.token or policy.token_label,
                          pin_handler=lambda _prompt: job.pin)
        chip = get_chip(job.chip)
        with Station.open(cfg, policy, job.audit_log) as st, open_device(
            job.chip, port=job.port,
            efuse_file=Path(job.efuse_file) if job.efuse_file else None,
            flash_file=Path(job.flash_file) if job.flash_file else None,
            flash_size=policy.profile(job.chip).flash_size, baud=job.baud, stub=job.stub,
        ) as device:
            if job.kind == "flash":
                result = Reflasher(st, policy, chip, job.images, progress,
                                   allow_rewrite=job.allow_rewrite).reflash(
                    device, dry_run=job.dry_run, device_mac=job.device_mac,
                    manifest=job.manifest)
            else:
                result = Provisioner(st, policy, chip, job.images, progress).provision(
                    device, dry_run=job.dry_run)
            note = getattr(device, "baud_note", None)
            if note:
                result.notes.append(note)
            return result
    except Error as e:
        if job.debug:
            import traceback

            traceback.print_exc()
        return e


def _worker(job: DeviceJob, queue: Any) -> DeviceResult | Error:
    return run_job(job, lambda text: queue.put((job.name, text)))


def run_jobs(jobs: list[DeviceJob], progress: Callable[[str, str], None]
             ) -> list[DeviceResult | Error]:
    """Run jobs in parallel worker processes (one job: in this process).

    `progress(name, text)` is called from a thread of this process.
    """
    if len(jobs) == 1:
        job = jobs[0]
        return [run_job(job, lambda text: progress(job.name, text))]
    from concurrent.futures import ProcessPoolExecutor

    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager:
        queue = manager.Queue()

        def pump() -> None:
            while True:
                item = queue.get()
                if item is None:
                    return
                progress(*item)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        results: list[DeviceResult | Error] = []
        try:
            with ProcessPoolExecutor(min(len(jobs), 16), mp_context=ctx) as pool:
                futures = [pool.submit(_worker, job, queue) for job in jobs]
                for job, future in zip(jobs, futures, strict=True):
                    try:
                        results.append(future.result())
                    except Exception as e:
                        if job.debug:  # the worker's traceback travels as the cause
                            import traceback

                            traceback.print_exception(e)
                        first = str(e).splitlines()[0] if str(e) else ""
                        results.append(InternalError(
                            f"{job.name}: worker process failed ({type(e).__name__}"
                            f"{': ' + first if first else ''}; rerun with --debug)"))
        finally:
            queue.put(None)
            reader.join(timeout=5)
    return results
