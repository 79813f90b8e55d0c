"""Self-fencing: a host that cannot renew its lease stops its guarded instances before it runs out.

The server fails a down host's instances over a lease (plus a grace period) after the last
heartbeat it acknowledged. If this host is merely cut off -- or only its agent died -- its
workloads would still run, holding their virtual IPs, while a standby takes over elsewhere: two
copies, one address answered by two MACs. So the agent keeps its own clock of the lease: from
the moment it *sent* a request that was acknowledged (the server renewed the lease while
handling it, so no earlier: the agent's deadline always falls at least the margin before the
server's, however late the answer came back), and ``lease - fence_margin_seconds`` later the
instances the server would fail over (:class:`Guarded`) must be dead and their addresses gone.

The clock is the agent's (:class:`LeaseClock`, ``time.monotonic`` = CLOCK_MONOTONIC, unit-tested
with a fake clock); the act is the fence keeper's (:mod:`corral.agent.keeper`), a process of its
own, so that it happens whether or not the agent lives. :class:`FenceKeeper` is the agent's side:
it writes the keeper's ``lease.json`` (the deadline, and for each guarded alive instance its
cgroup, main pid and start time, and VIPs) on every acknowledgement and whenever that set
changes, starts or re-adopts the keeper and starts it again if it dies, and reads the keeper's
``fenced.json`` at start and whenever it changes, so that fenced instances read ``stopped``, not
``failed``. :func:`fence_all` runs in the agent at the same deadline: it marks the guarded
instances first, waits for the keeper's record, and only what no keeper fenced (none alive) it
fences itself, through the same :func:`corral.agent.keeper.fence`; an instance that lives in the
agent's memory only (the fake driver) goes through its driver. Killing twice is harmless: every
pid is checked by its start time, and an address already gone is left alone.

Arming: at start the deadline is ``now + window``, but never later than the one the previous
agent left in ``lease.json`` this boot: a restart renews nothing, so an agent restarted during a
partition fences in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from corral.agent import keeper as kp
from corral.agent.report import is_alive
from corral.agent.store import InstanceRecord, write_atomic
from corral.drivers import reaping
from corral.drivers.cgroups import read_mounts
from corral.ha import vip as viplib

if TYPE_CHECKING:
    from corral.agent.state import AgentState
    from corral.agent.vips import Vips

log = logging.getLogger(__name__)

#: a margin that leaves less than this of the lease fences at half the lease instead
MIN_WINDOW = 0.5
#: drivers whose instances are no processes of the host: only their driver can end them
IN_MEMORY = frozenset({"fake"})
#: how long the agent waits for the keeper's record of a fence before fencing itself
KEEPER_WAIT = kp.KILL_WAIT_SECONDS + 1.0
#: a keeper that keeps dying is started again at most this often
RESPAWN_SECONDS = 1.0


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
        #: what that fence stopped (nothing to tell when it stopped nothing)
        self.stopped: list[str] = []
        #: called whenever the deadline may have moved (the keeper's file follows it)
        self.on_change: Callable[[], None] | None = None

    def arm(self, not_after: float | None = None) -> None:
        """Start counting now (the agent is about to reach for the server), but end no later
        than ``not_after``, a deadline an earlier agent left: restarting renews nothing."""
        now = self.clock()
        self.last_ack = now if not_after is None else min(now, not_after - self.window)
        self.fenced = False
        self._changed()

    def acked(self, lease_seconds: float | None = None, sent_at: float | None = None) -> None:
        """The server acknowledged a join or heartbeat sent at ``sent_at`` (this clock; default
        now), with ``lease_seconds`` from a join reply."""
        if lease_seconds is not None:
            self.lease = lease_seconds
        self.last_ack = max(self.last_ack, self.clock() if sent_at is None else sent_at)
        if self.fenced and self.stopped:
            log.warning("the server answers again; %s stay stopped until it says otherwise",
                        ", ".join(self.stopped))
        self.fenced, self.stopped = False, []
        self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

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
        #: called when the set changes (the keeper's file follows it)
        self.on_change: Callable[[], None] | None = None
        with contextlib.suppress(OSError, ValueError, TypeError):
            self.names = {str(n) for n in json.loads(path.read_text())}

    def update(self, names: list[str] | None) -> None:
        if names is None or set(names) == self.names:
            return
        self.names = set(names)
        write_atomic(self.path, json.dumps(sorted(self.names)).encode())
        if self.on_change is not None:
            self.on_change()

    def covers(self, name: str) -> bool:
        return self.names is None or name in self.names


def cgroup_roots() -> tuple[str, ...]:
    """Every cgroup hierarchy's root here; an instance's cgroup is a path below each."""
    m = read_mounts()
    return tuple(dict.fromkeys([*(str(p) for p in m.v1_all), *([str(m.v2)] if m.v2 else [])]))


def _pos_int(v: object) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 1 else None


def entry_of(rec: InstanceRecord, vips: Vips | None, held: set[str]) -> kp.Entry | None:
    """What the keeper needs to kill ``rec`` without its driver (None: nothing it could kill),
    with its VIP unless another alive instance here holds that address too (``held``)."""
    if rec.driver in IN_MEMORY:
        return None
    data = rec.handle.data
    pid, start = _pos_int(data.get("pid")), data.get("starttime")
    if pid is None or not isinstance(start, int) or isinstance(start, bool) or start < 0:
        pid, start = None, None
    cgroup = data.get("cgroup")
    addresses: list[kp.Vip] = []
    if rec.spec.vip and vips is not None and rec.spec.vip not in held:
        try:
            iface = viplib.parse(rec.spec.vip)
            if str(iface.ip) in vips.added:  # only what corral added is ever removed
                addresses.append(kp.parse_vip({"address": str(iface),
                                               "interface": vips.interface}))
        except Exception as exc:
            log.error("the fence keeper cannot be told about the VIP of %s: %s", rec.name, exc)
    entry = kp.Entry(name=rec.name, generation=str(data.get("generation") or "")[:128],
                     pid=pid, start=start, sid=pid if pid and data.get("sid") == pid else None,
                     cgroup=str(cgroup) if cgroup else None, vips=tuple(addresses))
    try:
        return kp.parse_entry(entry.to_json())  # what the keeper would refuse, it is not told
    except ValueError as exc:
        if entry.pid is not None or entry.cgroup is not None:
            log.error("the fence keeper cannot guard %s: %s", rec.name, exc)
        return None


class FenceKeeper:
    """The agent's side of the fence keeper: the file it reads, the process, what it did."""

    def __init__(self, data_dir: Path, st: AgentState, lease: LeaseClock, guarded: Guarded,
                 vips: Vips | None) -> None:
        self.dir = Path(os.path.abspath(data_dir)) / kp.DIR_NAME
        self.st, self.lease, self.guarded, self.vips = st, lease, guarded, vips
        self.boot = kp.boot_id()
        self.roots = cgroup_roots()
        self.me = (os.getpid(), kp.start_time(os.getpid()))
        #: what the keeper was last told to guard
        self.listed: tuple[kp.Entry, ...] = ()
        self.proc: kp.Found | None = None
        self.changed = asyncio.Event()
        self._popen: subprocess.Popen[bytes] | None = None
        self._written: bytes | None = None
        #: what the last file was made from (see :meth:`publish`)
        self._made_from: object = None
        self._fenced_seen: tuple[int, int, int] | None = None
        self._spawned_at = -math.inf
        #: the keeper could not be told the current deadline (see :meth:`publish`)
        self._stale = False
        lease.on_change = guarded.on_change = self.changed.set

    # --- lease.json -----------------------------------------------------------------------------
    def inherited_deadline(self) -> float | None:
        """The deadline an earlier agent left this boot, if any."""
        try:
            old = kp.read_state(self.dir)
        except (OSError, ValueError):
            return None
        return old.deadline if old.boot == self.boot else None

    def entries(self, recs: Iterable[InstanceRecord]) -> dict[str, kp.Entry]:
        recs = list(recs)
        names = {r.name for r in recs}
        held = {r.spec.vip for r in self.st.records.values()
                if r.spec.vip and is_alive(r) and r.name not in names}
        out = {}
        for rec in recs:
            entry = entry_of(rec, self.vips, held)
            if entry is not None:
                out[rec.name] = entry
        return out

    def state(self, entries: Iterable[kp.Entry]) -> kp.LeaseState:
        return kp.LeaseState(deadline=self.lease.deadline, boot=self.boot,
                             agent_pid=self.me[0], agent_start=self.me[1],
                             cgroup_roots=self.roots, instances=tuple(entries),
                             lease=self.lease.lease, window=self.lease.window)

    def _inputs(self) -> object:
        """Everything the file is made of, cheap to compare: it is looked at four times a
        second, and rebuilt only when one of these changed."""
        return (self.lease.deadline, self.lease.lease, self.lease.margin,
                None if self.guarded.names is None else frozenset(self.guarded.names),
                None if self.vips is None else frozenset(self.vips.added),
                tuple((r.name, r.state, r.driver, r.spec.vip, repr(r.handle.data.get("pid")),
                       repr(r.handle.data.get("generation")), repr(r.handle.data.get("cgroup")))
                      for r in self.st.records.values()))

    def publish(self) -> bool:
        """Tell the keeper the deadline and what to guard, when either changed; False when it
        cannot be told. A keeper left with an old deadline would fence a healthy host, so
        until the file can be written again it is stopped and the agent fences by itself."""
        inputs = self._inputs()
        if inputs == self._made_from:
            return True
        recs = sorted((r for r in self.st.records.values()
                       if is_alive(r) and self.guarded.covers(r.name)), key=lambda r: r.name)
        state = self.state(self.entries(recs).values())
        try:
            data = kp.encode_state(state)
            if data != self._written:
                self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
                kp.write_private(self.dir / kp.STATE_FILE, data)
        except (OSError, ValueError) as exc:
            if not self._stale:
                log.critical("the fence keeper cannot be told what to guard (%s): it is stopped, "
                             "and the agent fences by itself until it can be told again", exc)
            self._stale = True
            return False
        if self._stale:
            log.warning("the fence keeper can be told what to guard again")
        self._stale = False
        self._written, self.listed, self._made_from = data, state.instances, inputs
        return True

    # --- the process ----------------------------------------------------------------------------
    def alive(self) -> bool:
        if self._popen is not None and self._popen.poll() is not None:
            reaping.release(self._popen.pid)
            self._popen = None
        return self.proc is not None and kp.is_alive(self.proc.pid, self.proc.start)

    async def ensure(self) -> None:
        """Adopt the keeper that runs for this directory, else start one; stop it while it
        cannot be told the deadline."""
        if self._stale:
            if self.alive() or kp.identify(self.dir) is not None:
                await self._stop()
            return
        if self.alive():
            return
        found = kp.identify(self.dir)
        if found is not None and found.version != kp.VERSION:
            log.warning("replacing the fence keeper %d (version %s) with version %d",
                        found.pid, found.version, kp.VERSION)
            await asyncio.to_thread(kp.stop, self.dir)
            found = None
        if found is None:  # one whose pid file is gone or damaged is still the one
            others = await asyncio.to_thread(kp.find_all, self.dir)
            found = others[0] if others else None
        if found is not None:
            log.info("the fence keeper %d guards this host (adopted)", found.pid)
            self.proc = found
            return
        now = time.monotonic()
        if now - self._spawned_at < RESPAWN_SECONDS:
            return
        if self.proc is not None:
            log.error("the fence keeper %d is gone; starting another", self.proc.pid)
        self._spawned_at = now
        self._spawn()

    def _spawn(self) -> None:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        out = os.open(self.dir / kp.LOG_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            with reaping.owned() as own:
                popen = subprocess.Popen(
                    kp.argv_for(self.dir), stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                    start_new_session=True, close_fds=True, cwd="/",
                    env={"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
                         "LANG": "C.UTF-8"})
                own(popen.pid)
        except OSError as exc:
            log.critical("cannot start the fence keeper: %s", exc)
            return
        finally:
            os.close(out)
        self._popen = popen
        self.proc = kp.Found(popen.pid, kp.start_time(popen.pid) or 0, kp.VERSION)
        log.info("started the fence keeper %d for %s", popen.pid, self.dir)

    # --- fenced.json ----------------------------------------------------------------------------
    def _fences(self) -> list[dict[str, object]]:
        return [f for f in kp.read_fenced(self.dir) if f.get("boot") == self.boot]

    async def learn(self, force: bool = False) -> list[str]:
        """Mark the instances the keeper fenced (same run: same generation) that are not marked
        yet, so they read ``stopped``; their addresses are gone, so forget them too."""
        try:
            st = (self.dir / kp.FENCED_FILE).stat()
        except OSError:
            return []
        seen = (st.st_ino, st.st_mtime_ns, st.st_size)
        if seen == self._fenced_seen and not force:
            return []
        self._fenced_seen = seen
        learned: list[InstanceRecord] = []
        for fence in self._fences():
            at = fence.get("at")
            insts = fence.get("instances")
            for inst in insts if isinstance(insts, list) else []:
                rec = self.st.records.get(str(inst.get("name"))) if isinstance(inst, dict) else None
                if (rec is None or "fenced_at" in rec.extra or not isinstance(inst, dict)
                        or str(rec.handle.data.get("generation") or "") != inst.get("generation")):
                    continue
                rec.stop_requested = True
                rec.extra["fenced_at"] = at if isinstance(at, int | float) else time.time()
                self.st.save(rec)
                learned.append(rec)
                log.critical("FENCE: %s was fenced by the fence keeper (%s); it reads stopped",
                             rec.name, fence.get("why"))
        for rec in learned:
            with contextlib.suppress(Exception):
                await self.st.refresh(rec)
            if self.vips is not None:
                await self.vips.down(rec, self.st.records)
        if learned:
            self.st.changed.set()
        return [r.name for r in learned]

    async def await_fence(self, recs: list[InstanceRecord]) -> set[str]:
        """The names among ``recs`` the keeper fenced since the lease was last renewed,
        waiting (bounded) while it lives and has not done them all."""
        want = {r.name: str(r.handle.data.get("generation") or "") for r in recs}
        loop = asyncio.get_running_loop()
        until = loop.time() + KEEPER_WAIT
        done: set[str] = set()
        while True:
            for fence in self._fences():
                began = fence.get("monotonic")
                insts = fence.get("instances")
                if not isinstance(began, int | float) or began < self.lease.last_ack:
                    continue
                for inst in insts if isinstance(insts, list) else []:
                    if isinstance(inst, dict) and want.get(str(inst.get("name"))) == \
                            inst.get("generation"):
                        done.add(str(inst.get("name")))
            if done >= set(want) or not self.alive() or loop.time() >= until:
                return done
            await asyncio.sleep(0.05)

    # --- the agent's life -----------------------------------------------------------------------
    async def start(self) -> None:
        """At agent start, before the join: learn of fences made while it was away, tell the
        keeper what to guard, adopt it or start one."""
        await self.learn(force=True)
        self.publish()
        await self.ensure()

    async def tend(self) -> None:
        self.publish()
        await self.ensure()
        await self.learn()

    async def wait(self, stop: asyncio.Event, timeout: float) -> None:
        """Until ``timeout``, a stop, or a change the keeper must hear of."""
        if not self.changed.is_set():
            waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(
                self.changed.wait())]
            _, pending = await asyncio.wait(waits, timeout=timeout,
                                            return_when=asyncio.FIRST_COMPLETED)
            for w in pending:
                w.cancel()
        self.changed.clear()

    async def close(self) -> None:
        """A clean stop of the agent. With nothing guarded alive (``corral down`` stopped the
        instances first) the keeper is stopped; otherwise it stays armed, since the server
        fails those instances over if this agent stays away past the lease."""
        if self.publish() and self.listed:
            log.warning("the fence keeper stays armed for %s until this agent is back",
                        ", ".join(e.name for e in self.listed))
            return
        stopped = await self._stop()
        if stopped:
            log.info("fence keeper %s stopped: nothing here is guarded", stopped)

    async def _stop(self) -> list[int]:
        stopped = await asyncio.to_thread(kp.stop, self.dir)
        if self._popen is not None:
            self._popen.poll()
            reaping.release(self._popen.pid)
            self._popen = None
        self.proc = None
        self._spawned_at = -math.inf  # stopped on purpose: a new one may start at once
        return stopped


