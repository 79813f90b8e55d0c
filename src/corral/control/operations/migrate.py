"""``migrate``: move an instance and its disk to another host; finish, or leave no trace.

Warm (default): a live pass while the instance runs, then the instance is frozen for a pass of
only what changed and stays frozen; it is killed on the source (its final state is already on
the target), the copy is adopted as the target's disk, created and started there. Cold: stop
first, then one pass. The start on the target is the point of no return; before it, any failure
(a refused ``pre-migrate`` or ``pre-freeze`` hook, a full target disk, an agent that dies, a
server killed -9 and restarted) undoes every step in reverse: the target's copy is removed, the
source thawed or started again with a new epoch. After it, only the source's old copy remains to
remove, which is retried, never undone.

Downtime is measured on the server's clock, from the moment the frozen pass began freezing
(its call's return minus the time the agent reports it was frozen) to the target's start reply.

Live (a running instance whose driver can migrate a running instance on both hosts, e.g. qemu):
the instance never stops. The live file pass puts the disk directory in the
target's slot, which is adopted; the instance is created there and started waiting for the
stream (``live_incoming``); the source sends memory and disk (``live_send``: QEMU's block
migration over TLS, see drivers/qemu_migrate.py) and returns once the guest runs on the
target, the source's copy paused for good; in the same step (the commit) the target's copy is
claimed (``live_claim``) and recorded as the instance, with the epoch it was created with.
Then the source's paused copy is killed and reaped, then removed. A failure before the end of
that step undoes: the target's copy is killed first and only then the source's runs on
(``live_abort``, also after QEMU completed, if the claim failed): never two copies running.
Once the step is done the move only goes forward: the guest has run on the target. Downtime
and bytes are QEMU's own (``query-migrate``). A virtual IP is the guest's own
(drivers/qemu_net.py), so its connections move with it: the source's host stops answering for
it when the stream ends, the destination's announces it as soon as its guest runs (and again
at the claim), and an undo gives it back to the source. The choice is made when the
operation is built and read back from the recorded steps when it is resumed.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from sqlalchemy.orm import Session

from corral.api import operations as wire
from corral.bus import rpc
from corral.bus.messages import WireSpec
from corral.control.db import Host, Instance, Standby
from corral.control.operations.moves import DiskOps
from corral.disks import tickets, tunnel
from corral.errors import Conflict, DriverError, InvalidRequest, NoCapacity, NotFound
from corral.lifecycle import ALIVE, State
from corral.ops.engine import OpContext, Step
from corral.ops.store import OpRecord
from corral.scheduling.placement import HostSnapshot, Request, place

KIND = "migrate"
#: switch over when what is left fits this pause (QEMU's own default; the setting
#: ``live_migrate_downtime_ms`` is what the live step sends)
LIVE_DOWNTIME_MS = 300
LIVE_STEP = "live-send"
#: files of a VM's disk directory a live migration's file pass sends the size of only: QEMU's
#: block migration sends every block of the raw disk anyway (a qcow2 goes with the pass: an
#: empty file of its size is no qcow2)
LIVE_SHAPE_ONLY = ("disk.raw",)


def pick_target(name: str, req: Request, standby: str | None,
                hosts: Sequence[HostSnapshot]) -> str:
    """Where a migration without ``--to`` goes: never the standby's host (a migration there is
    refused: switching to the standby is what promotion is for). When no host is left, the
    error says the standby is why and points at promotion."""
    if standby is None:
        return place(req, hosts)
    avoid = req.avoid | {standby}
    try:
        return place(replace(req, avoid=avoid), hosts)
    except NoCapacity as exc:
        others = {h: why for h, why in exc.details.get("shortfall", {}).items()
                  if h not in avoid}
        summary = "; ".join(f"{h}: {why}" for h, why in others.items()) or "no other hosts"
        raise NoCapacity(
            f"no host can take '{name}' but {' and '.join(sorted(req.avoid))} (where it runs) "
            f"and {standby} (which holds its standby): {summary}",
            hint=f"switch to the standby with 'corral standby promote {name}', or make room "
                 "on another host (or add one) and migrate again",
            details={"shortfall": others, "standby": standby}) from exc


def live_capable(host: Host | None, driver: str) -> bool:
    caps = ((host.drivers or {}) if host is not None else {}).get(driver) or {}
    return bool(caps.get("can_live_migrate"))


class Migrate(DiskOps):
    def build(self, rec: OpRecord) -> list[Step]:
        cold = bool(rec.params.get("cold"))
        live = (any(sr.name == LIVE_STEP for sr in rec.steps) if rec.steps
                else not cold and self._wants_live(rec.target, rec.params.get("to")))
        steps = [Step("plan", self._plan), Step("prepare", self._prepare, self._unprepare)]
        if live:
            return [*steps, Step("copy", self._copy_live),
                    Step("adopt", self._adopt, self._unadopt),
                    Step("create", self._create_live, self._unadopt),
                    Step("incoming", self._incoming, self._unincoming),
                    Step(LIVE_STEP, self._live_send, self._unlive_send, commit=True),
                    Step("end-source", self._end_source),
                    Step("cleanup", self._cleanup)]
        if cold:
            steps += [Step("stop", self._stop, self._unstop),
                      Step("copy", self._copy_cold)]
        else:
            steps += [Step("copy", self._copy_live),
                      Step("freeze-copy", self._copy_frozen, self._unfreeze),
                      Step("stop", self._stop, self._unstop)]
        return [*steps,
                Step("adopt", self._adopt, self._unadopt),
                Step("create", self._create, self._unadopt),
                Step("start", self._start, self._unstart, commit=True),
                Step("cleanup", self._cleanup)]

    def _wants_live(self, name: str, to: str | None) -> bool:
        """A running instance whose driver migrates running instances on its host and on the
        target named (one the scheduler picks is checked when planning)."""
        with self.fleet.sessions() as s:
            inst = s.get(Instance, name)
            if inst is None or inst.state != State.RUNNING.value or not inst.host:
                return False
            return live_capable(s.get(Host, inst.host), inst.driver) and (
                to is None or live_capable(s.get(Host, to), inst.driver))

    # -- refusals ----------------------------------------------------------------------------
    def check(self, name: str, params: dict[str, Any]) -> None:
        """The engine's check: refuse before anything is recorded (see :meth:`_refusals`)."""
        with self.fleet.sessions() as s:
            self._refusals(s, name, params)

    def _refusals(self, s: Session, name: str, params: dict[str, Any]
                  ) -> tuple[Instance, State, str, str]:
        """Raise what makes the move impossible; else the instance, its state, and the source
        and target hosts. Reads only: the check and the plan both run it."""
        inst = self.instance(s, name)
        state = self.check_movable(inst, "migrate")
        source = self.host_up(s, inst.host or "", "its")
        snapshot = self.fleet.snapshot(s)
        sb = s.get(Standby, name)
        to = params.get("to") or pick_target(
            name, Request(inst.cpus, inst.memory_bytes, inst.driver,
                          avoid=frozenset({source.name})), sb.host if sb else None, snapshot)
        if to == source.name:
            raise InvalidRequest(f"instance '{name}' already runs on {to}",
                                 hint="name another host with --to")
        target = self.host_up(s, to, "target")
        self.check_pair(source, target)
        if sb is not None and sb.host == to:
            raise Conflict(f"{to} holds the standby of '{name}'",
                           hint=f"use 'corral standby promote {name}' to switch to it")
        if inst.driver not in (target.drivers or {}):
            raise InvalidRequest(f"host {to} does not offer driver '{inst.driver}'",
                                 hint="pick a host that lists it in 'corral host ls'")
        place(Request(inst.cpus, inst.memory_bytes, inst.driver, host=to), snapshot)
        return inst, state, source.name, to

    @staticmethod
    def result(rec: OpRecord) -> wire.MoveResult:
        """Also a promotion's: both are moves, with the same blackboard."""
        d = rec.data
        frozen = [p.get("freeze_ms") for p in d.get("passes", [])
                  if p.get("freeze_ms") is not None]
        live = d.get("live_stats") or {}
        return wire.MoveResult(source=d.get("source"), target=d.get("target"),
                               bytes=int(d.get("bytes") or 0), passes=len(d.get("passes", [])),
                               freeze_ms=frozen[-1] if frozen else None,
                               downtime_ms=d.get("downtime_ms"), data_at=d.get("data_at"),
                               live=bool(d.get("live")),
                               memory_bytes=live.get("ram_bytes"),
                               disk_bytes=live.get("disk_bytes"))

    # -- steps -------------------------------------------------------------------------------
    async def _plan(self, ctx: OpContext) -> None:
        """Check again (the fleet may have changed since the engine's check) and write down
        everything an undo will need."""
        with self.fleet.sessions() as s:
            inst, state, source, target = self._refusals(s, ctx.record.target, ctx.params)
            ctx.data.update(source=source, target=target,
                            was_running=state == State.RUNNING, state=state.value,
                            spec=self.spec(inst), bytes=0)
            if any(sr.name == LIVE_STEP for sr in ctx.record.steps):
                if state != State.RUNNING or not live_capable(s.get(Host, target),
                                                               inst.driver):
                    raise InvalidRequest(
                        f"'{ctx.record.target}' can no longer be migrated live to {target} "
                        f"(it is {state.value}, or {target}'s {inst.driver} driver cannot "
                        "take a running instance)",
                        hint="run the migration again (a stopped instance moves its disk "
                             "only), or migrate it --cold")
                # the target's copy gets the next epoch; the row takes it only at the switch
                ctx.data.update(live=True, live_epoch=int(inst.epoch) + 1)

    async def _prepare(self, ctx: OpContext) -> None:
        ctx.data["recv"] = await self.recv(ctx.data["target"], ctx.record.target, "incoming")

    async def _unprepare(self, ctx: OpContext) -> None:
        if "target" in ctx.data:
            await self.agents.call(ctx.data["target"], rpc.DISK_DISCARD,
                                   rpc.SlotArgs(name=ctx.record.target, slot="incoming"))

    async def _copy_live(self, ctx: OpContext) -> None:
        if not ctx.data["was_running"]:
            return
        if ctx.data.get("live"):  # the stream sends the disk: only its size goes now
            res = await self.send(ctx, ctx.data["source"], "live", shape_only=LIVE_SHAPE_ONLY)
            # only what was asked: a source host does not choose which files of the
            # target's copy come out empty
            ctx.data["shapes"] = {k: v for k, v in (res.get("shapes") or {}).items()
                                  if k in LIVE_SHAPE_ONLY}
            ctx.save()
        else:
            await self.send(ctx, ctx.data["source"], "live")

    async def _copy_frozen(self, ctx: OpContext) -> None:
        started = time.monotonic()
        res = await self.send(ctx, ctx.data["source"], "frozen", keep_frozen=True)
        frozen_ms = res.get("freeze_ms")
        if frozen_ms is not None:  # when, on our clock, the instance stopped answering
            ctx.data["down_since"] = time.time() - frozen_ms / 1000.0
        else:
            ctx.data["down_since"] = time.time() - (time.monotonic() - started)
        ctx.save()

    async def _copy_cold(self, ctx: OpContext) -> None:
        await self.send(ctx, ctx.data["source"], "frozen")

    async def _unfreeze(self, ctx: OpContext) -> None:
        if "source" in ctx.data:
            await self.thaw_if_frozen(ctx.data["source"], ctx.record.target)

    async def _stop(self, ctx: OpContext) -> None:
        if not ctx.data["was_running"]:
            return
        if "down_since" not in ctx.data:
            ctx.data["down_since"] = time.time()
            ctx.save()
        await self.kill_source(ctx.data["source"], ctx.record.target)

    async def _unstop(self, ctx: OpContext) -> None:
        if ctx.data.get("was_running"):
            await self.restart_source(ctx, ctx.data["source"])

    async def _adopt(self, ctx: OpContext) -> None:
        await self.agents.call(ctx.data["target"], rpc.DISK_ADOPT,
                               rpc.SlotArgs(name=ctx.record.target, slot="incoming"))

    async def _unadopt(self, ctx: OpContext) -> None:
        """Nothing of the instance left on the target: its record and its disk go."""
        if "target" in ctx.data:
            await self.stop_if_alive(ctx.data["target"], ctx.record.target, signal=9)
            await self.agents.call(ctx.data["target"], rpc.DELETE,
                                   rpc.DeleteArgs(name=ctx.record.target))
            if ctx.data.get("live"):  # the source ran all along, and its row never moved
                return
            self.record(ctx.record.target, ctx.data["source"],
                        State(ctx.data["state"]) if not ctx.data["was_running"]
                        else State.STOPPED, None)

    async def _create(self, ctx: OpContext) -> None:
        await self.create_on(ctx, ctx.data["target"])

    async def _start(self, ctx: OpContext) -> None:
        await self.start_on(ctx, ctx.data["target"])
        if ctx.data.get("was_running") and "down_since" in ctx.data:
            ctx.data["downtime_ms"] = round((time.time() - ctx.data["down_since"]) * 1000, 1)
            ctx.save()

    async def _unstart(self, ctx: OpContext) -> None:
        await self.stop_if_alive(ctx.data["target"], ctx.record.target, signal=9)

    async def _cleanup(self, ctx: OpContext) -> None:
        """The source's copy goes (instance record, workdir and disk)."""
        await self.agents.call(ctx.data["source"], rpc.DELETE,
                               rpc.DeleteArgs(name=ctx.record.target))

    # -- live ------------------------------------------------------------------------------
    async def _create_live(self, ctx: OpContext) -> None:
        """The target's copy, at the epoch the row takes only at the switch-over: the source
        keeps its own until then, so a rollback leaves its reports current."""
        spec = WireSpec.model_validate({**ctx.data["spec"], "epoch": ctx.data["live_epoch"]})
        await self.agents.call(ctx.data["target"], rpc.CREATE, rpc.CreateArgs(
            spec=spec, shapes=ctx.data.get("shapes") or {}))

    async def _incoming(self, ctx: OpContext) -> None:
        out = await self.agents.call(
            ctx.data["target"], rpc.LIVE_INCOMING,
            rpc.IncomingArgs(name=ctx.record.target, peer=ctx.data["source"],
                             epoch=ctx.data["live_epoch"]))
        ctx.data["incoming"] = out.model_dump()
        ctx.save()

    async def _unincoming(self, ctx: OpContext) -> None:
        if "target" in ctx.data:
            await self.stop_if_alive(ctx.data["target"], ctx.record.target, signal=9)

    async def _live_send(self, ctx: OpContext) -> None:
        where = ctx.data["incoming"]
        name, source, target = ctx.record.target, ctx.data["source"], ctx.data["target"]
        ticket = tickets.issue(self.fleet.ticket_key, name, tunnel.LIVE, source=source,
                               target=target)
        stats = await self.agents.call(
            source, rpc.LIVE_SEND,
            rpc.LiveSendArgs(name=name, address=where["address"], port=where["port"],
                             target=target, ticket=ticket,
                             downtime_ms=self.settings.live_migrate_downtime_ms))
        ctx.data["live_stats"] = stats.model_dump()
        ctx.data["downtime_ms"] = stats.downtime_ms
        ctx.data["bytes"] = int(ctx.data.get("bytes", 0)) + stats.ram_bytes + stats.disk_bytes
        ctx.data["data_at"] = time.time()
        ctx.save()
        await self._switchover(ctx)

    async def _unlive_send(self, ctx: OpContext) -> None:
        """The target's copy is killed and reaped first, then the source's runs on (a
        migration QEMU completed left it paused): never two copies running."""
        if "target" not in ctx.data:
            return
        name = ctx.record.target
        await self.stop_if_alive(ctx.data["target"], name, signal=9)
        try:
            report = await self.agents.call(ctx.data["source"], rpc.LIVE_ABORT,
                                            rpc.NameArgs(name=name))
        except NotFound:
            return
        # the row may already name the target (a switch-over cut short): back to the source,
        # at the source's own epoch, so its reports count again
        self.record(name, ctx.data["source"], State(report.state), report, epoch=report.epoch)

    async def _switchover(self, ctx: OpContext) -> None:
        """The end of the commit step: the target's copy, running with the guest's state,
        becomes the instance (the source's is paused for good). In the same step as the
        stream, because once QEMU completed, the guest has run on the target and may have
        answered clients (acknowledged a commit): rolling back to the source's paused state
        from then on would lose what it did. Only a failure right here (the target's copy
        died after the stream, the server crashed in these milliseconds) goes back."""
        name, target = ctx.record.target, ctx.data["target"]
        report = await self.agents.call(target, rpc.LIVE_CLAIM, rpc.NameArgs(name=name))
        if report.state != State.RUNNING.value:
            raise DriverError(f"'{name}' on {target} is {report.state} after the migration, "
                              "not running", hint="the operation rolls back; the instance "
                              "runs on at the source", retryable=True)
        self.record(name, target, State.RUNNING, report, epoch=ctx.data["live_epoch"],
                    desired_state=State.RUNNING.value)
        ctx.data["started_at"] = time.time()
        ctx.save()

    async def _end_source(self, ctx: OpContext) -> None:
        """The source's paused copy ends and is reaped before the operation says done."""
        name, source = ctx.record.target, ctx.data["source"]
        try:
            report = await self.agents.call(source, rpc.KILL, rpc.KillArgs(name=name, signal=9))
        except NotFound:
            return
        if State(report.state) in ALIVE:
            self.ensure_ended(report, source)
