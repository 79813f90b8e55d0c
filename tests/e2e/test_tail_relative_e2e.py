"""``corral run --tail SOURCE=RELATIVE/PATH``: the file is read in the instance's own disk (a
plain process's working directory) on whichever host it runs, so its lines keep arriving after
a migration; paths that could leave the disk are refused by the API with a 4xx."""

from __future__ import annotations

import json
import shutil
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from diskkit import host_dirs
from fleetkit import Fleet

pytestmark = [pytest.mark.timeout(600),
              pytest.mark.skipif(shutil.which("rsync") is None, reason="needs rsync")]

#: appends "hit N PID" to logs/access.log in its working directory (its disk), carrying on
#: from the last number in the file (after a migration it finds the copy and goes on); the pid
#: tells the lines of the run after the move from those before it
WRITER = ('mkdir -p logs && touch logs/access.log && i=$(wc -l < logs/access.log) && '
          'while :; do i=$((i+1)); echo "hit $i $$" >> logs/access.log; sleep 0.05; done')


def access(f: Fleet, name: str) -> list[dict[str, Any]]:
    """What ``corral logs NAME`` shows of the tail source, in order."""
    out = f.ok("logs", name, "--json")
    recs = [json.loads(line) for line in out.splitlines() if line.strip()]
    return [r for r in recs if r["source"] == "access"]


def number(rec: dict[str, Any]) -> int:
    return int(str(rec["line"]).split()[1])


def writer(rec: dict[str, Any]) -> str:
    return str(rec["line"]).split()[2]


def wait_for(what: str, probe: Callable[[], Any], timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = probe()
        if got:
            return got
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.3)


def test_relative_tail_follows_the_instance_across_a_migration(local_fleet: Fleet) -> None:
    f = local_fleet
    name = f"tailrel-{uuid.uuid4().hex[:6]}"
    f.ok("run", name, "--host", "host1", "--tail", "access=logs/access.log", "--",
         "sh", "-c", WRITER)
    try:
        view = f.wait_state(name, {"running"})
        assert view["host"] == "host1" and view["tail"] == {"access": "logs/access.log"}
        first = wait_for("access lines from host1", lambda: (r := access(f, name)) and
                         len(r) >= 5 and r)
        assert {r["host"] for r in first} == {"host1"}
        assert [number(r) for r in first] == list(range(1, len(first) + 1))
        (before,) = {writer(r) for r in first}

        f.ok("migrate", name, "--to", "host2")
        assert f.wait_state(name, {"running"})["host"] == "host2"
        assert (host_dirs(f)["host2"] / "disks" / name / "logs" / "access.log").is_file()

        def after_move() -> list[dict[str, Any]]:
            recs = access(f, name)
            return recs if len([r for r in recs if writer(r) != before]) >= 5 else []

        recs = wait_for("lines written on host2 after the move", after_move)
        moved = [r for r in recs if writer(r) != before]
        assert {r["host"] for r in moved} == {"host2"}
        # the writer went on from the copy of its file, and nothing was lost across the move
        assert min(number(r) for r in moved) > max(number(r) for r in recs
                                                   if writer(r) == before)
        seen = {number(r) for r in recs}
        assert seen == set(range(1, max(seen) + 1)), sorted(set(range(1, max(seen))) - seen)
        # and nothing came twice: host2 did not send again the lines host1 wrote and sent
        numbers = [number(r) for r in recs]
        assert len(numbers) == len(seen), sorted(n for n in seen if numbers.count(n) > 1)[:10]
    finally:
        f.cli("rm", "--force", name)


def test_tail_paths_that_could_leave_the_disk_are_refused(local_fleet: Fleet) -> None:
    f = local_fleet
    name = f"tailbad-{uuid.uuid4().hex[:6]}"
    proc = f.cli("run", name, "--tail", "access=../outside.log", "--", "sleep", "60")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "'..'" in proc.stderr and "hint:" in proc.stderr
    # the API itself refuses them too (a client that is not the CLI)
    assert f.ctx is not None
    body = {"name": name, "command": ["sleep", "60"]}
    with httpx.Client(base_url=f.ctx.url, timeout=30, verify=f.ctx.ca_file or True,
                      headers={"Authorization": f"Bearer {f.ctx.token}"}) as http:
        for path, why in (("logs/../../etc/shadow", "'..'"), ("logs/\0x", "NUL byte")):
            r = http.post("/v1/instances", json={**body, "tail": {"access": path}})
            assert r.status_code == 422, r.text
            err = r.json()["error"]
            assert err["code"] == "invalid_request" and why in err["message"]
            assert [fl["field"] for fl in err["details"]["fields"]] == ["tail"]
            assert err["hint"]
        assert http.get(f"/v1/instances/{name}").status_code == 404