async def _await_end(st: AgentState, recs: list[InstanceRecord], seconds: float = 3.0) -> None:
    """Refresh ``recs`` until none is alive (bounded: SIGKILL takes a moment to land)."""
    loop = asyncio.get_running_loop()
    until = loop.time() + seconds
    for rec in recs:
        with contextlib.suppress(Exception):
            await st.refresh(rec)
        while is_alive(rec) and loop.time() < until:
            await asyncio.sleep(0.05)
            with contextlib.suppress(Exception):
                await st.refresh(rec)


async def fence_all(st: AgentState, vips: Vips | None, why: str,
                    guarded: Guarded | None = None,
                    keeper: FenceKeeper | None = None) -> list[str]:
    """Fence every alive instance the server would fail over (``guarded``; all when unknown):
    mark it (it reads ``stopped``), let the keeper kill it and drop its VIP, or do that here
    when no keeper did; the names fenced. An instance with no standby is never started
    elsewhere while its host is away, so stopping it would only be an outage."""
    targets: list[InstanceRecord] = []
    for name in list(st.records):
        rec = st.records.get(name)
        if rec is None or not is_alive(rec):
            continue
        if guarded is not None and not guarded.covers(name):
            log.warning("FENCE: %s keeps running: the server would not start it elsewhere",
                        name)
            continue
        targets.append(rec)
    marked: list[InstanceRecord] = []
    for rec in targets:  # first: the keeper may be killing it now, and an end seen unmarked
        try:             # would read "failed"
            rec.stop_requested = True
            rec.extra["fenced_at"] = time.time()
            st.save(rec)
            marked.append(rec)
        except Exception as exc:
            log.critical("FENCE: could not mark %s: %s", rec.name, exc)
    if keeper is not None:
        entries = keeper.entries(marked)
    else:
        names = {r.name for r in marked}
        held = {r.spec.vip for r in st.records.values() if r.spec.vip and is_alive(r)
                and r.name not in names}
        entries = {r.name: e for r in marked if (e := entry_of(r, vips, held)) is not None}
    by_keeper: set[str] = set()
    if keeper is not None and entries:
        by_keeper = await keeper.await_fence([r for r in marked if r.name in entries])
    rest = [e for n, e in entries.items() if n not in by_keeper]
    if rest:
        if keeper is not None:
            log.critical("FENCE: no fence keeper fenced %s; the agent does it itself",
                         ", ".join(e.name for e in rest))
        state = (keeper.state(rest) if keeper is not None else
                 kp.LeaseState(deadline=time.monotonic(), boot=kp.boot_id(),
                               cgroup_roots=cgroup_roots(), instances=tuple(rest)))
        try:
            record = await asyncio.to_thread(kp.fence, state, rest, why, "agent")
            if keeper is not None:
                await asyncio.to_thread(kp.record_fence, keeper.dir, record)
        except Exception as exc:
            log.critical("FENCE: could not fence %s: %s", ", ".join(e.name for e in rest), exc)
    for rec in marked:
        if rec.name in entries:
            continue
        # no lock wait: a command stuck on a dead server must not delay the fence
        try:
            drv = st.driver(rec.driver)
            if rec.state == "frozen":
                with contextlib.suppress(Exception):  # SIGKILL lands sooner on a thawed task
                    await st.call(drv.thaw, rec.handle)
            await st.call(drv.kill, rec.handle, int(signal.SIGKILL))
        except Exception as exc:
            log.critical("FENCE: could not kill %s: %s", rec.name, exc)
    await _await_end(st, marked)
    fenced = [r.name for r in marked if not is_alive(r)]
    for rec in marked:
        if is_alive(rec):
            log.critical("FENCE: %s still runs after SIGKILL", rec.name)
    if vips is not None:
        for rec in marked:
            await vips.down(rec, st.records)
        await vips.sync(st.records)
    if not marked:
        log.warning("the lease ran out (%s); nothing guarded runs here", why)
        return []
    log.critical("FENCE: %s; killed %d instance(s): %s%s", why, len(fenced),
                 ", ".join(fenced) or "none",
                 f" (by the fence keeper: {', '.join(sorted(by_keeper))})" if by_keeper else "")
    st.changed.set()
    return fenced
