"""Health checks, run by the agent while an instance runs (so they hold while the server is
away).

A check (``WireSpec.check``) is ``http://[HOST]:PORT/PATH`` (healthy on a 2xx or 3xx answer
within the timeout), ``tcp:[HOST]:PORT`` (a connection is accepted) or ``exec:CMD`` (``sh -c
CMD`` exits 0 within the timeout; for a container, inside it: every namespace of its main
process, its root, its working directory, as its own root, so a script the workload wrote never
runs as the host's root; else on the host in the instance's working directory). An
empty HOST is 127.0.0.1 *in the instance's network namespace*: the check runs in the network
namespace of the instance's main process (``/proc/PID/ns/net``, entered with ``setns`` in a
thread of its own for http and tcp, with ``nsenter --net`` for exec) when it is not the
agent's own; today's runc containers share the agent's, so that is the common case.

Health is ``unknown`` until a first result (and whenever the instance is not running),
``healthy`` after a success, ``unhealthy`` after ``threshold`` failures in a row (failures
within ``grace`` seconds of a start do not count: a slow start is not a sick one). It is kept in
the record's ``extra["health"]`` and reported with the instance; a change is heartbeated at
once. When an instance turns unhealthy and its restart policy is ``on-failure`` or
``always``, it is killed (its stop signal, then SIGKILL after the stop timeout) without being
marked as asked: the sweep sees it ``failed`` and the restart policy takes it from there.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import http.client
import logging
import os
import re
import signal as signals
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from corral.agent.report import is_alive
from corral.agent.store import InstanceRecord
from corral.bus.messages import HealthCheck
from corral.errors import InvalidRequest
from corral.lifecycle import State

if TYPE_CHECKING:
    from corral.agent.state import AgentState

log = logging.getLogger(__name__)
T = TypeVar("T")

UNKNOWN, HEALTHY, UNHEALTHY = "unknown", "healthy", "unhealthy"
#: how often the monitor looks for checks that are due (seconds)
TICK = 0.1
_HTTP = re.compile(r"^http://(?P<host>[A-Za-z0-9.-]*|\[[0-9A-Fa-f:.]+\]):(?P<port>\d{1,5})"
                   r"(?P<path>/\S*)?$")
_TCP = re.compile(r"^tcp:(?P<host>[A-Za-z0-9.-]*|\[[0-9A-Fa-f:.]+\]):(?P<port>\d{1,5})$")
CLONE_NEWNET = 0x40000000


@dataclass(frozen=True)
class Probe:
    kind: str  # http, tcp or exec
    host: str = "127.0.0.1"
    port: int = 0
    path: str = "/"
    command: str = ""


def parse(target: str) -> Probe:
    """The probe ``target`` names (the API refuses the others with the same words)."""
    if target.startswith("exec:") and target[5:].strip():
        return Probe("exec", command=target[5:])
    m = _HTTP.match(target)
    kind = "http"
    if m is None:
        m, kind = _TCP.match(target), "tcp"
    if m is None or not 1 <= int(m.group("port")) <= 65535:
        raise InvalidRequest(f"health check {target[:80]!r} is not one the agent can run",
                             hint="http://:PORT/PATH, tcp::PORT or exec:CMD")
    host = m.group("host").strip("[]") or "127.0.0.1"
    path = (m.groupdict().get("path") or "/") if kind == "http" else "/"
    return Probe(kind, host=host, port=int(m.group("port")), path=path)


def _netns_of(pid: int | None) -> str | None:
    """``/proc/PID/ns/net`` when the instance's network namespace is not ours, else None."""
    if not pid:
        return None
    path = f"/proc/{pid}/ns/net"
    try:
        if os.stat(path).st_ino == os.stat("/proc/self/ns/net").st_ino:
            return None
    except OSError:
        return None
    return path


