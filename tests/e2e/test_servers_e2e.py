"""``corral up --servers 3 --postgres``: three servers, each with a node of one NATS cluster,
sharing the rig's PostgreSQL, with real agents; the leader killed with -9 in the middle of a
migration.

What must hold: ``status`` names the leader, the three servers and the three bus nodes; after
the kill another server leads, the CLI (given every server's URL) gets its mutating call
through, the migration the dead leader held ends succeeded or rolled back, exactly one copy of
the instance runs (the other's process is gone), no host was failed over, and ``down`` leaves
nothing running.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fleetkit import Fleet, fleet_for

from corral.rig import procs
from corral.rig.context import ProcInfo, load_context

pytestmark = pytest.mark.timeout(900)

#: web's command is ``sleep WEB_SLEEP``: its copies are the processes running exactly that
WEB_SLEEP = "907"


def _copies() -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv[:2] == [b"sleep", WEB_SLEEP.encode()] and not _zombie(entry):
                out.append(int(entry.name))
    return sorted(out)


def _zombie(entry: Path) -> bool:
    try:
        return (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


@pytest.fixture
def trio(tmp_path: Path) -> Iterator[Fleet]:
    from corral.rig.postgres import bin_dir

    try:
        bin_dir()
    except Exception as exc:
        pytest.skip(str(exc))
    # PostgreSQL (not root) must reach its directory: not under pytest's 0700 tmp
    top = Path(tempfile.mkdtemp(prefix="corral-trio-"))
    os.chmod(top, 0o711)
    try:
        with fleet_for(tmp_path) as f:
            f.ok("up", "--hosts", "2", "--servers", "3", "--postgres", "--data",
                 str(top / "data"), timeout=420)
            f.ctx = load_context(f.context_file)
            yield f
    finally:
        shutil.rmtree(top, ignore_errors=True)


def _servers(f: Fleet) -> list[ProcInfo]:
    assert f.ctx is not None and f.ctx.server is not None
    return [f.ctx.server, *f.ctx.servers]


def _api_port(p: ProcInfo) -> str:
    return p.argv[p.argv.index("--api-port") + 1]


def _leader(f: Fleet) -> tuple[ProcInfo, dict[str, Any]]:
    status = f.json("status")["status"]
    lead = status.get("leader")
    assert lead, f"no leader in {status}"
    port = lead["api_url"].rsplit(":", 1)[1]
    return next(p for p in _servers(f) if _api_port(p) == port), status


def _data_of(p: ProcInfo) -> Path:
    return Path(p.argv[p.argv.index("--data") + 1])


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_the_leader_killed_mid_migration_is_replaced_and_one_copy_runs(trio: Fleet) -> None:
    f = trio
    leader, status = _leader(f)
    assert len(status["servers"]) == 3 and sum(s["leader"] for s in status["servers"]) == 1
    assert len(status["nats"]) == 3, status["nats"]
    assert status["db"].startswith("postgresql")
    shown = f.ok("status")
    assert "leader" in shown and status["leader"]["id"] in shown

    f.ok("run", "web", "--host", "host1", "--", "sleep", WEB_SLEEP)
    old_pid = f.wait_state("web", {"running"})["pid"]

    # the leader is held just before the migration's copy on host2 starts, then killed
    drills = _data_of(leader) / "drills"
    drills.mkdir(exist_ok=True)
    flag = drills / "migrate.create.before"
    flag.write_text("")
    migrate = subprocess.Popen([*_cli(), "migrate", "web", "--to", "host2", "--json"],
                               env=f.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        deadline = time.monotonic() + 120
        reached = flag.with_name(flag.name + ".reached")
        while not reached.exists():
            assert migrate.poll() is None, migrate.communicate()
            assert time.monotonic() < deadline, f"the drill was not reached\n{f.logs()}"
            time.sleep(0.1)
        op_id = reached.read_text().strip()
        os.kill(leader.pid, signal.SIGKILL)
        t0 = time.monotonic()
        migrate.wait(300)
    finally:
        if migrate.poll() is None:
            migrate.kill()
            migrate.wait(10)
    assert not procs.alive(leader)

    # a mutating call through the CLI reaches the new leader (the client passes over the dead)
    f.ok("run", "probe", "--host", "host2", "--", "sleep", "900", timeout=120)
    took = time.monotonic() - t0
    new, status = _leader(f)
    assert new.pid != leader.pid

    deadline = time.monotonic() + 120
    op = f.json("ops", "show", op_id)
    while not op["finished"] and time.monotonic() < deadline:
        time.sleep(0.5)
        op = f.json("ops", "show", op_id)
    assert op["state"] in ("succeeded", "rolled_back"), op
    web = f.wait_state("web", {"running"}, timeout=120)
    assert web["host"] in ("host1", "host2")
    # exactly one copy: the one the record names (a rollback restarted it where it was)
    deadline = time.monotonic() + 30
    while _copies() != [web["pid"]] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _copies() == [web["pid"]], f"copies {_copies()}, the record says {web['pid']}"
    if web["host"] == "host2":
        assert not _alive(old_pid)
    assert _alive(web["pid"])
    hosts = {h["name"]: h["state"] for h in f.json("host", "ls")}
    assert hosts == {"host1": "up", "host2": "up"}, hosts
    events = f.ok("events", "--type", "host", "--json")
    assert "host.joined" in events and "host.down" not in events
    print(f"\nnew leader accepted a write {took:.2f}s after the kill")

    # down ends everything, the killed server's NATS node included
    ctx = load_context(f.context_file)
    assert ctx is not None
    f.ok("down", "--timeout", "5", timeout=180)
    for p in [*_servers(f), *ctx.agents, *([ctx.postgres] if ctx.postgres else [])]:
        assert not procs.alive(p), f"{p.name} still runs"
    assert not _alive(web["pid"])


def _cli() -> list[str]:
    import sys
    return [sys.executable, "-m", "corral.cli"]
