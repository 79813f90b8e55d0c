"""Zombies: an instance is gone only when every one of its processes has been reaped.

A killed process lingers as a zombie until its parent waits for it, and a zombie still owns its
pid: ``kill(pid, 0)`` succeeds, so PostgreSQL, reading ``postmaster.pid`` on a disk that was just
migrated, refuses to start ("Is another postmaster (PID N) running"). When an instance's leader
dies first, its children are orphaned and re-parented to the nearest *child subreaper*, else to
PID 1, which may reap late (seen here: 1.3 to 1.7 s). So the agent makes itself a subreaper: it
adopts every orphan of its instances and reaps them at once.

Being a subreaper makes the agent responsible for those orphans, and only for those. A child
that someone will ``wait`` for itself (a ``subprocess.Popen`` the drivers keep: an instance's
leader, a runc shim) is registered with :func:`owned` when it is started and left alone;
children in the agent's own session (rsync, btrfs, runc verbs, run by ``subprocess`` or asyncio,
which wait for them by pid) are left alone too. Every other zombie child is an adopted orphan of
an instance, and :func:`reap_orphans` collects it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from collections.abc import Callable, Iterator

from corral.drivers import procfs

_PR_SET_CHILD_SUBREAPER = 36
_lock = threading.Lock()
#: pids of children whose own Popen (or the like) waits for them
_waited: set[int] = set()


def set_subreaper(on: bool = True) -> bool:
    """Mark (or unmark) this process a child subreaper; False where the kernel refuses."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1 if on else 0, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


@contextlib.contextmanager
def owned() -> Iterator[Callable[[int], None]]:
    """Start a child that its Popen will wait for inside this block and register its pid with
    the function it yields; the lock keeps :func:`reap_orphans` from taking it in between."""
    with _lock:
        yield _waited.add


def release(pid: int) -> None:
    """The child ``pid`` was waited for by its owner (or will never be)."""
    with _lock:
        _waited.discard(pid)


def reap_orphans(stats: list[procfs.ProcStat] | None = None) -> list[int]:
    """Reap every zombie child of this process that nobody else waits for; the pids reaped.

    ``stats`` is a scan of /proc the caller already made (one walk serves both)."""
    me, my_sid = os.getpid(), os.getsid(0)
    procs = procfs.scan() if stats is None else stats
    reaped: list[int] = []
    with _lock:
        for seen in procs:
            if not _stray(seen, me, my_sid):
                continue
            now = procfs.read_stat(seen.pid)  # the scan may be stale: the pid may be reused
            if now is None or not _stray(now, me, my_sid):
                continue
            with contextlib.suppress(ChildProcessError):
                done, _ = os.waitpid(now.pid, os.WNOHANG)
                if done:
                    reaped.append(done)
    return reaped


def _stray(st: procfs.ProcStat, me: int, my_sid: int) -> bool:
    return st.ppid == me and not st.alive and st.session != my_sid and st.pid not in _waited
