"""The control plane's operation engine: one :class:`Engine` over the server's database, its
hooks directory, the registered operation kinds, and resumption after a crash.

Kept out of :mod:`corral.control.server` so the server only builds this, includes its router
and calls :meth:`Operations.start` / :meth:`Operations.stop`. Services reach the engine as
``ControlPlane.ops`` (this object) and start operations with :meth:`Operations.begin`, which
returns as soon as the operation is recorded; the operation runs on in a task of its own. A
request its kind's check refuses is never recorded: :meth:`Operations.begin` raises the refusal
(the routes answer it as a 4xx) and the instance is left exactly as it was.

An operation's target instance is in :attr:`Fleet.busy` from :meth:`begin` (or from server
start, for one a crash left unfinished) until the record is finished, so lifecycle verbs and
heartbeats keep off it while its steps run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import Engine as DbEngine

from corral.config import Settings
from corral.control.agents import AgentCaller
from corral.control.db import Host
from corral.control.fleet import Fleet
from corral.control.migrate import KIND as MIGRATE
from corral.control.migrate import Migrate
from corral.control.recreate import KIND as RECREATE
from corral.control.recreate import Recreate
from corral.control.standby import FAILOVER, PROMOTE, SYNC, StandbyOps
from corral.errors import Conflict, CorralError
from corral.ops.engine import Engine
from corral.ops.hooks import Hooks
from corral.ops.store import FINISHED, OperationStore, OpRecord

log = logging.getLogger(__name__)


def hooks_dir(settings: Settings) -> Path:
    """``hooks_dir`` when set, else ``DATA/hooks``."""
    return Path(settings.hooks_dir) if settings.hooks_dir else Path(settings.data_dir) / "hooks"


class Operations:
    def __init__(self, db: DbEngine, fleet: Fleet, agents: AgentCaller, settings: Settings,
                 publish: Callable[[OpRecord], None] | None = None) -> None:
        self.fleet = fleet
        self.settings = settings
        self.publish = publish
        self.store = OperationStore(db)  # the table comes from migration 0003, never create_all
        self.hooks_dir = hooks_dir(settings)
        self.engine = Engine(self.store, Hooks(self.hooks_dir), on_change=self._changed,
                             pause_dir=Path(settings.data_dir) / "drills")
        recreate = Recreate(fleet, agents, settings)
        self.engine.register(RECREATE, recreate.build, check=recreate.check)
        migrate = Migrate(fleet, agents, settings)
        self.engine.register(MIGRATE, migrate.build, check=migrate.check)
        standby = StandbyOps(fleet, agents, settings)
        self.engine.register(SYNC, standby.build_sync, check=standby.check_sync)
        self.engine.register(PROMOTE, standby.build_promote, check=standby.check_promote)
        self.engine.register(FAILOVER, standby.build_failover, check=standby.check_failover)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._first_save: dict[str, asyncio.Future[OpRecord]] = {}

    def _changed(self, rec: OpRecord) -> None:
        if self.publish is not None:
            try:
                self.publish(rec)
            except Exception:
                log.exception("publishing operation %s failed", rec.id)
        waiter = self._first_save.pop(rec.target, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(rec)
        if rec.state in FINISHED:
            self.fleet.busy.discard(rec.target)

    # -- running operations ------------------------------------------------------------------
    async def begin(self, kind: str, target: str, params: dict[str, Any]) -> OpRecord:
        """Start an operation; returns its first recorded state (it runs on in a task)."""
        if target in self.fleet.busy or target in self._first_save:
            raise Conflict(f"'{target}' is busy with another request",
                           hint="wait for it to finish (see 'corral ops ls'), then try again",
                           retryable=True)
        self.fleet.busy.add(target)
        first: asyncio.Future[OpRecord] = asyncio.get_running_loop().create_future()
        self._first_save[target] = first
        task = self._spawn(self.engine.submit(kind, target, params), f"op-{kind}-{target}")
        try:
            await asyncio.wait({first, task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._first_save.pop(target, None)
        if first.done():
            return first.result()
        self.fleet.busy.discard(target)
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
        unfinished = self.store.unfinished()
        for rec in unfinished:
            self.fleet.busy.add(rec.target)
        if unfinished:
            self._spawn(self._resume(started_at), "ops-resume")

    async def _resume(self, started_at: float) -> None:
        s = self.settings
        loop = asyncio.get_running_loop()
        deadline = loop.time() + s.lease_seconds + 2 * s.heartbeat_seconds
        while loop.time() < deadline:
            with self.fleet.sessions() as sess:
                waiting = [h.name for h in sess.scalars(select(Host).where(Host.state == "up"))
                           if (h.last_heartbeat or 0.0) < started_at]
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
