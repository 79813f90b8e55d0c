"""Fault injection: kill -9 the source agent, the target agent or the server at every step of a
migration and of a standby refresh, then show that the instance runs on exactly one host, that
no half-copied disk is left anywhere, that the writer's file is a clean prefix, and that the next
operation on the instance works.

Each case pauses the operation at its step with the engine's fire-drill flag
(``DATA/drills/<kind>.<step>.<before|after>``): agents are killed *before* the step (its calls
then meet a dead agent, and its undos meet one that is coming back), the server *after* the
step's work and before it was recorded (the hardest case for a resume).
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from diskkit import (
    clean_prefix,
    host_dirs,
    kill_agent,
    leftovers,
    revive,
    running_copies,
    start_writer,
    wait_host_up,
)
from fleetkit import Fleet, fleet_for
from test_ops_e2e import restart_server

from corral.rig.context import load_context

pytestmark = [pytest.mark.timeout(900),
              pytest.mark.skipif(shutil.which("rsync") is None, reason="needs rsync")]

MIGRATE_STEPS = ["prepare", "copy", "freeze-copy", "stop", "adopt", "create", "start", "cleanup"]
SYNC_STEPS = ["prepare", "copy", "freeze-copy", "commit"]
VICTIMS = ["source", "target", "server"]
SOURCE, TARGET, OTHER = "host1", "host2", "host3"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    with fleet_for(tmp_path_factory.mktemp("faultfleet"), "--hosts", "3") as f:
        yield f


def _api(f: Fleet) -> httpx.Client:
    assert f.ctx is not None
    return httpx.Client(base_url=f.ctx.url, verify=f.ctx.ca_file or True,
                        headers={"Authorization": f"Bearer {f.ctx.token}"},
                        timeout=30)


def _drills(f: Fleet) -> Path:
    assert f.ctx is not None and f.ctx.data_dir
    d = Path(f.ctx.data_dir) / "server" / "drills"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _wait_finished(f: Fleet, op_id: str, timeout: float = 120) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while True:
        proc = f.cli("ops", "show", op_id, "--json")
        if proc.returncode == 0:
            import json

            op = dict(json.loads(proc.stdout))
            if op["finished"]:
                return op
        assert time.monotonic() < deadline, f"operation {op_id} did not finish\n{f.logs(30)}"
        time.sleep(0.3)


def _inject(f: Fleet, kind: str, step: str, victim: str, start: str) -> dict[str, object]:
    """Pause ``kind`` at ``step``, kill ``victim`` there, let it go on, bring the victim back;
    the finished operation."""
    when = "after" if victim == "server" else "before"
    flag = _drills(f) / f"{kind}.{step}.{when}"
    reached = flag.with_name(flag.name + ".reached")
    reached.unlink(missing_ok=True)
    flag.write_text("")
    try:
        with _api(f) as c:
            resp = c.post(start, json={"to": TARGET} if kind == "migrate" else None)
            assert resp.status_code == 202, resp.text
            op_id = str(resp.json()["id"])
        deadline = time.monotonic() + 60
        while not reached.exists():
            assert time.monotonic() < deadline, f"{kind} never reached {step}\n{f.logs(30)}"
            time.sleep(0.05)
        if victim == "server":
            ctx = load_context(f.context_file)
            assert ctx is not None and ctx.server is not None
            os.kill(ctx.server.pid, signal.SIGKILL)
            flag.unlink()
            restart_server(f)
        else:
            host = SOURCE if victim == "source" else TARGET
            kill_agent(f, host)
            flag.unlink()
            time.sleep(0.3)  # the step (or its undo) meets the dead agent
            revive(f, host)
    finally:
        flag.unlink(missing_ok=True)
    for h in (SOURCE, TARGET):
        wait_host_up(f, h)
    return _wait_finished(f, op_id)


def _check(f: Fleet, name: str, marker: str, standby: str | None = None) -> str:
    """Exactly one running copy, where the record says; nothing half-copied; clean data."""
    inst = f.wait_state(name, {"running"})
    home = str(inst["host"])
    deadline = time.monotonic() + 10
    while [h for _, h in running_copies(marker)] != [home]:
        assert time.monotonic() < deadline, f"copies {running_copies(marker)}, record {home}"
        time.sleep(0.2)
    assert leftovers(f, name, home=home, standby=standby) == []
    clean_prefix(host_dirs(f)[home] / "disks" / name / "data.log")
    return home


@pytest.mark.parametrize("victim", VICTIMS)
@pytest.mark.parametrize("step", MIGRATE_STEPS)
def test_kill_during_migration(fleet: Fleet, step: str, victim: str) -> None:
    f = fleet
    name = f"m{MIGRATE_STEPS.index(step)}{victim[:2]}"
    marker = start_writer(f, name, SOURCE, records=20)
    op = _inject(f, "migrate", step, victim, f"/v1/instances/{name}/migrate")
    assert op["state"] in ("rolled_back", "succeeded"), op
    home = _check(f, name, marker)
    assert home == (TARGET if op["state"] == "succeeded" else SOURCE), op
    # the next operation on it works
    f.ok("migrate", name, "--to", OTHER)
    _check(f, name, marker)
    f.ok("rm", "--force", name)


@pytest.mark.parametrize("victim", VICTIMS)
@pytest.mark.parametrize("step", SYNC_STEPS)
def test_kill_during_standby_refresh(fleet: Fleet, step: str, victim: str) -> None:
    f = fleet
    name = f"s{SYNC_STEPS.index(step)}{victim[:2]}"
    marker = start_writer(f, name, SOURCE, records=20)
    f.ok("standby", "add", name, "--host", TARGET, "--every", "1h")
    copy = host_dirs(f)[TARGET] / "disks" / ".standby" / name / "data.log"
    first = clean_prefix(copy)
    op = _inject(f, "standby-sync", step, victim, f"/v1/instances/{name}/standby/sync")
    assert op["state"] in ("rolled_back", "succeeded"), op
    assert _check(f, name, marker, standby=TARGET) == SOURCE
    (sb,) = [s for s in f.json("standby", "ls") if s["instance"] == name]
    assert sb["state"] == ("ready" if op["state"] == "succeeded" else "stale"), sb
    # the copy kept every file whole: a clean prefix, at least as long as the first sync's
    assert clean_prefix(copy) >= first
    # the next refresh works and the copy catches up
    f.ok("standby", "sync", name)
    (sb,) = [s for s in f.json("standby", "ls") if s["instance"] == name]
    assert sb["state"] == "ready" and clean_prefix(copy) > first
    f.ok("rm", "--force", name)
    assert leftovers(f, name, home=None) == []
