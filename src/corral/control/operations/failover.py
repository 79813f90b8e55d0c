"""``failover``: the primary's host is down (and has fenced itself), so the standby's copy is
what there is: adopt it, create and start the instance on the standby's host (the point of no
return), forget the standby. The dead host's copy is stopped and removed by reconciliation when
that host comes back."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from corral.api import operations as wire
from corral.control.db import Host, Instance, Standby
from corral.control.operations.standby import StandbyMoves
from corral.errors import Conflict
from corral.ops.engine import OpContext, Step
from corral.ops.store import OpRecord

KIND = "failover"


class Failover(StandbyMoves):
    def _failing_over(self, s: Session, name: str, params: dict[str, Any]) -> Instance:
        """Refusals of a failover: there must be a synced standby and a dead primary."""
        inst, _, _ = self._with_standby(s, name, need_ready=True)
        dead = str(params.get("from") or "")
        host = s.get(Host, inst.host or "")
        if inst.host != dead or (host is not None and host.state == "up"):
            raise Conflict(f"instance '{name}' is on {inst.host}, which is up: no failover",
                           hint="use 'corral standby promote' for a planned switch")
        return inst

    def check(self, name: str, params: dict[str, Any]) -> None:
        with self.fleet.sessions() as s:
            self._failing_over(s, name, params)

    @staticmethod
    def result(rec: OpRecord) -> wire.FailoverResult:
        d = rec.data
        return wire.FailoverResult(source=d.get("source"), target=d.get("target"),
                                   data_at=d.get("data_at"))

    def build(self, rec: OpRecord) -> list[Step]:
        return [Step("plan", self._plan),
                Step("adopt", self._adopt, self._unadopt),
                Step("create", self._create, self._uncreate),
                Step("start", self._start, self._unstart, commit=True),
                Step("finish", self._finish)]

    async def _plan(self, ctx: OpContext) -> None:
        with self.fleet.sessions() as s:
            inst = self._failing_over(s, ctx.record.target, ctx.params)
            _, sb, target = self._with_standby(s, inst.name, need_ready=True)
            self._note(ctx, inst, target)
            ctx.data.update(data_at=sb.data_at, was_running=True)

    async def _finish(self, ctx: OpContext) -> None:
        """No standby any more (its copy is now the disk); the dead host's copy is stopped and
        removed by reconciliation when that host comes back."""
        with self.fleet.sessions.begin() as s:
            sb = s.get(Standby, ctx.record.target)
            if sb is not None:
                s.delete(sb)
