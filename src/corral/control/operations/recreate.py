"""The ``recreate`` operation: stop, delete on its host, create again (same or another host),
start again if it was running.

The first real operation of the engine, small on purpose, and the skeleton later migrations
reuse: every step that changes a host has an undo that puts the instance back on its original
host, so a failure anywhere (a target host that does not answer, a start that fails) leaves it
as it was, running where it ran. Undo functions are idempotent and safe when their ``do`` never
ran, because after a server crash the step that was in flight is undone whatever it achieved.

What an undo needs (source and target host, whether it ran, its spec) is written to the record's
``data`` by the first step, so a server restarted after a crash can finish the rollback from the
database alone. Every start gets a new epoch (the fleet's rule), so a report about a previous run
never overwrites the new one; the instance is in :attr:`Fleet.busy` for the whole operation, so
heartbeats do not race the steps.
"""

from __future__ import annotations

import logging
from typing import Any

import nats.errors
from sqlalchemy.orm import Session

from corral.api import operations as wire
from corral.bus import rpc
from corral.control.db import Instance
from corral.control.operations.base import OpBase
from corral.errors import Conflict, HostUnavailable, InvalidRequest
from corral.lifecycle import MOVABLE, State
from corral.ops.engine import OpContext, Step
from corral.ops.store import OpRecord
from corral.scheduling.placement import Request, place

log = logging.getLogger(__name__)

KIND = "recreate"
#: states an instance may be recreated from (frozen must be thawed first; pending/lost wait)
RECREATABLE = MOVABLE


class Recreate(OpBase):
    """Builds the steps of a ``recreate`` record (registered with ``Engine.register``)."""

    def build(self, rec: OpRecord) -> list[Step]:
        return [
            Step("plan", self._plan),
            Step("stop", self._stop, self._unstop),
            Step("delete", self._delete, self._undelete),
            Step("create", self._create, self._uncreate),
            Step("start", self._start, self._unstart),
        ]

    # -- helpers -----------------------------------------------------------------------------
    @staticmethod
    def result(rec: OpRecord) -> wire.RecreateResult:
        return wire.RecreateResult(host=rec.data.get("target"))

    # -- refusals ----------------------------------------------------------------------------
    def check(self, name: str, params: dict[str, Any]) -> None:
        """The engine's check: refuse before anything is recorded (see :meth:`_refusals`)."""
        with self.fleet.sessions() as s:
            self._refusals(s, name, params)

    def _refusals(self, s: Session, name: str, params: dict[str, Any]
                  ) -> tuple[Instance, State, str, str]:
        """Raise what makes the request impossible; else the instance, its state, and the
        source and target hosts. Reads only: the check and the plan both run it."""
        inst = self.instance(s, name)
        state = State(inst.state)
        if state not in RECREATABLE:
            raise Conflict(f"cannot recreate instance '{name}': it is {state.value}",
                           hint="thaw it first" if state == State.FROZEN else
                           "wait until it is running or stopped")
        source = inst.host or ""
        self.host_up(s, source, "its")
        target = params.get("to") or source
        if target != source:
            host = self.host_up(s, target, "target")
            if inst.driver not in (host.drivers or {}):
                raise InvalidRequest(f"host {target} does not offer driver '{inst.driver}'",
                                     hint="pick a host that lists it in 'corral host ls'")
            place(Request(inst.cpus, inst.memory_bytes, inst.driver, host=target),
                  self.fleet.snapshot(s))
        return inst, state, source, target

    # -- steps -------------------------------------------------------------------------------
    async def _plan(self, ctx: OpContext) -> None:
        """Check again (the fleet may have changed since the engine's check) and write down
        everything an undo will need."""
        with self.fleet.sessions() as s:
            inst, state, source, target = self._refusals(s, ctx.record.target, ctx.params)
            ctx.data.update(source=source, target=target, was_running=state == State.RUNNING,
                            state=state.value, desired=inst.desired_state,
                            spec=self.spec(inst))

    async def _stop(self, ctx: OpContext) -> None:
        if not ctx.data["was_running"]:
            return
        name, source = ctx.record.target, ctx.data["source"]
        grace = self.settings.stop_timeout
        report = await self.agents.call(source, rpc.STOP, rpc.StopArgs(name=name, timeout=grace))
        self.record(name, source, State.STOPPED, report, desired_state=State.STOPPED.value)

    async def _unstop(self, ctx: OpContext) -> None:
        """Running again on the source host (a no-op if it never stopped)."""
        if not ctx.data.get("was_running"):
            return
        name, source = ctx.record.target, ctx.data["source"]
        now = await self.agents.call(source, rpc.STATUS, rpc.NameArgs(name=name))
        if now.state != State.RUNNING.value:
            epoch = self.new_epoch(name)
            now = await self.agents.call(source, rpc.START, rpc.StartArgs(name=name, epoch=epoch))
        self.record(name, source, State.RUNNING, now, desired_state=State.RUNNING.value)

    async def _delete(self, ctx: OpContext) -> None:
        await self.agents.call(ctx.data["source"], rpc.DELETE,
                               rpc.DeleteArgs(name=ctx.record.target))

    async def _undelete(self, ctx: OpContext) -> None:
        """Back on the source host (the agent's create returns what it still has, if any)."""
        if "source" not in ctx.data:
            return
        name, source = ctx.record.target, ctx.data["source"]
        report = await self.agents.call(source, rpc.CREATE,
                                        rpc.CreateArgs(spec=self.recorded_spec(ctx)))
        state = State.CREATED if report.state == State.CREATED.value else State.STOPPED
        self.record(name, source, state, report)

    async def _create(self, ctx: OpContext) -> None:
        name, target = ctx.record.target, ctx.data["target"]
        ctx.data["create_sent"] = True
        ctx.save()  # before the call: after a crash, the undo must look on the target
        self.record(name, target, State.PENDING, None)
        try:
            report = await self.agents.call(target, rpc.CREATE,
                                            rpc.CreateArgs(spec=self.recorded_spec(ctx)))
        except HostUnavailable as exc:
            if isinstance(exc.__cause__, nats.errors.NoRespondersError):
                ctx.data["create_sent"] = False  # nobody received it: nothing to undo there
                ctx.save()
            raise
        self.record(name, target, State.CREATED, report)

    async def _uncreate(self, ctx: OpContext) -> None:
        """Nothing left on the target host; the record points at the source again."""
        if "source" not in ctx.data:
            return
        name, source, target = ctx.record.target, ctx.data["source"], ctx.data["target"]
        if target != source and ctx.data.get("create_sent"):
            await self.agents.call(target, rpc.DELETE, rpc.DeleteArgs(name=name))
        self.record(name, source, State.STOPPED, None)

    async def _start(self, ctx: OpContext) -> None:
        name, target = ctx.record.target, ctx.data["target"]
        if not ctx.data["was_running"]:
            return
        epoch = self.new_epoch(name)
        report = await self.agents.call(target, rpc.START, rpc.StartArgs(name=name, epoch=epoch))
        self.record(name, target, State.RUNNING, report, desired_state=State.RUNNING.value)

    async def _unstart(self, ctx: OpContext) -> None:
        if not ctx.data.get("was_running"):
            return
        name, target = ctx.record.target, ctx.data["target"]
        report = await self.stop_if_alive(target, name)
        if report is not None:
            self.record(name, target, State.STOPPED, report)
