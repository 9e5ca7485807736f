"""The station's live table: plain lines off a terminal, a redrawn table on one."""

from __future__ import annotations

import io
import os
import pty

from hsmflash.cli.progress import DeviceTable


def test_plain_lines_when_not_a_terminal() -> None:
    out = io.StringIO()
    with DeviceTable(["a", "b"], enabled=True, stream=out) as table:
        table.update("a", "burning keys")
        table.update("b", "FAILED: no chip")
    assert out.getvalue().splitlines() == ["[a] burning keys", "[b] FAILED: no chip"]


def test_nothing_printed_when_disabled() -> None:
    out = io.StringIO()
    with DeviceTable(["a"], enabled=False, stream=out) as table:
        table.update("a", "done")
    assert out.getvalue() == ""
    assert table.status == {"a": "done"}


def test_terminal_gets_one_row_per_device() -> None:
    master, slave = pty.openpty()
    with os.fdopen(slave, "w") as tty, DeviceTable(["/dev/ttyUSB0", "/dev/ttyUSB1"],
                                                   enabled=True, stream=tty) as table:
        table.update("/dev/ttyUSB0", "writing flash")
        table.update("/dev/ttyUSB1", "provisioned")
    screen = b""
    os.set_blocking(master, False)
    try:
        while chunk := os.read(master, 65536):
            screen += chunk
    except OSError:  # nothing more to read (EAGAIN), or the other side closed (EIO)
        pass
    os.close(master)
    text = screen.decode(errors="replace")
    assert "/dev/ttyUSB0" in text and "writing flash" in text and "provisioned" in text
    assert "[/dev/ttyUSB0]" not in text  # a table, not log lines
