"""The choke point is structural: a key signs, encrypts, derives or leaves the token only
through the handle `Station.use(...)` yields, and only while that audited use is open."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from hsmflash.errors import InternalError, PolicyRefused
from hsmflash.keyuse import Station
from hsmflash.policy import ExportRules, unrestricted_policy

MAC = bytes.fromhex("7cdfa1123456")


@pytest.fixture
def station(token_config, tmp_path, uniq):  # type: ignore[no-untyped-def]
    from hsmflash.token.keys import generate_key

    policy = dataclasses.replace(unrestricted_policy(),
                                 export=ExportRules(efuse_burn=True))
    with Station.open(token_config, policy, tmp_path / "audit.jsonl", station="t",
                      actor="t") as st:
        generate_key(st.session, f"{uniq}-m", "aes-256", ("derive",))
        yield st, st.key(f"{uniq}-m"), tmp_path / "audit.jsonl"


def _records(log: Path) -> list[dict[str, object]]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_station_has_no_key_operations_outside_use(station) -> None:  # type: ignore[no-untyped-def]
    st, _master, _log = station
    for name in ("signer", "cipher", "derive", "export"):
        assert not hasattr(st, name), name


def test_handle_stops_working_when_the_use_ends(station) -> None:  # type: ignore[no-untyped-def]
    st, master, _log = station
    with st.use("derive", master) as use:
        use.derive(MAC, "XTS_AES_128_KEY").destroy()
    with pytest.raises(InternalError, match="after its audited use ended"):
        use.derive(MAC, "XTS_AES_128_KEY")


def test_exports_are_declared_checked_first_and_recorded(station) -> None:  # type: ignore[no-untyped-def]
    st, master, log = station
    before = len(_records(log))
    # forbidden by the policy: refused before the intent record
    with pytest.raises(PolicyRefused, match="esp32_classic_transient"), \
            st.use("encrypt", master, exports=["esp32_classic_transient"]):
        pytest.fail("the block must not run")
    assert len(_records(log)) == before
    # an export the use did not declare is refused even though the policy allows it
    with pytest.raises(InternalError, match="not declared"), st.use("derive", master) as use:
        derived = use.derive(MAC, "XTS_AES_128_KEY", exportable=True)
        try:
            use.export(derived, "efuse_burn")
        finally:
            derived.destroy()
    # declared and allowed: exported, recorded with its KCV, even though the step then fails
    with pytest.raises(RuntimeError), st.use("burn", master, exports=["efuse_burn"]) as use:
        derived = use.derive(MAC, "XTS_AES_128_KEY", exportable=True)
        kcv = derived.kcv
        key = use.export(derived, "efuse_burn")
        derived.destroy()
        assert len(key) == 32
        raise RuntimeError("the burn failed")
    failed = _records(log)[-1]
    assert failed["phase"] == "error"
    assert failed["detail"]["exported"] == [  # type: ignore[index]
        {"purpose": "XTS_AES_128_KEY", "kcv": kcv, "why": "efuse_burn"}]
    assert key.hex() not in log.read_text()
