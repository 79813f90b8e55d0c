"""Failover on unhealthy (ha/unhealthy.py): the pure decision (who is failed over, why, and why
not), what the agent reports for it, and the leader's side on a real (SQLite) database with
fake operations: one promotion per copy, the reason in its params and its event, a skip said
once, and the cooldown read back from the operation records."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from corral.agent.report import to_report
from corral.agent.restart import Restarter
from corral.agent.store import InstanceRecord
from corral.api.models import CheckSpec, CreateInstance, InstanceView
from corral.api.spec import load
from corral.bus.messages import HealthCheck, InstanceReport, RestartPolicy, WireSpec
from corral.cli.spec_plan import plan
from corral.cli.spec_toml import dumps, export
from corral.config import Settings
from corral.control.db import Host, Instance, Standby, open_db
from corral.control.fleet import Fleet
from corral.drivers.base import Handle
from corral.errors import Busy, Conflict, InvalidRequest
from corral.ha.manager import HaManager
from corral.ha.unhealthy import COOLDOWN_S, PROMOTE, Facts, decide, trigger
from corral.ops.store import OperationStore, OpRecord, OpState

NOW = 100_000.0
REASON = "ConnectionRefusedError: [Errno 111] Connection refused"


def facts(**kw: Any) -> Facts:
    base: dict[str, Any] = dict(
        instance="db", opted_in=True, desired="running", state="failed", health="unknown",
        reason=REASON, gave_up=True, restarts=3, restart_mode="on-failure",
        target="tcp::5432", standby_host="h2", standby_up=True, standby_synced=True)
    return Facts(**{**base, **kw})


# -- the decision ------------------------------------------------------------------------------
def test_gave_up_after_failing_its_check_fails_over_and_says_why() -> None:
    v = decide(facts(), NOW)
    assert v is not None and v.act and v.refusal == ""
    assert v.why == f"unhealthy after 3 restarts: check tcp::5432 failed: {REASON}"


def test_restart_no_fails_over_once_unhealthy() -> None:
    f = facts(restart_mode="no", state="running", health="unhealthy", gave_up=False,
              restarts=0)
    v = decide(f, NOW)
    assert v is not None and v.act
    assert v.why.startswith("unhealthy (restart policy no): check tcp::5432 failed: ")
    assert decide(replace(f, health="healthy"), NOW) is None
    assert decide(replace(f, health="unknown"), NOW) is None


@pytest.mark.parametrize("change", [
    {"opted_in": False},  # not asked for
    {"desired": "stopped"},  # the operator stopped it
    {"gave_up": False},  # its agent still restarts it: the agent's job first
    {"reason": ""},  # it gave up on a crash, not on its check
    {"state": "running", "health": "unhealthy", "gave_up": False},  # on its way to a restart
    {"restart_mode": "always", "gave_up": False},
])
def test_nothing_to_decide(change: dict[str, Any]) -> None:
    assert decide(facts(**change), NOW) is None
    assert trigger(facts(**change)) is None


@pytest.mark.parametrize(("change", "words"), [
    ({"standby_host": None, "standby_up": False, "standby_synced": False},
     "it has no standby"),
    ({"standby_up": False}, "its standby host h2 is down"),
    ({"standby_synced": False}, "its standby on h2 was never synced"),
    ({"last_auto": NOW - 60}, "already failed over on unhealthy at"),
])
def test_why_not(change: dict[str, Any], words: str) -> None:
    v = decide(facts(**change), NOW)
    assert v is not None and not v.act
    assert words in v.refusal
    assert v.why.startswith("unhealthy after 3 restarts")


def test_the_cooldown_ends() -> None:
    assert decide(facts(last_auto=NOW - COOLDOWN_S + 1), NOW).act is False  # type: ignore[union-attr]
    v = decide(facts(last_auto=NOW - COOLDOWN_S - 1), NOW)
    assert v is not None and v.act
    v = decide(facts(last_auto=NOW - 120), NOW, cooldown=60)
    assert v is not None and v.act


# -- the flag on the wire ------------------------------------------------------------------------
def test_the_flag_lives_in_the_check_and_the_agent_ignores_it() -> None:
    req = CreateInstance(name="db", command=["x"],
                         check=CheckSpec(target="tcp::5432", failover=True))
    assert req.check is not None and req.check.model_dump()["failover"] is True
    assert CheckSpec(target="tcp::1").failover is False  # opt-in
    # the row keeps the check's JSON; the agent's model reads it without the flag
    assert HealthCheck.model_validate(req.check.model_dump()).target == "tcp::5432"


def test_the_flag_in_a_fleet_file_exports_and_plans_back_to_nothing() -> None:
    def view(failover: bool) -> InstanceView:
        return InstanceView.model_validate({
            "name": "db", "host": "host1", "driver": "process", "command": ["x"],
            "cpus": 0.1, "memory_bytes": 64 * 1024**2, "desired_state": "running",
            "state": "running", "created_at": 1.0, "updated_at": 1.0,
            "check": {"target": "tcp::5432", "failover": failover}})

    text = dumps(export([view(True)], []))
    assert '"failover" = true' in text
    assert plan(load(text), [view(True)], []).changes == []
    # off is the default: files written before the flag existed stay as they were
    assert "failover" not in dumps(export([view(False)], []))
    (change,) = plan(load(text), [view(False)], []).changes
    assert change.action == "recreate" and [d[0] for d in change.diffs] == ["check"]
    with pytest.raises(InvalidRequest):
        load('[[instance]]\nname = "db"\ncommand = ["x"]\n'
             '[instance.check]\ntarget = "tcp::1"\nfailover = "yes please"\n')


# -- what the agent reports ----------------------------------------------------------------------
def _record(mode: str = "on-failure", attempts: int = 1) -> InstanceRecord:
    spec = WireSpec(name="db", driver="process", command=["x"], cpus=0.1, memory_bytes=2**20,
                    restart=RestartPolicy(mode=mode, attempts=attempts),  # type: ignore[arg-type]
                    check=HealthCheck(target="tcp::5432"))
    return InstanceRecord(spec=spec, handle=Handle("process", "db"), epoch=4)


def test_the_agent_reports_giving_up_with_the_checks_reason() -> None:
    rec = _record()
    rec.state = "running"
    rec.extra.update(health="unhealthy", health_reason=REASON)
    r = to_report(rec)
    assert (r.health, r.health_reason, r.gave_up) == ("unhealthy", REASON, False)
    # health.py ended it for failing: the reason outlives the run's health
    rec.extra.update(ended_unhealthy=NOW, unhealthy_reason=REASON, health="unknown")
    rec.extra.pop("health_reason")
    rec.state = "failed"
    rec.extra["restart_times"] = [NOW - 1]  # one restart made: the one attempt is used
    saved: list[str] = []

    async def start(_: InstanceRecord) -> None:
        raise AssertionError("no restart past the attempts")

    Restarter(start, lambda r: saved.append(r.name), clock=lambda: NOW).noticed(rec)
    assert saved == ["db"]
    r = to_report(rec)
    assert (r.state, r.gave_up, r.health_reason) == ("failed", True, REASON)


def test_a_restart_forgets_the_reason() -> None:
    rec = _record(attempts=3)
    rec.state = "failed"
    rec.extra.update(ended_unhealthy=NOW, unhealthy_reason=REASON)
    Restarter(_never, lambda r: None, clock=lambda: NOW).made(rec)
    rec.state = "running"
    r = to_report(rec)
    assert (r.health_reason, r.gave_up) == ("", False)


async def _never(_: InstanceRecord) -> None:
    raise AssertionError("not called")


# -- the leader's side ---------------------------------------------------------------------------
class FakeOps:
    def __init__(self) -> None:
        self.store = self
        self.begun: list[tuple[str, str, dict[str, Any]]] = []
        self.records: dict[str, OpRecord] = {}
        self.refuse: Exception | None = None

    async def begin(self, kind: str, target: str, params: dict[str, Any]) -> OpRecord:
        if self.refuse is not None:
            raise self.refuse
        rec = OpRecord(kind=kind, target=target, params=params)
        self.records[rec.id] = rec
        self.begun.append((kind, target, params))
        return rec

    def get(self, op_id: str) -> OpRecord | None:
        return self.records.get(op_id)


class Events:
    def __init__(self) -> None:
        self.got: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, type_: str, **fields: Any) -> None:
        self.got.append((type_, fields))

    def of(self, type_: str) -> list[dict[str, Any]]:
        return [f for t, f in self.got if t == type_]


@pytest.fixture
def db(tmp_path: Path) -> Iterator[tuple[Engine, sessionmaker[Session]]]:
    engine, made = open_db(Settings(data_dir=tmp_path))
    with made.begin() as s:
        for h in ("h1", "h2"):
            s.add(Host(name=h, address="10.0.0.1", cores=2, memory_bytes=2**30,
                       disk_bytes=2**30, drivers={"process": {}}, state="up",
                       lease_expires_at=NOW + 10))
        s.flush()
        for name, opted in (("db", True), ("plain", False), ("alone", True)):
            s.add(Instance(name=name, host="h1", driver="process", command=["x"], cpus=0.1,
                           memory_bytes=2**20, desired_state="running", state="failed",
                           epoch=4, restart_policy={"mode": "on-failure", "attempts": 3},
                           check_spec={"target": "tcp::5432", "failover": opted}))
            s.flush()
        for name in ("db", "plain"):
            s.add(Standby(instance=name, host="h2", every_seconds=60.0, state="ready",
                          data_at=NOW - 30))
    yield engine, made
    engine.dispose()


def _report(name: str, epoch: int = 4, **kw: Any) -> InstanceReport:
    base: dict[str, Any] = dict(name=name, driver="process", state="failed", epoch=epoch,
                                restarts=3, health="unknown", health_reason=REASON,
                                gave_up=True)
    return InstanceReport(**{**base, **kw})


def _manager(made: sessionmaker[Session], ops: FakeOps, events: Events) -> HaManager:
    settings = Settings(lease_seconds=10.0)
    return HaManager(Fleet(made, settings, lambda: NOW), ops, ops,  # type: ignore[arg-type]
                     settings, events)


async def _settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0.01)


async def test_one_promotion_with_its_reason_and_skips_said_once(
        db: tuple[Engine, sessionmaker[Session]]) -> None:
    _, made = db
    ops, events = FakeOps(), Events()
    ha = _manager(made, ops, events)
    reports = [_report("db"), _report("plain"), _report("alone")]
    ha.on_report("h1", reports)
    ha.on_report("h1", reports)  # the next heartbeat: the promotion is in flight
    await _settle()
    why = f"unhealthy after 3 restarts: check tcp::5432 failed: {REASON}"
    assert ops.begun == [(PROMOTE, "db", {"reason": why})]
    (ev,) = events.of("instance.failover")
    assert (ev["instance"], ev["host"], ev["from"], ev["cause"], ev["reason"]) == (
        "db", "h2", "h1", "unhealthy", why)
    (skip,) = events.of("instance.failover_skipped")  # once, though heard twice
    assert (skip["instance"], skip["reason"]) == ("alone", "it has no standby")
    # a report from a host the row does not name is not that copy's
    assert ha.unhealthy.on_report("h2", [_report("db")]) == []
    for rec in ops.records.values():
        rec.state = OpState.ROLLED_BACK
        rec.error = {"message": "the last pass failed"}
    await _settle()
    (failed,) = events.of("instance.failover_failed")
    assert failed["message"] == "the last pass failed"
    await ha.stop()


async def test_the_cooldown_comes_from_the_operation_records(
        db: tuple[Engine, sessionmaker[Session]]) -> None:
    engine, made = db
    ops, events = FakeOps(), Events()
    ha = _manager(made, ops, events)
    store = OperationStore(engine)
    by_hand = OpRecord(kind=PROMOTE, target="db", params={}, created_at=NOW - 10)
    store.save(by_hand)  # an operator's promotion does not count
    ha.on_report("h1", [_report("db")])
    await _settle()
    assert len(ops.begun) == 1
    ha.unhealthy.acting.clear()
    auto = OpRecord(kind=PROMOTE, target="db", params={"reason": "unhealthy"},
                    created_at=NOW - 10, state=OpState.SUCCEEDED)
    store.save(auto)
    ops.begun.clear()
    ha.on_report("h1", [_report("db", epoch=5)])
    await _settle()
    assert ops.begun == []  # the row is at epoch 4: a report of another copy is ignored
    with made.begin() as s:
        inst = s.get(Instance, "db")
        assert inst is not None
        inst.epoch = 5
    ha.on_report("h1", [_report("db", epoch=5)])
    await _settle()
    assert ops.begun == []
    (skip,) = events.of("instance.failover_skipped")
    assert "already failed over on unhealthy" in skip["reason"]
    await ha.stop()


async def test_a_refusal_is_said_once_and_busy_is_tried_again(
        db: tuple[Engine, sessionmaker[Session]]) -> None:
    _, made = db
    ops, events = FakeOps(), Events()
    ha = _manager(made, ops, events)
    ops.refuse = Busy("'db' is busy with another request")
    ha.on_report("h1", [_report("db")])
    await _settle()
    assert events.of("instance.failover_skipped") == []
    ops.refuse = Conflict("cannot promote instance 'db': it is frozen")
    for _ in range(3):
        ha.on_report("h1", [_report("db")])
        await _settle()
    (skip,) = events.of("instance.failover_skipped")
    assert "frozen" in skip["reason"]
    ops.refuse = None
    ha.on_report("h1", [_report("db")])  # refused for this copy: not asked again
    await _settle()
    assert ops.begun == []
    await ha.stop()
