"""Failover on unhealthy (``corral run --check ... --failover-on-unhealthy``).

A restart cures a sick process, not a sick host (a failing disk, a broken NIC, a neighbour
eating the memory): an instance that opted in (``CheckSpec.failover``) and whose check still
fails after its agent's restart attempts is moved to its standby's host. The agent decides
nothing here; it reports what it knows (health, why the check failed, whether its restart policy
gave up: ``InstanceReport.health_reason``/``gave_up``) and the leader decides on each report:

* restart ``no``: the instance runs and is unhealthy (the check's threshold is the debounce);
* restart ``on-failure``/``always``: the agent gave up on it after it was ended for failing its
  check (a crash that ends the attempts is not a health problem and is left alone).

The move is the planned switch, a ``standby-promote`` with the reason in its params: a last
pass from the primary (no data dropped, unlike a failover from a dead host), the old copy
killed and reaped on its host before the copy starts on the standby's (``ensure_ended``: never
two copies), the old disk kept as the new standby. Without a usable standby, or when the
instance was already failed over on unhealthy within :data:`COOLDOWN_S`, nothing moves and an
``instance.failover_skipped`` event says why. The cooldown is read from the operation records
(every automatic promotion is one, with its reason), so it holds across a change of leader and
two sick copies never bounce the instance back and forth.

The decision is a pure function (:func:`decide` over :class:`Facts`), unit-tested without a
fleet; :class:`UnhealthyFailover` only reads rows, starts operations and emits events.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any, Protocol

from sqlalchemy import select
from sqlalchemy.orm import Session

from corral.bus.messages import InstanceReport
from corral.control.db import Host, Instance, Standby
from corral.control.fleet import Fleet
from corral.errors import CorralError
from corral.lifecycle import ENDED, State
from corral.ops.store import FINISHED, OpRecord, OpState, operations

log = logging.getLogger(__name__)

PROMOTE = "standby-promote"  # the operation kind control/operations/promote.py registers
#: at most one automatic failover per instance in this many seconds
COOLDOWN_S = 3600.0
OP_WAIT_S = 900.0  # how long the wait for one promotion's end may take


@dataclass(frozen=True)
class Facts:
    """What the decision reads of one instance: its row, its latest report, its standby."""

    instance: str
    opted_in: bool
    desired: str
    #: from the agent's report (fresher than the row, which ignores reports during operations)
    state: str
    health: str | None
    reason: str
    gave_up: bool
    restarts: int
    restart_mode: str
    target: str  # the check
    standby_host: str | None = None
    standby_up: bool = False
    standby_synced: bool = False
    #: when the last automatic failover on unhealthy of it started (None: never)
    last_auto: float | None = None


@dataclass(frozen=True)
class Verdict:
    act: bool
    #: what is wrong with it ("unhealthy after 3 restarts: check tcp::8080 failed: ...")
    why: str
    #: why it is not failed over (empty when ``act``)
    refusal: str = ""


def trigger(f: Facts) -> str | None:
    """Why ``f`` calls for a failover, or None while its own agent still handles it (or
    nothing is wrong, or it did not opt in)."""
    if not f.opted_in or f.desired != State.RUNNING.value:
        return None
    reason = f.reason or "unhealthy"
    if f.restart_mode == "no":
        if f.state == State.RUNNING.value and f.health == "unhealthy":
            return f"unhealthy (restart policy no): check {f.target} failed: {reason}"
        return None
    if f.gave_up and f.reason and f.state in {s.value for s in ENDED}:
        plural = "" if f.restarts == 1 else "s"
        return f"unhealthy after {f.restarts} restart{plural}: check {f.target} failed: {reason}"
    return None


def decide(f: Facts, now: float, cooldown: float = COOLDOWN_S) -> Verdict | None:
    """Promote its standby (``act``), say why not, or None: nothing to decide."""
    why = trigger(f)
    if why is None:
        return None
    if f.standby_host is None:
        return Verdict(False, why, "it has no standby")
    if not f.standby_up:
        return Verdict(False, why, f"its standby host {f.standby_host} is down")
    if not f.standby_synced:
        return Verdict(False, why, f"its standby on {f.standby_host} was never synced")
    if f.last_auto is not None and now - f.last_auto < cooldown:
        at = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(f.last_auto))
        return Verdict(False, why, f"it was already failed over on unhealthy at {at} (at most "
                       f"once per {cooldown / 60:g} min, so two sick copies never bounce it "
                       f"back and forth): look at the workload, or 'corral standby promote "
                       f"{f.instance}' by hand")
    return Verdict(True, why)


def worth_a_look(r: InstanceReport) -> bool:
    """Cheap filter of every heartbeat's reports before any row is read."""
    return r.health == "unhealthy" or (r.gave_up and bool(r.health_reason))


