"""``corral down`` ends every instance it started, even one whose agent was killed with -9: from
the handles that agent persisted, through the driver it used, so the workload's processes and
its cgroups are gone afterwards, and down says what it had to end."""

from __future__ import annotations

import contextlib
import os
import signal
import time
import uuid
from pathlib import Path

import pytest
from fleetkit import Fleet

from corral.rig import procs
from corral.rig.context import load_context

pytestmark = pytest.mark.timeout(600)


def session_of(leader: int) -> list[tuple[int, int]]:
    """(pid, start time) of every live process in ``leader``'s session."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) == leader and fields[0] != "Z":
                out.append((int(d.name), int(fields[19])))
    return out


def alive(pid: int, start: int) -> bool:
    """The very process (same start time), and not a zombie."""
    return procs.start_time(pid) == start and not procs.is_zombie(pid)


def cgroup_dirs(pid: int) -> list[Path]:
    """The instance's cgroup directories (``…/corral/…``) in every hierarchy ``pid`` is in."""
    mounts: list[tuple[str, set[str], Path]] = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, right = line.split(" - ", 1)
        fstype, _, opts = right.split()[:3]
        if fstype in ("cgroup", "cgroup2"):
            mounts.append((fstype, set(opts.split(",")), Path(left.split()[4])))
    dirs = []
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, ctrls, rel = line.split(":", 2)
        if "/corral/" not in rel:
            continue
        want = set(ctrls.split(",")) if ctrls else set()
        for fstype, opts, where in mounts:
            if (fstype == "cgroup2" and not ctrls) or (fstype == "cgroup" and want and
                                                       want <= opts):
                dirs.append(where / rel.lstrip("/"))
    return dirs


def test_down_ends_the_instances_of_a_dead_agent(fresh_fleet_dir: Fleet) -> None:
    f = fresh_fleet_dir
    f.up("--hosts", "1")
    name = f"orphan-{uuid.uuid4().hex[:6]}"
    f.ok("run", name, "--", "sh", "-c", "sleep 600 & sleep 600 & wait")
    leader = int(f.wait_state(name, {"running"})["pid"])
    deadline = time.monotonic() + 20
    while len(tree := session_of(leader)) < 3:  # the shell and its two sleeps
        assert time.monotonic() < deadline, tree
        time.sleep(0.1)
    cgroups = [d for d in cgroup_dirs(leader) if d.is_dir()]
    if os.geteuid() == 0:  # the process driver gives each instance a cgroup when root
        assert cgroups, Path(f"/proc/{leader}/cgroup").read_text()
    ctx = load_context(f.context_file)
    assert ctx is not None
    (agent,) = ctx.agents
    try:
        os.kill(agent.pid, signal.SIGKILL)
        while procs.alive(agent):
            procs.reap(agent.pid)
            time.sleep(0.05)
        assert all(alive(*p) for p in tree)  # the workload outlives its agent

        out = f.ok("down", "--timeout", "5")
        left = [p for p in tree if alive(*p)]
        assert not left, f"still running after down: {left}\n{out}"
        assert not [d for d in cgroups if d.exists()], out
        assert f"ended {name} on host1" in out and "its agent had died" in out, out
    finally:  # whatever down did, nothing of the workload outlives the test
        for pid, start in tree:
            if alive(pid, start):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for d in cgroups:
            for _ in range(50):
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.1)
