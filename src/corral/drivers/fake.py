"""The ``fake`` driver: instances that live in memory, for unit tests of the agent and server.

It keeps the real drivers' semantics (states, generations, stop-then-kill, recover never kills,
stats leave out what is not running) so logic tested against it behaves the same on a real host,
and it adds the controls a test needs to make things happen: :meth:`FakeDriver.crash`,
CPU counters that are set or that grow at a chosen rate on a clock the test may drive, and
injected failures.

The "processes" live in a :class:`FakeWorld` (the fake kernel); a new :class:`FakeDriver` on the
same world is an agent that restarted, so recover can be tested exactly like the real thing.
"""

from __future__ import annotations

import signal as sig
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from corral.drivers import runs
from corral.drivers.base import (
    Capabilities,
    Handle,
    MigrationStats,
    Spec,
    Stats,
    Status,
)
from corral.errors import Conflict, CorralError, DriverError, InvalidRequest, NotSupported


@dataclass
class FakeProc:
    """One fake workload run (one generation)."""

    pid: int
    generation: str
    started_at: float
    cpu_rate: float = 0.0  # cores
    cpu_base_ns: int = 0
    rate_since: float = 0.0
    memory_bytes: int = 1 << 20
    frozen: bool = False
    ignores_term: bool = False
    alive: bool = True
    exit_code: int | None = None
    signal: int | None = None
    stop_requested: bool = False


#: destinations waiting for a fake live migration, by socket name (every world of the process)
_LISTENING: dict[str, tuple[FakeWorld, str, str]] = {}
_NEXT_PORT = [40000]


@dataclass
class FakeWorld:
    """What survives a "restart" of the agent: the running fake processes."""

    clock: Callable[[], float] = time.monotonic
    procs: dict[str, FakeProc] = field(default_factory=dict)
    next_pid: int = 1000
    lock: threading.RLock = field(default_factory=threading.RLock)


