"""A server behind with its heartbeats does not take its own delay for its hosts': a lease
that ran out less than the queue's lag ago waits; one that ran out before does not, and the
lag is bounded by a lease (a stuck server still marks dead hosts down)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker
from test_heartbeat_writes import LEASE, Clock

from corral.bus.messages import Capacity, Heartbeat, JoinRequest
from corral.config import Settings
from corral.control.db import Host, open_db
from corral.control.fleet import Fleet, queue_lag


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[Fleet, Clock, sessionmaker[Session]]]:
    engine, sessions = open_db(Settings(data_dir=tmp_path))
    clock = Clock()
    fleet = Fleet(sessions, Settings(lease_seconds=LEASE, heartbeat_seconds=2.0), clock)
    try:
        yield fleet, clock, sessions
    finally:
        engine.dispose()


def test_the_lag_is_what_waits_at_the_rate_answered_and_never_more_than_a_lease() -> None:
    assert queue_lag(0, 500.0, LEASE) == 0.0
    assert queue_lag(1000, 500.0, LEASE) == 2.0
    assert queue_lag(100_000, 500.0, LEASE) == LEASE
    assert queue_lag(5, 0.0, LEASE) == LEASE  # answering nothing: as far behind as allowed


def test_a_lease_waits_for_the_lag_and_no_longer(
        world: tuple[Fleet, Clock, sessionmaker[Session]]) -> None:
    fleet, clock, sessions = world
    for name in ("a", "b"):
        fleet.join(JoinRequest(host=name, address="127.0.0.1", agent_version="t",
                               capacity=Capacity(cores=1, memory_bytes=2**30, disk_bytes=0),
                               drivers={"fake": {}}))
    clock.now += 3.0
    fleet.heartbeat("b", Heartbeat(host="b", seq=1, sent_at=0.0, instances=[]))
    clock.now += LEASE - 3.0 + 2.0  # a's lease ran out 2 s ago, b's has 1 s left
    assert fleet.expire_leases(slack=5.0) == []  # a's heartbeat may be in the queue
    assert fleet.expire_leases(slack=1.5) == ["a"]  # not that far behind: a is late
    clock.now += 3.0  # b's ran out 2 s ago
    assert fleet.expire_leases(slack=LEASE) == []
    clock.now += LEASE
    assert fleet.expire_leases(slack=LEASE) == ["b"]
    with sessions() as s:
        assert {h.name: h.state for h in s.query(Host)} == {"a": "down", "b": "down"}
