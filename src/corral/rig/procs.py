"""Detached child processes for ``corral up``: start them, recognise them later, stop them.

A fleet outlives the ``corral up`` command that made it, so processes are started in their own
session with output to a log file, and remembered by pid *and* start time: a pid alone could be
reused by an unrelated process by the time ``corral down`` runs, and we must never signal that.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from corral.rig.context import ProcInfo


def corral_argv(*args: str) -> list[str]:
    """argv that runs this very corral (same interpreter, same install), whatever PATH says."""
    return [sys.executable, "-m", "corral.cli", *args]


def start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (field 22 of /proc/PID/stat)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name may hold spaces and parentheses: split after the last ')'
    fields = raw.rsplit(")", 1)[1].split()
    return int(fields[19])


def is_zombie(pid: int) -> bool:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return raw.rsplit(")", 1)[1].split()[0] == "Z"


def alive(info: ProcInfo) -> bool:
    """True when the very process we started still runs (same pid, same start time)."""
    return start_time(info.pid) == info.start and not is_zombie(info.pid)


def spawn(
    name: str,
    argv: Sequence[str],
    log: Path,
    *,
    env: Mapping[str, str] | None = None,
    netns: str | None = None,
    address: str | None = None,
    user: str | None = None,
) -> ProcInfo:
    """Start ``argv`` detached (new session, stdin closed, output appended to ``log``), as
    ``user`` when given (root only: PostgreSQL refuses to run as root)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    # 0600: a log may sit in a directory others can traverse (see rig/perms.py)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "ab") as out:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=dict(env) if env is not None else None,
            close_fds=True,
            user=user,
            group=user,
            extra_groups=[] if user else None,
        )
    started = None
    for _ in range(100):
        started = start_time(proc.pid)
        if started is not None:
            break
        time.sleep(0.01)
    return ProcInfo(
        name=name,
        pid=proc.pid,
        start=started or 0,
        argv=list(argv),
        log=str(log),
        netns=netns,
        address=address,
    )


def reap(pid: int) -> None:
    """Collect our own dead children so they do not linger as zombies (no-op for others)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def stop(info: ProcInfo, timeout: float = 10.0, sig: int = signal.SIGTERM) -> bool:
    """``sig`` (SIGTERM), wait up to ``timeout``, then SIGKILL. True when it had to be killed."""
    if not alive(info):
        return False
    try:
        os.kill(info.pid, sig)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reap(info.pid)
        if not alive(info):
            return False
        time.sleep(0.1)
    try:
        os.kill(info.pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    for _ in range(50):
        reap(info.pid)
        if not alive(info):
            break
        time.sleep(0.1)
    return True


def tail(path: str | Path, lines: int = 15) -> str:
    """The end of a log file, for error messages that say why a process did not come up."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])
