"""Warm standbys as operations: ``standby-sync`` (refresh), ``standby-promote`` (planned switch)
and ``failover`` (the primary's host is gone).

A refresh is a live pass and a short frozen one into the standby host's ``standby`` slot. It
never removes the copy: a refresh that fails leaves the previous one (every file whole, see
:mod:`corral.agent.disks`) and marks the standby ``stale`` with the reason. ``data_at`` moves
only when a frozen pass completed, so it is the moment a promoted standby "drops back" to.

A promotion is a migration onto the standby's copy: freeze, last pass, kill the primary, adopt
the copy, create and start it on the standby host (the point of no return), then the old
primary's disk becomes the new standby. A failover is the same without the passes: the
primary's host is down (and has fenced itself), so the copy is what there is.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from corral.api import operations as wire
from corral.bus import rpc
from corral.control.db import Host, Instance, Standby
from corral.control.diskops import DiskOps
from corral.errors import Conflict, NotFound
from corral.lifecycle import ALIVE, State
from corral.ops.engine import OpContext, Step
from corral.ops.store import OpRecord

SYNC, PROMOTE, FAILOVER = "standby-sync", "standby-promote", "failover"


class StandbyOps(DiskOps):
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

    def _failing_over(self, s: Session, name: str, params: dict[str, Any]) -> Instance:
        """Refusals of a failover: there must be a synced standby and a dead primary."""
        inst, _, _ = self._with_standby(s, name, need_ready=True)
        dead = str(params.get("from") or "")
        host = s.get(Host, inst.host or "")
        if inst.host != dead or (host is not None and host.state == "up"):
            raise Conflict(f"instance '{name}' is on {inst.host}, which is up: no failover",
                           hint="use 'corral standby promote' for a planned switch")
        return inst

    def check_sync(self, name: str, params: dict[str, Any]) -> None:
        with self.fleet.sessions() as s:
            self._moving(s, name, "sync", need_ready=False)

    def check_promote(self, name: str, params: dict[str, Any]) -> None:
        with self.fleet.sessions() as s:
            self._moving(s, name, "promote", need_ready=True)

    def check_failover(self, name: str, params: dict[str, Any]) -> None:
        with self.fleet.sessions() as s:
            self._failing_over(s, name, params)

    # -- results ---------------------------------------------------------------------------------
    @staticmethod
    def sync_result(rec: OpRecord) -> wire.SyncResult:
        d = rec.data
        return wire.SyncResult(host=d.get("target"), bytes=int(d.get("bytes") or 0),
                               freeze_ms=d.get("freeze_ms"), data_at=d.get("data_at"))

    @staticmethod
    def failover_result(rec: OpRecord) -> wire.FailoverResult:
        d = rec.data
        return wire.FailoverResult(source=d.get("source"), target=d.get("target"),
                                   data_at=d.get("data_at"))

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

    # -- standby-sync ------------------------------------------------------------------------------
    def build_sync(self, rec: OpRecord) -> list[Step]:
        return [Step("plan", self._plan_sync), Step("prepare", self._prepare, self._mark_stale),
                Step("copy", self._live), Step("freeze-copy", self._frozen_sync),
                Step("commit", self._commit_sync)]

    async def _plan_sync(self, ctx: OpContext) -> None:
        with self.fleet.sessions() as s:
            self._note(ctx, *self._moving(s, ctx.record.target, "sync", need_ready=False))

    async def _frozen_sync(self, ctx: OpContext) -> None:
        res = await self.send(ctx, ctx.data["source"], "frozen")
        ctx.data.update(data_at=res["data_at"], freeze_ms=res.get("freeze_ms"))
        ctx.save()

    async def _commit_sync(self, ctx: OpContext) -> None:
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

    # -- standby-promote ---------------------------------------------------------------------------
    def build_promote(self, rec: OpRecord) -> list[Step]:
        return [Step("plan", self._plan_promote),
                Step("prepare", self._prepare, self._mark_stale),
                Step("copy", self._live),
                Step("freeze-copy", self._frozen_promote, self._unfreeze),
                Step("stop", self._stop_primary, self._unstop),
                Step("adopt", self._adopt, self._unadopt),
                Step("create", self._create, self._uncreate),
                Step("start", self._start, self._unstart, commit=True),
                Step("swap", self._swap)]

    async def _plan_promote(self, ctx: OpContext) -> None:
        with self.fleet.sessions() as s:
            self._note(ctx, *self._moving(s, ctx.record.target, "promote", need_ready=True))

    async def _frozen_promote(self, ctx: OpContext) -> None:
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

    # -- failover ----------------------------------------------------------------------------------
    def build_failover(self, rec: OpRecord) -> list[Step]:
        return [Step("plan", self._plan_failover),
                Step("adopt", self._adopt, self._unadopt),
                Step("create", self._create, self._uncreate),
                Step("start", self._start, self._unstart, commit=True),
                Step("finish", self._finish_failover)]

    async def _plan_failover(self, ctx: OpContext) -> None:
        with self.fleet.sessions() as s:
            inst = self._failing_over(s, ctx.record.target, ctx.params)
            _, sb, target = self._with_standby(s, inst.name, need_ready=True)
            self._note(ctx, inst, target)
            ctx.data.update(data_at=sb.data_at, was_running=True)

    async def _finish_failover(self, ctx: OpContext) -> None:
        """No standby any more (its copy is now the disk); the dead host's copy is stopped and
        removed by reconciliation when that host comes back."""
        with self.fleet.sessions.begin() as s:
            sb = s.get(Standby, ctx.record.target)
            if sb is not None:
                s.delete(sb)

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


def due(sessions: sessionmaker[Session], now: float, tried: dict[str, float]) -> list[str]:
    """Instances whose standby is due a refresh: both hosts up, the instance running or
    stopped, its interval passed since the last refresh *or attempt* (``tried``), so a refresh
    that keeps failing is retried once per interval, not in a loop."""
    out: list[str] = []
    with sessions() as s:
        rows = s.execute(select(Standby, Instance, Host).join(
            Instance, Instance.name == Standby.instance).join(
            Host, Host.name == Standby.host)).all()
        for sb, inst, host in rows:
            primary = s.get(Host, inst.host or "")
            if host.state != "up" or primary is None or primary.state != "up":
                continue
            if inst.state not in (State.RUNNING.value, State.STOPPED.value):
                continue
            last = max(sb.last_sync_at or 0.0, tried.get(sb.instance, 0.0))
            if now - last >= sb.every_seconds:
                out.append(sb.instance)
    return out
