"""Restart policies (agent/restart.py): the pure decision, then the agent's restarts on the
fake driver in-process (a crash seen by a refresh, as the sweep sees it)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from agentkit import ok

from corral.agent.handlers import restart_ended
from corral.agent.restart import Restarter, covers, decide, prune
from corral.agent.state import AgentState
from corral.agent.store import InstanceRecord
from corral.bus.messages import RestartPolicy
from corral.drivers.base import Driver
from corral.drivers.fake import FakeDriver, FakeWorld


def test_covers_by_mode() -> None:
    assert not covers(RestartPolicy(), "failed")
    assert covers(RestartPolicy(mode="on-failure"), "failed")
    assert not covers(RestartPolicy(mode="on-failure"), "exited")
    assert covers(RestartPolicy(mode="always"), "exited")
    assert covers(RestartPolicy(mode="always"), "failed")
    for mode in ("no", "on-failure", "always"):
        assert not covers(RestartPolicy(mode=mode), "stopped")  # type: ignore[arg-type]
        assert not covers(RestartPolicy(mode=mode), "running")  # type: ignore[arg-type]


def test_attempts_are_counted_within_the_interval() -> None:
    p = RestartPolicy(mode="on-failure", attempts=2, interval=60, delay=5)
    assert decide(p, [], 1000).restart
    assert decide(p, [], 1000).delay == 5
    assert decide(p, [990], 1000).restart
    assert not decide(p, [980, 990], 1000).restart  # two within the last minute: give up
    assert decide(p, [900, 990], 1000).restart  # one of them left the window
    assert decide(p, [900, 930], 1000).recent == 0
    assert prune(p, [900, 950, 990], 1000) == [950, 990]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _agent(tmp_path: Path, world: FakeWorld | None = None, allowed: Any = None,
           clock: Clock | None = None) -> tuple[AgentState, FakeDriver, Restarter]:
    drv = FakeDriver("h1", world)
    drivers: dict[str, Driver] = {"fake": drv}
    st = AgentState(tmp_path, drivers, stop_timeout=1.0)
    restarter: Restarter

    async def start(rec: InstanceRecord) -> None:
        await restart_ended(st, rec, restarter.made)

    restarter = Restarter(start, st.save, allowed or (lambda rec: True), clock or Clock())
    st.on_end.append(restarter.noticed)
    return st, drv, restarter


async def _run(st: AgentState, name: str = "a", **policy: Any) -> InstanceRecord:
    spec = {"name": name, "driver": "fake", "command": ["run"], "epoch": 1,
            "restart": {"mode": "on-failure", "delay": 0, **policy}}
    await ok(st, "create", spec=spec)
    await ok(st, "start", name=name, epoch=1)
    return st.records[name]


async def _settle(r: Restarter) -> None:
    """Let the scheduled restarts run (bounded: each is one sleep of its delay)."""
    for _ in range(100):
        if not r.tasks:
            return
        await asyncio.gather(*r.tasks.values(), return_exceptions=True)
    raise AssertionError("restarts still pending")


async def _crash(st: AgentState, drv: FakeDriver, r: Restarter, name: str = "a",
                 code: int = 1) -> InstanceRecord:
    drv.crash(name, code=code)
    rec = st.records[name]
    await st.refresh(rec)  # what the sweep does
    await _settle(r)
    return rec


async def test_a_failure_is_restarted_up_to_attempts_then_stays_failed(tmp_path: Path) -> None:
    st, drv, r = _agent(tmp_path)
    rec = await _run(st, attempts=2)
    pid = rec.pid
    await _crash(st, drv, r)
    assert rec.state == "running" and rec.pid != pid
    assert (await ok(st, "status", name="a"))["restarts"] == 1
    await _crash(st, drv, r)
    assert rec.state == "running"
    await _crash(st, drv, r)  # a third end within the interval: given up
    assert rec.state == "failed"
    assert rec.extra["restart_gave_up"] and "restart_due" not in rec.extra
    assert (await ok(st, "status", name="a"))["restarts"] == 2
    # an operator's start gives it its attempts back; the count goes on
    await ok(st, "start", name="a", epoch=2)
    await _crash(st, drv, r)
    assert rec.state == "running" and rec.extra["restarts"] == 3


async def test_the_window_slides(tmp_path: Path) -> None:
    clock = Clock()
    st, drv, r = _agent(tmp_path, clock=clock)
    rec = await _run(st, attempts=1, interval=60)
    await _crash(st, drv, r)
    assert rec.state == "running"
    clock.now += 61  # the first restart left the window
    await _crash(st, drv, r)
    assert rec.state == "running" and rec.extra["restarts"] == 2
    clock.now += 10
    await _crash(st, drv, r)
    assert rec.state == "failed"


async def test_exits_follow_the_mode_and_asked_ends_never_restart(tmp_path: Path) -> None:
    st, drv, r = _agent(tmp_path)
    on_failure = await _run(st, "a")
    await _crash(st, drv, r, "a", code=0)
    assert on_failure.state == "exited"  # a clean exit is not a failure
    always = await _run(st, "b", mode="always")
    await _crash(st, drv, r, "b", code=0)
    assert always.state == "running" and always.extra["restarts"] == 1
    await ok(st, "stop", name="b")
    await _settle(r)
    assert always.state == "stopped"
    c = await _run(st, "c", mode="always")
    await ok(st, "kill", name="c", signal=9)
    await _settle(r)
    assert c.state == "stopped" and "restarts" not in c.extra
    d = await _run(st, "d", mode="no")
    await _crash(st, drv, r, "d")
    assert d.state == "failed" and "restart_due" not in d.extra


async def test_a_delay_waits_and_a_stop_meanwhile_wins(tmp_path: Path) -> None:
    st, drv, r = _agent(tmp_path)
    rec = await _run(st, delay=30)
    drv.crash("a", code=3)
    await st.refresh(rec)
    assert rec.state == "failed" and rec.extra["restart_due"] == 1030.0
    assert "a" in r.tasks  # waiting for its delay
    r.cancel_all()
    # the instance is stopped by hand before the delay ran out: the restart does nothing
    rec.stop_requested = True
    assert not await restart_ended(st, rec, r.made)
    assert rec.state == "failed" and "restarts" not in rec.extra


async def test_a_pending_restart_survives_an_agent_restart(tmp_path: Path) -> None:
    world = FakeWorld()
    clock = Clock()
    st, drv, r = _agent(tmp_path, world, clock=clock)
    rec = await _run(st, delay=30)
    drv.crash("a", code=1)
    await st.refresh(rec)
    r.cancel_all()  # the agent is stopped during the delay
    st2, _drv2, r2 = _agent(tmp_path, world, clock=clock)
    await st2.recover_all()
    clock.now += 30
    for rec2 in st2.records.values():
        r2.resume(rec2)
    await _settle(r2)
    assert st2.records["a"].state == "running" and st2.records["a"].extra["restarts"] == 1


async def test_nothing_is_restarted_when_not_allowed(tmp_path: Path) -> None:
    """A fenced host restarts nothing the server would start elsewhere."""
    st, drv, r = _agent(tmp_path, allowed=lambda rec: False)
    rec = await _run(st)
    await _crash(st, drv, r)
    assert rec.state == "failed" and "restart_due" not in rec.extra


async def test_a_run_that_ends_at_once_is_restarted_again(tmp_path: Path) -> None:
    """The restart's own look sees the new run ended already: the next restart is scheduled
    from inside the first, which must not cancel itself."""
    st, drv, r = _agent(tmp_path)
    rec = await _run(st, attempts=3)
    real_start = drv.start

    def start_and_crash(handle: Any) -> Any:
        out = real_start(handle)
        drv.crash("a", code=2)
        return out

    drv.start = start_and_crash  # type: ignore[method-assign]
    await _crash(st, drv, r)
    assert rec.state == "failed" and rec.extra["restarts"] == 3
    assert rec.extra["restart_gave_up"]
