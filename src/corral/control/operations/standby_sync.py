"""``standby-sync``: refresh a warm standby, a live pass then a short frozen one into the
standby host's ``standby`` slot (see :mod:`corral.control.operations.standby`)."""

from __future__ import annotations

import time
from typing import Any

from corral.api import operations as wire
from corral.bus import rpc
from corral.control.db import Standby
from corral.control.operations.standby import StandbyMoves
from corral.ops.engine import OpContext, Step
from corral.ops.store import OpRecord

KIND = "standby-sync"


class StandbySync(StandbyMoves):
    def check(self, name: str, params: dict[str, Any]) -> None:
        with self.fleet.sessions() as s:
            self._moving(s, name, "sync", need_ready=False)

    @staticmethod
    def result(rec: OpRecord) -> wire.SyncResult:
        d = rec.data
        return wire.SyncResult(host=d.get("target"), bytes=int(d.get("bytes") or 0),
                               freeze_ms=d.get("freeze_ms"), data_at=d.get("data_at"))

    def build(self, rec: OpRecord) -> list[Step]:
        return [Step("plan", self._plan), Step("prepare", self._prepare, self._mark_stale),
                Step("copy", self._live), Step("freeze-copy", self._frozen),
                Step("commit", self._commit)]

    async def _plan(self, ctx: OpContext) -> None:
        with self.fleet.sessions() as s:
            self._note(ctx, *self._moving(s, ctx.record.target, "sync", need_ready=False))

    async def _frozen(self, ctx: OpContext) -> None:
        res = await self.send(ctx, ctx.data["source"], "frozen")
        ctx.data.update(data_at=res["data_at"], freeze_ms=res.get("freeze_ms"))
        ctx.save()

    async def _commit(self, ctx: OpContext) -> None:
        name = ctx.record.target
        await self.agents.call(ctx.data["target"], rpc.DISK_COMMIT,
                               rpc.SlotArgs(name=name, slot="standby"))
        with self.fleet.sessions.begin() as s:
            sb = s.get(Standby, name)
            if sb is None:
                return  # removed while it synced: the copy goes with 'standby rm'
            sb.state = "ready"
            sb.last_sync_at = time.time()
            sb.data_at = float(ctx.data["data_at"])
            sb.last_freeze_ms = ctx.data.get("freeze_ms")
            sb.last_bytes = int(ctx.data["bytes"])
            sb.total_bytes = int(sb.total_bytes or 0) + int(ctx.data["bytes"])
            sb.syncs = int(sb.syncs or 0) + 1
            sb.last_error = ""
