"""Self-fencing: an agent that cannot renew its lease stops its instances before it runs out.

The server fails a down host's instances over a lease (plus a grace period) after the last
heartbeat it acknowledged. If this host is merely cut off -- not dead -- its workloads would still
run, holding their virtual IPs, while a standby takes over elsewhere: two copies, one address
answered by two MACs. So the agent keeps its own clock of the lease: from the moment it *received*
a request that was acknowledged was *sent* (the server renewed the lease while handling it, so
no earlier: the agent's deadline always falls at least the margin before the server's, however
late the answer came back), and when ``lease - fence_margin_seconds`` passes without another one
it SIGKILLs every alive instance (a fence, not a polite stop), drops their addresses, and marks
them so they report ``stopped`` rather than ``failed`` when the server hears from it again.

The clock is ``time.monotonic`` (immune to wall-clock steps) and is armed at agent start with the
configured lease, so an agent restarted during a partition fences too. Pure bookkeeping lives in
:class:`LeaseClock` (unit-tested with a fake clock); :func:`fence_all` does the stopping.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from corral.agent.report import is_alive
from corral.agent.store import write_atomic

if TYPE_CHECKING:
    from corral.agent.state import AgentState
    from corral.agent.vips import Vips

log = logging.getLogger(__name__)

#: a margin that leaves less than this of the lease fences at half the lease instead
MIN_WINDOW = 0.5


class LeaseClock:
    """When this host's lease (as the agent must assume it) runs out, and whether it fenced."""

    def __init__(self, lease_seconds: float, margin_seconds: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.lease = lease_seconds
        self.margin = margin_seconds
        self.last_ack = clock()  # armed at start: an agent that never reaches a server fences
        #: True from a fence until the next acknowledgement
        self.fenced = False

    def arm(self) -> None:
        """Start counting now (the agent is about to reach for the server)."""
        self.last_ack = self.clock()
        self.fenced = False

    def acked(self, lease_seconds: float | None = None, sent_at: float | None = None) -> None:
        """The server acknowledged a join or heartbeat sent at ``sent_at`` (this clock; default
        now), with ``lease_seconds`` from a join reply."""
        if lease_seconds is not None:
            self.lease = lease_seconds
        self.last_ack = max(self.last_ack, self.clock() if sent_at is None else sent_at)
        if self.fenced:
            log.warning("the server answers again; instances stay stopped until it says "
                        "otherwise")
        self.fenced = False

    @property
    def window(self) -> float:
        """Seconds after an acknowledgement at which to fence."""
        w = self.lease - self.margin
        return w if w >= MIN_WINDOW else max(self.lease / 2, 0.1)

    @property
    def deadline(self) -> float:
        return self.last_ack + self.window

    def due(self) -> bool:
        return not self.fenced and self.clock() >= self.deadline

    def until_due(self) -> float:
        return max(0.0, self.deadline - self.clock())


class Guarded:
    """The instances the server would fail over (they have a standby), as it last said, kept
    in ``DATA/guarded.json`` so an agent restarted during a partition still knows. Unknown
    (no file, an older server): every instance is guarded."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.names: set[str] | None = None
        with contextlib.suppress(OSError, ValueError, TypeError):
            self.names = {str(n) for n in json.loads(path.read_text())}

    def update(self, names: list[str] | None) -> None:
        if names is None or set(names) == self.names:
            return
        self.names = set(names)
        write_atomic(self.path, json.dumps(sorted(self.names)).encode())

    def covers(self, name: str) -> bool:
        return self.names is None or name in self.names


async def fence_all(st: AgentState, vips: Vips | None, why: str,
                    guarded: Guarded | None = None) -> list[str]:
    """SIGKILL every alive instance the server would fail over (``guarded``; all when unknown),
    remove its VIP, mark it fenced; the names fenced. An instance with no standby is never
    started elsewhere while its host is away, so stopping it would only be an outage."""
    fenced: list[str] = []
    for name in list(st.records):
        rec = st.records.get(name)
        if rec is None or not is_alive(rec):
            continue
        if guarded is not None and not guarded.covers(name):
            log.warning("FENCE: %s keeps running: the server would not start it elsewhere",
                        name)
            continue
        # no lock wait: a command stuck on a dead server must not delay the fence
        try:
            rec.stop_requested = True
            rec.extra["fenced_at"] = time.time()
            st.save(rec)
            drv = st.driver(rec.driver)
            if rec.state == "frozen":
                with contextlib.suppress(Exception):  # SIGKILL lands sooner on a thawed task
                    await st.call(drv.thaw, rec.handle)
            await st.call(drv.kill, rec.handle, int(signal.SIGKILL))
            for _ in range(60):  # bounded: SIGKILL takes a moment to land
                if not is_alive(rec):
                    break
                await asyncio.sleep(0.05)
                await st.refresh(rec)
            fenced.append(name)
        except Exception as exc:
            log.critical("FENCE: could not kill %s: %s", name, exc)
    if vips is not None:
        for name in fenced:
            rec = st.records.get(name)
            if rec is not None:
                await vips.down(rec, st.records)
        await vips.sync(st.records)
    log.critical("FENCE: %s; killed %d instance(s): %s", why, len(fenced),
                 ", ".join(fenced) or "none")
    st.changed.set()
    return fenced
