"""The cheap pass (:meth:`Fleet.quiet_heartbeat`) answers what changes nothing and hands
everything else to :meth:`Fleet.heartbeat`; it writes nothing itself (the rows' leases go in
one commit, :meth:`Fleet.write_leases`), and it never renews a host marked down."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import event
from sqlalchemy.orm import Session, sessionmaker
from test_heartbeat_writes import LEASE, Clock  # the same fleet under the same clock

from corral.bus.messages import Capacity, Heartbeat, InstanceReport, JoinRequest
from corral.config import Settings
from corral.control.db import Host, Instance, Standby, open_db
from corral.control.fleet import Fleet
from corral.ops import locks
from corral.ops.locks import LockSet

World = tuple[Fleet, Clock, sessionmaker[Session], list[list[object]]]


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    engine, sessions = open_db(Settings(data_dir=tmp_path))
    clock = Clock()
    fleet = Fleet(sessions, Settings(lease_seconds=LEASE, heartbeat_seconds=2.0), clock)
    flushed: list[list[object]] = []  # the objects each flush wrote
    event.listen(sessions, "after_flush",
                 lambda s, _ctx: flushed.append([*s.new, *s.dirty, *s.deleted]))
    for host in ("h1", "h2"):
        fleet.join(JoinRequest(host=host, address="127.0.0.1", agent_version="t",
                               capacity=Capacity(cores=2, memory_bytes=2**30, disk_bytes=0),
                               drivers={"fake": {}}))
    with sessions.begin() as s:
        s.add(Instance(name="web", host="h1", driver="fake", command=["x"], cpus=0.1,
                       memory_bytes=1, desired_state="running", state="running", pid=7,
                       epoch=2, created_at=1.0, updated_at=1.0))
    flushed.clear()
    try:
        yield fleet, clock, sessions, flushed
    finally:
        engine.dispose()


def _hb(state: str = "running", pid: int | None = 7, epoch: int = 2, name: str = "web"
        ) -> Heartbeat:
    return Heartbeat(host="h1", seq=1, sent_at=0.0, instances=[
        InstanceReport(name=name, driver="fake", state=state, pid=pid, epoch=epoch)])


def test_a_quiet_heartbeat_renews_in_memory_and_reads_the_records(world: World) -> None:
    fleet, clock, _, flushed = world
    clock.now += 1.0
    quiet = fleet.quiet_heartbeat("h1", _hb())
    assert quiet is not None and quiet.reply.known
    assert quiet.reply.lease_expires_at == clock.now + LEASE
    assert fleet.lease_until["h1"] == clock.now + LEASE
    assert quiet.records == {"web": ("h1", 2)}  # for the HA manager: no second read
    assert flushed == []
    # a stale report (older epoch) changes nothing either, as in the loop's pass
    assert fleet.quiet_heartbeat("h1", _hb(state="exited", epoch=1)) is not None


def test_past_half_a_lease_the_rows_are_renewed_together(world: World) -> None:
    fleet, clock, sessions, flushed = world
    clock.now += LEASE / 2 + 1.0
    assert fleet.write_leases() == 0
    assert fleet.quiet_heartbeat("h1", _hb()) is not None
    assert fleet.quiet_heartbeat("h2", Heartbeat(host="h2", seq=1, sent_at=0.0)) is not None
    assert flushed == []  # no commit per heartbeat
    clock.now += 0.5
    assert fleet.quiet_heartbeat("h1", _hb()) is not None  # the newest beat is what is written
    assert fleet.write_leases() == 2
    assert len(flushed) == 1 and all(isinstance(o, Host) for o in flushed[0])
    with sessions() as s:
        h1, h2 = s.get(Host, "h1"), s.get(Host, "h2")
        assert h1 is not None and h1.lease_expires_at == clock.now + LEASE
        assert h1.last_heartbeat == clock.now and h1.state == "up"
        assert h2 is not None and h2.lease_expires_at == clock.now - 0.5 + LEASE
    assert fleet.quiet_heartbeat("h1", _hb()) is not None
    assert fleet.write_leases() == 0  # renewed: nothing until the next half lease
    assert len(flushed) == 1
    clock.now += LEASE  # the lease check writes them too, in its transaction
    assert fleet.quiet_heartbeat("h1", _hb()) is not None
    assert fleet.expire_leases() == ["h2"]  # h2 went silent; h1's renewal is written
    with sessions() as s:
        h1 = s.get(Host, "h1")
        assert h1 is not None and h1.lease_expires_at == clock.now + LEASE


@pytest.mark.parametrize("hb", [_hb(state="exited", pid=None), _hb(pid=8),
                                _hb(name="nobody"), Heartbeat(host="h2", seq=1, sent_at=0.0)])
def test_what_would_change_goes_to_the_loop(world: World, hb: Heartbeat) -> None:
    fleet, _, _, flushed = world
    assert fleet.quiet_heartbeat("h1", hb) is None
    assert flushed == []


def test_unknown_and_down_hosts_go_to_the_loop(world: World) -> None:
    fleet, clock, sessions, _ = world
    unknown = Heartbeat(host="h9", seq=1, sent_at=0.0)
    assert fleet.quiet_heartbeat("h9", unknown) is None
    assert fleet.heartbeat("h9", unknown).known is False
    clock.now += LEASE + 1.0
    assert sorted(fleet.expire_leases()) == ["h1", "h2"]
    assert fleet.quiet_heartbeat("h1", _hb(state="lost", pid=None)) is None
    assert fleet.heartbeat("h1", _hb()).known  # the loop brings it back
    with sessions() as s:
        host = s.get(Host, "h1")
        assert host is not None and host.state == "up"


def test_a_host_marked_down_in_memory_is_not_renewed_by_the_cheap_pass(world: World) -> None:
    fleet, _, _, _ = world
    fleet.states["h1"] = "down"  # what expire_leases leaves behind, row written or not
    assert fleet.quiet_heartbeat("h1", _hb()) is None
    assert fleet.heartbeat("h1", _hb()).known and fleet.states["h1"] == "up"
    assert fleet.quiet_heartbeat("h1", _hb()) is not None


def test_a_locked_instance_is_left_to_its_verb(world: World) -> None:
    fleet, _, sessions, flushed = world
    with fleet.locks.holding("stop-web", LockSet.of([locks.instance("web")])):
        quiet = fleet.quiet_heartbeat("h1", _hb(state="exited", pid=None))
    assert quiet is not None and flushed == []
    with sessions() as s:
        web = s.get(Instance, "web")
        assert web is not None and web.state == "running"


def test_a_standby_added_is_guarded_at_the_next_quiet_heartbeat(world: World) -> None:
    fleet, _, sessions, _ = world
    quiet = fleet.quiet_heartbeat("h1", _hb())
    assert quiet is not None and quiet.reply.guarded == []
    with sessions.begin() as s:
        s.add(Standby(instance="web", host="h2", every_seconds=60.0, state="new"))
    quiet = fleet.quiet_heartbeat("h1", _hb())
    assert quiet is not None and quiet.reply.guarded == ["web"]


def _reads(sessions: sessionmaker[Session]) -> list[str]:
    """Every statement the fleet's engine runs from now on (the test's own too)."""
    seen: list[str] = []
    event.listen(sessions.kw["bind"], "before_cursor_execute",
                 lambda _c, _cur, stmt, *_a: seen.append(stmt))
    return seen


def test_a_heartbeat_saying_what_the_last_one_said_reads_nothing(world: World) -> None:
    fleet, clock, sessions, flushed = world
    seen = _reads(sessions)
    first = fleet.quiet_heartbeat("h1", _hb())
    assert first is not None and len(seen) >= 2  # the host's row and its instances'
    seen.clear()
    clock.now += 0.5
    again = fleet.quiet_heartbeat("h1", _hb())
    assert again is not None and seen == [] and flushed == []
    assert again.records == {"web": ("h1", 2)}
    assert again.reply.lease_expires_at == clock.now + LEASE  # renewed all the same
    assert fleet.quiet_heartbeat("h1", _hb(pid=8)) is None  # a different report reads


def test_a_write_of_an_instance_makes_its_host_compare_again(world: World) -> None:
    fleet, _, _, _ = world
    assert fleet.quiet_heartbeat("h1", _hb()) is not None
    fleet.move("web", pid=8)  # e.g. a verb's reply: the row no longer says what h1 said
    assert fleet.quiet_heartbeat("h1", _hb()) is None
    assert fleet.quiet_heartbeat("h2", Heartbeat(host="h2", seq=1, sent_at=0.0)) is not None
    fleet.move("web", pid=7)
    assert fleet.quiet_heartbeat("h1", _hb()) is not None  # agreed again
    fleet.move("web", host="h2")  # moved away: h1's stale word about it is not "quiet"
    assert fleet.quiet_heartbeat("h1", _hb()) is None
    fleet.move("web", host="h1")
    assert fleet.quiet_heartbeat("h1", _hb()) is not None


def test_a_host_row_removed_or_marked_down_ends_its_agreement(world: World) -> None:
    fleet, _, sessions, _ = world
    assert fleet.quiet_heartbeat("h2", Heartbeat(host="h2", seq=1, sent_at=0.0)) is not None
    with sessions.begin() as s:
        s.delete(s.get(Host, "h2"))
    assert fleet.quiet_heartbeat("h2", Heartbeat(host="h2", seq=1, sent_at=0.0)) is None
    assert fleet.quiet_heartbeat("h1", _hb()) is not None
    with sessions.begin() as s:  # what another writer (a takeover's) could leave
        h1 = s.get(Host, "h1")
        assert h1 is not None
        h1.state = "down"
    assert fleet.quiet_heartbeat("h1", _hb()) is None


def test_a_write_flushed_before_the_heartbeat_and_committed_after_counts(world: World
                                                                           ) -> None:
    fleet, _, sessions, _ = world
    with sessions.begin() as s:  # a session held open across an await, say
        web = s.get(Instance, "web")
        assert web is not None
        web.pid = 8
        s.flush()
        # the heartbeat reads the committed row (pid 7): it agrees, for now
        assert fleet.quiet_heartbeat("h1", _hb()) is not None
    assert fleet.quiet_heartbeat("h1", _hb()) is None  # committed: compared again


def test_a_report_let_pass_for_a_lock_is_compared_again_after_it(world: World) -> None:
    fleet, _, _, _ = world
    with fleet.locks.holding("stop-web", LockSet.of([locks.instance("web")])):
        assert fleet.quiet_heartbeat("h1", _hb(state="exited", pid=None)) is not None
    assert fleet.quiet_heartbeat("h1", _hb(state="exited", pid=None)) is None


def test_a_takeover_compares_every_heartbeat_again(world: World) -> None:
    fleet, _, sessions, _ = world
    assert fleet.quiet_heartbeat("h1", _hb()) is not None
    seen = _reads(sessions)
    fleet.fresh_leases()  # this server takes the lead: another may have written meanwhile
    seen.clear()
    assert fleet.quiet_heartbeat("h1", _hb()) is not None and len(seen) >= 2


def test_a_host_written_before_it_was_read_ends_every_agreement(world: World) -> None:
    """An instance whose host is set without being loaded first: the old host is unknown to
    the flush hook, so no agreement is kept (any host may have held it)."""
    from sqlalchemy import select
    from sqlalchemy.orm import load_only

    fleet, _, sessions, _ = world
    assert fleet.quiet_heartbeat("h1", _hb()) is not None
    with sessions.begin() as s:
        web = s.scalars(select(Instance).where(Instance.name == "web")
                        .options(load_only(Instance.pid))).one()
        web.host = "h2"  # its host column never loaded
    assert fleet.quiet_heartbeat("h1", _hb()) is None  # compared again: web is not h1's
