"""The HA manager's decisions on a real (SQLite) database with fake operations and agents: when
a dead host's instances are failed over, once, bounded; what is reported lost; which copies a
returning host must kill or delete -- and that nothing is ever started by reconciling."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel
from sqlalchemy.orm import Session, sessionmaker

from corral.bus import rpc
from corral.bus.messages import InstanceReport
from corral.config import Settings
from corral.control.db import Host, Instance, Standby, open_db
from corral.control.fleet import Fleet
from corral.errors import Conflict, CorralError, NotFound
from corral.ha.manager import HaManager, plan_rejoin
from corral.ha.reconcile import Record
from corral.ops.store import OpRecord, OpState

NOW = 10_000.0


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


class FakeOps:
    """Records begun operations; the test decides how and when each one ends."""

    def __init__(self) -> None:
        self.store = self
        self.begun: list[tuple[str, str, dict[str, Any]]] = []
        self.records: dict[str, OpRecord] = {}
        self.refuse: CorralError | None = None

    async def begin(self, kind: str, target: str, params: dict[str, Any]) -> OpRecord:
        if self.refuse is not None:
            raise self.refuse
        rec = OpRecord(kind=kind, target=target, params=params)
        self.records[rec.id] = rec
        self.begun.append((kind, target, params))
        return rec

    def get(self, op_id: str) -> OpRecord | None:
        return self.records.get(op_id)

    def finish(self, target: str, state: OpState, message: str = "") -> None:
        for rec in self.records.values():
            if rec.target == target:
                rec.state = state
                rec.error = {"message": message} if message else None


class FakeAgents:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, dict[str, Any]]] = []

    async def call(self, host: str, call: rpc.Call[Any, Any], args: BaseModel) -> Any:
        self.calls.append((host, call.verb, args.model_dump(exclude_unset=True)))
        return None


class Events:
    def __init__(self) -> None:
        self.got: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, type_: str, **fields: Any) -> None:
        self.got.append((type_, fields))

    def of(self, type_: str) -> list[dict[str, Any]]:
        return [f for t, f in self.got if t == type_]


@pytest.fixture
def sessions(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    engine, made = open_db(Settings(data_dir=tmp_path))
    yield made
    engine.dispose()


def _host(name: str, state: str, lease: float) -> Host:
    return Host(name=name, address="10.0.0.1", cores=2, memory_bytes=2**30, disk_bytes=2**30,
                drivers={"process": {}}, state=state, lease_expires_at=lease)


def _inst(name: str, host: str, state: str = "lost", desired: str = "running",
          epoch: int = 3) -> Instance:
    return Instance(name=name, host=host, driver="process", command=["x"], cpus=0.1,
                    memory_bytes=2**20, desired_state=desired, state=state, epoch=epoch)


def _standby(name: str, host: str, synced: bool = True) -> Standby:
    return Standby(instance=name, host=host, every_seconds=60.0, state="ready",
                   data_at=NOW - 30 if synced else None)


def _setup(sessions: sessionmaker[Session], *rows: Any) -> None:
    with sessions.begin() as s:
        s.add_all([_host("h1", "down", NOW - 2.0), _host("h2", "up", NOW + 8),
                   _host("h3", "down", NOW - 50)])
        s.flush()
        for r in rows:
            s.add(r)
            s.flush()


def _manager(sessions: sessionmaker[Session], clock: Clock, ops: FakeOps,
             agents: FakeAgents | None = None, events: Events | None = None,
             max_parallel: int = 4) -> HaManager:
    settings = Settings(failover_grace_seconds=1.0, lease_seconds=10.0)
    fleet = Fleet(sessions, settings, clock)
    return HaManager(fleet, agents or FakeAgents(), ops, settings, events, max_parallel)


async def _settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0.01)


async def test_dead_host_fails_over_after_grace_and_only_once(
        sessions: sessionmaker[Session]) -> None:
    _setup(sessions, _inst("web", "h1"), _standby("web", "h2"))
    clock, ops, events = Clock(), FakeOps(), Events()
    ha = _manager(sessions, clock, ops, events=events)
    clock.now = NOW - 2.0 + 0.5  # lease ran out 0.5 s ago: still within the grace
    assert ha.tick() == []
    clock.now = NOW
    assert [c.instance for c in ha.tick()] == ["web"]
    await _settle()
    assert ops.begun == [("failover", "web", {"from": "h1"})]
    assert events.of("instance.failover")[0]["host"] == "h2"
    assert ha.tick() == []  # the same down episode is handled once
    ops.finish("web", OpState.SUCCEEDED)
    await _settle()
    assert events.of("instance.failover_failed") == []
    await ha.stop()


async def test_without_a_usable_standby_it_is_reported_lost(
        sessions: sessionmaker[Session]) -> None:
    _setup(sessions, _inst("bare", "h1"), _inst("nosync", "h1"), _inst("sbdown", "h1"),
           _inst("idle", "h1", desired="stopped"), _inst("gone", "h1", state="stopped"),
           _standby("nosync", "h2", synced=False), _standby("sbdown", "h3"))
    ops, events = FakeOps(), Events()
    ha = _manager(sessions, Clock(), ops, events=events)
    ha.tick()
    ha.tick()
    await _settle()
    assert ops.begun == []
    lost = {e["instance"]: e["reason"] for e in events.of("instance.lost_needs_restore")}
    assert lost == {"bare": "it has no standby",
                    "nosync": "its standby on h2 was never synced",
                    "sbdown": "its standby host h3 is down"}  # once each; idle/gone not at all
    await ha.stop()


async def test_busy_instance_is_tried_again_and_failures_are_published(
        sessions: sessionmaker[Session]) -> None:
    _setup(sessions, _inst("web", "h1"), _standby("web", "h2"))
    ops, events = FakeOps(), Events()
    ha = _manager(sessions, Clock(), ops, events=events)
    ops.refuse = Conflict("'web' is busy with another request", retryable=True)
    ha.tick()
    await _settle()
    assert ops.begun == [] and events.of("instance.failover_failed") == []
    ops.refuse = None
    ha.tick()  # tried again on the next pass
    await _settle()
    assert ops.begun == [("failover", "web", {"from": "h1"})]
    ops.finish("web", OpState.ROLLED_BACK, "standby host h2 is down")
    await _settle()
    failed = events.of("instance.failover_failed")
    assert len(failed) == 1 and failed[0]["message"] == "standby host h2 is down"
    await ha.stop()


async def test_refused_operation_is_published_not_retried(
        sessions: sessionmaker[Session]) -> None:
    _setup(sessions, _inst("web", "h1"), _standby("web", "h2"))
    ops, events = FakeOps(), Events()
    ops.refuse = NotFound("unknown operation kind 'failover'")
    ha = _manager(sessions, Clock(), ops, events=events)
    ha.tick()
    await _settle()
    ha.tick()
    await _settle()
    assert [e["message"] for e in events.of("instance.failover_failed")] == [
        "unknown operation kind 'failover'"]
    await ha.stop()


async def test_failovers_run_at_most_max_parallel_at_once(
        sessions: sessionmaker[Session]) -> None:
    _setup(sessions, _inst("a", "h1"), _inst("b", "h1"), _inst("c", "h1"),
           _standby("a", "h2"), _standby("b", "h2"), _standby("c", "h2"))
    ops = FakeOps()
    ha = _manager(sessions, Clock(), ops, max_parallel=2)
    ha.tick()
    await _settle()
    assert len(ops.begun) == 2  # the third waits for a slot
    first = ops.begun[0][1]
    ops.finish(first, OpState.SUCCEEDED)
    await _settle()
    assert sorted(t for _, t, _ in ops.begun) == ["a", "b", "c"]
    for name in "abc":
        ops.finish(name, OpState.SUCCEEDED)
    await _settle()
    await ha.stop()


def _rep(name: str, epoch: int, state: str = "running") -> InstanceReport:
    return InstanceReport(name=name, driver="runc", state=state, epoch=epoch)


def test_plan_rejoin_decisions() -> None:
    records = {"moved": Record("moved", "h2", 5), "moved_stopped": Record("moved_stopped", "h2", 5),
               "fenced": Record("fenced", "h1", 7), "fine": Record("fine", "h1", 4),
               "busy": Record("busy", "h2", 9), "newer": Record("newer", "h2", 2)}
    reports = [_rep("moved", 4), _rep("moved_stopped", 4, "stopped"), _rep("fenced", 6),
               _rep("fine", 4), _rep("busy", 1), _rep("newer", 3), _rep("unknown", 1)]
    plan = {c.instance: (c.kill, c.delete) for c in plan_rejoin("h1", reports, records, {"busy"})}
    assert plan == {
        "moved": (True, True),  # failed over while h1 was away: kill and delete here
        "moved_stopped": (False, True),  # fenced already: only the delete is left
        "fenced": (True, False),  # its own host, but an epoch the DB has moved past: kill it
    }  # fine: current; busy: an operation owns it; newer: an operator decides; unknown: not ours


async def test_rejoin_kills_then_deletes_and_never_starts(
        sessions: sessionmaker[Session]) -> None:
    _setup(sessions, _inst("web", "h2", state="running", epoch=5))
    agents, events = FakeAgents(), Events()
    ha = _manager(sessions, Clock(), FakeOps(), agents, events)
    todo = ha.on_report("h1", [_rep("web", 4)])
    assert len(todo) == 1
    assert ha.on_report("h1", [_rep("web", 4)]) == []  # already being cleaned up
    await _settle()
    assert agents.calls == [("h1", "kill", {"name": "web", "if_epoch": 4, "signal": 9}),
                            ("h1", "delete", {"name": "web", "if_epoch": 4, "set_aside": True})]
    assert all(verb not in ("start", "create") for _, verb, _ in agents.calls)
    assert events.of("instance.stale_copy_removed")[0]["deleted"] is True
    await ha.stop()


def test_a_shelved_instance_reported_late_is_deleted_by_its_epoch() -> None:
    """A shelved instance has no host; a late report of its old copy is cleaned up, guarded by
    the epoch (the agent then leaves the kept disk alone, see the agent's delete)."""
    plan = plan_rejoin("h1", [_rep("arch", 6, "stopped")], {"arch": Record("arch", None, 6)})
    assert [(c.instance, c.kill, c.delete, c.epoch) for c in plan] == [("arch", False, True, 6)]


async def test_a_pass_over_a_dead_host_reads_it_once_however_many_it_held(
        sessions: sessionmaker[Session]) -> None:
    """The pass runs every second while a host stays down: one read of the dead host's
    instances with their standbys, not lookups per instance (30,000 of them held the loop)."""
    from sqlalchemy import event

    many = [_inst(f"bare{i:03d}", "h1") for i in range(60)]
    _setup(sessions, *many, _inst("web", "h1"), _standby("web", "h2"))
    ha = _manager(sessions, Clock(), FakeOps(), events=Events())
    seen: list[str] = []
    event.listen(sessions.kw["bind"], "before_cursor_execute",
                 lambda _c, _cur, stmt, *_a: seen.append(stmt))
    found = {c.instance: (c.standby, c.reason) for c in ha.tick()}
    assert len(found) == 61 and found["web"] == ("h2", "")
    assert found["bare000"] == (None, "it has no standby")
    assert len([q for q in seen if q.lstrip().upper().startswith("SELECT")]) <= 3
    await _settle()
    await ha.stop()
