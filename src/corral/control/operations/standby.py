"""What the standby operations share: the refusals about a standby, the notes every step
and undo reads, the pass into the standby slot, and adopting that copy as the live disk.

Three kinds are built on it, one module each: ``standby-sync`` (a refresh), ``standby-promote``
(a planned switch) and ``failover`` (the primary's host is gone). A refresh never removes the
copy: one that fails leaves the previous one (every file whole, see :mod:`corral.agent.disks`)
and marks the standby ``stale`` with the reason. ``data_at`` moves only when a frozen pass
completed, so it is the moment a promoted or failed-over standby "drops back" to.
"""

from __future__ import annotations

import time

from sqlalchemy.orm import Session

from corral.bus import rpc
from corral.control.db import Host, Instance, Standby
from corral.control.operations.moves import DiskOps
from corral.errors import Conflict, NotFound
from corral.lifecycle import ALIVE, State
from corral.ops.engine import OpContext


class StandbyMoves(DiskOps):
    # -- refusals (the engine's checks; the plans run them again) --------------------------------
    def _with_standby(self, s: Session, name: str, need_ready: bool
                      ) -> tuple[Instance, Standby, Host]:
        """The instance, its standby and the standby's host (up), or the refusal."""
        inst = self.instance(s, name)
        sb = s.get(Standby, name)
        if sb is None:
            raise NotFound(f"instance '{name}' has no standby",
                           hint=f"add one with 'corral standby add {name} --host HOST'")
        if need_ready and sb.data_at is None:
            raise Conflict(f"the standby of '{name}' on {sb.host} was never synced",
                           hint=f"run 'corral standby sync {name}' first")
        return inst, sb, self.host_up(s, sb.host, "standby")

    def _moving(self, s: Session, name: str, what: str, need_ready: bool
                ) -> tuple[Instance, Host]:
        """Refusals of a sync or a promotion (both copy from the primary's host); else the
        instance and the standby's host."""
        inst, _, target = self._with_standby(s, name, need_ready)
        self.check_movable(inst, what)
        self.check_pair(self.host_up(s, inst.host or "", "primary"), target)
        return inst, target

    # -- shared --------------------------------------------------------------------------------
    def _note(self, ctx: OpContext, inst: Instance, target: Host) -> None:
        """Write both hosts and the spec into ``data`` (what every later step and undo reads)."""
        ctx.data.update(target=target.name, source=inst.host or "",
                        spec=self.spec(inst), state=inst.state, bytes=0,
                        was_running=inst.desired_state == State.RUNNING.value
                        or inst.state == State.RUNNING.value)

    async def _prepare(self, ctx: OpContext) -> None:
        ctx.data["recv"] = await self.recv(ctx.data["target"], ctx.record.target, "standby")
        self.standby_update(ctx.record.target, state="syncing")

    async def _mark_stale(self, ctx: OpContext) -> None:
        why = (ctx.record.error or {}).get("message", "interrupted")
        self.standby_update(ctx.record.target, state="stale", last_error=str(why)[:2000])

    async def _live(self, ctx: OpContext) -> None:
        if State(ctx.data["state"]) in ALIVE:
            await self.send(ctx, ctx.data["source"], "live")

    # -- adopting the standby copy (promote and failover) ------------------------------------------
    async def _adopt(self, ctx: OpContext) -> None:
        await self.agents.call(ctx.data["target"], rpc.DISK_ADOPT,
                               rpc.SlotArgs(name=ctx.record.target, slot="standby"))

    async def _unadopt(self, ctx: OpContext) -> None:
        """The copy goes back to being the standby (never deleted: it may be all there is)."""
        if "target" in ctx.data:
            await self.agents.call(ctx.data["target"], rpc.DISK_DEMOTE,
                                   rpc.NameArgs(name=ctx.record.target))

    async def _create(self, ctx: OpContext) -> None:
        await self.create_on(ctx, ctx.data["target"])

    async def _uncreate(self, ctx: OpContext) -> None:
        if "target" in ctx.data:
            await self.stop_if_alive(ctx.data["target"], ctx.record.target, signal=9)
            await self.agents.call(ctx.data["target"], rpc.DELETE,
                                   rpc.DeleteArgs(name=ctx.record.target, keep_disk=True))

    async def _start(self, ctx: OpContext) -> None:
        await self.start_on(ctx, ctx.data["target"])
        if "down_since" in ctx.data:
            ctx.data["downtime_ms"] = round((time.time() - ctx.data["down_since"]) * 1000, 1)
            ctx.save()

    async def _unstart(self, ctx: OpContext) -> None:
        await self.stop_if_alive(ctx.data["target"], ctx.record.target, signal=9)
