"""``unshelve-group``: bring back many shelved instances as one server-side operation.

USERS.md §3 asks for hundreds of unshelves at once. Run from the client as N operations, that is
N loops of requests, and a client that goes away stops the batch half-way. Here the server runs
one operation whose step starts an ordinary ``unshelve`` per instance, at most ``parallel`` at a
time, and waits for each; every member is a real operation with its own record, locks, hooks and
rollback. The group itself undoes nothing (each member rolls its own half back): its first step
is its point of no return, so after a server crash it is resumed forward, waiting for the
members it had started (the engine resumes those) and starting the rest.

Its result lists every member with how it ended; the group succeeds once every member has
ended, whatever each did, and the client says which did not succeed.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

from sqlalchemy import select

from corral.api import operations as wire
from corral.config import Settings
from corral.control.agents import AgentCaller
from corral.control.db import Instance
from corral.control.fleet import BUSY_WAIT, Fleet
from corral.control.operations.base import OpBase
from corral.control.operations.unshelve import KIND as UNSHELVE
from corral.errors import Busy, CorralError, InvalidTransition, NotFound
from corral.lifecycle import State, Verb, check_verb
from corral.ops.engine import OpContext, Step
from corral.ops.locks import LockSet
from corral.ops.store import FINISHED, OpRecord, OpState

log = logging.getLogger(__name__)

KIND = "unshelve-group"


class OpsLike(Protocol):
    async def begin(self, kind: str, target: str, params: dict[str, Any]) -> OpRecord: ...

    async def wait(self, op_id: str) -> OpRecord: ...


class UnshelveGroup(OpBase):
    def __init__(self, fleet: Fleet, agents: AgentCaller, settings: Settings,
                 ops: OpsLike) -> None:
        super().__init__(fleet, agents, settings)
        self.ops = ops

    def build(self, rec: OpRecord) -> list[Step]:
        return [Step("accept", self._accept, commit=True), Step("run", self._run)]

    def held(self, target: str, params: dict[str, Any]) -> LockSet:
        """Nothing but its own name: each member holds its instance while it runs."""
        return LockSet.of([f"group:{target}"])

    def check(self, target: str, params: dict[str, Any]) -> None:
        """Every name is a shelved instance (the members check the rest themselves)."""
        names = list(params["names"])
        if len(set(names)) != len(names):
            raise CorralError("a name is given twice", hint="name each instance once")
        with self.fleet.sessions() as s:
            states = {name: state for name, state in s.execute(
                select(Instance.name, Instance.state).where(Instance.name.in_(names)))}
        missing = [n for n in names if n not in states]
        if missing:
            raise NotFound(f"no instance named {', '.join(repr(n) for n in missing[:10])}",
                           hint="see 'corral shelved'")
        not_shelved = [n for n in names if states[n] != State.SHELVED.value]
        if len(not_shelved) == 1:  # the lifecycle's own words: what it is, what it can do
            check_verb(not_shelved[0], State(states[not_shelved[0]]), Verb.UNSHELVE)
        if not_shelved:
            listed = ", ".join(f"{n} ({states[n]})" for n in not_shelved[:10])
            raise InvalidTransition(f"not shelved: {listed}",
                                    hint="unshelve only what 'corral shelved' lists")

    @staticmethod
    def result(rec: OpRecord) -> wire.UnshelveGroupResult:
        members = rec.data.get("members", {})
        out = []
        for name in rec.params.get("names", []):
            m = members.get(name) or {"state": "not started"}
            res = m.get("result")
            out.append(wire.GroupMember(
                name=name, op=m.get("op"), state=str(m.get("state")),
                error=str(m.get("error") or ""),
                result=wire.UnshelveResult.model_validate(res) if res else None))
        return wire.UnshelveGroupResult(members=out)

    # -- steps -------------------------------------------------------------------------------
    async def _accept(self, ctx: OpContext) -> None:
        ctx.data.setdefault("members", {})
        ctx.save()

    async def _run(self, ctx: OpContext) -> None:
        sem = asyncio.Semaphore(int(ctx.params.get("parallel") or 8))
        await asyncio.gather(*(self._member(ctx, sem, name) for name in ctx.params["names"]))
        done = ctx.data["members"]
        failed = [n for n, m in done.items() if m.get("state") != OpState.SUCCEEDED.value]
        log.info("unshelve group %s: %d of %d back", ctx.record.id,
                 len(done) - len(failed), len(ctx.params["names"]))

    async def _member(self, ctx: OpContext, sem: asyncio.Semaphore, name: str) -> None:
        members: dict[str, dict[str, Any]] = ctx.data["members"]
        m = members.get(name) or {}
        if m.get("state") in {s.value for s in FINISHED} | {"refused"}:
            return  # ended before a restart
        async with sem:
            if m.get("op"):  # started before a restart: the engine resumes it
                rec = await self.ops.wait(str(m["op"]))
            else:
                first = await self._begin(ctx, name)
                if first is None:
                    return
                members[name] = {"op": first.id, "state": first.state.value}
                ctx.save()
                rec = await self.ops.wait(first.id)
        members[name] = {"op": rec.id, "state": rec.state.value, "result": rec.result,
                         "error": (rec.error or {}).get("message", "")}
        ctx.save()

    async def _begin(self, ctx: OpContext, name: str) -> OpRecord | None:
        """Start the member's unshelve (waiting a little while its instance is busy); None
        when it was refused, which is written down as its outcome."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + BUSY_WAIT
        while True:
            try:
                return await self.ops.begin(UNSHELVE, name, {"to": ctx.params.get("to")})
            except Busy as exc:
                if loop.time() < deadline:
                    await asyncio.sleep(0.2)
                    continue
                ctx.data["members"][name] = {"state": "refused", "error": exc.message}
                ctx.save()
                return None
            except CorralError as exc:
                ctx.data["members"][name] = {"state": "refused", "error": exc.message}
                ctx.save()
                return None
