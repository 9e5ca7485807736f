"""The lockdown report's rules, on inputs given directly: never "closed" without evidence."""

from __future__ import annotations

from hsmflash.app import lockdown
from hsmflash.chips import get_chip
from hsmflash.formats import partitions


def test_no_inputs_no_closed_channel() -> None:
    report = lockdown.check(lockdown.Inputs())
    assert {c.status for c in report.channels} == {"unknown"}
    assert all(c.evidence and c.close for c in report.channels)


def test_a_firmware_that_is_not_micropython_closes_nothing_by_absence() -> None:
    report = lockdown.check(lockdown.Inputs(chip=get_chip("esp32s3"),
                                            firmware=b"\xe9" + bytes(4096)))
    assert not [c.id for c in report.channels if c.status == "closed"]


def test_table_flags_alone_do_not_close_the_filesystem() -> None:
    report = lockdown.check(lockdown.Inputs(table=partitions.micropython_template()))
    fs = next(c for c in report.channels if c.id == "filesystem")
    assert fs.status == "unknown"  # the eFuses decide whether flash encryption is on
    assert any("flash encryption state unknown" in e for e in fs.evidence)


def test_nvs_without_nvs_keys_is_open() -> None:
    report = lockdown.check(lockdown.Inputs(table=partitions.parse_csv(
        "nvs, data, nvs, 0x9000, 0x6000\nfactory, app, factory, 0x10000, 0x100000\n")))
    nvs = next(c for c in report.channels if c.id == "nvs-credentials")
    assert nvs.status == "open" and "no nvs_keys" in nvs.evidence[0]
