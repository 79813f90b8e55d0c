"""Shelved instances outside their operations: registration of the two operation kinds, the
offload loop that removes kept disks when their delay passed, clean-up when an instance is
removed, and the listing behind ``GET /v1/shelves``.

A kept disk is named by the instance row: ``disk_host`` holds a copy until ``offload_at`` (NULL:
kept until unshelve or rm). The loop only touches rows no operation or verb holds (the fleet's
busy set, which it also takes while it works), so an unshelve never chooses "its disk is still
there" while that disk is being removed; the agent refuses to drop a disk an instance uses.

A kept disk goes only once the store's copy is verified whole (:func:`store_copy_whole`: every
chunk of the shelf's manifest read back and matching its id): until then it is the one good
copy. A shelf found damaged is logged and looked at again after :data:`RECHECK_AFTER`, never
dropped; a whole one is remembered, so each shelf is read back once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from sqlalchemy import select

from corral.api.models import ShelfView
from corral.bus import rpc
from corral.config import Settings
from corral.control.agents import AgentCaller
from corral.control.db import Host, Instance
from corral.control.fleet import Fleet
from corral.control.operations.runner import Operations
from corral.control.operations.shelve import Shelve, store_copy_whole
from corral.errors import Busy, CorralError
from corral.images.store import ImageStore
from corral.lifecycle import State
from corral.ops import locks
from corral.ops.locks import LockSet

log = logging.getLogger(__name__)

#: how often the offload loop looks for disks whose delay passed
OFFLOAD_EVERY = 1.0
#: how long a shelf found damaged waits before it is read back again (it is a whole read)
RECHECK_AFTER = 300.0


class Shelves:
    def __init__(self, fleet: Fleet, agents: AgentCaller, settings: Settings, ops: Operations,
                 images: Callable[[], ImageStore | None]) -> None:
        self.fleet = fleet
        self.agents = agents
        self.images = images
        self.shelve = Shelve(fleet, agents, settings, images)
        #: shelves read back whole (each is read once), and when a damaged one may be again
        self._whole: set[str] = set()
        self._recheck: dict[str, float] = {}

    # -- the offload loop --------------------------------------------------------------------
    async def loop(self) -> None:
        while True:
            await asyncio.sleep(OFFLOAD_EVERY)
            if not self.fleet.sure():
                continue  # its database may be away: see Fleet.sure
            try:
                await self.offload_due()
            except Exception:
                log.exception("offload pass failed; trying again")

    def _due(self) -> list[tuple[str, str, str | None]]:
        """(instance, host keeping its disk, the shelf to verify first) of each kept disk due
        to go. The shelf is None when the instance is no longer shelved: it came back on
        another host with its own disk, and this copy is an old one."""
        now = self.fleet.clock()
        with self.fleet.sessions() as s:
            up = set(s.scalars(select(Host.name).where(Host.state == "up")))  # not the rows
            rows = s.scalars(select(Instance).where(
                Instance.disk_host.is_not(None), Instance.offload_at.is_not(None),
                Instance.offload_at <= now))
            return [(i.name, i.disk_host,
                     i.shelf or "" if i.state == State.SHELVED.value else None) for i in rows
                    if i.disk_host in up and i.disk_host != i.host
                    and i.name not in self.fleet.locks.instances]

    async def _verified(self, name: str, shelf: str) -> bool:
        """:func:`store_copy_whole`, once per shelf when whole, at most every
        :data:`RECHECK_AFTER` when not."""
        if shelf in self._whole:
            return True
        now = self.fleet.clock()
        if self._recheck.get(shelf, now) > now:
            return False
        if await store_copy_whole(self.images(), shelf, name):
            self._whole.add(shelf)
            self._recheck.pop(shelf, None)
            return True
        self._recheck[shelf] = now + RECHECK_AFTER
        return False

    async def offload_due(self) -> list[str]:
        """Remove every kept disk whose delay passed (on hosts that are up) and whose shelf
        the store holds whole; their names."""
        done = []
        due = self._due()
        shelves = {shelf for _, _, shelf in due}  # forget the shelves no longer waiting
        self._whole &= shelves
        self._recheck = {k: v for k, v in self._recheck.items() if k in shelves}
        for name, host, shelf in due:
            if shelf is not None and not await self._verified(name, shelf):
                continue  # the kept disk is the one good copy
            try:
                with self.fleet.locks.holding(f"offload:{name}", LockSet.of(
                        [locks.instance(name)], [locks.host(host)]), "an offload of its disk"):
                    await self.agents.call(host, rpc.DISK_DROP, rpc.NameArgs(name=name))
            except Busy:
                continue  # an operation or a verb took it meanwhile: the next pass looks again
            except CorralError as exc:
                log.warning("could not remove the kept disk of %s on %s: %s", name, host, exc)
                continue
            with self.fleet.sessions.begin() as s:
                inst = s.get(Instance, name)
                if inst is not None and inst.disk_host == host:
                    self.fleet.move_in(inst, disk_host=None, offload_at=None)
            log.info("kept disk of %s removed from %s (offload delay passed)", name, host)
            done.append(name)
        return done

    # -- rm ----------------------------------------------------------------------------------
    async def discard_for_deleted(self, name: str) -> None:
        """``InstanceService.before_delete`` hook: a kept disk and a shelved manifest go too
        (best effort for the disk: a host that is down keeps it, and the log says so)."""
        with self.fleet.sessions() as s:
            inst = s.get(Instance, name)
            if inst is None:
                return
            disk_host, shelf, host = inst.disk_host, inst.shelf, inst.host
        if disk_host is not None and disk_host != host:
            try:
                await self.agents.call(disk_host, rpc.DISK_DROP, rpc.NameArgs(name=name))
            except CorralError as exc:
                log.warning("the kept disk of %s stays on %s: %s", name, disk_host, exc)
        self.shelve.drop_shelf(shelf)

    # -- listing -----------------------------------------------------------------------------
    def views(self) -> list[ShelfView]:
        store = self.images()
        with self.fleet.sessions() as s:
            rows = list(s.scalars(select(Instance).where(
                Instance.state == State.SHELVED.value).order_by(Instance.name)))
        out = []
        for i in rows:
            size = stored = unique = None
            if store is not None and i.shelf:
                try:
                    info = store.shelf_info(i.shelf)
                    size, stored, unique = info.size, info.stored_size, info.unique_size
                except CorralError:
                    pass
            out.append(ShelfView(
                name=i.name, driver=i.driver, cpus=i.cpus, memory_bytes=i.memory_bytes,
                image=i.image, shelf=i.shelf, shelved_from=i.shelved_from,
                shelved_at=i.shelved_at, disk_host=i.disk_host, offload_at=i.offload_at,
                size=size, stored_size=stored, unique_size=unique))
        return out
