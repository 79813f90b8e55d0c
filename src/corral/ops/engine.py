"""The operation engine: durable multi-step actions that finish or leave no trace.

An operation is a list of :class:`Step`, each with ``do`` and ``undo``. The engine persists the
record after every step transition. A failure undoes, in reverse, every step that finished *and*
the one that was in flight (it may have half-happened), then runs the ``<kind>-failed`` hook.
Undo functions must therefore be idempotent and safe when their ``do`` never ran (OpenNebula's
driver DSL, USERS.md §4, pairs every action with its fail action for the same reason).

A step may be marked ``commit``: once it is done the operation has passed its point of no return
(say, the instance now runs on the target) and the rest is finished forward — retried, never
undone. On server start :meth:`Engine.resume_all` takes every unfinished record: forward if a
commit step is done, else back. Steps are rebuilt from ``kind`` + ``params`` by a registered
builder, so nothing but data needs to survive a crash.

A kind may also register a ``check``: the refusals of its first step ("it is running", "no such
host", "no room"), as a function that only reads. :meth:`Engine.submit` runs it before anything
is recorded, so a refused request leaves neither an operation record nor a changed instance, and
the caller gets the error itself (an HTTP 4xx) instead of a rolled-back operation. The first step
may check again (the fleet can change between the two), which is why undos still have to be safe
when their ``do`` refused.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from corral.errors import CorralError, InvalidRequest
from corral.errors import (
    OperationFailed as OperationFailed,  # lives in errors.py with the rest
)
from corral.ops.hooks import HookResult, Hooks
from corral.ops.locks import LockManager, LockSet, instance
from corral.ops.store import (
    FINISHED,
    OperationStore,
    OpRecord,
    OpState,
    StepRecord,
    StepState,
)

log = logging.getLogger(__name__)

#: a fire-drill pause (see :meth:`Engine._pause`) never holds a step longer than this
PAUSE_LIMIT = 300.0


class OpContext:
    """What a step sees: the operation's params and a blackboard persisted with the record."""

    def __init__(self, engine: Engine, record: OpRecord) -> None:
        self._engine = engine
        self.record = record

    @property
    def params(self) -> dict[str, Any]:
        return self.record.params

    @property
    def data(self) -> dict[str, Any]:
        return self.record.data

    def save(self) -> None:
        """Persist ``data`` now (a step that learns something an undo needs saves it at once);
        watchers hear of it as of any other change of the record."""
        self._engine._save(self.record)

    async def hook(self, name: str, extra: dict[str, Any] | None = None) -> HookResult:
        return await self._engine.run_hook(self.record, name, extra)


StepFn = Callable[[OpContext], Awaitable[None]]


@dataclass(frozen=True)
class Step:
    name: str
    do: StepFn
    undo: StepFn | None = None
    commit: bool = False


Builder = Callable[[OpRecord], list[Step]]
#: ``check(target, params)``: raise the request's refusal, or return; reads only, never awaits
Check = Callable[[str, dict[str, Any]], None]
#: ``locks(target, params)``: what an operation holds from submit until its record is finished
Locks = Callable[[str, dict[str, Any]], LockSet]


def owner(rec: OpRecord) -> str:
    """The lock owner of an operation."""
    return f"op:{rec.id}"


@dataclass(frozen=True)
class Kind:
    """One kind of operation, whole: how to build its steps from a record, what it takes
    (``params``, validated before anything is recorded), what it refuses (``check``), what it
    holds while it runs (``locks``; default: its target instance) and what it gives back
    (``result_of``, computed from what the steps learned when it ends)."""

    name: str
    build: Builder
    params: type[BaseModel]
    check: Check | None = None
    locks: Locks | None = None
    result_of: Callable[[OpRecord], BaseModel] | None = None

    def held(self, target: str, params: dict[str, Any]) -> LockSet:
        if self.locks is not None:
            return self.locks(target, params)
        return LockSet.of([instance(target)])


