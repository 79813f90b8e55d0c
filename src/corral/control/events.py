"""Events: every committed change of fleet state, on the CORRAL_EVENTS JetStream stream.

Events are *built from committed state*, not sprinkled through the code that changes it: a
SQLAlchemy session listener (:func:`watch`) notes what each flush changed on hosts and instances,
and only when the transaction commits hands those notes to the :class:`EventPublisher`. A
rolled-back change therefore never becomes an event, and a new code path that changes state
emits its events without knowing about them. Things that are not rows (a verb's error, an
operation's progress) are emitted directly with :meth:`EventPublisher.emit`.

Order: everything that writes the database runs on the server's event loop, commits happen one
after the other, and one task publishes the queue in order, so the stream sequence (the event's
``index``) follows commit order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable, Collection
from typing import Any

from sqlalchemy import event as sa_event
from sqlalchemy import inspect
from sqlalchemy.orm import Session, sessionmaker

from corral.api.models import Event
from corral.bus import subjects
from corral.control.db import Host, Instance
from corral.errors import CorralError, InvalidRequest
from corral.lifecycle import State

log = logging.getLogger(__name__)

#: Every event type, with what it means. :meth:`EventPublisher.emit` refuses anything else.
TYPES: dict[str, str] = {
    "instance.created": "a new instance was recorded (data: driver, cpus, memory_bytes)",
    "instance.placed": "the scheduler put an instance on a host (data: cpus, memory_bytes)",
    "instance.state": "an instance's observed state changed (data: from, to, desired, "
                      "exit_code, cause: verb, observed, restart or lease)",
    "instance.deleted": "an instance was removed (data: state it had)",
    "instance.health": "an instance's health check result changed (data: from, to: unknown, "
                       "healthy or unhealthy)",
    "instance.restarted": "its agent restarted an instance under its restart policy (data: "
                          "restarts (of this copy), mode, state (now), exit_code (of the end))",
    "instance.error": "a verb on an instance failed (data: verb, code, message)",
    "host.joined": "a host joined the fleet for the first time (data: address, cores)",
    "host.up": "a host came back (re-joined or heartbeat after being down)",
    "host.down": "a host lost its lease",
    "instance.failover": "the HA manager started failing an instance over from a dead host to "
                         "its standby (data: from, id of the operation); or, opted in with "
                         "--failover-on-unhealthy, promoting the standby of an instance still "
                         "unhealthy after its restarts (data: also cause: unhealthy, reason)",
    "instance.failover_skipped": "an instance opted in to failover on unhealthy is still "
                                 "unhealthy but was not failed over (data: reason, e.g. no "
                                 "standby, or already failed over within the hour)",
    "instance.failover_failed": "a failover did not succeed (data: id, message); the instance "
                                "stays lost (on unhealthy: where it was, rolled back)",
    "instance.lost_needs_restore": "an instance's host is dead and it has no usable standby "
                                   "(data: reason): restore it by hand",
    "instance.stale_copy_removed": "a returning host held a copy that was failed over or "
                                   "fenced; it was killed (and deleted) there (data: epoch, "
                                   "deleted, reason)",
    "operation.changed": "an operation started, finished a step, or ended (data: id, kind, "
                         "state, step (the one in flight, else the last moved), step_state, error)",
}

MAX_QUEUE = 100_000
_PENDING = "corral_events"


def make(type_: str, *, host: str | None = None, instance: str | None = None,
         ts: float | None = None, **data: Any) -> Event:
    """A new event of a registered type (index 0 until the stream stores it)."""
    if type_ not in TYPES:
        raise InvalidRequest(f"unknown event type {type_!r}",
                             hint=f"registered types: {', '.join(sorted(TYPES))}")
    return Event(type=type_, ts=time.time() if ts is None else ts, host=host,
                 instance=instance, data=data)


def matches(ev: Event, types: Collection[str] = (), instance: str | None = None) -> bool:
    """Filter of ``/v1/events``: a type matches itself or its prefix (``instance`` matches
    ``instance.state``)."""
    if instance is not None and ev.instance != instance:
        return False
    return not types or any(ev.type == t or ev.type.startswith(t + ".") for t in types)


# --- building events from ORM changes -----------------------------------------------------------

def _old(obj: Any, attr: str) -> Any:
    hist = inspect(obj).attrs[attr].history
    return hist.deleted[0] if hist.deleted else None


def _changed(obj: Any, attr: str) -> bool:
    return bool(inspect(obj).attrs[attr].history.has_changes())


def events_for_flush(session: Session, busy: Collection[str] = (),
                     now: float | None = None) -> list[Event]:
    """What one flush changed, as events (called before the flush's history is reset)."""
    now = time.time() if now is None else now
    out: list[Event] = []
    for obj in session.new:
        if isinstance(obj, Host):
            out.append(make("host.joined", host=obj.name, ts=now, address=obj.address,
                            cores=obj.cores))
        elif isinstance(obj, Instance):
            out.append(make("instance.created", host=obj.host, instance=obj.name, ts=now,
                            driver=obj.driver, cpus=obj.cpus, memory_bytes=obj.memory_bytes,
                            state=obj.state))
            if obj.host:
                out.append(make("instance.placed", host=obj.host, instance=obj.name, ts=now,
                                cpus=obj.cpus, memory_bytes=obj.memory_bytes))
    for obj in session.dirty:
        if isinstance(obj, Host) and _changed(obj, "state"):
            old = _old(obj, "state")
            if old != obj.state:
                kind = "host.down" if obj.state == "down" else "host.up"
                out.append(make(kind, host=obj.name, ts=now, previous=old))
        elif isinstance(obj, Instance):
            out.extend(_instance_changes(obj, busy, now))
    for obj in session.deleted:
        if isinstance(obj, Instance):
            out.append(make("instance.deleted", host=obj.host, instance=obj.name, ts=now,
                            state=obj.state))
    return out


def _instance_changes(obj: Instance, busy: Collection[str], now: float) -> list[Event]:
    out: list[Event] = []
    restarted = False
    if _changed(obj, "restarts"):
        old_n = _old(obj, "restarts")
        if obj.restarts and obj.restarts > (old_n or 0):
            restarted = True
            out.append(make("instance.restarted", host=obj.host, instance=obj.name, ts=now,
                            restarts=obj.restarts,
                            mode=(obj.restart_policy or {}).get("mode", "no"),
                            state=obj.state, exit_code=_old(obj, "exit_code")))
    if _changed(obj, "health"):
        was = _old(obj, "health")
        if obj.health is not None and (was or "unknown") != obj.health:
            out.append(make("instance.health", host=obj.host, instance=obj.name, ts=now,
                            **{"from": was or "unknown", "to": obj.health}))
    if _changed(obj, "state"):
        old = _old(obj, "state")
        if old != obj.state:
            cause = ("lease" if obj.state == State.LOST.value
                     else "verb" if obj.name in busy
                     else "restart" if restarted else "observed")
            out.append(make("instance.state", host=obj.host, instance=obj.name, ts=now,
                            **{"from": old, "to": obj.state, "desired": obj.desired_state,
                               "exit_code": obj.exit_code, "cause": cause}))
    return out


def watch(sessions: sessionmaker[Session], publisher: EventPublisher,
          busy: Collection[str] = ()) -> None:
    """Emit the events of every transaction made with ``sessions``, after it commits."""

    def after_flush(session: Session, _ctx: Any) -> None:
        session.info.setdefault(_PENDING, []).extend(events_for_flush(session, busy))

    def after_commit(session: Session) -> None:
        for ev in session.info.pop(_PENDING, []):
            publisher.publish(ev)

    def after_rollback(session: Session) -> None:
        session.info.pop(_PENDING, None)

    sa_event.listen(sessions, "after_flush", after_flush)
    sa_event.listen(sessions, "after_commit", after_commit)
    sa_event.listen(sessions, "after_rollback", after_rollback)


# --- publishing ---------------------------------------------------------------------------------

class EventPublisher:
    """Publishes events in order from one task; :meth:`emit` never blocks and is safe to call
    from any thread (later code, e.g. the operation engine's ``on_change``, just calls it).

    While NATS is away events wait in a bounded queue (the oldest are dropped past
    :data:`MAX_QUEUE`, counted in ``dropped``); each carries a ``Nats-Msg-Id`` so a publish
    retried after a lost ack is stored once."""

    def __init__(self, js: Any, subject: str = subjects.EVENTS) -> None:
        self.js = js
        self.subject = subject
        self.dropped = 0
        self.published = 0
        #: called with each event as it is queued (on the loop), e.g. to forget a deleted
        #: instance's traffic
        self.listeners: list[Callable[[Event], None]] = []
        self._queue: deque[tuple[str, Event]] = deque()
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(self._run(), name="events")

    def emit(self, type_: str, **fields: Any) -> Event:
        """Build and queue an event: ``emit("instance.error", instance="web", verb="stop")``;
        ``host``, ``instance`` and ``ts`` are fields of the event, the rest its data."""
        ev = make(type_, **fields)
        self.publish(ev)
        return ev

    def on_op_change(self, rec: Any) -> None:
        """An :class:`corral.ops.engine.OpEngine` ``on_change`` callback."""
        steps = list(getattr(rec, "steps", None) or [])
        busy = [s for s in steps if str(s.state) in ("running", "undoing", "failed",
                                                     "undo_failed")]
        moved = [s for s in steps if str(s.state) != "pending"]
        current = busy[0] if busy else (moved[-1] if moved else None)
        self.emit("operation.changed", instance=rec.target, id=rec.id, kind=rec.kind,
                  state=str(rec.state), step=current.name if current else None,
                  step_state=str(current.state) if current else None, error=rec.error)

    def verb_error(self, instance: str, verb: str, exc: CorralError) -> None:
        """An :class:`InstanceService` ``on_error`` callback."""
        self.emit("instance.error", instance=instance, verb=verb, code=exc.code,
                  message=exc.message)

    def publish(self, ev: Event) -> None:
        loop = self._loop
        if loop is not None and not _on_loop(loop):
            loop.call_soon_threadsafe(self._put, ev)
        else:
            self._put(ev)

    def _put(self, ev: Event) -> None:
        if len(self._queue) >= MAX_QUEUE:
            self._queue.popleft()
            self.dropped += 1
        self._queue.append((uuid.uuid4().hex, ev))
        self._wake.set()
        for fn in self.listeners:
            try:
                fn(ev)
            except Exception:
                log.exception("event listener failed on %s", ev.type)

    async def _run(self) -> None:
        delay = 0.2
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            msg_id, ev = self._queue[0]
            try:
                await self.js.publish(self.subject, ev.model_dump_json(exclude={"index"}).encode(),
                                      headers={"Nats-Msg-Id": msg_id})
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("publishing event %s failed (%s); retrying in %.1fs", ev.type, exc,
                            delay)
                await asyncio.sleep(delay)
                delay = min(5.0, delay * 2)
                continue
            delay = 0.2
            if self._queue and self._queue[0][0] == msg_id:
                self._queue.popleft()
            self.published += 1

    async def stop(self, timeout: float = 3.0) -> None:
        """Publish what is queued (for at most ``timeout``), then stop."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._queue and self._task is not None and not self._task.done() \
                and loop.time() < deadline:
            await asyncio.sleep(0.02)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False
