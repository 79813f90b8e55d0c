"""The agent's instance records (agent/store.py): a record is rewritten only when it changed,
and what is on disk is always the last record saved."""

from __future__ import annotations

from pathlib import Path

from corral.agent.store import RECORD_FILE, InstanceRecord, Store
from corral.bus.messages import WireSpec
from corral.drivers.base import Handle


def _rec(name: str = "web") -> InstanceRecord:
    spec = WireSpec(name=name, driver="process", command=["sleep", "9"])
    return InstanceRecord(spec=spec, handle=Handle("process", name, {"pid": 1}))


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


def test_an_unchanged_record_is_not_written_again(tmp_path: Path) -> None:
    store = Store(tmp_path)
    rec = _rec()
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
    Store(tmp_path).save(_rec())
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
