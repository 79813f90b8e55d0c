"""The ``shelve`` operation: the disk goes to the image store, CPU and memory are released at
once, the disk itself stays on the host until the offload delay (USERS.md §3).

Steps, each with an undo that leaves the instance as it was (running where it ran):

1. ``plan``: check it can be shelved (not frozen, not run from a host path, no standby, host
   up) and write down what every undo needs;
2. ``stop``: stop it if it runs (undo: start it again);
3. ``push``: the agent chunks the stopped disk and uploads only what the store lacks, under the
   reserved name ``@shelf-<name>-<op>`` (undo: drop that name; gc frees what no one else uses);
4. ``delete``: delete it on the host but keep its disk (undo: create it again there; the create
   finds the disk and uses it as it is);
5. ``record`` (the point of no return): the row says ``shelved``, ``host`` NULL (so the fleet's
   reservations no longer count it) and ``disk_host`` the host that keeps the disk until
   ``offload_at``;
6. ``offload``: with a delay of 0 the disk goes at once, once the store's copy is read back
   whole (if it is not, or the drop fails, the disk stays and the offload loop in
   :mod:`corral.control.shelves`, which checks the same, decides later).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from sqlalchemy.orm import Session

from corral.api import operations as wire
from corral.bus import rpc
from corral.config import Settings
from corral.control.agents import AgentCaller
from corral.control.db import Host, Instance, Standby
from corral.control.fleet import Fleet
from corral.control.operations.base import OpBase
from corral.errors import Conflict, CorralError, HostUnavailable, InvalidRequest
from corral.images.store import PREFIX, SHELF_PREFIX, ImageStore
from corral.lifecycle import State, Verb, check_verb
from corral.ops.engine import OpContext, Step
from corral.ops.store import OpRecord

log = logging.getLogger(__name__)

KIND = "shelve"


def shelf_name(instance: str, op_id: str) -> str:
    """The store name of one shelving of ``instance`` (unique per operation, so a retried or
    repeated shelve never replaces a manifest an agent may be reading)."""
    return f"{SHELF_PREFIX}{instance}-{op_id[:8]}"


async def store_copy_whole(store: ImageStore | None, shelf: str | None, name: str) -> bool:
    """Whether the store holds all of ``shelf`` (read back in a worker thread: a shelf is
    as big as the disk); logs why not. The kept disk of ``name`` may go only when it does."""
    if store is None or not shelf:
        log.warning("the kept disk of %s stays: %s", name,
                    "the image store is not open" if store is None else "it has no shelf")
        return False
    try:
        bad = await asyncio.to_thread(store.verify_image, shelf)
    except CorralError as exc:
        log.error("the kept disk of %s stays: its shelf %s cannot be read: %s", name, shelf,
                  exc)
        return False
    if bad:
        log.error("the kept disk of %s stays: %d chunk(s) of its shelf %s are missing or "
                  "damaged in the store (e.g. %s); it is the one good copy (run 'corral image "
                  "verify'; shelving it again stores it anew)", name, len(bad), shelf, bad[0])
        return False
    return True


class ShelfSteps(OpBase):
    """What shelve and unshelve share beyond :class:`OpBase`: the store and row updates that
    may clear ``host`` (a shelved instance has none)."""

    def __init__(self, fleet: Fleet, agents: AgentCaller, settings: Settings,
                 images: Callable[[], ImageStore | None]) -> None:
        super().__init__(fleet, agents, settings)
        self._images = images

    def store(self) -> ImageStore:
        store = self._images()
        if store is None:
            raise HostUnavailable("the image store is not open yet",
                                  hint="the server is starting; try again", retryable=True)
        return store

    def drop_shelf(self, shelf: str | None) -> None:
        """Remove a shelved manifest's name (idempotent)."""
        if shelf:
            self.store().packs.del_ref(PREFIX + shelf)

    async def start_on(self, name: str, host: str) -> None:
        epoch = self.new_epoch(name)
        report = await self.agents.call(host, rpc.START, rpc.StartArgs(name=name, epoch=epoch))
        self.fleet.move(name, State.RUNNING, report=report, host=host,
                        desired_state=State.RUNNING.value)


