"""A large fleet heartbeats less often (control/pace.py): past ``max_heartbeats_per_second``
the heartbeat, lease and sample periods grow with the host count, the timing rules still
hold, a lease granted is never cut short by a shorter pace, and a new leader's fresh leases
are as long as the longest any leader granted."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker
from test_heartbeat_writes import Clock

from corral.bus.messages import Capacity, Heartbeat, InstanceReport, JoinRequest
from corral.config import Settings, timing_problems
from corral.control.db import Host, Instance, LeaderLease, open_db
from corral.control.fleet import Fleet
from corral.control.pace import HYSTERESIS, pace_for, repace

BUDGET = 10.0  # heartbeats a second: 20 hosts at the default 2 s heartbeat


def _settings(**kw: float) -> Settings:
    return Settings(max_heartbeats_per_second=kw.pop("budget", BUDGET), **kw)


def test_below_the_budget_the_settings_hold_and_above_it_every_period_stretches() -> None:
    s = _settings()
    for hosts in (0, 1, 20):
        p = pace_for(s, hosts)
        assert (p.heartbeat_seconds, p.lease_seconds, p.sample_seconds, p.factor) == (
            s.heartbeat_seconds, s.lease_seconds, s.sample_seconds, 1.0)
    p = pace_for(s, 100)  # 100 hosts at 10 a second: one heartbeat each every 10 s
    assert p.heartbeat_seconds == pytest.approx(10.0)
    assert p.factor == pytest.approx(5.0)
    assert p.lease_seconds == pytest.approx(5 * s.lease_seconds)
    assert p.sample_seconds == pytest.approx(5 * s.sample_seconds)
    assert pace_for(_settings(budget=0), 100_000).factor == 1.0  # no budget: no stretch


@pytest.mark.parametrize("preset", [{}, {"lease_seconds": 2.0, "heartbeat_seconds": 0.5,
                                         "fence_margin_seconds": 0.5}])
@pytest.mark.parametrize("hosts", [50, 1000, 5000])
def test_a_stretched_pace_keeps_the_timing_rules(preset: dict[str, float], hosts: int) -> None:
    s = _settings(**preset)
    assert timing_problems(s) == []
    p = pace_for(s, hosts)
    assert p.factor > 1.0
    stretched = replace(s, heartbeat_seconds=p.heartbeat_seconds,
                        lease_seconds=p.lease_seconds)  # the margin stays as set
    assert timing_problems(stretched) == []


def test_small_moves_keep_the_pace_and_large_ones_change_it() -> None:
    s = _settings()
    p = pace_for(s, 100)
    assert repace(p, s, int(100 * (1 + HYSTERESIS / 2))) is p
    assert repace(p, s, int(100 * (1 - HYSTERESIS / 2))) is p
    assert repace(p, s, 200).factor == pytest.approx(10.0)
    assert repace(p, s, 5).factor == 1.0  # back under the budget: the settings again


def test_a_dense_fleet_samples_less_often_but_at_least_every_half_lease() -> None:
    s = _settings(max_instance_samples_per_second=1000.0)
    assert pace_for(s, 10, 1000).sample_seconds == s.sample_seconds  # within the budget
    p = pace_for(s, 10, 3000)  # 3000 instances at 1000 figures a second: every 3 s
    assert p.sample_seconds == pytest.approx(3.0)
    assert (p.heartbeat_seconds, p.lease_seconds) == (s.heartbeat_seconds, s.lease_seconds)
    assert pace_for(s, 10, 10**6).sample_seconds == pytest.approx(s.lease_seconds / 2)
    big = pace_for(s, 100, 10**6)  # stretched by hosts too: half the stretched lease
    assert big.sample_seconds == pytest.approx(big.lease_seconds / 2)
    assert pace_for(_settings(max_instance_samples_per_second=0.0), 10,
                    10**6).sample_seconds == s.sample_seconds  # 0: no limit
    # the pace moves the samples alone, past the hysteresis only, leases untouched
    now = pace_for(s, 10, 3000)
    assert repace(now, s, 10, 3100) is now
    moved = repace(now, s, 10, 4000)
    assert moved.sample_seconds == pytest.approx(4.0)
    assert (moved.heartbeat_seconds, moved.lease_seconds) == (now.heartbeat_seconds,
                                                                now.lease_seconds)
    assert timing_problems(replace(s, max_instance_samples_per_second=-1.0))


def test_the_leader_counts_the_instances_its_hosts_report(
        world: tuple[Settings, Clock, sessionmaker[Session]]) -> None:
    settings, clock, sessions = world
    fleet = Fleet(sessions, replace(settings, max_instance_samples_per_second=4.0), clock)
    for name in ("h0", "h1"):
        _join(fleet, name)
    with sessions.begin() as s:
        for k in range(6):
            s.add(Instance(name=f"i{k}", host="h0" if k < 4 else "h1", driver="fake",
                           command=["x"], cpus=0.1, memory_bytes=1, desired_state="running",
                           state="running", epoch=0, created_at=1.0, updated_at=1.0))
    reports = [InstanceReport(name=f"i{k}", driver="fake", state="running") for k in range(6)]
    fleet.heartbeat("h0", Heartbeat(host="h0", seq=1, sent_at=0.0, instances=reports[:4]))
    quiet = fleet.quiet_heartbeat("h1", Heartbeat(host="h1", seq=1, sent_at=0.0,
                                                  instances=reports[4:]))
    assert quiet is not None
    assert sum(fleet.reported.values()) == 6
    assert fleet.repace().sample_seconds == pytest.approx(1.5)  # 6 instances at 4 a second
    # what a host claims of instances not its own (others', made up) is not counted: one
    # host must not slow every host's samples by reporting a thousand that do not exist
    made_up = [InstanceReport(name=f"x{k}", driver="fake", state="running")
               for k in range(1000)]
    fleet.heartbeat("h1", Heartbeat(host="h1", seq=2, sent_at=0.0,
                                    instances=reports[:4] + made_up))
    assert fleet.reported == {"h0": 4, "h1": 0}
    fleet.heartbeat("h0", Heartbeat(host="h0", seq=2, sent_at=0.0))  # h0 emptied
    assert fleet.repace().sample_seconds == settings.sample_seconds


def test_a_negative_budget_is_refused_with_what_to_set() -> None:
    problems = timing_problems(_settings(budget=-1))
    assert len(problems) == 1 and "max_heartbeats_per_second" in problems[0][0]


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[Settings, Clock, sessionmaker[Session]]]:
    settings = _settings(data_dir=tmp_path)  # type: ignore[arg-type]
    engine, sessions = open_db(settings)
    try:
        yield settings, Clock(), sessions
    finally:
        engine.dispose()


def _join(fleet: Fleet, name: str) -> float:
    reply = fleet.join(JoinRequest(host=name, address="127.0.0.1", agent_version="t",
                                   capacity=Capacity(cores=1, memory_bytes=2**30, disk_bytes=0),
                                   drivers={"fake": {}}))
    return reply.lease_seconds


def test_the_leader_stretches_its_leases_keeps_the_ceiling_and_never_cuts_a_lease(
        world: tuple[Settings, Clock, sessionmaker[Session]]) -> None:
    settings, clock, sessions = world
    fleet = Fleet(sessions, settings, clock)
    assert _join(fleet, "h000") == settings.lease_seconds
    for i in range(1, 100):
        _join(fleet, f"h{i:03d}")
    long = fleet.repace()  # by the hosts it granted a lease: 100
    assert long.factor == pytest.approx(5.0)
    with sessions() as s:  # written before any agent heard it
        lease_row = s.get(LeaderLease, 1)
        assert lease_row is not None and lease_row.lease_ceiling == pytest.approx(50.0)
    reply = fleet.heartbeat("h000", Heartbeat(host="h000", seq=1, sent_at=0.0, instances=[]))
    assert (reply.heartbeat_seconds, reply.lease_seconds) == (10.0, 50.0)
    assert reply.lease_expires_at == pytest.approx(clock.now + 50.0)
    granted = reply.lease_expires_at

    clock.now += 5.0
    assert fleet.repace(1).factor == 1.0  # the fleet shrinks: the settings' pace again
    quiet = fleet.quiet_heartbeat("h000", Heartbeat(host="h000", seq=2, sent_at=0.0,
                                                    instances=[]))
    assert quiet is not None
    assert quiet.reply.lease_seconds == settings.lease_seconds
    # the agent may not have heard this reply: the lease it holds (50 s) still counts here
    assert quiet.reply.lease_expires_at == pytest.approx(granted)
    clock.now += settings.lease_seconds + 1.0
    assert "h000" not in fleet.expire_leases()  # (the others, silent, are down)
    clock.now = granted + 0.5
    assert fleet.expire_leases() == ["h000"]

    # a new leader, whose own pace is short, grants the ceiling at its takeover
    new = Fleet(sessions, settings, clock)
    with sessions.begin() as s:
        host = s.get(Host, "h000")
        assert host is not None
        host.state = "up"
    assert new.fresh_leases() == 1
    with sessions() as s:
        host = s.get(Host, "h000")
        assert host is not None and host.lease_expires_at == pytest.approx(clock.now + 50.0)