class Engine:
    def __init__(
        self,
        store: OperationStore,
        hooks: Hooks,
        *,
        forward_retries: int = 3,
        undo_retries: int = 5,
        retry_delay: float = 1.0,
        on_change: Callable[[OpRecord], None] | None = None,
        pause_dir: Path | None = None,
        locks: LockManager | None = None,
    ) -> None:
        self.store = store
        self.hooks = hooks
        self.kinds: dict[str, Kind] = {}
        #: shared with the fleet: verbs and loops take the same locks (see ops/locks.py)
        self.locks = locks or LockManager()
        self.forward_retries = forward_retries
        #: an undo is tried this often (delays growing by ``retry_delay``) before the operation
        #: is left needing attention: an agent killed mid-step is usually back within seconds
        self.undo_retries = undo_retries
        self.retry_delay = retry_delay
        self.on_change = on_change
        self.pause_dir = pause_dir

    def register(self, kind: Kind) -> None:
        self.kinds[kind.name] = kind

    # -- entry points ------------------------------------------------------------------------
    async def submit(self, kind: str, target: str, params: dict[str, Any]) -> OpRecord:
        """Run a new operation to its end; returns the finished record (never raises for a
        step failure: the record says how it ended). Raises, recording nothing and holding
        nothing, when the kind is unknown, the params are not its kind's, what it must hold
        is busy, or the kind's check refuses."""
        k = self.kinds.get(kind)
        if k is None:
            raise InvalidRequest(f"unknown operation '{kind}'",
                                 hint=f"known: {', '.join(sorted(self.kinds))}")
        try:
            params = k.params.model_validate(params).model_dump(mode="json", by_alias=True)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ()))
            raise InvalidRequest(f"bad parameters for {kind}: {where}: {first.get('msg')}",
                                 details={"params": params}) from exc
        rec = OpRecord(kind=kind, target=target, params=params)
        # no await from here to the save: nothing changes between the check and the record
        self.locks.take(owner(rec), k.held(target, params), f"operation {rec.id} ({kind})")
        try:
            if k.check is not None:
                k.check(target, params)
            rec.steps = [StepRecord(s.name) for s in k.build(rec)]
            self._save(rec)
        except BaseException:
            self.locks.release(owner(rec))
            raise
        return await self._drive(rec, fresh=True)

    def hold_unfinished(self) -> list[OpRecord]:
        """At server start, before anything else may take them: every unfinished operation
        holds again what it held (they are driven later by :meth:`resume_all`)."""
        out = self.store.unfinished()
        for rec in out:
            k = self.kinds.get(rec.kind)
            if k is not None:
                self.locks.take(owner(rec), k.held(rec.target, rec.params),
                                f"operation {rec.id} ({rec.kind}, resuming)")
        return out

    async def resume_all(self) -> list[OpRecord]:
        """Finish or roll back every operation a crash left unfinished, all at once: an
        operation group (unshelve-group, drain) waits for its members, which are records of
        their own resumed here too, so one after the other would never end."""
        recs = self.store.unfinished()
        for rec in recs:
            log.warning("resuming operation %s (%s on %s, %s)", rec.id, rec.kind, rec.target,
                        rec.state.value)
        ended = await asyncio.gather(*(self._drive(rec, fresh=False) for rec in recs),
                                     return_exceptions=True)
        out = []
        for rec, got in zip(recs, ended, strict=True):
            if isinstance(got, OpRecord):
                out.append(got)
            elif isinstance(got, asyncio.CancelledError):
                raise got
            else:
                log.error("operation %s could not be resumed: %s", rec.id, got)
        return out

    # -- the machine -------------------------------------------------------------------------
    async def _drive(self, rec: OpRecord, fresh: bool) -> OpRecord:
        # its locks are held since submit (or server start: see hold_unfinished)
        steps = self.kinds[rec.kind].build(rec)
        if [s.name for s in steps] != [s.name for s in rec.steps]:
            raise CorralError(f"operation {rec.id}: steps changed since it was recorded",
                              hint="finish it with the corral version that started it")
        ctx = OpContext(self, rec)
        if fresh:
            pre = await self.run_hook(rec, f"pre-{rec.kind}")
            if not pre.ok:
                why = f"pre-{rec.kind} hook refused (exit {pre.exit_code}): {pre.output[-500:]}"
                rec.error = {"message": why.strip(), "step": None}
                rec.state = OpState.ROLLED_BACK
                self._save(rec)
                await self.run_hook(rec, f"{rec.kind}-failed")
                return rec
        if rec.state == OpState.RUNNING:
            committed = any(
                st.commit and sr.state == StepState.DONE for st, sr in zip(steps, rec.steps,
                                                                            strict=True)
            )
            if not fresh and not committed:
                rec.state = OpState.ROLLING_BACK
                rec.error = rec.error or {"message": "interrupted (server or agent crash)",
                                          "step": self._in_flight(rec)}
                self._save(rec)
            else:
                await self._forward(rec, steps, ctx)
        if rec.state == OpState.ROLLING_BACK:
            await self._backward(rec, steps, ctx)
            await self.run_hook(rec, f"{rec.kind}-failed")
        elif rec.state == OpState.SUCCEEDED:
            await self.run_hook(rec, f"post-{rec.kind}")
        return rec

    def _in_flight(self, rec: OpRecord) -> str | None:
        for sr in rec.steps:
            if sr.state in (StepState.RUNNING, StepState.FAILED):
                return sr.name
        return None

    async def _forward(self, rec: OpRecord, steps: list[Step], ctx: OpContext) -> None:
        committed = False
        for step, sr in zip(steps, rec.steps, strict=True):
            if sr.state == StepState.DONE:
                committed = committed or step.commit
                continue
            attempts = self.forward_retries if committed else 1
            for attempt in range(1, attempts + 1):
                sr.state, sr.started_at, sr.error = StepState.RUNNING, time.time(), ""
                self._save(rec)
                try:
                    await self._pause(rec, step.name, "before")
                    await step.do(ctx)
                    await self._pause(rec, step.name, "after")
                except Exception as exc:  # every failure, whatever its type, is recorded
                    sr.state, sr.ended_at, sr.error = StepState.FAILED, time.time(), _text(exc)
                    self._save(rec)
                    if attempt < attempts:
                        await asyncio.sleep(self.retry_delay * attempt)
                        continue
                    rec.error = {"message": _text(exc), "step": step.name,
                                 **({"code": exc.code} if isinstance(exc, CorralError) else {})}
                    rec.state = OpState.NEEDS_ATTENTION if committed else OpState.ROLLING_BACK
                    self._save(rec)
                    return
                sr.state, sr.ended_at = StepState.DONE, time.time()
                committed = committed or step.commit
                self._save(rec)
                break
        rec.state = OpState.SUCCEEDED
        self._save(rec)

    async def _backward(self, rec: OpRecord, steps: list[Step], ctx: OpContext) -> None:
        clean = True
        pairs = list(zip(steps, rec.steps, strict=True))
        for step, sr in reversed(pairs):
            if sr.state in (StepState.PENDING, StepState.UNDONE):
                continue
            if step.undo is None:
                sr.state = StepState.UNDONE
                continue
            sr.state = StepState.UNDOING
            self._save(rec)
            for attempt in range(1, self.undo_retries + 1):
                try:
                    await step.undo(ctx)
                except Exception as exc:
                    sr.error = f"undo: {_text(exc)}"
                    if attempt < self.undo_retries:  # e.g. an agent coming back after a crash
                        log.warning("operation %s: undo of %s failed (%s); retrying", rec.id,
                                    step.name, exc)
                        await asyncio.sleep(self.retry_delay * attempt)
                        continue
                    sr.state = StepState.UNDO_FAILED
                    clean = False
                    log.error("operation %s: undo of %s failed: %s", rec.id, step.name, exc)
                else:
                    sr.state = StepState.UNDONE
                break
            sr.ended_at = time.time()
            self._save(rec)
        rec.state = OpState.ROLLED_BACK if clean else OpState.NEEDS_ATTENTION
        self._save(rec)

    async def _pause(self, rec: OpRecord, step: str, when: str) -> None:
        """Fire drills: while ``<pause_dir>/<kind>.<step>.<before|after>`` exists, the step
        waits there (after writing ``….reached``), so a drill can kill a server or an agent at
        exactly that point and watch the operation finish or roll back. Bounded."""
        if self.pause_dir is None:
            return
        flag = self.pause_dir / f"{rec.kind}.{step}.{when}"
        if not flag.exists():
            return
        log.warning("operation %s paused %s step %s (%s exists)", rec.id, when, step, flag)
        flag.with_name(flag.name + ".reached").write_text(rec.id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + PAUSE_LIMIT
        while flag.exists() and loop.time() < deadline:
            await asyncio.sleep(0.05)

    async def run_hook(self, rec: OpRecord, name: str,
                       extra: dict[str, Any] | None = None) -> HookResult:
        payload = {"operation": rec.to_dict(), **(extra or {})}
        result = await self.hooks.run(name, payload)
        if result.ran:
            rec.hooks.append({"name": name, "exit_code": result.exit_code,
                              "timed_out": result.timed_out, "output": result.output[-2000:]})
            self._save(rec)
        return result

    def _save(self, rec: OpRecord) -> None:
        if rec.state in FINISHED and rec.result is None:
            k = self.kinds.get(rec.kind)
            if k is not None and k.result_of is not None:
                try:
                    rec.result = k.result_of(rec).model_dump(mode="json")
                except Exception:  # a result is a report: it never changes how it ended
                    log.exception("operation %s: its result could not be built", rec.id)
        self.store.save(rec)
        if rec.state in FINISHED:
            self.locks.release(owner(rec))
        if self.on_change is not None:
            self.on_change(rec)


def finished(rec: OpRecord) -> bool:
    return rec.state in FINISHED


def _text(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
