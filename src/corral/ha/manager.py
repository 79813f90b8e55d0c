"""The HA manager: fail a dead host's instances over to their standbys, and clean up after it.

Two duties, both driven by what the fleet already records:

* **Failover.** A host whose lease ran out ``failover_grace_seconds`` ago is treated as dead (its
  agent fenced itself before the lease ended, see :mod:`corral.agent.fence`). Every instance on
  it that should run (desired ``running``, observed ``lost``) and has a standby with a complete
  copy on a host that is up gets one ``failover`` operation (``control/standby.py``), at most
  ``max_parallel`` at a time; one without gets an ``instance.lost_needs_restore`` event. Each
  (instance, down episode) is handled once, except that an instance busy with another operation
  is tried again on the next pass.
* **Reconcile on rejoin.** Every join and heartbeat says what a host holds. A copy of an instance
  that now belongs to another host (failed over while this one was away), or that carries an
  older epoch than the database, is a stale copy: it is killed and, when it belongs elsewhere,
  deleted there. Decisions come from :func:`corral.ha.reconcile.reconcile` (newest epoch wins)
  plus one rule of ours (a copy recorded elsewhere goes); reconcile never starts anything, never
  touches an instance busy with an operation, and leaves instances the database does not know
  alone (a server with a fresh database must not stop a whole fleet).

The decisions are pure functions over database rows and reports (:func:`failover_candidates`,
:func:`plan_rejoin`), unit-tested with fakes; :class:`HaManager` only schedules and calls.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy import select
from sqlalchemy.orm import Session, aliased

from corral.bus import rpc
from corral.bus.messages import InstanceReport
from corral.config import Settings
from corral.control.db import Host, Instance, Standby
from corral.control.fleet import Fleet
from corral.errors import CorralError
from corral.ha.reconcile import Record, Seen, reconcile
from corral.ha.unhealthy import UnhealthyFailover
from corral.lifecycle import ALIVE, State
from corral.ops.store import FINISHED, OpRecord, OpState

log = logging.getLogger(__name__)

FAILOVER = "failover"  # the operation kind control/standby.py registers
OP_WAIT_S = 900.0  # how long one failover may hold a concurrency slot


class OpStore(Protocol):
    def get(self, op_id: str) -> OpRecord | None: ...


class OpsLike(Protocol):
    """What the manager needs of :class:`corral.control.operations.runner.Operations`."""

    @property
    def store(self) -> OpStore: ...

    async def begin(self, kind: str, target: str, params: dict[str, Any]) -> OpRecord: ...


class CallerLike(Protocol):
    async def call(self, host: str, call: rpc.Call[rpc.A, rpc.R], args: rpc.A) -> rpc.R: ...


Emit = Callable[..., None]


@dataclass(frozen=True)
class Candidate:
    instance: str
    host: str  # the dead host
    episode: float  # the dead host's lease_expires_at: one down episode
    standby: str | None  # the standby's host, None when there is no usable standby
    reason: str = ""

    @property
    def key(self) -> tuple[str, str, float]:
        return (self.instance, self.host, self.episode)


def failover_candidates(s: Session, now: float, grace: float) -> list[Candidate]:
    """Instances of hosts down for ``grace`` past their lease that should run somewhere.

    One read a dead host, of plain columns: each instance with its standby and the standby
    host's state beside it. The pass runs every second for as long as a host stays down;
    two lookups an instance (its standby, then that standby's host) made a fleet of 1000
    hosts that had lost its bus for a moment spend most of its loop here, on the 30,000
    instances it could not fail over (bench/fleet_scale.py), and it never caught up."""
    out: list[Candidate] = []
    dead = s.execute(select(Host.name, Host.lease_expires_at).where(Host.state == "down"))
    standby_host = aliased(Host)
    for host, expires in dead.all():
        episode = expires or 0.0
        if episode + grace > now:
            continue
        rows = s.execute(
            select(Instance.name, Standby.host, Standby.data_at, standby_host.state)
            .outerjoin(Standby, Standby.instance == Instance.name)
            .outerjoin(standby_host, standby_host.name == Standby.host)
            .where(Instance.host == host, Instance.desired_state == State.RUNNING.value,
                   Instance.state == State.LOST.value)
            .order_by(Instance.name))
        for name, sb_host, data_at, sb_state in rows:
            why = _unusable(host, sb_host, data_at, sb_state)
            out.append(Candidate(name, host, episode, None if why else sb_host, why))
    return out


def _unusable(dead: str, sb_host: str | None, data_at: float | None, sb_state: str | None
             ) -> str:
    """Why a standby on ``sb_host`` (None: there is none), last synced at ``data_at``, its
    host ``sb_state`` (None: unknown host), cannot take over from ``dead``; empty when it
    can."""
    if sb_host is None:
        return "it has no standby"
    if sb_host == dead or sb_state != "up":
        return f"its standby host {sb_host} is down"
    if data_at is None:
        return f"its standby on {sb_host} was never synced"
    return ""


@dataclass(frozen=True)
class Cleanup:
    """A stale copy on the reporting host: kill it if alive, delete it if it belongs elsewhere."""

    instance: str
    epoch: int
    kill: bool
    delete: bool
    reason: str


def plan_rejoin(host: str, reports: Iterable[InstanceReport], records: dict[str, Record],
                busy: Collection[str] = ()) -> list[Cleanup]:
    """What to do about ``host``'s copies, given the database's ``records`` by name."""
    mine = [r for r in reports if r.name in records and r.name not in busy]
    plan = reconcile([records[r.name] for r in mine],
                     [Seen(host, r.name, r.epoch, r.state) for r in mine], {host})
    stops = {s.instance: s.reason for s in plan.stops if s.host == host}
    out: list[Cleanup] = []
    for r in mine:
        rec = records[r.name]
        alive = r.state in ALIVE
        if rec.host != host and r.epoch <= rec.epoch:
            out.append(Cleanup(r.name, r.epoch, alive, True,
                               f"it belongs to {rec.host} now (epoch {rec.epoch})"))
        elif r.name in stops:
            out.append(Cleanup(r.name, r.epoch, True, False, stops[r.name]))
        elif rec.host != host:
            log.warning("host %s reports %s at epoch %d, newer than the record (%s, epoch %d); "
                        "leaving both alone: an operator must decide", host, r.name, r.epoch,
                        rec.host, rec.epoch)
    return out


class HaManager:
    def __init__(self, fleet: Fleet, agents: CallerLike, ops: OpsLike, settings: Settings,
                 emit: Emit | None = None, max_parallel: int = 4) -> None:
        self.fleet = fleet
        self.agents = agents
        self.ops = ops
        self.settings = settings
        self.emit = emit or (lambda *_a, **_k: None)
        self._slots = asyncio.Semaphore(max_parallel)
        self._handled: set[tuple[str, str, float]] = set()
        self._cleaning: set[tuple[str, str]] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._run: asyncio.Task[None] | None = None
        #: failover of opted-in instances still unhealthy after their restarts (ha/unhealthy.py)
        self.unhealthy = UnhealthyFailover(fleet, ops, self.emit, self._spawn)

    def start(self) -> None:
        """Run the failover passes (on the leader only: it starts this when it takes over)."""
        if self._run is None:
            self._run = asyncio.create_task(self.run(), name="ha")

    # -- failover ------------------------------------------------------------------------------
    async def run(self) -> None:
        """Pass after pass; the first only a lease after start: a server that was away finds
        every lease expired, and its live hosts need one heartbeat to say they are there."""
        every = max(0.1, min(1.0, self.settings.lease_seconds / 4))
        await asyncio.sleep(self.settings.lease_seconds)
        while True:
            await asyncio.sleep(every)
            if not self.fleet.sure():
                continue  # its database may be away: see Fleet.sure
            try:
                self.tick()
            except Exception:
                log.exception("HA pass failed; trying again")

    def tick(self) -> list[Candidate]:
        """Start what one pass finds; returns the candidates acted on (for tests)."""
        with self.fleet.sessions() as s:
            found = failover_candidates(s, self.fleet.clock(),
                                        self.settings.failover_grace_seconds)
        self._handled &= {c.key for c in found}  # outages that ended need no memory
        acted = []
        for c in found:
            if c.key in self._handled:
                continue
            self._handled.add(c.key)
            acted.append(c)
            if c.standby is None:
                log.error("instance %s was on %s, which is down, and %s: it needs a restore",
                          c.instance, c.host, c.reason)
                self.emit("instance.lost_needs_restore", host=c.host, instance=c.instance,
                          reason=c.reason)
            else:
                self._spawn(self._failover(c))
        return acted

    async def _failover(self, c: Candidate) -> None:
        async with self._slots:
            try:
                rec = await self.ops.begin(FAILOVER, c.instance, {"from": c.host})
            except CorralError as exc:
                if exc.retryable:  # busy with another operation: the next pass tries again
                    self._handled.discard(c.key)
                    return
                self._failed(c, exc.message, None)
                return
            log.warning("failing %s over from %s to %s (operation %s)", c.instance, c.host,
                        c.standby, rec.id)
            self.emit("instance.failover", host=c.standby, instance=c.instance, id=rec.id,
                      **{"from": c.host})
            done = await self._wait(rec.id)
            if done is None or done.state != OpState.SUCCEEDED:
                state = done.state.value if done is not None else "unknown"
                self._failed(c, str((done.error or {}).get("message", state)) if done else
                             "the operation record disappeared", rec.id)
            else:
                log.warning("instance %s now runs on %s", c.instance, c.standby)

    def _failed(self, c: Candidate, why: str, op_id: str | None) -> None:
        log.error("failover of %s from %s failed: %s", c.instance, c.host, why)
        self.emit("instance.failover_failed", host=c.host, instance=c.instance, id=op_id,
                  message=why)

    async def _wait(self, op_id: str) -> OpRecord | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + OP_WAIT_S
        while True:
            rec = self.ops.store.get(op_id)
            if rec is None or rec.state in FINISHED or loop.time() > deadline:
                return rec
            await asyncio.sleep(0.2)

    # -- reconcile on rejoin -------------------------------------------------------------------
    def on_report(self, host: str, reports: list[InstanceReport],
                  records: dict[str, tuple[str | None, int]] | None = None) -> list[Cleanup]:
        """Called with every join and heartbeat; schedules cleanups of stale copies (and
        failovers of opted-in unhealthy instances, see ha/unhealthy.py). ``records``: the
        reported instances' (host, epoch) as the heartbeat just read them (not read again)."""
        if not reports:
            return []
        try:
            self.unhealthy.on_report(host, reports)
        except Exception:  # never in the way of the cleanups below
            log.exception("failover on unhealthy: a pass over %s's report failed", host)
        if records is not None:
            known = {name: Record(name, h, e) for name, (h, e) in records.items()}
        else:
            with self.fleet.sessions() as s:
                rows = s.scalars(select(Instance).where(
                    Instance.name.in_([r.name for r in reports]))).all()
                known = {i.name: Record(i.name, i.host, i.epoch) for i in rows}
        todo = [c for c in plan_rejoin(host, reports, known, self.fleet.locks.instances)
                if (host, c.instance) not in self._cleaning]
        for c in todo:
            self._cleaning.add((host, c.instance))
            self._spawn(self._cleanup(host, c))
        return todo

    def reconcile_all(self) -> None:
        """A new leader asks every host that is up what it holds and reconciles each answer
        as a rejoin (stale copies a failover or a fence left behind while no one led)."""
        with self.fleet.sessions() as s:
            hosts = list(s.scalars(select(Host.name).where(Host.state == "up")))
        for host in hosts:
            self._spawn(self._ask(host))

    async def _ask(self, host: str) -> None:
        try:
            reports = await self.agents.call(host, rpc.LIST, rpc.NoArgs())
        except CorralError as exc:
            log.info("reconcile: %s did not say what it holds (%s); its next heartbeat will",
                     host, exc)
            return
        self.on_report(host, list(reports))

    async def _cleanup(self, host: str, c: Cleanup) -> None:
        if c.instance in self.fleet.locks.instances:  # taken since the report: not ours
            self._cleaning.discard((host, c.instance))
            return
        # only the copy that was reported (if_epoch)
        try:
            log.warning("stale copy of %s (epoch %d) on %s: %s; %s", c.instance, c.epoch, host,
                        c.reason, "killing and deleting it" if c.delete else "killing it")
            if c.kill:
                await self.agents.call(host, rpc.KILL, rpc.KillArgs(
                    name=c.instance, if_epoch=c.epoch, signal=9))
            if c.delete:  # its disk may hold writes after the last sync: set aside, not lost
                await self.agents.call(host, rpc.DELETE, rpc.DeleteArgs(
                    name=c.instance, if_epoch=c.epoch, set_aside=True))
            self.emit("instance.stale_copy_removed", host=host, instance=c.instance,
                      epoch=c.epoch, deleted=c.delete, reason=c.reason)
        except CorralError as exc:
            log.error("could not clean up the stale copy of %s on %s: %s (next report "
                      "tries again)", c.instance, host, exc)
        finally:
            self._cleaning.discard((host, c.instance))

    # -- tasks ---------------------------------------------------------------------------------
    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        """Stop the passes and every failover and cleanup in flight (a failover's operation
        stays unfinished: the next leader resumes it)."""
        if self._run is not None:
            self._run.cancel()
            await asyncio.gather(self._run, return_exceptions=True)
            self._run = None
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
