"""The station's live table: one row per device, redrawn in place on a terminal (rich), plain
`[device] status` lines otherwise (logs, CI, pipes), nothing with --json."""

from __future__ import annotations

import sys
import threading
from types import TracebackType
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from rich.live import Live
    from rich.table import Table


class DeviceTable:
    """Progress of several devices at once; `update` may be called from any thread."""

    def __init__(self, names: list[str], *, enabled: bool, stream: TextIO | None = None) -> None:
        self.names = names
        self.status = dict.fromkeys(names, "waiting")
        self.enabled = enabled
        self._stream = stream if stream is not None else sys.stderr
        self._lock = threading.Lock()
        self._live: Live | None = None
        if enabled and self._stream.isatty():
            from rich.console import Console
            from rich.live import Live

            console = Console(file=self._stream)
            self._live = Live(
                self._render(), console=console, refresh_per_second=8, transient=False
            )

    def _render(self) -> Table:
        from rich.table import Table

        table = Table(box=None, show_header=True, header_style="bold", pad_edge=False)
        table.add_column("device", overflow="fold", max_width=48)
        table.add_column("status")
        for name in self.names:
            text = self.status[name]
            style = (
                "red"
                if text.startswith("FAILED")
                else (
                    "green"
                    if text in ("provisioned", "already-provisioned", "flashed", "up-to-date")
                    else ""
                )
            )
            table.add_row(name, text, style=style)
        return table

    def __enter__(self) -> DeviceTable:
        if self._live is not None:
            self._live.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._live is not None:
            with self._lock:
                self._live.update(self._render())
                self._live.stop()

    def update(self, name: str, text: str) -> None:
        with self._lock:
            self.status[name] = text
            if not self.enabled:
                return
            if self._live is not None:
                self._live.update(self._render())
            else:
                self._stream.write(f"[{name}] {text}\n")
                self._stream.flush()