class Shelve(ShelfSteps):
    """Builds the steps of a ``shelve`` record (see the module doc)."""

    @staticmethod
    def result(rec: OpRecord) -> wire.ShelveResult:
        d, push = rec.data, rec.data.get("push") or {}
        return wire.ShelveResult(
            host=d.get("source"), shelf=d.get("shelf"), files=push.get("files"),
            size=push.get("size"), stored_size=push.get("stored_size"),
            uploaded_chunks=push.get("uploaded_chunks"),
            uploaded_bytes=push.get("uploaded_bytes"), offload_after=d.get("offload_after"))

    def build(self, rec: OpRecord) -> list[Step]:
        return [
            Step("plan", self._plan),
            Step("stop", self._stop, self._unstop),
            Step("push", self._push, self._unpush),
            Step("delete", self._delete, self._undelete),
            Step("record", self._record, commit=True),
            Step("offload", self._offload),
        ]

    def check(self, name: str, params: dict[str, Any]) -> None:
        """The engine's check: refuse before anything is recorded (see :meth:`_refusals`)."""
        with self.fleet.sessions() as s:
            self._refusals(s, name)

    def _refusals(self, s: Session, name: str) -> tuple[Instance, State]:
        """Raise what makes shelving impossible; else the instance and its state. Reads only:
        the check and the plan both run it."""
        inst = self.instance(s, name)
        state = State(inst.state)
        check_verb(name, state, Verb.SHELVE)
        if inst.rootfs:
            raise InvalidRequest(
                f"instance '{name}' runs from a host path ({inst.rootfs}), which corral "
                "does not own", hint="only instances with their own disk (--image, or "
                "neither --image nor --from) can be shelved")
        if s.get(Standby, name) is not None:
            raise Conflict(f"instance '{name}' has a warm standby; a shelved instance "
                           "runs nowhere, so there is nothing to keep it fresh from",
                           hint=f"remove the standby first: corral standby rm {name}")
        source = self.host_up(s, inst.host or "", "its").name
        old = s.get(Host, inst.disk_host) if inst.disk_host not in (None, source) else None
        if old is not None and old.state != "up":
            raise Conflict(f"an old copy of '{name}''s disk on {old.name} is not removed yet "
                           "and that host is down",
                           hint="wait for the host to come back, then shelve again",
                           retryable=True)
        return inst, state

    async def _plan(self, ctx: OpContext) -> None:
        name = ctx.record.target
        with self.fleet.sessions() as s:
            inst, state = self._refusals(s, name)
            source = inst.host or ""
            old_copy = inst.disk_host if inst.disk_host not in (None, source) else None
            spec = self.spec(inst)
        if old_copy is not None:  # left by an unshelve elsewhere: drop it before we reuse the
            try:                  # column for this shelving's copy
                await self.agents.call(old_copy, rpc.DISK_DROP, rpc.NameArgs(name=name))
            except HostUnavailable as exc:
                raise Conflict(f"an old copy of '{name}''s disk on {old_copy} is not removed "
                               "yet and that host does not answer",
                               hint="wait for the host to come back, then shelve again",
                               retryable=True) from exc
            self.fleet.move(name, disk_host=None, offload_at=None)
        raw = ctx.params.get("offload_after")
        delay = self.settings.shelved_offload_seconds if raw is None else float(raw)
        ctx.data.update(source=source, was_running=state == State.RUNNING,
                        state=state.value, spec=spec, shelf=shelf_name(name, ctx.record.id),
                        offload_after=None if delay < 0 else delay)

    async def _stop(self, ctx: OpContext) -> None:
        if not ctx.data["was_running"]:
            return
        name, source = ctx.record.target, ctx.data["source"]
        report = await self.agents.call(source, rpc.STOP,
                                        rpc.StopArgs(name=name, timeout=self.settings.stop_timeout))
        self.fleet.move(name, State.STOPPED, report=report, desired_state=State.STOPPED.value)

    async def _unstop(self, ctx: OpContext) -> None:
        if not ctx.data.get("was_running"):
            return
        name, source = ctx.record.target, ctx.data["source"]
        now = await self.agents.call(source, rpc.STATUS, rpc.NameArgs(name=name))
        if now.state != State.RUNNING.value:
            await self.start_on(name, source)

    async def _push(self, ctx: OpContext) -> None:
        name, source, shelf = ctx.record.target, ctx.data["source"], ctx.data["shelf"]
        self.drop_shelf(shelf)  # a push retried after a crash names it anew, not "replace"
        out = await self.agents.call(source, rpc.DISK_PUSH, rpc.PushArgs(name=name, image=shelf))
        info = self.store().shelf_info(shelf)
        ctx.data["push"] = {**dict(out), "size": info.size, "stored_size": info.stored_size,
                            "unique_size": info.unique_size, "files": info.files}

    async def _unpush(self, ctx: OpContext) -> None:
        self.drop_shelf(ctx.data.get("shelf"))

    async def _delete(self, ctx: OpContext) -> None:
        await self.agents.call(ctx.data["source"], rpc.DELETE,
                               rpc.DeleteArgs(name=ctx.record.target, keep_disk=True))

    async def _undelete(self, ctx: OpContext) -> None:
        """Back on its host, on its own disk (create finds the disk and uses it)."""
        if "source" not in ctx.data:
            return
        name, source = ctx.record.target, ctx.data["source"]
        report = await self.agents.call(source, rpc.CREATE,
                                        rpc.CreateArgs(spec=self.recorded_spec(ctx)))
        state = State.CREATED if report.state == State.CREATED.value else State.STOPPED
        self.fleet.move(name, state, report=report, host=source)

    async def _record(self, ctx: OpContext) -> None:
        now = self.fleet.clock()
        delay = ctx.data["offload_after"]
        self.fleet.move(ctx.record.target, State.SHELVED, host=None,
                        desired_state=State.SHELVED.value, exit_code=None,
                        disk_host=ctx.data["source"], shelf=ctx.data["shelf"],
                        shelved_from=ctx.data["state"], shelved_at=now,
                        offload_at=None if delay is None else now + delay)

    async def _offload(self, ctx: OpContext) -> None:
        if ctx.data["offload_after"] != 0:
            return
        name, source = ctx.record.target, ctx.data["source"]
        if not await store_copy_whole(self._images(), ctx.data["shelf"], name):
            return  # the kept disk is the one good copy; the shelve itself succeeded
        try:
            await self.agents.call(source, rpc.DISK_DROP, rpc.NameArgs(name=name))
        except Exception as exc:  # the offload loop tries again; the shelve itself succeeded
            log.warning("could not drop the shelved disk of %s on %s now (%s); the offload "
                        "loop will", name, source, exc)
            return
        self.fleet.move(name, disk_host=None, offload_at=None)
