"""What the operations that move disks share: host checks, records, epochs, the disk calls.

Migration, standby refresh, promotion and failover are all made of the same few moves: make a
slot ready on one host, send a live pass and a frozen pass from another, adopt the copy, create
and start the instance there. Each move here is one agent call with its undo beside it, so every
operation built from them undoes exactly what it did, on every host involved.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any, Literal

from corral.bus import rpc
from corral.bus.messages import WireSpec
from corral.control.db import Host, Instance, Standby
from corral.control.operations.base import OpBase
from corral.disks import tickets
from corral.errors import Conflict, HookRefused, HostUnavailable, InvalidRequest, NotFound
from corral.lifecycle import MOVABLE, State
from corral.ops.engine import OpContext

log = logging.getLogger(__name__)


class DiskOps(OpBase):
    """The disk moves, each one agent call with its undo beside it."""

    @staticmethod
    def check_movable(inst: Instance, what: str) -> State:
        state = State(inst.state)
        if state not in MOVABLE:
            raise Conflict(f"cannot {what} instance '{inst.name}': it is {state.value}",
                           hint="thaw it first" if state == State.FROZEN else
                           "wait until it is running or stopped")
        if inst.rootfs:
            raise InvalidRequest(
                f"instance '{inst.name}' runs from the host path {inst.rootfs}, which corral "
                f"cannot {what}", hint="create it from an image (--image) or the default root")
        return state

    @staticmethod
    def check_pair(source: Host, target: Host) -> None:
        """Both ends can move disks and keep them the same way."""
        for h in (source, target):
            if not h.data_port:
                raise HostUnavailable(f"host {h.name} has no data channel for disk transfers",
                                      hint="upgrade its agent and let it re-join")
        if source.disk_backend != target.disk_backend:
            raise InvalidRequest(
                f"host {source.name} keeps disks in {source.disk_backend} and {target.name} "
                f"in {target.disk_backend}", hint="pick a host with the same disk_backend")

    def standby_update(self, name: str, **fields: Any) -> None:
        with self.fleet.sessions.begin() as s:
            sb = s.get(Standby, name)
            if sb is not None:
                for k, v in fields.items():
                    setattr(sb, k, v)

    # -- the moves -------------------------------------------------------------------------------
    async def recv(self, host: str, name: str, slot: rpc.Slot) -> dict[str, Any]:
        """Where the sender writes (kept in ``ctx.data['recv']``, which outlives a crash),
        with the receiving host and slot the pass's ticket names."""
        out = await self.agents.call(host, rpc.DISK_RECV, rpc.SlotArgs(name=name, slot=slot))
        return {**out.model_dump(), "host": host, "slot": slot}

    async def send(self, ctx: OpContext, host: str, mode: Literal["live", "frozen"],
                   keep_frozen: bool = False, shape_only: Sequence[str] = ()
                   ) -> dict[str, Any]:
        """A pass from ``host`` into ``ctx.data['recv']``; the frozen one runs the
        ``pre-freeze`` hook before (a refusal aborts) and ``post-thaw`` after."""
        name = ctx.record.target
        recv = ctx.data["recv"]
        if not recv.get("host") or not recv.get("slot"):
            raise InvalidRequest(
                f"the transfer of '{name}' was prepared by an older server: its target does "
                "not say which host and slot it is, so no transfer ticket can be issued",
                hint="let the operation roll back, then run it again")
        target = rpc.SlotTarget.model_validate(recv)
        if mode == "frozen":
            pre = await ctx.hook("pre-freeze", {"instance": name, "host": host})
            if not pre.ok:
                raise HookRefused(f"pre-freeze hook refused (exit {pre.exit_code}): "
                                  f"{pre.output.strip()[-300:]}",
                                  hint="fix what the hook checks, then run it again")
        # issued last, after the hook: its few minutes count from the pass's start
        ticket = tickets.issue(self.fleet.ticket_key, name, str(recv["slot"]), source=host,
                               target=str(recv["host"]))
        args = rpc.SendArgs(name=name, target=target, mode=mode, gen=ctx.data.get("gen", ""),
                            keep_frozen=keep_frozen, ticket=ticket, shape_only=list(shape_only))
        try:
            res = (await self.agents.call(host, rpc.DISK_SEND, args)).model_dump()
        finally:
            if mode == "frozen" and not keep_frozen:
                await ctx.hook("post-thaw", {"instance": name, "host": host})
        ctx.data["gen"] = res["gen"]
        ctx.data["bytes"] = int(ctx.data.get("bytes", 0)) + int(res["bytes"])
        ctx.data.setdefault("passes", []).append({"mode": mode, **res})
        ctx.save()
        log.info("%s: %s pass from %s: %d bytes in %.2fs%s", name, mode, host, res["bytes"],
                 res["seconds"], f", frozen {res['freeze_ms']:.1f} ms"
                 if res.get("freeze_ms") is not None else "")
        return res

    async def thaw_if_frozen(self, host: str, name: str) -> None:
        try:
            now = await self.agents.call(host, rpc.STATUS, rpc.NameArgs(name=name))
        except NotFound:
            return
        if now.state == State.FROZEN.value:
            await self.agents.call(host, rpc.THAW, rpc.NameArgs(name=name))

    async def kill_source(self, host: str, name: str) -> None:
        """End the source copy at once: it is frozen with its final state already sent, so it
        must not run its shutdown path (writes that would never reach the target)."""
        report = await self.agents.call(host, rpc.KILL, rpc.KillArgs(name=name, signal=9))
        self.ensure_ended(report, host)
        self.record(name, host, State.STOPPED, report)

    async def restart_source(self, ctx: OpContext, host: str) -> None:
        """Undo of stopping the source: running there again, with a new epoch."""
        name = ctx.record.target
        try:
            now = await self.agents.call(host, rpc.STATUS, rpc.NameArgs(name=name))
        except NotFound:
            return
        if now.state == State.FROZEN.value:
            now = await self.agents.call(host, rpc.THAW, rpc.NameArgs(name=name))
        if now.state != State.RUNNING.value:
            epoch = self.new_epoch(name)
            now = await self.agents.call(host, rpc.START, rpc.StartArgs(name=name, epoch=epoch))
        self.record(name, host, State.RUNNING, now, desired_state=State.RUNNING.value)

    async def create_on(self, ctx: OpContext, host: str) -> None:
        name = ctx.record.target
        epoch = self.new_epoch(name)
        ctx.data["epoch"] = epoch
        ctx.save()
        spec = WireSpec.model_validate({**ctx.data["spec"], "epoch": epoch})
        await self.agents.call(host, rpc.CREATE, rpc.CreateArgs(spec=spec))

    async def start_on(self, ctx: OpContext, host: str) -> None:
        name = ctx.record.target
        if not ctx.data.get("was_running"):
            self.record(name, host, State.CREATED, None)
            return
        epoch = self.new_epoch(name)
        report = await self.agents.call(host, rpc.START, rpc.StartArgs(name=name, epoch=epoch))
        self.record(name, host, State.RUNNING, report, desired_state=State.RUNNING.value)
        ctx.data["started_at"] = time.time()
        ctx.save()
