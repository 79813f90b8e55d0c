"""``standby-promote``: a planned switch to the standby, a migration onto its copy. Freeze,
last pass, kill the primary, adopt the copy, create and start it on the standby host (the point
of no return), then the old primary's disk becomes the new standby."""

from __future__ import annotations

import time
from typing import Any

from corral.api import operations as wire
from corral.bus import rpc
from corral.control.db import Host
from corral.control.operations.migrate import Migrate
from corral.control.operations.standby import StandbyMoves
from corral.lifecycle import ALIVE, State
from corral.ops.engine import OpContext, Step
from corral.ops.store import OpRecord

KIND = "standby-promote"


class Promote(StandbyMoves):
    def check(self, name: str, params: dict[str, Any]) -> None:
        with self.fleet.sessions() as s:
            self._moving(s, name, "promote", need_ready=True)

    @staticmethod
    def result(rec: OpRecord) -> wire.MoveResult:
        return Migrate.result(rec)

    def build(self, rec: OpRecord) -> list[Step]:
        return [Step("plan", self._plan),
                Step("prepare", self._prepare, self._mark_stale),
                Step("copy", self._live),
                Step("freeze-copy", self._frozen, self._unfreeze),
                Step("stop", self._stop_primary, self._unstop),
                Step("adopt", self._adopt, self._unadopt),
                Step("create", self._create, self._uncreate),
                Step("start", self._start, self._unstart, commit=True),
                Step("swap", self._swap)]

    async def _plan(self, ctx: OpContext) -> None:
        with self.fleet.sessions() as s:
            self._note(ctx, *self._moving(s, ctx.record.target, "promote", need_ready=True))

    async def _frozen(self, ctx: OpContext) -> None:
        res = await self.send(ctx, ctx.data["source"], "frozen", keep_frozen=True)
        ctx.data["down_since"] = time.time() - (res.get("freeze_ms") or 0.0) / 1000.0
        ctx.data["data_at"] = res["data_at"]
        ctx.save()

    async def _unfreeze(self, ctx: OpContext) -> None:
        if ctx.data.get("source"):
            await self.thaw_if_frozen(ctx.data["source"], ctx.record.target)

    async def _stop_primary(self, ctx: OpContext) -> None:
        if State(ctx.data["state"]) in ALIVE:
            await self.kill_source(ctx.data["source"], ctx.record.target)

    async def _unstop(self, ctx: OpContext) -> None:
        if State(ctx.data.get("state", "stopped")) in ALIVE:
            await self.restart_source(ctx, ctx.data["source"])

    async def _swap(self, ctx: OpContext) -> None:
        """The old primary's disk becomes the standby (on btrfs it is dropped and the next
        refresh sends everything: a demoted disk is no received snapshot to build on)."""
        name, old = ctx.record.target, ctx.data["source"]
        await self.agents.call(old, rpc.DELETE, rpc.DeleteArgs(name=name, keep_disk=True))
        with self.fleet.sessions() as s:
            host = s.get(Host, old)
            btrfs = host is not None and host.disk_backend == "btrfs"
        if btrfs:
            await self.agents.call(old, rpc.DELETE, rpc.DeleteArgs(name=name))
        else:
            await self.agents.call(old, rpc.DISK_DEMOTE, rpc.NameArgs(name=name))
        self.standby_update(name, host=old, state="new" if btrfs else "ready",
                            data_at=None if btrfs else ctx.data.get("data_at"),
                            last_sync_at=time.time(), last_error="")
