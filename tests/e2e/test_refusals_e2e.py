"""Refusals in a real fleet, through the CLI (issue 15): a refused unshelve leaves a running
instance running where it was, with no operation recorded (item 7); a migration without
``--to`` never picks the standby's host, and says "promote" when nothing else fits (item 8)."""

from __future__ import annotations

import shutil
import uuid
from typing import Any

import pytest
from fleetkit import Fleet

pytestmark = [pytest.mark.timeout(600),
              pytest.mark.skipif(shutil.which("rsync") is None, reason="needs rsync")]

NO_CAPACITY_EXIT = 6
LOOP = ["sh", "-c", "while :; do sleep 0.1; done"]


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:6]}"


def record(f: Fleet, name: str) -> dict[str, Any]:
    """What must not change: the instance's record and its standby's (live figures aside)."""
    inst = f.instance(name)
    inst.pop("usage", None)
    standbys = [s for s in f.json("standby", "ls") if s["instance"] == name]
    for s in standbys:
        s.pop("data_age_seconds", None)
    return {"instance": inst, "standby": standbys}


def kinds(f: Fleet, name: str) -> list[str]:
    return [o["kind"] for o in f.json("ops", "ls", "--target", name)]


def test_refused_unshelve_of_a_running_instance_changes_nothing(local_fleet: Fleet) -> None:
    f = local_fleet
    w = unique("w")
    f.ok("run", w, "--host", "host1", "--cpus", "0.1", "--memory", "16M", "--", *LOOP)
    try:
        f.wait_state(w, {"running"})
        f.ok("standby", "add", w, "--every", "1h")
        before = record(f, w)
        ops_before = kinds(f, w)
        proc = f.cli("unshelve", w)
        assert proc.returncode != 0, proc.stdout
        assert f"cannot unshelve instance '{w}': it is running" in proc.stdout + proc.stderr
        assert record(f, w) == before
        assert kinds(f, w) == ops_before and "unshelve" not in ops_before  # nothing recorded
        listed = {i["name"]: i for i in f.json("ls")}[w]
        assert (listed["state"], listed["host"]) == ("running", "host1")
        refused = f.cli("start", w)  # refused because it runs, not because it is "shelved"
        assert refused.returncode != 0 and "it is running" in refused.stderr, refused.stderr
        f.ok("stop", w, "--timeout", "5")  # and it is free for the next verb
    finally:
        f.cli("rm", "--force", w)


def test_migrate_without_to_avoids_the_standby_host(local_fleet: Fleet) -> None:
    f = local_fleet
    m, filler = unique("m"), unique("fill")
    f.ok("run", m, "--host", "host1", "--cpus", "0.1", "--memory", "16M", "--", *LOOP)
    try:
        f.wait_state(m, {"running"})
        f.ok("standby", "add", m, "--host", "host2", "--every", "1h")
        # host3 is the only other host: fill it, and host2 (the standby's) is all that fits
        free = {h["name"]: h["free"]["cpus"] for h in f.json("host", "ls")}
        f.ok("run", filler, "--host", "host3", "--cpus", f"{free['host3']:g}", "--memory", "16M",
             "--", *LOOP)
        before = record(f, m)
        proc = f.cli("migrate", m)
        assert proc.returncode == NO_CAPACITY_EXIT, proc.stdout + proc.stderr
        assert "host2 (which holds its standby)" in proc.stderr, proc.stderr
        assert f"corral standby promote {m}" in proc.stderr, proc.stderr
        assert "migrate" not in kinds(f, m)
        assert record(f, m) == before
        # room again on host3: that is where it goes, never to the (emptier) standby host
        f.ok("rm", "--force", filler)
        f.ok("migrate", m)
        after = f.wait_state(m, {"running"})
        assert after["host"] == "host3"
        assert [s["host"] for s in f.json("standby", "ls") if s["instance"] == m] == ["host2"]
    finally:
        f.cli("rm", "--force", filler)
        f.cli("rm", "--force", m)
