"""Reading /proc: process identity, liveness and the cost of a whole process tree.

A pid alone does not name a process (pids are reused), so corral names one by ``(pid, start
time)``: field 22 of ``/proc/<pid>/stat``, in clock ticks since boot, never changes for a process
and differs for any later process that gets the same pid. Counting a tree's CPU without a cgroup
means summing every process of its session; :func:`scan` reads /proc once so that a sampler with
500 instances pays for one walk of /proc, not 500.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
CLOCK_TICKS: int = os.sysconf("SC_CLK_TCK")
PAGE_SIZE: int = os.sysconf("SC_PAGE_SIZE")
_NS_PER_TICK = 1_000_000_000 // CLOCK_TICKS


@dataclass(frozen=True)
class ProcStat:
    """The fields of ``/proc/<pid>/stat`` corral uses (times in clock ticks, rss in pages)."""

    pid: int
    comm: str
    state: str
    ppid: int
    pgrp: int
    session: int
    utime: int
    stime: int
    cutime: int
    cstime: int
    starttime: int
    rss_pages: int

    @property
    def alive(self) -> bool:
        """A zombie (Z) or dead (X) task has ended; only its parent's wait is missing."""
        return self.state not in ("Z", "X")

    @property
    def cpu_ticks(self) -> int:
        """Own CPU plus that of reaped children (whose time the kernel folds into the parent)."""
        return self.utime + self.stime + self.cutime + self.cstime


def parse_stat(text: str) -> ProcStat:
    """Parse one ``/proc/<pid>/stat`` line.

    ``comm`` may hold spaces and parentheses (a process may name itself ``a) b``), so it is taken
    between the first ``(`` and the *last* ``)``; the fields after it are split on spaces.
    """
    open_at = text.index("(")
    close_at = text.rindex(")")
    pid = int(text[:open_at].strip())
    comm = text[open_at + 1 : close_at]
    rest = text[close_at + 2 :].split()
    # rest[0] is field 3 (state); field N is rest[N - 3].
    if len(rest) < 22:
        raise ValueError(f"short /proc stat line for pid {pid}: {len(rest)} fields after comm")
    return ProcStat(
        pid=pid,
        comm=comm,
        state=rest[0],
        ppid=int(rest[1]),
        pgrp=int(rest[2]),
        session=int(rest[3]),
        utime=int(rest[11]),
        stime=int(rest[12]),
        cutime=int(rest[13]),
        cstime=int(rest[14]),
        starttime=int(rest[19]),
        rss_pages=int(rest[21]),
    )


def read_stat(pid: int, proc: Path = PROC) -> ProcStat | None:
    """The stat of ``pid``, or None when there is no such process (or it vanished mid-read)."""
    try:
        with open(proc / str(pid) / "stat") as f:
            return parse_stat(f.read())
    except (FileNotFoundError, ProcessLookupError, ValueError):
        return None


def identify(pid: int, starttime: int, proc: Path = PROC) -> ProcStat | None:
    """The stat of the process ``(pid, starttime)`` if that very process still exists (even as
    a zombie); None if it is gone or the pid now belongs to another process."""
    st = read_stat(pid, proc)
    if st is None or st.starttime != starttime:
        return None
    return st


def is_alive(pid: int, starttime: int, proc: Path = PROC) -> bool:
    st = identify(pid, starttime, proc)
    return st is not None and st.alive


def scan(proc: Path = PROC) -> list[ProcStat]:
    """Every process on the machine, from one walk of /proc (processes that exit mid-walk are
    skipped)."""
    out: list[ProcStat] = []
    try:
        names = os.listdir(proc)
    except OSError:
        return out
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(proc / name / "stat") as f:
                text = f.read()
        except OSError:
            continue
        try:
            out.append(parse_stat(text))
        except ValueError:
            continue
    return out


@dataclass(frozen=True)
class TreeUsage:
    cpu_ticks: int
    rss_pages: int
    pids: tuple[int, ...]

    @property
    def cpu_ns(self) -> int:
        return ticks_to_ns(self.cpu_ticks)

    @property
    def rss_bytes(self) -> int:
        return self.rss_pages * PAGE_SIZE


def usage_by_session(stats: Iterable[ProcStat]) -> dict[int, TreeUsage]:
    """CPU and resident memory summed per session id, for every session in ``stats``.

    A session is what ``setsid`` makes: every process an instance forks stays in it unless it
    calls setsid itself, so the session is the process tree without following ppid links (which
    break when a middle process exits and its children are re-parented).
    """
    ticks: dict[int, int] = {}
    rss: dict[int, int] = {}
    pids: dict[int, list[int]] = {}
    for st in stats:
        sid = st.session
        ticks[sid] = ticks.get(sid, 0) + st.cpu_ticks
        rss[sid] = rss.get(sid, 0) + st.rss_pages
        pids.setdefault(sid, []).append(st.pid)
    return {sid: TreeUsage(ticks[sid], rss[sid], tuple(pids[sid])) for sid in ticks}


def ticks_to_ns(ticks: int) -> int:
    return ticks * _NS_PER_TICK
