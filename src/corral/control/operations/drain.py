"""``drain``: empty a host, as one server-side operation group (``corral host drain``).

Its first step marks the host ``draining`` (the scheduler places nothing new there, pinned or
not) and is the point of no return, so after a server crash the group is resumed forward. Its
second step looks at what the host still holds, each round, and empties it, at most
``parallel`` members at a time:

- an instance: an ordinary warm ``migrate`` (own record, locks, hooks and rollback) to where
  the scheduler says;
- a standby it keeps: removed and added again on a host the scheduler picks (chosen before the
  removal, so "no room" never loses it), then refreshed once;
- a shelved instance's disk kept there: dropped once its shelf reads back whole from the
  store (until then that disk is the one good copy).

Each member's progress is written into the record before and after each action, so a resumed
group waits for what it had started (the engine resumes member operations) and starts the rest;
a migration a crash rolled back is simply started again. The group ends succeeded once the host
holds nothing; else (the deadline, an undrain, members that keep failing) it fails with the
list of what is left, which stays where it is, running. The mark stays until ``host undrain``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from sqlalchemy import select
from sqlalchemy.orm import Session

from corral.api import operations as wire
from corral.bus import rpc
from corral.config import Settings
from corral.control.agents import AgentCaller
from corral.control.db import Host, Instance, Standby
from corral.control.fleet import BUSY_WAIT, Fleet
from corral.control.operations.base import OpBase
from corral.control.operations.migrate import KIND as MIGRATE
from corral.control.operations.migrate import pick_target
from corral.control.operations.moves import DiskOps
from corral.control.operations.shelve import store_copy_whole
from corral.errors import Busy, Conflict, CorralError, HostUnavailable, NoCapacity, NotFound
from corral.images.store import ImageStore
from corral.lifecycle import State
from corral.ops import locks
from corral.ops.engine import OpContext, Step
from corral.ops.locks import LockSet
from corral.ops.store import FINISHED, OperationStore, OpRecord, OpState
from corral.scheduling.placement import HostSnapshot, Request, place

log = logging.getLogger(__name__)

KIND = "drain"
#: rounds of "what is still there" one run of the step makes (the engine retries the step)
ROUNDS = 3
#: member states that need nothing more
DONE = {OpState.SUCCEEDED.value, "gone"}


class StandbysLike(Protocol):
    async def remove(self, name: str, check_busy: bool = True) -> None: ...

    async def add(self, name: str, host: str | None, every: float) -> OpRecord: ...

    async def sync(self, name: str) -> OpRecord: ...


class OpsLike(Protocol):
    store: OperationStore
    standbys: StandbysLike | None

    async def begin(self, kind: str, target: str, params: dict[str, Any]) -> OpRecord: ...

    async def wait(self, op_id: str) -> OpRecord: ...


def drain_in_flight(store: OperationStore, host: str) -> OpRecord | None:
    return next((r for r in store.unfinished() if r.kind == KIND and r.target == host), None)


def what_is_left(s: Session, host: str) -> dict[str, list[str]]:
    """What ``host`` still holds, by kind (``host rm`` says it, the drain empties it)."""
    on = list(s.scalars(select(Instance.name).where(Instance.host == host)
                        .order_by(Instance.name)))
    kept = list(s.scalars(select(Instance.name).where(
        Instance.disk_host == host, (Instance.host.is_(None)) | (Instance.host != host))
        .order_by(Instance.name)))
    sbs = list(s.scalars(select(Standby.instance).where(Standby.host == host)
                         .order_by(Standby.instance)))
    return {"instance": on, "standby": sbs, "disk": kept}


def plan_room(s: Session, host: str, snapshot: list[HostSnapshot]) -> None:
    """Raise :class:`NoCapacity` unless every instance on ``host`` fits elsewhere at once
    (each placed in turn, the reservations of those before it counted) and every standby
    there has another host to go to."""
    snap = {h.name: h for h in snapshot}
    for name in what_is_left(s, host)["instance"]:
        inst = s.get(Instance, name)
        assert inst is not None
        DiskOps.check_movable(inst, "migrate")
        sb = s.get(Standby, name)
        avoid = frozenset({host} | ({sb.host} if sb else set()))
        req = Request(inst.cpus, inst.memory_bytes, inst.driver, avoid=avoid)
        try:
            to = place(req, list(snap.values()))
        except NoCapacity as exc:
            raise NoCapacity(f"cannot drain {host}: no other host can take '{name}': "
                             f"{exc.message}",
                             hint="add a host or make room (stop and remove instances), then "
                                  "drain again", details=exc.details) from exc
        h = snap[to]
        snap[to] = HostSnapshot(h.name, h.up, h.cores, h.memory_bytes,
                                h.reserved_cpus + inst.cpus,
                                h.reserved_memory + inst.memory_bytes, h.drivers, h.draining)
    for name in what_is_left(s, host)["standby"]:
        inst = s.get(Instance, name)
        if inst is None:
            continue
        try:
            place(Request(inst.cpus, inst.memory_bytes, inst.driver,
                          avoid=frozenset({host, inst.host or ""})), snapshot)
        except NoCapacity as exc:
            raise NoCapacity(f"cannot drain {host}: no other host can keep the standby of "
                             f"'{name}': {exc.message}",
                             hint=f"add a host, or remove the standby first ('corral standby "
                                  f"rm {name}')", details=exc.details) from exc


class Drain(OpBase):
    def __init__(self, fleet: Fleet, agents: AgentCaller, settings: Settings, ops: OpsLike,
                 images: Callable[[], ImageStore | None]) -> None:
        super().__init__(fleet, agents, settings)
        self.ops = ops
        self.images = images
        #: one pick of a target at a time (see :meth:`_pick`)
        self._picking = asyncio.Lock()

    def build(self, rec: OpRecord) -> list[Step]:
        return [Step("mark", self._mark, self._unmark, commit=True), Step("run", self._run)]

    def held(self, target: str, params: dict[str, Any]) -> LockSet:
        """Nothing: each member holds its instance while it runs, and a second drain of the
        host is refused by :meth:`check` (its record is saved right after, with no await
        between), with words that say so."""
        return LockSet()

    def check(self, host: str, params: dict[str, Any]) -> None:
        """Refuse before anything is recorded: no such host, a host that is down, a drain
        of it in flight, something that cannot move, no room elsewhere."""
        with self.fleet.sessions() as s:
            h = s.get(Host, host)
            if h is None:
                raise NotFound(f"no host named {host}", hint="see 'corral host ls'")
            if h.state != "up":
                raise HostUnavailable(f"host {host} is down: nothing on it can be migrated",
                                      hint="instances with a standby fail over on their own; "
                                           "bring the host back up, then drain it")
            running = drain_in_flight(self.ops.store, host)
            if running is not None:
                raise Conflict(f"host {host} is already draining (operation {running.id})",
                               hint=f"follow it with 'corral ops show {running.id}'")
            snapshot = [x if x.name != host else HostSnapshot(
                x.name, x.up, x.cores, x.memory_bytes, x.reserved_cpus, x.reserved_memory,
                x.drivers, True) for x in self.fleet.snapshot(s)]
            plan_room(s, host, snapshot)

    @staticmethod
    def result(rec: OpRecord) -> wire.DrainResult:
        out = [wire.DrainMember(kind=str(m.get("kind")), name=str(m.get("name")),
                                op=m.get("op"), state=str(m.get("state")), host=m.get("to"),
                                error=str(m.get("error") or ""))
               for _, m in sorted(rec.data.get("members", {}).items())]
        return wire.DrainResult(host=rec.target, members=out)

    # -- steps -------------------------------------------------------------------------------
    async def _mark(self, ctx: OpContext) -> None:
        deadline = ctx.params.get("deadline_seconds")
        ctx.data.setdefault("members", {})
        ctx.data.setdefault("deadline_at", None if deadline is None else time.time() + deadline)
        ctx.save()
        self._set_mark(ctx.record.target, True)

    async def _unmark(self, ctx: OpContext) -> None:
        """Only a crash inside the first step comes here (it cannot fail otherwise): the
        drain never began, so neither does the mark."""
        self._set_mark(ctx.record.target, False)

    def _set_mark(self, host: str, on: bool) -> None:
        with self.fleet.sessions.begin() as s:
            h = s.get(Host, host)
            if h is not None:
                h.draining = on

    def _marked(self, host: str) -> bool:
        with self.fleet.sessions() as s:
            h = s.get(Host, host)
            return bool(h is not None and h.draining)

    async def _run(self, ctx: OpContext) -> None:
        host = ctx.record.target
        deadline_at = ctx.data.get("deadline_at")
        members: dict[str, dict[str, Any]] = ctx.data["members"]
        for round_ in range(ROUNDS + 1):
            todo = self._todo(host, members)
            if not todo:  # empty: done, even if the last moves ended past the deadline
                self._settle(ctx)
                return
            self._stop_if(ctx, deadline_at)
            if round_ == ROUNDS:
                break
            ctx.save()
            sem = asyncio.Semaphore(int(ctx.params.get("parallel") or 4))
            work = asyncio.gather(*(self._member(ctx, sem, key) for key in todo))
            if deadline_at is None:
                await work
                continue
            with contextlib.suppress(TimeoutError):  # said by _stop_if with what is left
                await asyncio.wait_for(work, max(0.0, deadline_at - time.time()))
        self._fail(ctx, "it still holds")

    def _todo(self, host: str, members: dict[str, dict[str, Any]]) -> list[str]:
        """Keys of the members to work on: what the host still holds, and what was begun
        and not ended (a standby between its removal and its new copy)."""
        with self.fleet.sessions() as s:
            left = what_is_left(s, host)
        keys = [f"{kind}:{name}" for kind, names in left.items() for name in names]
        for key in keys:
            kind, _, name = key.partition(":")
            m = members.setdefault(key, {"kind": kind, "name": name, "state": "pending"})
            if m["state"] in DONE:  # back on the host since (or a new copy): again
                m.update(state="pending", op=None, error="")
        keys += [k for k, m in members.items() if k not in keys and m["state"] not in DONE
                 and m.get("removed")]
        return keys

    def _stop_if(self, ctx: OpContext, deadline_at: float | None) -> None:
        if deadline_at is not None and time.time() >= deadline_at:
            self._fail(ctx, f"the deadline ({ctx.params['deadline_seconds']:g}s) passed; "
                            "it still holds")
        if not self._marked(ctx.record.target):
            self._fail(ctx, "it was undrained; it still holds")

    def _settle(self, ctx: OpContext) -> None:
        """Members whose operation went on without the group (cut off by the deadline or a
        restart) get that operation's outcome, or say they are still in flight."""
        for m in ctx.data["members"].values():
            if not m.get("op") or m.get("state") not in ("running", "rolling_back"):
                continue
            rec = self.ops.store.get(str(m["op"]))
            if rec is not None and rec.state in FINISHED:
                self._ended(m, rec)
            else:
                m["error"] = ("still in flight when the drain stopped: its operation "
                              "finishes or rolls back on its own")
        ctx.save()

    def _fail(self, ctx: OpContext, why: str) -> None:
        host = ctx.record.target
        self._settle(ctx)
        with self.fleet.sessions() as s:
            left = what_is_left(s, host)
        members = ctx.data["members"]
        parts = []
        for kind, names in left.items():
            for name in names:
                m = members.get(f"{kind}:{name}") or {}
                err = f" ({m['state']}: {m.get('error')})" if m.get("error") else ""
                parts.append(f"{kind} {name}{err}")
        ctx.save()
        raise CorralError(
            f"drain of {host} not finished: {why} {len(parts)} item(s): "
            + ("; ".join(parts[:10]) or "nothing"),
            hint=f"what is left stays on {host}, running; fix what the errors say, then run "
                 f"'corral host drain {host}' again (or 'corral host undrain {host}')")

    # -- members -----------------------------------------------------------------------------
    async def _member(self, ctx: OpContext, sem: asyncio.Semaphore, key: str) -> None:
        m: dict[str, Any] = ctx.data["members"][key]
        async with sem:
            if not self._marked(ctx.record.target):
                return  # undrained: start nothing more
            try:
                if m["kind"] == "instance":
                    await self._migrate(ctx, m)
                elif m["kind"] == "standby":
                    await self._standby(ctx, m)
                else:
                    await self._disk(ctx, m)
            except CorralError as exc:
                m.update(state="failed", error=exc.message)
            ctx.save()

    async def _op(self, ctx: OpContext, m: dict[str, Any], kind: str,
                  params: dict[str, Any]) -> OpRecord:
        """Begin ``kind`` on the member (waiting a little while it is busy) unless one begun
        before (a restart) is still to be waited for; its record once ended."""
        if m.get("op") and m.get("state") in ("running", "rolling_back"):
            return await self.ops.wait(str(m["op"]))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + BUSY_WAIT
        while True:
            try:
                first = await self.ops.begin(kind, m["name"], params)
                break
            except Busy:
                if loop.time() >= deadline:
                    raise
                await asyncio.sleep(0.2)
        m.update(op=first.id, state=first.state.value, error="")
        ctx.save()
        return await self.ops.wait(first.id)

    def _ended(self, m: dict[str, Any], rec: OpRecord) -> None:
        m.update(state=rec.state.value, error=(rec.error or {}).get("message", ""))
        if rec.state == OpState.SUCCEEDED and rec.result:
            m["to"] = rec.result.get("target") or m.get("to")

    async def _migrate(self, ctx: OpContext, m: dict[str, Any]) -> None:
        with self.fleet.sessions() as s:
            inst = s.get(Instance, m["name"])
            moving = m.get("op") and m.get("state") in ("running", "rolling_back")
            if (inst is None or inst.host != ctx.record.target) and not moving:
                m.update(state="gone" if inst is None else OpState.SUCCEEDED.value)
                return
        if m.get("op") and m.get("state") in ("running", "rolling_back"):
            self._ended(m, await self.ops.wait(str(m["op"])))
            return
        async with self._picking:
            m.update(to=self._pick(ctx, m["name"]), state="running", op=None, error="")
            ctx.save()
        self._ended(m, await self._op(ctx, m, MIGRATE, {"to": m["to"], "cold": False}))

    def _pick(self, ctx: OpContext, name: str) -> str:
        """Where the scheduler sends ``name``, counting what the migrations in flight will
        reserve on their targets (a migration reserves its target only once it moves there:
        picked on their own, parallel members would all go to the same emptiest host)."""
        host = ctx.record.target
        with self.fleet.sessions() as s:
            inst = self.instance(s, name)
            snap = {h.name: h for h in self.fleet.snapshot(s)}
            for m in ctx.data["members"].values():
                to, other = m.get("to"), m.get("name")
                if (m.get("kind") != "instance" or other == name or to not in snap
                        or m.get("state") not in ("running", "rolling_back")):
                    continue
                o = s.get(Instance, other)
                if o is not None and o.host != to:
                    h = snap[to]
                    snap[to] = HostSnapshot(h.name, h.up, h.cores, h.memory_bytes,
                                            h.reserved_cpus + o.cpus,
                                            h.reserved_memory + o.memory_bytes, h.drivers,
                                            h.draining)
            sb = s.get(Standby, name)
            return pick_target(name, Request(inst.cpus, inst.memory_bytes, inst.driver,
                                             avoid=frozenset({host})),
                               sb.host if sb else None, list(snap.values()))

    async def _standby(self, ctx: OpContext, m: dict[str, Any]) -> None:
        standbys = self.ops.standbys
        if standbys is None:
            raise CorralError("internal: the server has no standby service")
        name, host = m["name"], ctx.record.target
        with self.fleet.sessions() as s:
            sb = s.get(Standby, name)
            inst = s.get(Instance, name)
            if inst is None:
                m.update(state="gone")
                return
            if sb is not None and sb.host == host:  # pick first: "no room" loses nothing
                m["every"] = sb.every_seconds
                m["to"] = place(Request(inst.cpus, inst.memory_bytes, inst.driver,
                                        avoid=frozenset({host, inst.host or ""})),
                                self.fleet.snapshot(s))
            elif sb is None and not m.get("removed"):
                m.update(state="gone")
                return
        if sb is not None and sb.host == host:
            m.update(removed=True, state="running")
            ctx.save()
            await standbys.remove(name)
            sb = None
        if sb is None:  # removed (maybe before a restart): the new copy
            try:
                first = await standbys.add(name, m.get("to"), float(m.get("every") or 60.0))
            except NoCapacity:
                first = await standbys.add(name, None, float(m.get("every") or 60.0))
            m.update(op=first.id, state=first.state.value, removed=False)
            ctx.save()
            rec = await self.ops.wait(first.id)
        elif m.get("op") and m.get("state") in ("running", "rolling_back"):
            rec = await self.ops.wait(str(m["op"]))
        else:
            rec = await self.ops.wait((await standbys.sync(name)).id)
        to = m.get("to")
        self._ended(m, rec)
        m["to"] = to

    async def _disk(self, ctx: OpContext, m: dict[str, Any]) -> None:
        name, host = m["name"], ctx.record.target
        with self.fleet.sessions() as s:
            inst = s.get(Instance, name)
            if inst is None or inst.disk_host != host or inst.host == host:
                m.update(state="gone")
                return
            shelf = inst.shelf if inst.state == State.SHELVED.value else None
        m.update(state="running")
        if shelf is not None and not await store_copy_whole(self.images(), shelf, name):
            raise CorralError(f"the shelf of '{name}' does not read back whole from the "
                              f"store: the disk kept on {host} is its one good copy")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + BUSY_WAIT
        while True:
            try:
                with self.fleet.locks.holding(f"drain-disk:{name}", LockSet.of(
                        [locks.instance(name)], [locks.host(host)]), "a drain of its host"):
                    await self.agents.call(host, rpc.DISK_DROP, rpc.NameArgs(name=name))
                break
            except Busy:
                if loop.time() >= deadline:
                    raise
                await asyncio.sleep(0.2)
        with self.fleet.sessions.begin() as s:
            inst = s.get(Instance, name)
            if inst is not None and inst.disk_host == host:
                self.fleet.move_in(inst, disk_host=None, offload_at=None)
        log.info("drain of %s: the kept disk of %s dropped (its shelf is whole)", host, name)
        m.update(state=OpState.SUCCEEDED.value, error="")


def undrain(fleet: Fleet, host: str) -> bool:
    """Clear the mark; whether it was set. A drain in flight notices and stops starting
    members (those in flight end on their own)."""
    with fleet.sessions.begin() as s:
        h = s.get(Host, host)
        if h is None:
            raise NotFound(f"no host named {host}", hint="see 'corral host ls'")
        was = bool(h.draining)
        h.draining = False
    return was