def facts(s: Session, host: str, r: InstanceReport) -> Facts | None:
    """The facts of ``r`` reported by ``host``; None when the row is not that copy (moved,
    another epoch, no check)."""
    inst = s.get(Instance, r.name)
    if inst is None or inst.host != host or inst.epoch != r.epoch or not inst.check_spec:
        return None
    check = inst.check_spec
    sb = s.get(Standby, r.name)
    sb_host = s.get(Host, sb.host) if sb is not None else None
    return Facts(
        instance=r.name, opted_in=bool(check.get("failover")), desired=inst.desired_state,
        state=r.state, health=r.health, reason=r.health_reason, gave_up=r.gave_up,
        restarts=r.restarts, restart_mode=str((inst.restart_policy or {}).get("mode", "no")),
        target=str(check.get("target", "")),
        standby_host=sb.host if sb is not None else None,
        standby_up=(sb is not None and sb.host != host and sb_host is not None
                    and sb_host.state == "up"),
        standby_synced=sb is not None and sb.data_at is not None)


def last_auto(s: Session, name: str, limit: int = 50) -> float | None:
    """When the newest automatic promotion of ``name`` (one with a reason in its params)
    started, from the operation records (the engine's table, in the same database)."""
    rows = s.execute(select(operations.c.body, operations.c.created_at)
                     .where(operations.c.target == name, operations.c.kind == PROMOTE)
                     .order_by(operations.c.created_at.desc()).limit(limit))
    for body, created_at in rows:
        try:
            params = json.loads(body).get("params") or {}
        except (ValueError, AttributeError):
            continue
        if params.get("reason"):
            return float(created_at)
    return None


class OpStore(Protocol):
    def get(self, op_id: str) -> OpRecord | None: ...


class OpsLike(Protocol):
    @property
    def store(self) -> OpStore: ...

    async def begin(self, kind: str, target: str, params: dict[str, Any]) -> OpRecord: ...


class UnhealthyFailover:
    """Runs :func:`decide` on the reports the leader hears (see the module's doc)."""

    def __init__(self, fleet: Fleet, ops: OpsLike, emit: Callable[..., None],
                 spawn: Callable[[Any], None], cooldown: float = COOLDOWN_S) -> None:
        self.fleet = fleet
        self.ops = ops
        self.emit = emit
        self.spawn = spawn
        self.cooldown = cooldown
        #: instances with a promotion being started or followed by this server
        self.acting: set[str] = set()
        #: (instance, epoch) -> the refusal last said: each is an event once per copy
        self.said: dict[tuple[str, int], str] = {}
        #: copies whose promotion the operation's own check refused: not asked again
        self.refused: set[tuple[str, int]] = set()

    def on_report(self, host: str, reports: Iterable[InstanceReport]) -> list[Verdict]:
        """Called with every join and heartbeat; returns the verdicts reached (for tests)."""
        out: list[Verdict] = []
        for r in reports:
            if not worth_a_look(r) or r.name in self.acting \
                    or r.name in self.fleet.locks.instances:
                continue
            with self.fleet.sessions() as s:
                f = facts(s, host, r)
                if f is None or trigger(f) is None:
                    continue
                f = replace(f, last_auto=last_auto(s, r.name))
            v = decide(f, self.fleet.clock(), self.cooldown)
            if v is None or (v.act and (r.name, r.epoch) in self.refused):
                continue
            out.append(v)
            if v.act:
                self.acting.add(r.name)
                self.spawn(self._promote(host, r.epoch, f, v))
            else:
                self._skipped(host, r.name, r.epoch, v.why, v.refusal)
        return out

    def _skipped(self, host: str, name: str, epoch: int, why: str, refusal: str) -> None:
        if self.said.get((name, epoch)) == refusal:
            return
        if len(self.said) > 10_000:  # bounded: old copies need no memory
            self.said.clear()
        self.said[(name, epoch)] = refusal
        log.error("instance %s on %s is %s; not failing it over: %s", name, host, why, refusal)
        self.emit("instance.failover_skipped", host=host, instance=name, reason=refusal,
                  check=why)

    async def _promote(self, host: str, epoch: int, f: Facts, v: Verdict) -> None:
        name = f.instance
        try:
            try:
                rec = await self.ops.begin(PROMOTE, name, {"reason": v.why})
            except CorralError as exc:
                # busy (a standby refresh in flight, say) is retryable: the next report asks
                # again; a refusal (its check: frozen, no data channel...) is final for this copy
                if not exc.retryable:
                    if len(self.refused) > 10_000:
                        self.refused.clear()
                    self.refused.add((name, epoch))
                    self._skipped(host, name, epoch, v.why, exc.message)
                return
            log.warning("instance %s on %s is %s: promoting its standby on %s (operation %s)",
                        name, host, v.why, f.standby_host, rec.id)
            self.emit("instance.failover", host=f.standby_host, instance=name, id=rec.id,
                      cause="unhealthy", reason=v.why, **{"from": host})
            done = await self._wait(rec.id)
            if done is None or done.state != OpState.SUCCEEDED:
                msg = (str((done.error or {}).get("message", done.state.value))
                       if done is not None else "the operation record disappeared")
                log.error("failover of unhealthy %s from %s failed: %s", name, host, msg)
                self.emit("instance.failover_failed", host=host, instance=name, id=rec.id,
                          message=msg)
            else:
                log.warning("instance %s now runs on %s", name, f.standby_host)
        finally:
            self.acting.discard(name)

    async def _wait(self, op_id: str) -> OpRecord | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + OP_WAIT_S
        while True:
            rec = self.ops.store.get(op_id)
            if rec is None or rec.state in FINISHED or loop.time() > deadline:
                return rec
            await asyncio.sleep(0.2)
