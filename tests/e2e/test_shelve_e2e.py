"""Shelve and unshelve on a real fleet (``corral up``, process driver, real store and agents).

Shelving releases CPU and memory at once (another instance takes them); unshelve goes back to
the old host when the kept disk is there (the same files, nothing fetched), elsewhere when the
old host is full (only the chunks that host lacks are fetched, the files are identical); a
failing step rolls back; ``--all`` brings many back. Figures come from the operations' own
records (what each agent answered) and from the files on each host's disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fleetkit import Fleet, fleet_for, restart_agent

from corral.rig.context import load_context

pytestmark = pytest.mark.timeout(600)

FAILED_EXIT = 12
NO_CAPACITY_EXIT = 6
BASE_BLOB = 3_000_000
# writes its own data once (so a restart does not change it), then idles in its disk
WORKLOAD = ["sh", "-c", "[ -f own.bin ] || head -c 400000 /dev/urandom > own.bin; "
            "echo ready > ready; exec sleep 600"]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("shelvefleet")
    with fleet_for(tmp, "--hosts", "2") as f:
        base = tmp / "base"
        (base / "lib").mkdir(parents=True)
        (base / "lib" / "blob.bin").write_bytes(os.urandom(BASE_BLOB))
        (base / "etc").mkdir()
        (base / "etc" / "motd").write_text("hello from the base image\n")
        os.symlink("etc/motd", base / "motd")
        f.ok("image", "import", "base", str(base))
        yield f


def disk(f: Fleet, host: str, name: str) -> Path:
    assert f.ctx is not None and f.ctx.data_dir
    return Path(f.ctx.data_dir) / "hosts" / host / "disks" / name


def tree_hash(root: Path) -> str:
    """Paths, types, modes and contents of every entry under ``root``."""
    h = hashlib.sha256()
    for dirpath, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(dirs + files):
            p = Path(dirpath, name)
            st = p.lstat()
            h.update(f"{p.relative_to(root)} {st.st_mode:o}\n".encode())
            if p.is_symlink():
                h.update(os.readlink(p).encode())
            elif p.is_file():
                h.update(p.read_bytes())
    return h.hexdigest()


def wait_for(what: str, check: Any, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while not (got := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
    return got


def run(f: Fleet, name: str, host: str, cpus: str = "0.1") -> dict[str, Any]:
    f.ok("run", name, "--image", "base", "--driver", "process", "--host", host, "--cpus", cpus,
         "--memory", "16M", "--", *WORKLOAD)
    wait_for(f"{name} to write its data", lambda: (disk(f, host, name) / "ready").exists())
    return f.wait_state(name, {"running"})


def reserved(f: Fleet, host: str) -> float:
    return float(next(h for h in f.json("host", "ls") if h["name"] == host)["reserved"]["cpus"])


def test_shelve_frees_the_host_and_unshelve_moves_when_it_is_full(fleet: Fleet) -> None:
    f = fleet
    cores = next(h for h in f.json("host", "ls") if h["name"] == "host1")["cores"]
    taker = str(cores - 0.5)  # fits on host1 only once big's 1 cpu is released
    run(f, "big", "host1", cpus="1")
    f.ok("stop", "big")  # its files stay as they are from here on
    before = tree_hash(disk(f, "host1", "big"))
    full = f.cli("run", "taker", "--host", "host1", "--cpus", taker, "--", "sleep", "600")
    assert full.returncode == NO_CAPACITY_EXIT, full.stderr

    out = f.json("shelve", "big", "--offload-after", "never")
    assert out["state"] == "succeeded", out
    view = f.instance("big")
    assert (view["state"], view["host"], view["disk_host"]) == ("shelved", None, "host1")
    assert view["allowed"] == ["rm", "unshelve"]
    assert reserved(f, "host1") == 0
    assert disk(f, "host1", "big").is_dir()  # kept: offload never
    shelf = f.json("shelved")
    assert [s["name"] for s in shelf] == ["big"] and shelf[0]["offload_at"] is None
    assert shelf[0]["size"] >= BASE_BLOB and shelf[0]["unique_size"] < BASE_BLOB
    assert all(not i["name"].startswith("@") for i in f.json("image", "ls"))
    refused = f.cli("start", "big")
    assert refused.returncode != 0 and "unshelve" in refused.stderr

    # what it held is free: another instance takes it (and leaves too little for big)
    f.ok("run", "taker", "--host", "host1", "--cpus", taker, "--", "sleep", "600")
    run(f, "warm", "host2")  # host2 now caches the base image's chunks

    res = f.json("unshelve", "big")
    assert [(r["name"], r["result"], r["host"]) for r in res] == [("big", "succeeded", "host2")]
    assert res[0]["disk_was_there"] is False
    assert 0 < res[0]["fetched_bytes"] < BASE_BLOB, res  # own data, not the base image again
    view = f.wait_state("big", {"created"})  # it was stopped when shelved
    assert view["host"] == "host2" and view["shelf"] is None
    assert tree_hash(disk(f, "host2", "big")) == before
    # the old copy on host1 goes at once (it came back elsewhere); the shelf leaves the store
    wait_for("host1's old copy to go", lambda: not disk(f, "host1", "big").exists())
    wait_for("disk_host to clear", lambda: f.instance("big")["disk_host"] is None)
    assert f.json("shelved") == []
    f.ok("start", "big")
    f.ok("rm", "--force", "big", "taker", "warm")


def test_unshelve_returns_to_the_old_host_and_moves_nothing(fleet: Fleet) -> None:
    f = fleet
    before = run(f, "back", "host2")
    own = disk(f, "host2", "back") / "own.bin"
    inode, data = own.stat().st_ino, own.read_bytes()
    out = f.json("shelve", "back")  # the default delay (1h): the disk stays
    assert out["data"]["push"]["uploaded_bytes"] > 0
    again = f.json("unshelve", "back")[0]
    assert (again["result"], again["host"], again["disk_was_there"]) == (
        "succeeded", "host2", True)
    assert again["fetched_chunks"] == 0 and again["fetched_bytes"] == 0
    after = f.wait_state("back", {"running"})  # it was running when shelved
    assert after["epoch"] > before["epoch"] and after["disk_host"] is None
    assert own.stat().st_ino == inode and own.read_bytes() == data  # the same file, not a copy
    f.ok("rm", "--force", "back")


def test_failed_steps_roll_back(fleet: Fleet, tmp_path: Path) -> None:
    f = fleet
    # shelve: the push finds no disk (moved away behind corral's back) -> all undone
    run(f, "roll", "host1")
    f.ok("stop", "roll")
    home, away = disk(f, "host1", "roll"), tmp_path / "roll-disk"
    shutil.move(home, away)
    try:
        proc = f.cli("shelve", "roll", "--json")
    finally:
        shutil.move(away, home)
    assert proc.returncode == FAILED_EXIT, proc.stdout + proc.stderr
    assert "no disk for 'roll'" in proc.stderr
    op = f.json("ops", "ls", "--target", "roll")[0]
    assert (op["kind"], op["state"], op["error"]["step"]) == ("shelve", "rolled_back", "push")
    assert {s["name"]: s["state"] for s in op["steps"]} == {
        "plan": "undone", "stop": "undone", "push": "undone", "delete": "pending",
        "record": "pending", "offload": "pending"}
    view = f.instance("roll")  # stopped where it was, still holding its reservation
    assert (view["state"], view["host"], view["disk_host"]) == ("stopped", "host1", None)
    assert reserved(f, "host1") > 0
    f.ok("start", "roll")

    # an instance with a warm standby is refused before anything runs (nothing to keep fresh)
    f.ok("standby", "add", "roll", "--host", "host2", "--every", "1h")
    proc = f.cli("shelve", "roll")
    assert proc.returncode == 5 and "standby rm roll" in proc.stderr, proc.stderr  # conflict
    assert f.instance("roll")["state"] == "running"
    f.ok("standby", "rm", "roll")

    # unshelve to a host whose agent is dead: the pull fails, it stays shelved, nothing held
    f.ok("shelve", "roll", "--offload-after", "0")
    wait_for("the disk to go at once", lambda: not home.exists())
    ctx = load_context(f.context_file)
    assert ctx is not None
    os.kill(next(a for a in ctx.agents if a.name == "host2").pid, signal.SIGKILL)
    try:
        proc = f.cli("unshelve", "roll", "--to", "host2", "--json")
    finally:
        restart_agent(f, "host2")
    assert proc.returncode == FAILED_EXIT, proc.stdout + proc.stderr
    op = f.json("ops", "ls", "--target", "roll")[0]
    assert (op["kind"], op["state"], op["error"]["step"]) == ("unshelve", "rolled_back", "pull")
    view = f.instance("roll")
    assert (view["state"], view["host"]) == ("shelved", None)
    assert reserved(f, "host2") == 0
    wait_for("host2 to re-join",
             lambda: {h["name"]: h["state"] for h in f.json("host", "ls")}["host2"] == "up")
    res = f.json("unshelve", "roll", "--to", "host2")[0]
    assert res["result"] == "succeeded" and res["fetched_chunks"] > 0
    assert f.wait_state("roll", {"running"})["host"] == "host2"
    f.ok("rm", "--force", "roll")


def test_unshelve_all_brings_every_shelved_instance_back(fleet: Fleet) -> None:
    f = fleet
    names = [f"bulk{i}" for i in range(4)]
    for i, name in enumerate(names):
        run(f, name, f"host{1 + i % 2}")
        f.ok("shelve", name, "--offload-after", "0" if i % 2 else "1h")
    assert sorted(s["name"] for s in f.json("shelved")) == names
    proc = f.cli("unshelve", "--all", "--parallel", "2", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(proc.stdout)
    assert [r["name"] for r in rows] == names
    assert all(r["result"] == "succeeded" for r in rows), rows
    kept = [r["disk_was_there"] for r in rows]
    assert kept == [True, False, True, False]  # kept disks were used, dropped ones rebuilt
    assert f.json("shelved") == []
    for name in names:
        f.wait_state(name, {"running"})
    f.ok("rm", "--force", *names)


def test_kept_disk_goes_when_its_delay_passed_and_unshelve_then_uses_the_store(
        fleet: Fleet) -> None:
    f = fleet
    run(f, "late", "host1")
    data = (disk(f, "host1", "late") / "own.bin").read_bytes()
    f.ok("shelve", "late", "--offload-after", "2s")
    row = f.json("shelved")[0]
    assert row["disk_host"] == "host1"
    assert row["offload_at"] == pytest.approx(row["shelved_at"] + 2, abs=0.01)
    wait_for("the offload loop", lambda: not disk(f, "host1", "late").exists())
    wait_for("disk_host to clear", lambda: f.json("shelved")[0]["disk_host"] is None)
    res = f.json("unshelve", "late")[0]
    assert res["result"] == "succeeded" and res["disk_was_there"] is False
    host = res["host"]
    assert (disk(f, host, "late") / "own.bin").read_bytes() == data
    f.wait_state("late", {"running"})
    f.ok("rm", "--force", "late")
