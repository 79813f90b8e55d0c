"""Standby records: add (placed away from the primary), remove, list, and the refresh loop.

Adding a standby records it and starts its first refresh at once; after that the loop starts a
``standby-sync`` operation whenever one is due (see :func:`due`). An instance busy with another
operation is simply tried again on the next tick.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from corral.bus import rpc
from corral.control.agents import AgentCaller
from corral.control.db import Host, Instance, Standby
from corral.control.fleet import Fleet
from corral.control.operations.moves import DiskOps
from corral.control.operations.runner import Operations
from corral.control.operations.standby_sync import KIND as SYNC
from corral.errors import Conflict, CorralError, InvalidRequest, NotFound
from corral.lifecycle import State
from corral.ops import locks
from corral.ops.locks import LockSet
from corral.ops.store import OpRecord
from corral.scheduling.placement import Request, place

log = logging.getLogger(__name__)

MIN_EVERY = 1.0
TICK = 1.0


class Standbys:
    def __init__(self, fleet: Fleet, agents: AgentCaller, ops: Operations) -> None:
        self.fleet = fleet
        self.agents = agents
        self.ops = ops
        self._tried: dict[str, float] = {}

    def list(self) -> list[Standby]:
        with self.fleet.sessions() as s:
            return list(s.scalars(select(Standby).order_by(Standby.instance)))

    async def add(self, name: str, host: str | None, every: float) -> OpRecord:
        if every < MIN_EVERY:
            raise InvalidRequest(f"a refresh every {every:g}s is too often",
                                 hint=f"use at least {MIN_EVERY:g}s")
        with self.fleet.sessions.begin() as s:
            inst = DiskOps.instance(s, name)
            DiskOps.check_movable(inst, "keep a standby of")
            if s.get(Standby, name) is not None:
                raise Conflict(f"instance '{name}' already has a standby",
                               hint=f"remove it first ('corral standby rm {name}')")
            primary = DiskOps.host_up(s, inst.host or "", "its")
            if host is None:
                host = place(Request(inst.cpus, inst.memory_bytes, inst.driver,
                                     avoid=frozenset({primary.name})), self.fleet.snapshot(s))
            if host == primary.name:
                raise InvalidRequest(f"a standby of '{name}' cannot live on {host}, where it "
                                     "runs", hint="name another host with --host")
            target = DiskOps.host_up(s, host, "standby")
            if target.draining:
                raise InvalidRequest(f"host {host} is draining: it takes no new standby",
                                     hint=f"name another host, or 'corral host undrain {host}'")
            DiskOps.check_pair(primary, target)
            s.add(Standby(instance=name, host=host, every_seconds=every, state="new",
                          created_at=time.time(), total_bytes=0, syncs=0, last_error=""))
        log.info("standby of %s on %s, every %gs", name, host, every)
        return await self.sync(name)

    async def sync(self, name: str) -> OpRecord:
        with self.fleet.sessions() as s:
            if s.get(Standby, name) is None:
                raise NotFound(f"instance '{name}' has no standby",
                               hint=f"add one with 'corral standby add {name}'")
        self._tried[name] = time.time()
        return await self.ops.begin(SYNC, name, {})

    async def remove(self, name: str, check_busy: bool = True) -> None:
        """Forget the standby and drop its copy; a refresh in flight is waited for (a while),
        and none starts meanwhile. ``check_busy`` False: the instance's own removal, which
        already holds it."""
        if not check_busy:
            await self._remove(name)
            return
        await self.fleet.wait_free(name)
        with self.fleet.locks.holding(f"standby-rm:{name}:{uuid.uuid4().hex[:8]}",
                                      LockSet.of([locks.instance(name)]),
                                      "'corral standby rm'"):
            await self._remove(name)

    async def _remove(self, name: str) -> None:
        with self.fleet.sessions.begin() as s:
            sb = s.get(Standby, name)
            if sb is None:
                raise NotFound(f"instance '{name}' has no standby")
            host = s.get(Host, sb.host)
            up = host is not None and host.state == "up"
            where = sb.host
            s.delete(sb)
        if up:
            await self.agents.call(where, rpc.DISK_DISCARD, rpc.SlotArgs(name=name, slot="standby"))
        else:
            log.warning("standby of %s removed while %s is down; its copy stays there", name,
                        where)

    async def discard_for_deleted(self, name: str) -> None:
        """An instance is being deleted: its standby copy goes too (best effort)."""
        with contextlib.suppress(CorralError):  # none, or its host cannot answer now
            await self.remove(name, check_busy=False)

    async def loop(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            if not self.fleet.sure():
                continue  # its database may be away: see Fleet.sure
            try:
                for name in due(self.fleet.sessions, time.time(), self._tried):
                    if name in self.fleet.locks.instances:
                        continue
                    self._tried[name] = time.time()
                    try:
                        await self.ops.begin(SYNC, name, {})
                    except CorralError as exc:  # refused: the next interval tries again
                        if not (isinstance(exc, Conflict) and exc.retryable):  # not just busy
                            log.warning("refresh of the standby of %s refused: %s", name, exc)
            except Exception:
                log.exception("standby refresh loop failed; trying again")

    def view(self, sb: Standby) -> dict[str, Any]:
        now = time.time()
        return {"instance": sb.instance, "host": sb.host, "every_seconds": sb.every_seconds,
                "state": sb.state, "last_sync_at": sb.last_sync_at, "data_at": sb.data_at,
                "data_age_seconds": None if sb.data_at is None else round(now - sb.data_at, 3),
                "last_freeze_ms": sb.last_freeze_ms, "last_bytes": sb.last_bytes,
                "total_bytes": sb.total_bytes, "syncs": sb.syncs, "last_error": sb.last_error}

def due(sessions: sessionmaker[Session], now: float, tried: dict[str, float]) -> list[str]:
    """Instances whose standby is due a refresh: both hosts up, the instance running or
    stopped, its interval passed since the last refresh *or attempt* (``tried``), so a refresh
    that keeps failing is retried once per interval, not in a loop."""
    out: list[str] = []
    with sessions() as s:
        rows = s.execute(select(Standby, Instance, Host).join(
            Instance, Instance.name == Standby.instance).join(
            Host, Host.name == Standby.host)).all()
        for sb, inst, host in rows:
            primary = s.get(Host, inst.host or "")
            if host.state != "up" or primary is None or primary.state != "up":
                continue
            if inst.state not in (State.RUNNING.value, State.STOPPED.value):
                continue
            last = max(sb.last_sync_at or 0.0, tried.get(sb.instance, 0.0))
            if now - last >= sb.every_seconds:
                out.append(sb.instance)
    return out
