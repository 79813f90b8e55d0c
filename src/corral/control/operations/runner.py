"""The control plane's operation engine: one :class:`Engine` over the server's database, its
hooks directory, the registered operation kinds, and resumption after a crash.

Kept out of :mod:`corral.control.server` so the server only builds this, includes its router
and calls :meth:`Operations.start` / :meth:`Operations.stop`. Services reach the engine as
``ControlPlane.ops`` (this object) and start operations with :meth:`Operations.begin`, which
returns as soon as the operation is recorded; the operation runs on in a task of its own. A
request its kind's check refuses is never recorded: :meth:`Operations.begin` raises the refusal
(the routes answer it as a 4xx) and the instance is left exactly as it was.

An operation holds what its kind declares (its instance, shared holds on the hosts it touches)
in the fleet's lock manager from :meth:`begin` (or from server start, for one a crash left
unfinished) until the record is finished, so lifecycle verbs, loops and heartbeats keep off it
while its steps run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import Connection
from sqlalchemy.engine import Engine as DbEngine

from corral.api import operations as wire
from corral.config import Settings
from corral.control.agents import AgentCaller
from corral.control.db import Host
from corral.control.fleet import Fleet
from corral.control.operations.base import OpBase
from corral.control.operations.drain import KIND as DRAIN
from corral.control.operations.drain import Drain, StandbysLike
from corral.control.operations.failover import KIND as FAILOVER
from corral.control.operations.failover import Failover
from corral.control.operations.migrate import KIND as MIGRATE
from corral.control.operations.migrate import Migrate
from corral.control.operations.promote import KIND as PROMOTE
from corral.control.operations.promote import Promote
from corral.control.operations.recreate import KIND as RECREATE
from corral.control.operations.recreate import Recreate
from corral.control.operations.shelve import KIND as SHELVE
from corral.control.operations.shelve import Shelve
from corral.control.operations.standby_sync import KIND as SYNC
from corral.control.operations.standby_sync import StandbySync
from corral.control.operations.unshelve import KIND as UNSHELVE
from corral.control.operations.unshelve import Unshelve
from corral.control.operations.unshelve_group import KIND as UNSHELVE_GROUP
from corral.control.operations.unshelve_group import UnshelveGroup
from corral.errors import Busy, CorralError
from corral.images.store import ImageStore
from corral.ops.engine import Engine, Kind, owner
from corral.ops.hooks import Hooks
from corral.ops.store import FINISHED, OperationStore, OpRecord

log = logging.getLogger(__name__)


def hooks_dir(settings: Settings) -> Path:
    """``hooks_dir`` when set, else ``DATA/hooks``."""
    return Path(settings.hooks_dir) if settings.hooks_dir else Path(settings.data_dir) / "hooks"


def kinds(fleet: Fleet, agents: AgentCaller, settings: Settings,
          images: Callable[[], ImageStore | None], ops: Operations) -> list[Kind]:
    """Every operation kind, in one table: its builder, params, check, locks and result."""
    recreate = Recreate(fleet, agents, settings)
    migrate = Migrate(fleet, agents, settings)
    sync = StandbySync(fleet, agents, settings)
    promote = Promote(fleet, agents, settings)
    failover = Failover(fleet, agents, settings)
    shelve = Shelve(fleet, agents, settings, images)
    unshelve = Unshelve(fleet, agents, settings, images)
    group = UnshelveGroup(fleet, agents, settings, ops)
    drain = Drain(fleet, agents, settings, ops, images)
    held = OpBase(fleet, agents, settings).held
    return [
        Kind(RECREATE, recreate.build, wire.ToParams, recreate.check, held, recreate.result),
        Kind(MIGRATE, migrate.build, wire.MigrateParams, migrate.check, held, migrate.result),
        Kind(SYNC, sync.build, wire.NoParams, sync.check, held, sync.result),
        Kind(PROMOTE, promote.build, wire.PromoteParams, promote.check, held, promote.result),
        Kind(FAILOVER, failover.build, wire.FailoverParams, failover.check, held,
             failover.result),
        Kind(SHELVE, shelve.build, wire.ShelveParams, shelve.check, held, shelve.result),
        Kind(UNSHELVE, unshelve.build, wire.ToParams, unshelve.check, held, unshelve.result),
        Kind(UNSHELVE_GROUP, group.build, wire.UnshelveGroupParams, group.check, group.held,
             group.result),
        Kind(DRAIN, drain.build, wire.DrainParams, drain.check, drain.held, drain.result),
    ]


class Operations:
    def __init__(self, db: DbEngine, fleet: Fleet, agents: AgentCaller, settings: Settings,
                 publish: Callable[[OpRecord], None] | None = None,
                 images: Callable[[], ImageStore | None] = lambda: None,
                 fence: Callable[[Connection], None] | None = None) -> None:
        self.fleet = fleet
        self.settings = settings
        self.publish = publish
        # the table comes from migration 0003, never create_all; ``fence`` refuses the saves
        # of a server that no longer leads (control/leader.py)
        self.store = OperationStore(db, fence=fence)
        #: the standby service (set by the server once built): a drain moves standbys
        self.standbys: StandbysLike | None = None
        self.hooks_dir = hooks_dir(settings)
        self.engine = Engine(self.store, Hooks(self.hooks_dir), on_change=self._changed,
                             pause_dir=Path(settings.data_dir) / "drills", locks=fleet.locks)
        for kind in kinds(fleet, agents, settings, images, self):
            self.engine.register(kind)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._first_save: dict[str, asyncio.Future[OpRecord]] = {}
        #: operations ended since they were waited for (see :meth:`wait`)
        self._ended: dict[str, asyncio.Future[OpRecord]] = {}
        #: operations recorded unfinished by this server: what it holds locks for
        self._holding: dict[str, OpRecord] = {}

    def _changed(self, rec: OpRecord) -> None:
        if rec.state in FINISHED:
            self._holding.pop(rec.id, None)
        else:
            self._holding[rec.id] = rec
        if self.publish is not None:
            try:
                self.publish(rec)
            except Exception:
                log.exception("publishing operation %s failed", rec.id)
        waiter = self._first_save.pop(rec.target, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(rec)
        if rec.state in FINISHED:
            ended = self._ended.pop(rec.id, None)
            if ended is not None and not ended.done():
                ended.set_result(rec)

    async def wait(self, op_id: str) -> OpRecord:
        """The operation's record once it has ended (an operation group waits for its
        members this way)."""
        rec = self.store.get(op_id)
        if rec is None:
            raise CorralError(f"internal: no operation {op_id}")
        if rec.state in FINISHED:
            return rec
        fut = self._ended.setdefault(op_id, asyncio.get_running_loop().create_future())
        return await asyncio.shield(fut)

    # -- running operations ------------------------------------------------------------------
    async def begin(self, kind: str, target: str, params: dict[str, Any]) -> OpRecord:
        """Start an operation; returns its first recorded state (it runs on in a task)."""
        if target in self._first_save:  # another begin on it has not saved yet
            raise Busy(f"'{target}' is busy with another request",
                       hint="wait for it to finish (see 'corral ops ls'), then try again")
        first: asyncio.Future[OpRecord] = asyncio.get_running_loop().create_future()
        self._first_save[target] = first
        task = self._spawn(self.engine.submit(kind, target, params), f"op-{kind}-{target}")
        try:
            await asyncio.wait({first, task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._first_save.pop(target, None)
        if first.done():
            return first.result()
        exc = task.exception()  # refused before anything was recorded (unknown kind, conflict)
        if exc is not None:
            raise exc
        done: OpRecord = task.result()
        return done

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        exc = None if task.cancelled() else task.exception()
        if isinstance(exc, CorralError):  # a refusal: :meth:`begin` hands it to the caller
            log.info("operation task %s refused: %s", task.get_name(), exc)
        elif exc is not None:
            log.error("operation task %s failed: %s", task.get_name(), exc)

    # -- server start and stop ---------------------------------------------------------------
    def start(self, started_at: float) -> None:
        """Hold every unfinished operation's instance, then resume them in the background once
        the hosts that were up have heartbeated to this server (or lost their lease)."""
        with contextlib.suppress(OSError):
            self.hooks_dir.mkdir(parents=True, exist_ok=True)
        unfinished = self.engine.hold_unfinished()
        self._holding.update((rec.id, rec) for rec in unfinished)
        if unfinished:
            self._spawn(self._resume(started_at), "ops-resume")

    async def _resume(self, started_at: float) -> None:
        loop = asyncio.get_running_loop()
        pace = self.fleet.pace  # a large fleet beats less often (control/pace.py)
        deadline = loop.time() + pace.lease_seconds + 2 * pace.heartbeat_seconds
        while loop.time() < deadline:
            with self.fleet.sessions() as sess:
                waiting = [h.name for h in sess.scalars(select(Host).where(Host.state == "up"))
                           if max(h.last_heartbeat or 0.0,
                                  self.fleet.last_beat.get(h.name, 0.0)) < started_at]
            if not waiting:
                break
            await asyncio.sleep(0.2)
        for rec in await self.engine.resume_all():
            log.warning("operation %s (%s on %s) ended %s after a restart", rec.id, rec.kind,
                        rec.target, rec.state.value)

    async def stop(self) -> None:
        """Cancel running operations: they stay unfinished and the next start resumes them."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(task, 5)
        self._tasks.clear()

    async def step_down(self) -> None:
        """This server no longer leads: stop its operations where they are (the new leader
        resumes them from their records, as after a crash) and let go of what they held, so
        that taking the lead again later holds them afresh."""
        await self.stop()
        for rec in self._holding.values():
            self.engine.locks.release(owner(rec))
        self._holding.clear()
        for fut in [*self._first_save.values(), *self._ended.values()]:
            if not fut.done():
                fut.cancel()
        self._first_save.clear()
        self._ended.clear()
