"""A heartbeat that only says "still here" writes nothing: the leader keeps the lease in memory
and the host's row gets it every half lease, or with a change. Expiry reads both."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.orm import Session, sessionmaker

from corral.bus.messages import Capacity, Heartbeat, InstanceReport, JoinRequest
from corral.config import Settings
from corral.control.db import Host, Instance, open_db
from corral.control.fleet import Fleet

LEASE = 10.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[Fleet, Clock, sessionmaker[Session], list[int]]]:
    engine, sessions = open_db(Settings(data_dir=tmp_path))
    clock = Clock()
    fleet = Fleet(sessions, Settings(lease_seconds=LEASE, heartbeat_seconds=2.0), clock)
    flushes: list[int] = []
    event.listen(sessions, "after_flush", lambda *_: flushes.append(1))
    try:
        yield fleet, clock, sessions, flushes
    finally:
        engine.dispose()


def _join(fleet: Fleet) -> None:
    fleet.join(JoinRequest(host="h1", address="127.0.0.1", agent_version="t",
                           capacity=Capacity(cores=2, memory_bytes=2**30, disk_bytes=0),
                           drivers={"fake": {}}))
    with fleet.sessions.begin() as s:
        s.add(Instance(name="web", host="h1", driver="fake", command=["x"], cpus=0.1,
                       memory_bytes=1, desired_state="running", state="running", pid=7,
                       epoch=1, created_at=1.0, updated_at=1.0))


def _beat(fleet: Fleet, state: str = "running", seq: int = 1) -> Any:
    return fleet.heartbeat("h1", Heartbeat(host="h1", seq=seq, sent_at=0.0, instances=[
        InstanceReport(name="web", driver="fake", state=state, pid=7, epoch=1)]))


def test_a_heartbeat_that_changes_nothing_writes_nothing(
        world: tuple[Fleet, Clock, sessionmaker[Session], list[int]]) -> None:
    fleet, clock, sessions, flushes = world
    _join(fleet)
    flushes.clear()
    for i in range(4):  # within the first half of the lease the join wrote
        clock.now += 1.0
        assert _beat(fleet, seq=i).lease_expires_at == clock.now + LEASE
    assert flushes == []
    clock.now += 2.0  # past the half: the row's lease is renewed, once
    _beat(fleet)
    _beat(fleet)
    assert len(flushes) == 1
    with sessions() as s:
        host = s.get(Host, "h1")
        assert host is not None and host.lease_expires_at == clock.now + LEASE
    clock.now += 0.5
    _beat(fleet, state="exited")  # a change is written at once
    assert len(flushes) == 2


def test_expiry_goes_by_the_newest_heartbeat_and_writes_it_down(
        world: tuple[Fleet, Clock, sessionmaker[Session], list[int]]) -> None:
    fleet, clock, sessions, _ = world
    _join(fleet)
    clock.now += 4.0
    _beat(fleet)  # in memory only: the row still says join + LEASE
    last = clock.now
    clock.now += LEASE - 1.0  # the row's lease ran out, the heartbeat's did not
    assert fleet.expire_leases() == []
    clock.now += 2.0
    assert fleet.expire_leases() == ["h1"]
    with sessions() as s:
        host = s.get(Host, "h1")
        web = s.get(Instance, "web")
        assert host is not None and web is not None
        assert host.state == "down" and web.state == "lost"
        # the failover grace counts from the lease that really ran out
        assert host.lease_expires_at == last + LEASE and host.last_heartbeat == last


def test_a_standby_added_is_guarded_at_the_next_heartbeat(
        world: tuple[Fleet, Clock, sessionmaker[Session], list[int]]) -> None:
    from corral.control.db import Standby

    fleet, _, _, _ = world
    _join(fleet)
    fleet.join(JoinRequest(host="h2", address="127.0.0.2", agent_version="t",
                           capacity=Capacity(cores=2, memory_bytes=2**30, disk_bytes=0),
                           drivers={"fake": {}}))
    assert _beat(fleet).guarded == []
    with fleet.sessions.begin() as s:
        s.add(Standby(instance="web", host="h2", every_seconds=60.0, state="new"))
    assert _beat(fleet).guarded == ["web"]  # no waiting out the cache
    with fleet.sessions.begin() as s:
        sb = s.get(Standby, "web")
        assert sb is not None
        s.delete(sb)
    assert _beat(fleet).guarded == []