def _in_netns(netns: str | None, fn: Callable[[], T]) -> T:
    """``fn()`` in network namespace ``netns`` (None: here). The switch is made in a thread
    of its own, which ends with it: no other code ever runs in the instance's namespace."""
    if netns is None:
        return fn()
    out: list[T] = []
    err: list[BaseException] = []

    def run() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        try:
            fd = os.open(netns, os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns({netns})")
            finally:
                os.close(fd)
            out.append(fn())
        except BaseException as exc:
            err.append(exc)

    t = threading.Thread(target=run, name="corral-health-netns", daemon=True)
    t.start()
    t.join()
    if err:
        raise err[0]
    return out[0]


def _own_userns(pid: int) -> bool:
    """Whether ``pid`` runs in a user namespace other than the agent's (a runc container)."""
    try:
        return os.readlink(f"/proc/{pid}/ns/user") != os.readlink("/proc/self/ns/user")
    except OSError:
        return False


def _run_exec(argv: list[str], cwd: str | None, timeout: float) -> str:
    """Run a check command; at its timeout its whole process group is killed (``sh -c``'s
    children, nsenter's forked child), not only the first process, which left them running."""
    p = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        rc = p.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signals.SIGKILL)
        p.wait()
        raise
    return "" if rc == 0 else f"exit {rc}"


def run_probe(probe: Probe, timeout: float, pid: int | None, cwd: str | None) -> str:
    """One check, blocking (bounded by ``timeout``): "" when it passed, else why not."""
    netns = _netns_of(pid)
    try:
        if probe.kind == "exec":
            argv = ["sh", "-c", probe.command]
            if pid is not None and _own_userns(pid):
                # a container: in all its namespaces, at its root and working directory, as
                # its root (a host id of its range), never as the agent's root in its disk
                argv = ["nsenter", f"--target={pid}", "--all", "--root", "--wd", *argv]
                cwd = None
            elif netns is not None:
                argv = ["nsenter", f"--net={netns}", *argv]
            return _run_exec(argv, cwd if cwd and os.path.isdir(cwd) else None, timeout)
        if probe.kind == "tcp":
            def connect() -> None:
                with socket.create_connection((probe.host, probe.port), timeout=timeout):
                    pass
            _in_netns(netns, connect)
            return ""

        def get() -> int:
            conn = http.client.HTTPConnection(probe.host, probe.port, timeout=timeout)
            try:
                conn.request("GET", probe.path, headers={"User-Agent": "corral-health"})
                resp = conn.getresponse()
                resp.read(65536)
                return resp.status
            finally:
                conn.close()
        status = _in_netns(netns, get)
        return "" if 200 <= status < 400 else f"HTTP {status}"
    except subprocess.TimeoutExpired:
        return f"no answer within {timeout:g}s"
    except TimeoutError:
        return f"no answer within {timeout:g}s"
    except (OSError, http.client.HTTPException) as exc:
        return f"{type(exc).__name__}: {exc}"


@dataclass
class _Track:
    due: float = 0.0
    failures: int = 0
    pid: int | None = None
    task: asyncio.Task[None] | None = None
    #: when this run was first seen running (its grace counts from here)
    started: float = 0.0


