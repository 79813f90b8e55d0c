"""The agent's instance records: atomic JSON per instance (rewritten only when changed), safe
names, the state translation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from corral.agent.report import apply_status, observed_state, to_report
from corral.agent.store import RECORD_FILE, InstanceRecord, Store, check_name, write_atomic
from corral.bus.messages import WireSpec
from corral.bus.rpc import CALLS
from corral.drivers.base import Handle, Status
from corral.errors import InvalidRequest
from corral.lifecycle import State


def _record(name: str = "web-1", **kw: object) -> InstanceRecord:
    spec = WireSpec(name=name, driver="process", command=["sleep", "9"], epoch=3)
    handle = Handle(driver="process", name=name, data={"pid": 42, "start_ticks": 7})
    return InstanceRecord(spec=spec, handle=handle, epoch=3, **kw)  # type: ignore[arg-type]


def test_agent_has_exactly_one_handler_per_call() -> None:
    from corral.agent.handlers import HANDLERS

    assert set(HANDLERS) == set(CALLS)


def test_round_trip(tmp_path: Path) -> None:
    store = Store(tmp_path)
    rec = _record(state="running", pid=42, stop_requested=True)
    store.save(rec)
    assert (tmp_path / "instances" / "web-1" / RECORD_FILE).is_file()
    loaded = Store(tmp_path).load_all()
    assert list(loaded) == ["web-1"]
    got = loaded["web-1"]
    assert got.to_dict() == rec.to_dict()
    assert got.handle.data == {"pid": 42, "start_ticks": 7}
    assert got.spec.epoch == 3


def test_unreadable_record_is_skipped_not_deleted(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.save(_record("good"))
    bad = tmp_path / "instances" / "bad"
    bad.mkdir()
    (bad / RECORD_FILE).write_text("{not json")
    assert list(store.load_all()) == ["good"]
    assert (bad / RECORD_FILE).exists()


def test_remove_drops_directory(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.save(_record())
    (store.dir_for("web-1") / "rootfs").mkdir()
    store.remove("web-1")
    assert not store.dir_for("web-1").exists()
    assert store.load_all() == {}
    store.remove("web-1")  # idempotent


def test_write_atomic_replaces_whole_file(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    write_atomic(path, b'{"a": 1}')
    write_atomic(path, b'{"a": 2}')
    assert json.loads(path.read_text()) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


@pytest.mark.parametrize("bad", ["", "../etc", "a/b", ".hidden", "a.b", "x" * 200, "a b"])
def test_unsafe_names_refused(bad: str) -> None:
    with pytest.raises(InvalidRequest):
        check_name(bad)


@pytest.mark.parametrize(
    ("status", "stop_requested", "expected"),
    [
        (Status("running", pid=5), False, State.RUNNING),
        (Status("frozen", pid=5), False, State.FROZEN),
        (Status("created"), False, State.CREATED),
        (Status("exited", exit_code=0), False, State.EXITED),
        (Status("exited", exit_code=3), False, State.FAILED),
        (Status("exited", signal=9), False, State.FAILED),
        (Status("exited"), False, State.FAILED),  # code unknown after an agent restart
        (Status("stopped", signal=15), True, State.STOPPED),
        (Status("stopped"), False, State.STOPPED),
        (Status("exited", exit_code=137), True, State.STOPPED),
        (Status("weird"), False, State.FAILED),
    ],
)
def test_observed_state(status: Status, stop_requested: bool, expected: State) -> None:
    assert observed_state(status, stop_requested) == expected


def test_apply_status_tracks_changes_and_keeps_known_exit_code() -> None:
    rec = _record(state="running", pid=42)
    assert apply_status(rec, Status("exited", exit_code=2)) is True
    assert (rec.state, rec.pid, rec.exit_code) == ("failed", None, 2)
    # a later look that cannot see the code keeps the one learnt before
    assert apply_status(rec, Status("exited")) is False
    assert rec.exit_code == 2
    assert apply_status(rec, Status("running", pid=50)) is True
    report = to_report(rec)
    assert (report.state, report.pid, report.exit_code, report.epoch) == ("running", 50, None, 3)


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


def test_an_unchanged_record_is_not_written_again(tmp_path: Path) -> None:
    store = Store(tmp_path)
    rec = _record("web")
    store.save(rec)
    path = store.dir_for("web") / RECORD_FILE
    first = _stamp(path)
    store.save(rec)  # a refresh that changed nothing
    assert _stamp(path) == first
    rec.state = "running"
    store.save(rec)
    assert _stamp(path) != first  # a new file renamed into place
    assert Store(tmp_path).load_all()["web"].state == "running"


def test_what_was_loaded_counts_as_written_and_a_removed_record_is_written_anew(
        tmp_path: Path) -> None:
    Store(tmp_path).save(_record("web"))
    again = Store(tmp_path)  # a restarted agent
    rec = again.load_all()["web"]
    path = again.dir_for("web") / RECORD_FILE
    first = _stamp(path)
    again.save(rec)
    assert _stamp(path) == first
    again.remove("web")
    assert not path.exists()
    again.save(rec)  # the same content, but the file is gone: written
    assert path.exists() and again.load_all()["web"].name == "web"
