"""Migration and standbys in a real fleet (process driver, dir disks moved with rsync over the
agents' data channel): the data moves, the writer's file stays a clean prefix, failures leave
the source running and the target clean, and a promoted standby drops back to its last sync."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from diskkit import (
    clean_prefix,
    host_dirs,
    leftovers,
    op_of,
    running_copies,
    start_writer,
)
from fleetkit import CLI, Fleet, fleet_for

pytestmark = [pytest.mark.timeout(600),
              pytest.mark.skipif(shutil.which("rsync") is None, reason="needs rsync")]

FAILED_EXIT = 12


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    with fleet_for(tmp_path_factory.mktemp("migfleet"), "--hosts", "3") as f:
        yield f


def test_warm_migration_moves_the_disk_and_the_data(fleet: Fleet) -> None:
    f = fleet
    marker = start_writer(f, "mig1", "host1")
    before = f.instance("mig1")
    out = f.ok("migrate", "mig1", "--to", "host2")
    assert "succeeded" in out and "downtime" in out and "frozen" in out
    after = f.wait_state("mig1", {"running"})
    assert after["host"] == "host2" and after["epoch"] > before["epoch"]
    copies = running_copies(marker)
    assert [h for _, h in copies] == ["host2"], copies
    assert leftovers(f, "mig1", home="host2") == []
    op = op_of(f, "mig1")
    assert op["kind"] == "migrate" and op["state"] == "succeeded"
    assert op["data"]["bytes"] > 0 and op["data"]["downtime_ms"] > 0
    assert [p["mode"] for p in op["data"]["passes"]] == ["live", "frozen"]
    assert op["data"]["passes"][1]["full"] is False  # the frozen pass took the dirty list
    # the writer goes on where it was: one file, numbered without a gap
    log = host_dirs(f)["host2"] / "disks" / "mig1" / "data.log"
    n = clean_prefix(log)
    time.sleep(0.5)
    assert clean_prefix(log) > n
    # and back, cold this time
    f.ok("migrate", "mig1", "--to", "host1", "--cold")
    assert f.wait_state("mig1", {"running"})["host"] == "host1"
    assert [h for _, h in running_copies(marker)] == ["host1"]
    assert clean_prefix(host_dirs(f)["host1"] / "disks" / "mig1" / "data.log") > n
    assert leftovers(f, "mig1", home="host1") == []
    f.ok("rm", "--force", "mig1")
    assert leftovers(f, "mig1", home=None) == []


def test_refused_pre_migrate_hook_leaves_it_where_it_was(fleet: Fleet) -> None:
    f = fleet
    marker = start_writer(f, "mig2", "host1")
    assert f.ctx is not None and f.ctx.data_dir
    hook = Path(f.ctx.data_dir) / "server" / "hooks" / "pre-migrate"
    hook.parent.mkdir(parents=True, exist_ok=True)
    hook.write_text("#!/bin/sh\ncat >/dev/null\necho 'backup window: no moves now'\nexit 4\n")
    hook.chmod(0o755)
    try:
        proc = f.cli("migrate", "mig2", "--to", "host3")
    finally:
        hook.unlink()
    assert proc.returncode == FAILED_EXIT, proc.stdout + proc.stderr
    assert "backup window" in proc.stderr
    assert f.instance("mig2")["host"] == "host1"
    assert [h for _, h in running_copies(marker)] == ["host1"]
    assert leftovers(f, "mig2", home="host1") == []
    f.ok("rm", "--force", "mig2")


def test_refusals_say_why(fleet: Fleet) -> None:
    f = fleet
    start_writer(f, "mig3", "host1")
    proc = f.cli("migrate", "mig3", "--to", "host1")
    assert proc.returncode != 0 and "already runs on host1" in proc.stderr
    proc = f.cli("migrate", "mig3", "--to", "nosuch")
    assert proc.returncode != 0 and "nosuch" in proc.stderr
    proc = f.cli("standby", "add", "mig3", "--host", "host1")
    assert proc.returncode != 0 and "where it runs" in proc.stderr
    proc = f.cli("standby", "promote", "mig3")
    assert proc.returncode != 0 and "no standby" in proc.stderr
    f.ok("rm", "--force", "mig3")
    # an instance run from a host path has no disk of its own to move
    f.ok("run", "mig4", "--host", "host1", "--driver", "process", "--from", str(f.tmp), "--",
         "sleep", "600")
    proc = f.cli("migrate", "mig4", "--to", "host2")
    assert proc.returncode == 2 and "host path" in proc.stderr, proc.stderr  # refused: no op
    assert f.instance("mig4")["host"] == "host1"
    f.ok("rm", "--force", "mig4")


def test_standby_refresh_and_promotion(fleet: Fleet) -> None:
    f = fleet
    marker = start_writer(f, "sb1", "host1")
    out = f.ok("standby", "add", "sb1", "--host", "host3", "--every", "1h")
    assert "succeeded" in out
    (sb,) = [s for s in f.json("standby", "ls") if s["instance"] == "sb1"]
    assert sb["host"] == "host3" and sb["state"] == "ready" and sb["syncs"] == 1
    assert sb["last_freeze_ms"] is not None and sb["last_bytes"] > 0
    copy = host_dirs(f)["host3"] / "disks" / ".standby" / "sb1" / "data.log"
    synced = clean_prefix(copy)
    assert synced >= 50
    live = host_dirs(f)["host1"] / "disks" / "sb1" / "data.log"
    time.sleep(0.5)
    assert clean_prefix(live) > synced  # the standby lags: it is a copy, not a mirror
    assert clean_prefix(copy) == synced

    f.ok("standby", "sync", "sb1")
    assert clean_prefix(copy) > synced
    (sb,) = [s for s in f.json("standby", "ls") if s["instance"] == "sb1"]
    assert sb["syncs"] == 2 and sb["total_bytes"] > sb["last_bytes"]

    before = f.instance("sb1")
    out = f.ok("standby", "promote", "sb1")
    assert "downtime" in out
    after = f.wait_state("sb1", {"running"})
    assert after["host"] == "host3" and after["epoch"] > before["epoch"]
    assert [h for _, h in running_copies(marker)] == ["host3"]
    # the old primary's disk is the standby now
    (sb,) = [s for s in f.json("standby", "ls") if s["instance"] == "sb1"]
    assert sb["host"] == "host1" and sb["state"] == "ready"
    assert leftovers(f, "sb1", home="host3", standby="host1") == []
    clean_prefix(host_dirs(f)["host1"] / "disks" / ".standby" / "sb1" / "data.log")
    f.ok("standby", "sync", "sb1")  # the next refresh goes the other way

    f.ok("rm", "--force", "sb1")
    assert f.json("standby", "ls") == [] or all(s["instance"] != "sb1"
                                                for s in f.json("standby", "ls"))
    assert leftovers(f, "sb1", home=None) == []


def test_standby_refreshes_on_its_own(fleet: Fleet) -> None:
    f = fleet
    start_writer(f, "sb2", "host2")
    f.ok("standby", "add", "sb2", "--host", "host1", "--every", "1s")
    deadline = time.monotonic() + 30
    syncs = 1
    while syncs < 3:
        assert time.monotonic() < deadline, "the standby was not refreshed on schedule"
        time.sleep(0.5)
        (sb,) = [s for s in f.json("standby", "ls") if s["instance"] == "sb2"]
        syncs = sb["syncs"]
    f.ok("standby", "rm", "sb2")
    assert not (host_dirs(f)["host1"] / "disks" / ".standby" / "sb2").exists()
    f.ok("rm", "--force", "sb2")


@pytest.mark.root
@pytest.mark.skipif(shutil.which("mount") is None, reason="needs mount")
def test_target_out_of_disk_rolls_back(fleet: Fleet) -> None:
    import os

    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    f = fleet
    marker = start_writer(f, "big", "host1")
    blob = host_dirs(f)["host1"] / "disks" / "big" / "blob"
    blob.write_bytes(os.urandom(4 * 1024 * 1024))
    incoming = host_dirs(f)["host2"] / "disks" / ".incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "corral-test-full", str(incoming)],
                   check=True)
    try:
        proc = f.cli("migrate", "big", "--to", "host2")
    finally:
        subprocess.run(["umount", "-l", str(incoming)], check=False)
    assert proc.returncode == FAILED_EXIT, proc.stdout + proc.stderr
    assert "No space left" in proc.stderr or "space" in proc.stderr.lower(), proc.stderr
    assert f.instance("big")["host"] == "host1"
    assert [h for _, h in running_copies(marker)] == ["host1"]
    assert leftovers(f, "big", home="host1") == []
    f.ok("rm", "--force", "big")


def test_a_verb_waits_for_a_background_refresh(fleet: Fleet) -> None:
    """A refresh holds the instance for a moment; an operator's stop waits for it to end
    instead of failing with 'busy'."""
    import httpx

    f = fleet
    start_writer(f, "sb3", "host1")
    f.ok("standby", "add", "sb3", "--host", "host2", "--every", "1h")
    assert f.ctx is not None and f.ctx.data_dir
    drills = Path(f.ctx.data_dir) / "server" / "drills"
    drills.mkdir(parents=True, exist_ok=True)
    flag = drills / "standby-sync.copy.before"
    reached = drills / "standby-sync.copy.before.reached"
    reached.unlink(missing_ok=True)
    flag.write_text("")
    try:
        with httpx.Client(base_url=f.ctx.url, timeout=30, verify=f.ctx.ca_file or True,
                          headers={"Authorization": f"Bearer {f.ctx.token}"}) as c:
            assert c.post("/v1/instances/sb3/standby/sync").status_code == 202
        deadline = time.monotonic() + 30
        while not reached.exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        stop = subprocess.Popen([*CLI, "stop", "sb3"], env=f.env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(1.0)
        assert stop.poll() is None  # waiting, not refused
    finally:
        flag.unlink(missing_ok=True)
    _, err = stop.communicate(timeout=60)
    assert stop.returncode == 0, err
    assert f.instance("sb3")["state"] == "stopped"
    f.ok("rm", "sb3")


def test_failover_brings_back_the_last_sync(fleet: Fleet) -> None:
    """host3 dies (agent and workload killed): after its lease the instance runs on its
    standby's host from the last refresh, the file a clean prefix that then grows; when host3
    comes back its stale copy is removed. (Last in this module: it kills a host.)"""
    import os
    import signal

    from diskkit import kill_agent, revive

    f = fleet
    marker = start_writer(f, "fo1", "host3")
    f.ok("standby", "add", "fo1", "--host", "host1", "--every", "1h")
    synced = clean_prefix(host_dirs(f)["host1"] / "disks" / ".standby" / "fo1" / "data.log")
    before = f.instance("fo1")
    kill_agent(f, "host3")
    for pid, _ in running_copies(marker):
        os.kill(pid, signal.SIGKILL)
    try:
        deadline = time.monotonic() + 60
        while (v := f.instance("fo1"))["host"] != "host1" or v["state"] != "running":
            assert time.monotonic() < deadline, f"no failover: {v}\n{f.logs(30)}"
            time.sleep(0.3)
        assert v["epoch"] > before["epoch"]
        assert [h for _, h in running_copies(marker)] == ["host1"]
        log = host_dirs(f)["host1"] / "disks" / "fo1" / "data.log"
        n = clean_prefix(log)
        assert n >= synced  # it dropped back to the last sync, then went on
        time.sleep(0.5)
        assert clean_prefix(log) > n
        op = op_of(f, "fo1")
        assert op["kind"] == "failover" and op["state"] == "succeeded"
    finally:
        revive(f, "host3")
    deadline = time.monotonic() + 30
    while (host_dirs(f)["host3"] / "disks" / "fo1").exists():
        assert time.monotonic() < deadline, "the stale copy stayed on host3"
        time.sleep(0.3)
    assert [h for _, h in running_copies(marker)] == ["host1"]
    # its disk may hold writes after the last sync: kept aside, not deleted
    (kept,) = list((host_dirs(f)["host3"] / "disks" / ".orphaned").glob("fo1.*"))
    assert clean_prefix(kept / "data.log") >= synced
    f.ok("rm", "--force", "fo1")
