"""The ``unshelve`` operation: back to the old host when its disk is still there and it fits
(nothing moves), else to the host the scheduler picks, preferring hosts that already cache more
of the shelved disk's chunks, which then fetch only what they lack (USERS.md §3).

Steps, each with an undo that leaves the instance shelved as it was:

1. ``plan``: choose the host and reserve its CPU and memory at once (the row gets ``host``
   while still ``shelved``, so concurrent unshelves in a bulk never overfill a host); undo:
   release the reservation, if it made one (a plan that refused changed nothing);
2. ``pull``: the agent makes ``DISK_ROOT/NAME`` from the shelved manifest, or finds the kept
   disk there and moves nothing; undo: drop a disk that was built for this (a kept disk stays);
3. ``create``: the ordinary create, which uses that disk as it is; undo: delete, keeping the
   disk for the pull's undo to judge;
4. ``start``: if it was running when shelved; undo: stop it;
5. ``finish`` (the point of no return): the row forgets the shelf, the store drops its name;
   an old copy of the disk on another host is left to the offload loop to remove at once.

The chunk preference is measured, not guessed: the server sends every candidate host a sample
of the manifest's chunk ids (the numerically smallest ``SAMPLE`` of them, which for hashes is a
uniform sample) and each agent says how many it holds.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import nats.errors
from sqlalchemy.orm import Session

from corral.api import operations as wire
from corral.bus import rpc
from corral.control.db import Instance
from corral.control.operations.shelve import ShelfSteps
from corral.errors import Conflict, HostUnavailable, NotFound
from corral.lifecycle import State, Verb, check_verb
from corral.ops.engine import OpContext, Step
from corral.ops.store import OpRecord
from corral.scheduling.placement import Request, fits, place

log = logging.getLogger(__name__)

KIND = "unshelve"
SAMPLE = 256


def _unsent(ctx: OpContext, exc: HostUnavailable, flag: str) -> None:
    """Nobody was listening on the host, so nobody received the call: nothing to undo there
    (an undo sent to a dead agent would only fail and leave the operation needing attention)."""
    if isinstance(exc.__cause__, nats.errors.NoRespondersError):
        ctx.data[flag] = False
        ctx.save()


class Unshelve(ShelfSteps):
    """Builds the steps of an ``unshelve`` record (see the module doc)."""

    @staticmethod
    def result(rec: OpRecord) -> wire.UnshelveResult:
        d, pull = rec.data, rec.data.get("pull") or {}
        return wire.UnshelveResult(
            host=d.get("target"), disk_was_there=pull.get("existing") if pull else None,
            chunks=pull.get("chunks"), fetched_chunks=pull.get("fetched_chunks"),
            fetched_bytes=pull.get("fetched_bytes"))

    def build(self, rec: OpRecord) -> list[Step]:
        return [
            Step("plan", self._plan, self._unplan),
            Step("pull", self._pull, self._unpull),
            Step("create", self._create, self._uncreate),
            Step("start", self._start, self._unstart),
            Step("finish", self._finish, commit=True),
        ]

    # -- placement ---------------------------------------------------------------------------
    async def _scores(self, shelf: str, driver: str) -> dict[str, float]:
        """Share of a sample of the shelf's chunks each up host with the driver caches."""
        manifest = await asyncio.to_thread(self.store().manifest, shelf)
        sample = sorted(manifest.chunk_ids())[:SAMPLE]
        if not sample:
            return {}
        with self.fleet.sessions() as s:
            hosts = [h.name for h in self.fleet.snapshot(s) if h.up and driver in h.drivers]
        answers = await asyncio.gather(
            *(self.agents.call(h, rpc.CHUNKS_CACHED, rpc.ChunksArgs(ids=sample)) for h in hosts),
            return_exceptions=True)
        scores: dict[str, float] = {}
        for host, got in zip(hosts, answers, strict=True):
            if isinstance(got, BaseException) or not isinstance(got, dict):
                log.info("host %s did not say which chunks it caches: %s", host, got)
                continue
            scores[host] = int(got.get("have", 0)) / len(sample)
        return scores

    def _pick(self, ctx: OpContext, scores: dict[str, float] | None) -> str | None:
        """The host to reserve; with ``scores`` None only the old host is tried (None when it
        does not fit)."""
        name, to = ctx.record.target, ctx.params.get("to")
        with self.fleet.sessions() as s:
            inst = self.instance(s, name)
            snap = self.fleet.snapshot(s)
            old = inst.disk_host
            if scores is not None:
                return place(Request(inst.cpus, inst.memory_bytes, inst.driver, host=to,
                                     prefer=scores), snap)
            if old is None or (to is not None and to != old):
                return None
            req = Request(inst.cpus, inst.memory_bytes, inst.driver, host=old)
            return old if any(h.name == old and fits(req, h) for h in snap) else None

    def _reserve(self, ctx: OpContext, scores: dict[str, float] | None) -> bool:
        """Pick and reserve a host (no await between the two: nothing interleaves); False when
        only the old host was to be tried and it does not fit."""
        target = self._pick(ctx, scores)
        if target is None:
            return False
        ctx.data.update(target=target, fast=target == ctx.data["disk_host"],
                        scores=scores or {})
        ctx.save()  # before the row changes: the undo releases only what is written down here
        with self.fleet.sessions.begin() as s:
            self.fleet.move_in(self.instance(s, ctx.record.target), host=target)
        return True

    # -- refusals ----------------------------------------------------------------------------
    def check(self, name: str, params: dict[str, Any]) -> None:
        """The engine's check: refuse before anything is recorded (see :meth:`_refusals`)."""
        with self.fleet.sessions() as s:
            self._refusals(s, name, params)

    def _refusals(self, s: Session, name: str, params: dict[str, Any]) -> Instance:
        """Raise what makes unshelving impossible (not shelved, a host already reserved, the
        shelf gone from the store, no host with room); else the instance. Reads only: the
        check and the plan both run it."""
        inst = self.instance(s, name)
        check_verb(name, State(inst.state), Verb.UNSHELVE)
        if inst.host is not None:
            raise Conflict(f"instance '{name}' already has a host reserved ({inst.host})",
                           hint="an earlier unshelve did not finish; see 'corral ops ls'")
        shelf = inst.shelf or ""
        if not shelf or self.store().packs.get_ref("image:" + shelf) is None:
            raise NotFound(f"the shelved disk of '{name}' ({shelf or 'none'}) is not in the "
                           "image store", hint="it cannot be unshelved; 'corral rm' it")
        place(Request(inst.cpus, inst.memory_bytes, inst.driver, host=params.get("to")),
              self.fleet.snapshot(s))  # room somewhere; which host is the plan's choice
        return inst

    # -- steps -------------------------------------------------------------------------------
    async def _plan(self, ctx: OpContext) -> None:
        """Check again (the fleet may have changed since the engine's check), then reserve."""
        name = ctx.record.target
        with self.fleet.sessions() as s:
            inst = self._refusals(s, name, ctx.params)
            shelf, driver = inst.shelf or "", inst.driver
            ctx.data.update(shelf=shelf, disk_host=inst.disk_host, spec=self.spec(inst),
                            was_running=inst.shelved_from == State.RUNNING.value)
        if not self._reserve(ctx, None):
            self._reserve(ctx, await self._scores(shelf, driver))
        log.info("unshelving %s to %s (%s)", name, ctx.data["target"],
                 "its disk is there" if ctx.data["fast"] else "fetching what it lacks")

    async def _unplan(self, ctx: OpContext) -> None:
        """Shelved on no host again, if the plan reserved one (``target`` is written down
        before the row changes); a plan that refused changed nothing, so nothing is undone."""
        if "target" not in ctx.data:
            return
        with self.fleet.sessions() as s:
            inst = s.get(Instance, ctx.record.target)
            if inst is None:
                return
        self.fleet.move(ctx.record.target, State.SHELVED, host=None,
                        desired_state=State.SHELVED.value)

    async def _pull(self, ctx: OpContext) -> None:
        name, target = ctx.record.target, ctx.data["target"]
        ctx.data["pull_sent"] = True
        ctx.save()  # before the call: after a crash, the undo must look on the target
        try:
            pulled = await self.agents.call(target, rpc.DISK_PULL, rpc.PullArgs(
                name=name, image=ctx.data["shelf"], replace=not ctx.data["fast"]))
            ctx.data["pull"] = pulled.model_dump()
        except HostUnavailable as exc:
            _unsent(ctx, exc, "pull_sent")
            raise

    async def _unpull(self, ctx: OpContext) -> None:
        """A disk built for this unshelve goes; the kept disk of a fast one stays."""
        if ctx.data.get("pull_sent") and not ctx.data.get("fast"):
            await self.agents.call(ctx.data["target"], rpc.DISK_DROP,
                                   rpc.NameArgs(name=ctx.record.target))

    async def _create(self, ctx: OpContext) -> None:
        name, target = ctx.record.target, ctx.data["target"]
        ctx.data["create_sent"] = True
        ctx.save()
        try:
            report = await self.agents.call(target, rpc.CREATE,
                                            rpc.CreateArgs(spec=self.recorded_spec(ctx)))
        except HostUnavailable as exc:
            _unsent(ctx, exc, "create_sent")
            raise
        self.fleet.move(name, State.CREATED, report=report)

    async def _uncreate(self, ctx: OpContext) -> None:
        if ctx.data.get("create_sent"):
            await self.agents.call(ctx.data["target"], rpc.DELETE,
                                   rpc.DeleteArgs(name=ctx.record.target, keep_disk=True))

    async def _start(self, ctx: OpContext) -> None:
        if ctx.data["was_running"]:
            await self.start_on(ctx.record.target, ctx.data["target"])

    async def _unstart(self, ctx: OpContext) -> None:
        if not ctx.data.get("was_running") or "target" not in ctx.data:
            return
        await self.stop_if_alive(ctx.data["target"], ctx.record.target)

    async def _finish(self, ctx: OpContext) -> None:
        name, target, old = ctx.record.target, ctx.data["target"], ctx.data["disk_host"]
        desired = State.RUNNING if ctx.data["was_running"] else State.CREATED
        fields: dict[str, Any] = dict(shelf=None, shelved_from=None, shelved_at=None,
                                         desired_state=desired.value)
        if old is None or old == target:
            fields.update(disk_host=None, offload_at=None)
        else:  # an old copy stays on the old host: the offload loop removes it at once
            fields.update(offload_at=self.fleet.clock())
        self.fleet.move(name, **fields)
        self.drop_shelf(ctx.data["shelf"])
