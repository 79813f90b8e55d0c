"""Restart policies, enforced by the agent (so they hold while the server is away).

When the sweep sees an instance end by itself and its spec's :class:`RestartPolicy` covers that
end (``on-failure``: failed; ``always``: failed or exited), the agent starts it again through
its driver after ``delay`` seconds, at most ``attempts`` times within ``interval`` seconds
(Nomad's ``restart`` block); past that it gives up and the instance stays as it ended. An end
that was asked for (stop, kill, a fence: ``stop_requested``) is never restarted.

What the policy needs survives an agent restart in the record's ``extra``: ``restarts`` (how
many this copy had, reported to the server), ``restart_times`` (wall clock of each, for the
window), ``restart_due`` (a restart waiting for its delay: resumed by the next agent) and
``restart_gave_up``. An operator's start clears the window: it gets its attempts back.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from corral.agent.store import InstanceRecord
from corral.bus.messages import RestartPolicy
from corral.lifecycle import State

log = logging.getLogger(__name__)


def covers(policy: RestartPolicy, state: str) -> bool:
    """Whether an instance that ended in ``state`` (by itself) is restarted under ``policy``."""
    if policy.mode == "always":
        return state in (State.EXITED, State.FAILED)
    if policy.mode == "on-failure":
        return state == State.FAILED
    return False


@dataclass(frozen=True)
class Decision:
    restart: bool
    #: seconds to wait before starting it again (when ``restart``)
    delay: float
    #: restarts made within the window so far
    recent: int


def decide(policy: RestartPolicy, times: list[float], now: float) -> Decision:
    """Restart again (after the delay), or give up: ``attempts`` restarts were already made in
    the last ``interval`` seconds. ``times`` are the wall-clock times of earlier restarts."""
    recent = sum(1 for t in times if now - t < policy.interval)
    return Decision(restart=recent < policy.attempts, delay=policy.delay, recent=recent)


def prune(policy: RestartPolicy, times: list[float], now: float) -> list[float]:
    """The restart times still inside the window (the record keeps no more)."""
    return [t for t in times if now - t < policy.interval]


def restarts(rec: InstanceRecord) -> int:
    return int(rec.extra.get("restarts", 0))


def reset(rec: InstanceRecord) -> None:
    """An operator's start: the window starts over, nothing pending, not given up."""
    for key in ("restart_times", "restart_due", "restart_gave_up", "ended_unhealthy",
                "unhealthy_reason"):
        rec.extra.pop(key, None)


class Restarter:
    """Schedules and performs the restarts of one agent (see the module's doc).

    ``start`` is the agent's own start of a record (under its lock, it re-checks that the
    record is still the one that ended); ``allowed`` says whether the record may be restarted
    right now (not one the server would fail over, once this host fenced itself)."""

    def __init__(self, start: Callable[[InstanceRecord], Awaitable[None]],
                 save: Callable[[InstanceRecord], None],
                 allowed: Callable[[InstanceRecord], bool] = lambda rec: True,
                 clock: Callable[[], float] = time.time) -> None:
        self._start = start
        self._save = save
        self._allowed = allowed
        self._clock = clock
        self.tasks: dict[str, asyncio.Task[None]] = {}

    def noticed(self, rec: InstanceRecord) -> None:
        """``rec`` was just seen ending: schedule a restart if its policy covers it."""
        policy = rec.spec.restart
        if rec.stop_requested or not covers(policy, rec.state) or not self._allowed(rec):
            return
        now = self._clock()
        times = prune(policy, list(rec.extra.get("restart_times", [])), now)
        d = decide(policy, times, now)
        rec.extra["restart_times"] = times
        if not d.restart:
            rec.extra["restart_gave_up"] = now
            rec.extra.pop("restart_due", None)
            self._save(rec)
            log.warning("instance %s ended (%s) after %d restarts within %.0fs: giving up",
                        rec.name, rec.state, d.recent, policy.interval)
            return
        rec.extra["restart_due"] = now + d.delay
        self._save(rec)
        log.info("instance %s ended (%s, exit %s); restarting it in %.1fs (%d of %d)",
                 rec.name, rec.state, rec.exit_code, d.delay, d.recent + 1, policy.attempts)
        self.schedule(rec, d.delay)

    def resume(self, rec: InstanceRecord) -> None:
        """A restart a previous agent had scheduled and not made (called at start-up)."""
        due = rec.extra.get("restart_due")
        if due is None or rec.stop_requested or not covers(rec.spec.restart, rec.state):
            return
        self.schedule(rec, max(0.0, float(due) - self._clock()))

    def schedule(self, rec: InstanceRecord, delay: float) -> None:
        old = self.tasks.pop(rec.name, None)
        if old is not None and old is not asyncio.current_task():
            old.cancel()  # (a restart whose run ended at once schedules the next itself)
        task = asyncio.create_task(self._later(rec, delay))
        self.tasks[rec.name] = task
        task.add_done_callback(functools.partial(self._done, rec.name))

    def _done(self, name: str, task: asyncio.Task[None]) -> None:
        if self.tasks.get(name) is task:
            del self.tasks[name]

    async def _later(self, rec: InstanceRecord, delay: float) -> None:
        await asyncio.sleep(delay)
        if not self._allowed(rec):
            return
        try:
            await self._start(rec)
        except Exception as exc:
            log.error("restarting %s failed: %s", rec.name, exc)

    def made(self, rec: InstanceRecord) -> None:
        """Count a restart made now (the agent's start succeeded or was attempted)."""
        now = self._clock()
        times = prune(rec.spec.restart, list(rec.extra.get("restart_times", [])), now)
        rec.extra["restart_times"] = [*times, now]
        rec.extra["restarts"] = restarts(rec) + 1
        rec.extra.pop("restart_due", None)
        rec.extra.pop("ended_unhealthy", None)
        rec.extra.pop("unhealthy_reason", None)

    def cancel_all(self) -> list[asyncio.Task[None]]:
        tasks = list(self.tasks.values())
        for t in tasks:
            t.cancel()
        self.tasks.clear()
        return tasks
