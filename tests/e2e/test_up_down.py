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


def test_up_with_postgres_keeps_its_password_private_and_down_stops_it(
        fresh_fleet_dir: Fleet) -> None:
    """``up --postgres``: the fleet's database in a PostgreSQL the rig starts (as the postgres
    user when root), password authentication with a password that is in no process's argv,
    the same API on it; ``down`` stops PostgreSQL too. A second ``up`` on the same data finds
    its database again."""
    import shutil
    import tempfile
    from pathlib import Path

    from corral.rig.postgres import bin_dir

    try:
        bin_dir()
    except Exception as exc:
        pytest.skip(str(exc))
    f = fresh_fleet_dir
    # PostgreSQL (not root) must reach its directory: not under pytest's 0700 tmp
    top = Path(tempfile.mkdtemp(prefix="corral-uppg-"))
    os.chmod(top, 0o711)
    try:
        data = top / "data"
        f.ok("up", "--hosts", "1", "--postgres", "--data", str(data), timeout=300)
        ctx = load_context(f.context_file)
        assert ctx is not None and ctx.postgres is not None and procs.alive(ctx.postgres)
        status = f.json("status")
        assert status["status"]["db"].startswith("postgresql+psycopg://corral:***@127.0.0.1:")
        password = (data / "postgres" / "password").read_text().strip()
        assert len(password) >= 24 and (data / "postgres" / "password").stat().st_mode & 0o077 == 0
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    argv = Path(f"/proc/{pid}/cmdline").read_bytes()
                except OSError:
                    continue
                assert password.encode() not in argv, f"the password is in pid {pid}'s argv"
        f.ok("run", "kept", "--", "sleep", "600")
        f.ok("down", "--timeout", "5")
        assert not procs.alive(ctx.postgres)
        f.ok("up", "--hosts", "1", "--postgres", "--data", str(data), timeout=300)
        assert "kept" in {i["name"] for i in f.json("ls")}
        f.ok("down", "--timeout", "5")
    finally:
        shutil.rmtree(top, ignore_errors=True)


def test_several_servers_need_postgres(fresh_fleet_dir: Fleet) -> None:
    proc = fresh_fleet_dir.cli("up", "--servers", "3", "--data",
                               str(fresh_fleet_dir.tmp / "d"))
    assert proc.returncode != 0
    assert "--postgres" in proc.stderr and "hint: " in proc.stderr
    assert not (fresh_fleet_dir.tmp / "d").exists()