class HealthMonitor:
    """Runs every running instance's check on its interval, one check at a time each."""

    def __init__(self, st: AgentState, clock: Callable[[], float] = time.monotonic) -> None:
        self.st = st
        self.clock = clock
        self.tracks: dict[str, _Track] = {}

    async def run(self, stop: asyncio.Event) -> None:
        try:
            while not stop.is_set():
                self.tick()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=TICK)
        finally:
            for t in self.tracks.values():
                if t.task is not None:
                    t.task.cancel()

    def tick(self) -> None:
        now = self.clock()
        for name in list(self.tracks):
            rec = self.st.records.get(name)
            if rec is None or rec.spec.check is None:
                track = self.tracks.pop(name)
                if track.task is not None:
                    track.task.cancel()
        for name, rec in list(self.st.records.items()):
            check = rec.spec.check
            if check is None:
                continue
            track = self.tracks.setdefault(name, _Track(due=now))
            if rec.state != State.RUNNING or track.pid != rec.pid:
                # not running, or a new run: start over (frozen: checks wait, health stays)
                if rec.state != State.FROZEN:
                    self._set(rec, UNKNOWN, "")
                    track.failures = 0
                    track.pid = rec.pid if rec.state == State.RUNNING else None
                    track.started = now
                    track.due = now + (0.0 if rec.state == State.RUNNING else check.interval)
                continue
            if track.task is None and now >= track.due:
                track.due = now + check.interval
                track.task = asyncio.create_task(self._check(rec, check, track))

    async def _check(self, rec: InstanceRecord, check: HealthCheck, track: _Track) -> None:
        try:
            probe = parse(check.target)
            why = await asyncio.to_thread(run_probe, probe, check.timeout, rec.pid,
                                          self._cwd(rec))
            if self.st.records.get(rec.name) is not rec or rec.pid != track.pid \
                    or rec.state != State.RUNNING:
                return  # the run it checked is over; its result means nothing now
            if not why:
                track.failures = 0
                self._set(rec, HEALTHY, "")
                return
            if self.clock() - track.started < check.grace:
                log.info("health check of %s failed within its grace (%gs): %s", rec.name,
                         check.grace, why)
                return  # starting up: neither a failure nor healthy yet
            track.failures += 1
            log.info("health check of %s failed (%d of %d): %s", rec.name, track.failures,
                     check.threshold, why)
            if track.failures >= check.threshold and self._set(rec, UNHEALTHY, why):
                await self._act(rec)
        except Exception as exc:
            log.warning("health check of %s could not run: %s", rec.name, exc)
        finally:
            track.task = None

    def _cwd(self, rec: InstanceRecord) -> str | None:
        disk = rec.extra.get("disk")
        if isinstance(disk, str) and rec.extra.get("cwd_disk"):
            return disk
        return str(self.st.store.dir_for(rec.name))

    def _set(self, rec: InstanceRecord, health: str, why: str) -> bool:
        """Record ``health``; True when it changed (then the server hears it at once)."""
        if rec.extra.get("health", UNKNOWN) == health:
            return False
        rec.extra["health"] = health
        if why:
            rec.extra["health_reason"] = why[:500]
        else:
            rec.extra.pop("health_reason", None)
        if health != UNKNOWN or is_alive(rec):
            log.info("instance %s is %s%s", rec.name, health, f" ({why})" if why else "")
        self.st.save(rec)
        self.st.changed.set()
        return True

    async def _act(self, rec: InstanceRecord) -> None:
        """Unhealthy under on-failure/always: end it as a failure, for the policy to restart
        (its stop signal, then SIGKILL after the stop timeout; never marked as asked)."""
        if rec.spec.restart.mode == "no" or rec.stop_requested:
            return
        name = rec.name
        async with self.st.lock(name):
            if self.st.records.get(name) is not rec or rec.stop_requested \
                    or rec.state != State.RUNNING:
                return
            log.warning("instance %s is unhealthy; ending it for its restart policy (%s)",
                        name, rec.spec.restart.mode)
            rec.extra["ended_unhealthy"] = time.time()
            # kept past the end (health turns unknown then): a failover on unhealthy says why
            rec.extra["unhealthy_reason"] = str(rec.extra.get("health_reason", ""))[:500]
            drv = self.st.driver(rec.driver)
            first = rec.spec.stop_signal or int(signals.SIGTERM)
            with contextlib.suppress(Exception):
                await self.st.call(drv.kill, rec.handle, first)
            deadline = self.clock() + self.st.stop_timeout
            await self.st.refresh(rec)
            while is_alive(rec) and self.clock() < deadline:
                await asyncio.sleep(0.05)
                await self.st.refresh(rec)
            if is_alive(rec):
                with contextlib.suppress(Exception):
                    await self.st.call(drv.kill, rec.handle, int(signals.SIGKILL))
                for _ in range(100):  # bounded: 5 s for the kill to land and be reaped
                    await self.st.refresh(rec)
                    if not is_alive(rec):
                        break
                    await asyncio.sleep(0.05)