class FakeDriver:
    name = "fake"

    def __init__(self, scope: str = "fake", world: FakeWorld | None = None, *,
                 can_freeze: bool = True, unavailable: str | None = None,
                 can_live_migrate: bool = False) -> None:
        self.scope = scope
        self.world = world or FakeWorld()
        self.capabilities = Capabilities(can_freeze=can_freeze,
                                         can_live_migrate=can_live_migrate)
        self._unavailable = unavailable
        self._failures: dict[str, CorralError] = {}
        self.calls: list[tuple[str, str]] = []

    # -- controls for tests -------------------------------------------------------------
    def crash(self, name: str, code: int | None = 1, signal: int | None = None) -> None:
        """The workload ends by itself (``signal`` given: killed from outside)."""
        with self.world.lock:
            p = self._proc(name)
            if p is not None and p.alive:
                self._end(p, None if signal else code, signal)

    def set_cpu(self, name: str, cpu_ns: int) -> None:
        with self.world.lock:
            p = self._must(name)
            p.cpu_base_ns, p.rate_since = cpu_ns, self.world.clock()

    def set_cpu_rate(self, name: str, cores: float) -> None:
        """From now on the counter grows at ``cores`` while running and not frozen."""
        with self.world.lock:
            p = self._must(name)
            p.cpu_base_ns, p.rate_since, p.cpu_rate = self._cpu(p), self.world.clock(), cores

    def set_memory(self, name: str, memory_bytes: int) -> None:
        with self.world.lock:
            self._must(name).memory_bytes = memory_bytes

    def ignore_term(self, name: str, ignore: bool = True) -> None:
        with self.world.lock:
            self._must(name).ignores_term = ignore

    def fail_next(self, verb: str, error: CorralError) -> None:
        """The next call of ``verb`` (e.g. ``"start"``) raises ``error``."""
        self._failures[verb] = error

    # -- internals -----------------------------------------------------------------------
    def _proc(self, name: str) -> FakeProc | None:
        return self.world.procs.get(name)

    def _must(self, name: str) -> FakeProc:
        p = self._proc(name)
        if p is None:
            raise KeyError(f"fake instance {name} was never started")
        return p

    def _cpu(self, p: FakeProc) -> int:
        if not p.alive or p.frozen:
            return p.cpu_base_ns
        return p.cpu_base_ns + int(p.cpu_rate * (self.world.clock() - p.rate_since) * 1e9)

    def _settle(self, p: FakeProc) -> None:
        p.cpu_base_ns, p.rate_since = self._cpu(p), self.world.clock()

    def _end(self, p: FakeProc, code: int | None, signal: int | None) -> None:
        self._settle(p)
        p.alive, p.frozen, p.exit_code, p.signal = False, False, code, signal

    def _enter(self, verb: str, handle_name: str) -> None:
        self.calls.append((verb, handle_name))
        err = self._failures.pop(verb, None)
        if err is not None:
            raise err

    def _current(self, handle: Handle) -> FakeProc | None:
        p = self._proc(handle.name)
        if p is None or p.generation != handle.data.get("generation"):
            return None
        return p

    def _require_alive(self, handle: Handle, verb: str) -> FakeProc:
        p = self._current(handle)
        if p is None or not p.alive:
            raise Conflict(f"cannot {verb} instance {handle.name}: it is not running",
                           hint="start it first")
        return p

    # -- the Driver protocol ---------------------------------------------------------------
    def available(self) -> str | None:
        return self._unavailable

    def create(self, spec: Spec) -> Handle:
        self._enter("create", spec.name)
        if not spec.command:
            raise InvalidRequest(f"instance {spec.name}: empty command")
        return Handle(self.name, spec.name, {"spec": runs.spec_to_data(spec),
                                             "pid": None, "generation": None})

    def start(self, handle: Handle) -> Handle:
        self._enter("start", handle.name)
        with self.world.lock:
            cur = self._current(handle)
            if cur is not None and cur.alive:
                return handle
            self.world.next_pid += 1
            pid = self.world.next_pid
            now = self.world.clock()
            gen = f"{pid}-{int(now * 100)}"
            self.world.procs[handle.name] = FakeProc(pid=pid, generation=gen, started_at=now,
                                                     rate_since=now)
        return Handle(self.name, handle.name, dict(handle.data, pid=pid, generation=gen))

    def stop(self, handle: Handle, timeout: float) -> Status:
        self._enter("stop", handle.name)
        with self.world.lock:
            p = self._current(handle)
            if p is not None and p.alive:
                p.stop_requested = True
                if p.ignores_term:
                    self._end(p, None, sig.SIGKILL)
                else:
                    self._end(p, None, sig.SIGTERM)
        return self.status(handle)

    def kill(self, handle: Handle, signal: int) -> None:
        self._enter("kill", handle.name)
        with self.world.lock:
            p = self._require_alive(handle, "signal")
            if signal == sig.SIGSTOP:
                self._settle(p)
                p.frozen = True
            elif signal == sig.SIGCONT:
                self._settle(p)
                p.frozen = False
            elif signal in runs.ENDING_SIGNALS and not (signal == sig.SIGTERM and
                                                           p.ignores_term):
                p.stop_requested = True
                self._end(p, None, signal)

    def freeze(self, handle: Handle) -> None:
        self._enter("freeze", handle.name)
        if not self.capabilities.can_freeze:
            raise NotSupported("the fake driver was made without a freezer")
        with self.world.lock:
            p = self._require_alive(handle, "freeze")
            self._settle(p)
            p.frozen = True

    def thaw(self, handle: Handle) -> None:
        self._enter("thaw", handle.name)
        if not self.capabilities.can_freeze:
            raise NotSupported("the fake driver was made without a freezer")
        with self.world.lock:
            p = self._current(handle)
            if p is not None and p.alive and p.frozen:
                self._settle(p)
                p.frozen = False

    def status(self, handle: Handle) -> Status:
        with self.world.lock:
            if handle.data.get("pid") is None:
                return Status("created")
            p = self._current(handle)
            if p is None:  # a generation this world never ran (or forgot): it is gone
                return Status("exited")
            if p.alive:
                return Status("frozen" if p.frozen else "running", pid=p.pid)
            state = "stopped" if p.stop_requested else "exited"
            return Status(state, exit_code=p.exit_code, signal=p.signal)

    def stats(self, handles: Sequence[Handle]) -> dict[str, Stats]:
        out: dict[str, Stats] = {}
        with self.world.lock:
            for h in handles:
                p = self._current(h)
                if p is not None and p.alive:
                    out[h.name] = Stats(self._cpu(p), p.memory_bytes, p.generation)
        return out

    def delete(self, handle: Handle) -> None:
        self._enter("delete", handle.name)
        with self.world.lock:
            p = self._current(handle)
            if p is not None and p.alive:
                raise Conflict(f"instance {handle.name} is running", hint="stop it first")
            if p is not None:
                del self.world.procs[handle.name]

    def recover(self, handle: Handle) -> Status:
        self._enter("recover", handle.name)
        return self.status(handle)

    # -- live migration (only with can_live_migrate) -----------------------------------------
    def stream_dir(self, handle: Handle) -> Path:
        return runs.workdir(handle)

    def incoming(self, handle: Handle, peer: str) -> tuple[Handle, str]:
        """A paused copy waiting for ``peer``'s stream on a socket name of this process's
        table."""
        self._enter("incoming", handle.name)
        if not self.capabilities.can_live_migrate:
            raise NotSupported("the fake driver was made without live migration")
        with self.world.lock:
            cur = self._current(handle)
            if cur is not None and cur.alive:
                return handle, str(handle.data["incoming_sock"])
        new = self.start(handle)
        with self.world.lock:
            self._must(handle.name).frozen = True
            _NEXT_PORT[0] += 1
            sock = f"fake-migrate-{_NEXT_PORT[0]}.sock"
            _LISTENING[sock] = (self.world, handle.name, peer)
        return Handle(self.name, handle.name, dict(new.data, incoming_sock=sock)), sock

    def migrate_out(self, handle: Handle, sock: str, target: str, downtime_ms: int,
                    timeout: float) -> MigrationStats:
        """The waiting copy takes over (its counters go on); this one stays paused."""
        self._enter("migrate_out", handle.name)
        with self.world.lock:
            p = self._require_alive(handle, "migrate")
            dest = _LISTENING.pop(sock, None)
            if dest is None:
                raise DriverError(f"nothing waits for {handle.name} at {sock}",
                                  hint="the destination is gone", retryable=True)
            world, name, _ = dest
            with world.lock:
                q = world.procs.get(name)
                if q is None or not q.alive:
                    raise DriverError(f"the destination of {handle.name} died",
                                      retryable=True)
                self._settle(p)
                p.frozen = True
                q.cpu_base_ns, q.rate_since, q.frozen = p.cpu_base_ns, world.clock(), False
                q.cpu_rate, q.memory_bytes = p.cpu_rate, p.memory_bytes
        return MigrationStats("completed", 10.0, 1.0, 1.0, p.memory_bytes, 0, 1)

    def migration_abort(self, handle: Handle) -> None:
        self._enter("migration_abort", handle.name)
        self.thaw(handle)

    def resumed(self, handle: Handle) -> bool | None:
        state = self.status(handle).state
        return None if state not in ("running", "frozen") else state == "running"
