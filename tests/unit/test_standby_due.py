"""Which standbys the refresh loop starts: due by interval, never while a host is down or the
instance is in a state that cannot be copied, and a refresh that keeps failing is retried once
per interval (not in a loop)."""

from __future__ import annotations

from sqlalchemy import create_engine
from sqlalchemy.orm import Session, sessionmaker

from corral.control.db import Base, Host, Instance, Standby
from corral.control.standbys import due


def fleet() -> sessionmaker[Session]:
    engine = create_engine("sqlite://")
    Base.metadata.create_all(engine)
    sessions = sessionmaker(engine, expire_on_commit=False)
    with sessions.begin() as s:
        for h in ("a", "b"):
            s.add(Host(name=h, address="127.0.0.1", cores=2, memory_bytes=1 << 30,
                       disk_bytes=1 << 30, drivers={}, state="up"))
        s.add(Instance(name="web", host="a", driver="process", command=["x"], cpus=0.1,
                       memory_bytes=1, desired_state="running", state="running", epoch=1))
        s.add(Standby(instance="web", host="b", every_seconds=60.0, state="new",
                      created_at=0.0))
    return sessions


def set_(sessions: sessionmaker[Session], model: type, key: str, **fields: object) -> None:
    with sessions.begin() as s:
        row = s.get(model, key)
        for k, v in fields.items():
            setattr(row, k, v)


def test_due_by_interval() -> None:
    sessions = fleet()
    assert due(sessions, 1000.0, {}) == ["web"]  # never synced
    set_(sessions, Standby, "web", last_sync_at=990.0, data_at=990.0)
    assert due(sessions, 1000.0, {}) == []
    assert due(sessions, 1050.0, {}) == ["web"]


def test_a_failing_refresh_is_retried_once_per_interval() -> None:
    sessions = fleet()
    tried = {"web": 1000.0}
    assert due(sessions, 1001.0, tried) == []
    assert due(sessions, 1060.0, tried) == ["web"]


def test_not_while_a_host_is_down_or_the_instance_cannot_be_copied() -> None:
    sessions = fleet()
    set_(sessions, Host, "b", state="down")
    assert due(sessions, 1000.0, {}) == []
    set_(sessions, Host, "b", state="up")
    set_(sessions, Host, "a", state="down")
    assert due(sessions, 1000.0, {}) == []
    set_(sessions, Host, "a", state="up")
    for state in ("frozen", "lost", "pending"):
        set_(sessions, Instance, "web", state=state)
        assert due(sessions, 1000.0, {}) == [], state
    set_(sessions, Instance, "web", state="stopped")
    assert due(sessions, 1000.0, {}) == ["web"]
