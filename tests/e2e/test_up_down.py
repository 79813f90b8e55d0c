"""``corral up --tour`` and ``corral down`` on fleets of their own."""

from __future__ import annotations

import os

import pytest
from fleetkit import Fleet

from corral.rig import procs
from corral.rig.context import load_context

pytestmark = pytest.mark.timeout(600)


def test_tour_then_down_leaves_nothing(fresh_fleet_dir: Fleet) -> None:
    f = fresh_fleet_dir
    proc = f.cli("up", "--hosts", "2", "--data", str(f.tmp / "data"), "--tour", timeout=300)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}\n{f.logs()}"
    out = proc.stdout
    for expected in ("fleet up", "tour-burner", "CPU%host", "error: cannot thaw",
                     "corral top", "corral down"):
        assert expected in out, f"{expected!r} missing from the tour:\n{out}"
    assert not [i for i in f.json("ls") if i["name"].startswith("tour-")]

    # an instance left running is stopped by down: no workload is orphaned
    f.ok("run", "leftover", "--", "sleep", "600")
    pid = f.instance("leftover")["pid"]
    ctx = load_context(f.context_file)
    assert ctx is not None and ctx.server is not None
    f.ok("down", "--timeout", "5")
    assert not f.context_file.exists()
    assert not procs.alive(ctx.server)
    assert not any(procs.alive(a) for a in ctx.agents)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    again = f.cli("down")
    assert again.returncode == 1 and "no fleet to stop" in again.stderr
    gone = f.cli("ls")
    assert gone.returncode == 1 and "corral up" in gone.stderr


def test_netns_needs_root(fresh_fleet_dir: Fleet) -> None:
    if os.geteuid() == 0:
        pytest.skip("checks the refusal seen by an unprivileged user")
    proc = fresh_fleet_dir.cli("up", "--netns", "--data", str(fresh_fleet_dir.tmp / "d"))
    assert proc.returncode == 10
    assert "--netns needs root" in proc.stderr
