"""CPU accounting from cumulative counters: % of one core and % of the whole host.

A driver reports cumulative CPU nanoseconds per instance plus a ``generation`` that changes
whenever the counter starts again from zero (a new process, a new cgroup). The rate between two
readings is ``100 * dcpu / dwall`` (of one core) and that divided by the host's cores (of the
host). What makes this module worth its own file is the edges: a first reading, a restart, a
counter that went backwards or a clock that did not move all *rebaseline* and yield ``None`` --
never a spike, never a negative. The module is pure (no I/O) so it is tested exhaustively with
made-up sequences.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class _Reading:
    cpu_ns: int
    generation: str
    wall_ns: int


@dataclass(frozen=True)
class HostTotals:
    """Sums over instances that had a figure this round, and what is left of the host."""

    core_pct: float
    host_pct: float
    #: 100 minus ``host_pct``, never below zero (other processes are not counted).
    free_host_pct: float


class CpuAccountant:
    """Remembers the previous reading per instance name and turns the next one into rates."""

    def __init__(self, host_cores: int) -> None:
        if host_cores < 1:
            raise ValueError(f"host_cores must be at least 1, got {host_cores}")
        self.host_cores = host_cores
        self._last: dict[str, _Reading] = {}

    def update(
        self, name: str, cpu_ns: int, generation: str, wall_ns: int
    ) -> tuple[float | None, float | None]:
        """Record a reading; return (% of one core, % of the host) since the previous one.

        ``(None, None)`` when there is no usable previous reading: the first sample, a new
        generation, a counter that went backwards, or a wall clock that did not advance.
        A rate above what the host could possibly give (``cores * 100``) is clamped, since it
        can only come from timing jitter between reading the counter and the clock.
        """
        prev = self._last.get(name)
        now = _Reading(cpu_ns, generation, wall_ns)
        if (
            prev is None
            or prev.generation != generation
            or cpu_ns < prev.cpu_ns
            or wall_ns <= prev.wall_ns
            or cpu_ns < 0
        ):
            self._last[name] = now
            return None, None
        self._last[name] = now
        core_pct = 100.0 * (cpu_ns - prev.cpu_ns) / (wall_ns - prev.wall_ns)
        core_pct = min(core_pct, 100.0 * self.host_cores)
        return core_pct, core_pct / self.host_cores

    def forget(self, name: str) -> None:
        """Drop an instance (deleted, or no longer reported by its driver)."""
        self._last.pop(name, None)

    def forget_missing(self, present: Iterable[str]) -> None:
        """Drop every instance not in ``present`` so a later reading starts a new baseline."""
        keep = set(present)
        for name in [n for n in self._last if n not in keep]:
            del self._last[name]

    def known(self) -> set[str]:
        return set(self._last)

    def host_totals(self, core_pcts: Iterable[float | None]) -> HostTotals:
        """Sum one round's per-instance figures; ``None`` (no figure yet) counts as nothing."""
        core = sum(p for p in core_pcts if p is not None)
        host = core / self.host_cores
        return HostTotals(core_pct=core, host_pct=host, free_host_pct=max(0.0, 100.0 - host))


def parse_proc_stat(text: str) -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine from /proc/stat's first line.

    Idle and iowait count as not busy; steal counts as busy (the host did not get that time)."""
    fields = text.split("\n", 1)[0].split()
    if not fields or fields[0] != "cpu":
        raise ValueError("not a /proc/stat cpu line")
    values = [int(v) for v in fields[1:9]] + [0] * max(0, 8 - len(fields[1:9]))
    user, nice, system, idle, iowait, irq, softirq, steal = values[:8]
    busy = user + nice + system + irq + softirq + steal
    return busy, busy + idle + iowait


class HostCpu:
    """The whole host's busy % between two readings of /proc/stat (every process, corral's
    instances or not), so the server can show what the rest of the host uses."""

    def __init__(self, path: str = "/proc/stat") -> None:
        self.path = path
        self._prev: tuple[int, int] | None = None

    def update(self, text: str | None = None) -> float | None:
        if text is None:
            with open(self.path) as fh:
                text = fh.readline()
        busy, total = parse_proc_stat(text)
        prev, self._prev = self._prev, (busy, total)
        if prev is None or total <= prev[1] or busy < prev[0]:
            return None
        return 100.0 * (busy - prev[0]) / (total - prev[1])
