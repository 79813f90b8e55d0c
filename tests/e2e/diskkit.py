"""Helpers for tests that move disks: a writer of numbered, checksummed, fsynced records, the
check that a copy of its file is a clean prefix, and where (on which host) a copy runs or lies.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import time
import uuid
from pathlib import Path
from typing import Any

from fleetkit import Fleet, restart_agent

from corral.rig.context import load_context

WRITER = """\
import hashlib, os, sys, time
f = os.open("data.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
try:
    i = len(open("data.log").read().splitlines())
except OSError:
    i = 0
while True:  # MARK
    i += 1
    os.write(f, f"{i} {hashlib.sha256(str(i).encode()).hexdigest()[:16]}\\n".encode())
    os.fsync(f)
    time.sleep(0.01)
"""


def writer_cmd(tmp: Path, marker: str) -> list[str]:
    script = tmp / f"writer-{marker}.py"
    script.write_text(WRITER.replace("MARK", marker))
    return ["python3", str(script)]


def record(i: int) -> str:
    return f"{i} {hashlib.sha256(str(i).encode()).hexdigest()[:16]}"


def clean_prefix(path: Path) -> int:
    """How many records ``path`` holds; fails on a torn, missing or wrong record before the
    last line (the last may be half-written only if the writer died mid-write)."""
    lines = path.read_text().split("\n")
    tail = lines.pop()  # "" when the file ends with a newline
    for k, line in enumerate(lines, 1):
        assert line == record(k), f"{path}: record {k} is {line!r}"
    assert tail == "" or record(len(lines) + 1).startswith(tail), f"torn tail {tail!r}"
    return len(lines)


def host_dirs(f: Fleet) -> dict[str, Path]:
    assert f.ctx is not None and f.ctx.data_dir
    root = Path(f.ctx.data_dir) / "hosts"
    return {d.name: d for d in sorted(root.iterdir()) if d.is_dir()}


def running_copies(marker: str) -> list[tuple[int, str]]:
    """(pid, host) of every live writer with ``marker``; the host comes from its cwd (its
    disk, ``…/hosts/<host>/disks/<name>`` or ``DISK_ROOT/<host>/<name>``)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            raw = (d / "cmdline").read_bytes()
            if marker.encode() not in raw or b"python" not in raw.split(b"\0")[0]:
                continue
            if (d / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            cwd = os.readlink(d / "cwd")
            hosts = [p for p in Path(cwd).parts if re.fullmatch(r"host\d+", p)]
            host = hosts[-1] if hosts else "?"
            out.append((int(d.name), host))
    return out


def leftovers(f: Fleet, name: str, home: str | None, standby: str | None = None) -> list[str]:
    """Copies of ``name``'s disk that should not exist: any in-flight slot, a live disk on a
    host other than ``home``, a standby copy anywhere but ``standby``."""
    bad = []
    for host, d in host_dirs(f).items():
        disks = d / "disks"
        for p in (disks / ".incoming" / name, disks / ".new" / name):
            if p.exists():
                bad.append(str(p))
        if (disks / name).exists() and host != home:
            bad.append(str(disks / name))
        if (disks / ".standby" / name).exists() and host != standby:
            bad.append(str(disks / ".standby" / name))
    return bad


def kill_agent(f: Fleet, host: str) -> None:
    ctx = load_context(f.context_file)
    assert ctx is not None
    agent = next(a for a in ctx.agents if a.name == host)
    os.kill(agent.pid, signal.SIGKILL)


def wait_host_up(f: Fleet, host: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while {h["name"]: h["state"] for h in f.json("host", "ls")}.get(host) != "up":
        assert time.monotonic() < deadline, f"{host} did not re-join"
        time.sleep(0.2)


def revive(f: Fleet, host: str) -> None:
    restart_agent(f, host)
    wait_host_up(f, host)


def op_of(f: Fleet, name: str) -> dict[str, Any]:
    return dict(f.json("ops", "ls", "--target", name)[0])


def start_writer(f: Fleet, name: str, host: str, records: int = 50) -> str:
    """Run the writer as ``name`` on ``host`` and wait for ``records`` records in its disk;
    returns its marker (to find its processes)."""
    marker = f"{name}-{uuid.uuid4().hex[:8]}"
    f.ok("run", name, "--host", host, "--cpus", "0.05", "--memory", "32M", "--",
         *writer_cmd(f.tmp, marker))
    f.wait_state(name, {"running"})
    log = host_dirs(f)[host] / "disks" / name / "data.log"
    deadline = time.monotonic() + 20
    while not log.exists() or clean_prefix(log) < records:
        assert time.monotonic() < deadline, "the writer did not write"
        time.sleep(0.05)
    return marker
