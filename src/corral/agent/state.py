"""What one agent holds in memory: its drivers, its instance records and a lock per instance.

Shared by the command handlers, the watcher and the heartbeat, so each of them stays a thin
function over this one object. Driver calls are synchronous; :meth:`AgentState.call` runs them in
a worker thread so a slow ``runc`` never stalls heartbeats.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from corral.agent.report import apply_status, to_report
from corral.agent.store import InstanceRecord, Store
from corral.bus.messages import InstanceReport
from corral.drivers.base import Driver
from corral.errors import InvalidRequest, NotFound
from corral.lifecycle import ENDED

if TYPE_CHECKING:
    from corral.agent.disks import HostDisks
    from corral.agent.imagecache import ImageCache
    from corral.agent.vips import Vips

log = logging.getLogger(__name__)
T = TypeVar("T")
#: a handler of one agent call: takes that call's argument model (bus/rpc.py), returns its
#: result; a test pins each handler's annotation to the table
Handler = Callable[["AgentState", Any], Awaitable[Any]]


class AgentState:
    def __init__(self, data_dir: Path, drivers: dict[str, Driver], stop_timeout: float) -> None:
        self.data_dir = Path(data_dir)
        self.drivers = drivers
        self.stop_timeout = stop_timeout
        self.store = Store(self.data_dir)
        self.records: dict[str, InstanceRecord] = {}
        #: newest epoch accepted per instance name; survives delete for the agent's lifetime.
        self.epochs: dict[str, int] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        #: set when something worth telling the server at once happened (an instance ended).
        self.changed = asyncio.Event()
        #: awaited with the name (under its lock) before an instance's files are removed,
        #: e.g. log capture's last pump.
        self.before_delete: list[Callable[[str], Awaitable[None]]] = []
        #: the chunk cache for image-based roots (set by the agent; None in bare tests)
        self.images: ImageCache | None = None
        #: this host's instance disks and data channel (set by the agent; None in bare tests,
        #: where instances run from their spec's rootfs or their workdir as before)
        self.disks: HostDisks | None = None
        #: this host's virtual IPs (set by the agent; None in bare tests: no addresses added)
        self.vips: Vips | None = None
        #: told of a record just seen ending (exited or failed; its restart policy, see
        #: agent/restart.py); called under the instance's lock, must not block
        self.on_end: list[Callable[[InstanceRecord], None]] = []

    def lock(self, name: str) -> asyncio.Lock:
        lock = self._locks.get(name)
        if lock is None:
            lock = self._locks[name] = asyncio.Lock()
        return lock

    def driver(self, name: str) -> Driver:
        drv = self.drivers.get(name)
        if drv is None:
            offered = ", ".join(sorted(self.drivers)) or "none"
            raise InvalidRequest(
                f"driver '{name}' is not offered by this agent",
                hint=f"drivers here: {offered}",
            )
        return drv

    def record(self, name: str) -> InstanceRecord:
        rec = self.records.get(name)
        if rec is None:
            raise NotFound(
                f"instance '{name}' is not on this host",
                hint="run 'corral ls' to see where it is",
            )
        return rec

    async def call(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.to_thread(fn, *args)

    def save(self, rec: InstanceRecord) -> None:
        self.store.save(rec)

    async def refresh(self, rec: InstanceRecord) -> InstanceReport:
        """Ask the driver, update and persist the record, and report it."""
        status = await self.call(self.driver(rec.driver).status, rec.handle)
        if apply_status(rec, status):
            self.changed.set()
            if rec.state in ENDED:
                for cb in self.on_end:
                    cb(rec)
        self.save(rec)
        return to_report(rec)

    def reports(self) -> list[InstanceReport]:
        return [to_report(r) for r in self.records.values()]

    async def recover_all(self) -> None:
        """Load every record and re-attach through its driver; never kill or restart anything."""
        self.records = self.store.load_all()
        for rec in self.records.values():
            self.epochs[rec.name] = max(self.epochs.get(rec.name, 0), rec.epoch)
            drv = self.drivers.get(rec.driver)
            if drv is None:
                log.error("instance %s uses driver %s, which this agent does not offer; "
                          "reporting it failed", rec.name, rec.driver)
                rec.state, rec.pid = "failed", None
                continue
            try:
                status = await self.call(drv.recover, rec.handle)
            except Exception as exc:
                log.error("could not recover instance %s: %s", rec.name, exc)
                rec.state, rec.pid = "failed", None
                continue
            apply_status(rec, status)
            self.save(rec)
            log.info("recovered %s: %s (pid %s)", rec.name, rec.state, rec.pid)
