"""``corral up --tour`` on a fleet of its own: every step's figures, then nothing left behind;
and ``corral rig kill-host`` / ``revive-host`` on their own."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest
from fleetkit import Fleet

from corral.rig import procs
from corral.rig.context import FleetContext, load_context

pytestmark = pytest.mark.timeout(600)


def figure(pattern: str, out: str) -> re.Match[str]:
    m = re.search(pattern, out, re.MULTILINE)
    assert m is not None, f"{pattern!r} missing from the tour:\n{out}"
    return m


def under(data: Path) -> list[int]:
    """Pids of processes whose working directory or command line is in ``data`` (workloads
    run in their disks; agents, servers and keepers name their directories)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cwd = os.readlink(f"/proc/{entry}/cwd")
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if stat != "Z" and (cwd.startswith(str(data)) or str(data) in cmd):
            found.append(int(entry))
    return found


def test_tour_walks_through_the_mission_and_leaves_nothing(fresh_fleet_dir: Fleet) -> None:
    f = fresh_fleet_dir
    data = f.tmp / "data"
    proc = f.cli("up", "--hosts", "3", "--data", str(data), "--tour", timeout=400)
    ctx = load_context(f.context_file)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}\n{f.logs()}"
    assert ctx is not None
    f.ctx = ctx
    out = proc.stdout

    # 1. accounting: a burner costs a share of a core, half that of a 2-core host; idle ~0
    burn = figure(r"accounting: tour-burner uses ([\d.]+)% of a core, ([\d.]+)% of (host\d)",
                  out)
    core, host = float(burn[1]), float(burn[2])
    assert core > 5 and 0 < host < core, burn[0]
    idle = figure(r"accounting: tour-idle uses ([\d.]+)% of a core", out)
    assert float(idle[1]) < 5
    assert "error: cannot thaw" in out

    # 2. the standby: the first copy moved the 1 MiB blob, the refresh only what changed
    first = int(figure(r"first copy: moved \S+ \(bytes=(\d+)\)", out)[1])
    again = int(figure(r"refresh \(only what changed\): moved \S+ \(bytes=(\d+)\)", out)[1])
    assert first >= 1 << 20 and 0 <= again < first
    sb = figure(r"standby: tour-db on host2, ready, freeze ([\d.]+) ms, data age ([\d.]+) s",
                out)
    assert float(sb[1]) >= 0 and float(sb[2]) >= 0

    # 3. the migration, with its downtime and bytes
    mig = figure(r"migration of tour-web host3 -> host2: moved \S+ \(bytes=(\d+)\).*"
                 r"\(downtime_ms=(\d+)\)", out)
    assert int(mig[1]) > 0 and int(mig[2]) > 0

    # 4. host1 killed: tour-db runs on its standby's host; host1 back afterwards
    figure(r"killed host1: its agent \(pid \d+\), \d+ fence keeper\(s\), tour-db", out)
    figure(r"host1 marked down by the server", out)
    fo = figure(r"failover: tour-db moved from host1 to (host\d) in [\d.]+ s", out)
    assert fo[1] == "host2"
    figure(r"host1: agent started again \(pid \d+\), up", out)

    # 5. the web server's requests in its logs and its traffic view
    figure(r"requests: / 200, .*/no-such-page 404", out)
    assert re.search(r"access .*\"GET /no-such-page HTTP/1.1\" 404", out), out
    assert int(figure(r"traffic: (\d+) requests, 1 client\(s\) online", out)[1]) >= 6

    # 6. shelve and unshelve moved bytes through the image store
    sh = figure(r"shelve: tour-web stored .* \(bytes=(\d+), size=(\d+)\)", out)
    assert int(sh[1]) > 0 and int(sh[2]) > 0
    assert int(figure(r"unshelve: tour-web on host\d, fetched \d+ chunks, \S+ \(bytes=(\d+)\)",
                      out)[1]) > 0
    figure(r"GET / after unshelve: 200", out)

    # 7. the events of it all; 8. the dashboard, last
    for kind in ("host.down", "host.up", "instance.failover", "instance.stale_copy_removed",
                 "standby-sync succeeded", "migrate succeeded", "shelve succeeded"):
        assert kind in out, f"{kind} missing from the events:\n{out}"
    assert out.rstrip().splitlines()[-1] == f"dashboard: {ctx.url}/?token={ctx.token}"

    # nothing of the tour is left, and its killed host runs again under the context
    assert not [i for i in f.json("ls") if i["name"].startswith("tour-")]
    assert not [s for s in f.json("standby", "ls") if s["instance"].startswith("tour-")]
    assert not [s for s in f.json("shelved") if str(s.get("name", "")).startswith("tour-")]
    assert {h["name"]: h["state"] for h in f.json("host", "ls")} == {
        "host1": "up", "host2": "up", "host3": "up"}
    assert all(procs.alive(a) for a in ctx.agents)
    assert not list((data / "hosts" / "host1" / "disks" / ".orphaned").glob("tour-*"))
    f.ok("down", "--timeout", "5", timeout=180)
    assert not any(procs.alive(p) for p in [*ctx.agents, *([ctx.server] if ctx.server else [])])
    assert under(data) == []


def wait_host(f: Fleet, host: str, state: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while {h["name"]: h["state"] for h in f.json("host", "ls")}.get(host) != state:
        assert time.monotonic() < deadline, f"{host} never {state}\n{f.logs()}"
        time.sleep(0.3)


def test_rig_kills_a_host_and_revives_it(fresh_fleet_dir: Fleet) -> None:
    """kill-host ends the agent, its keeper and its workload at once (the server notices only
    at the lease's end); revive-host starts the agent again, which rejoins."""
    f = fresh_fleet_dir
    f.up("--hosts", "2")
    f.ok("run", "victim", "--host", "host2", "--", "sleep", "600")
    pid = f.wait_state("victim", {"running"})["pid"]
    missing = f.cli("rig", "kill-host", "host9")
    assert missing.returncode != 0 and "no host named 'host9'" in missing.stderr
    alive = f.cli("rig", "revive-host", "host2")
    assert alive.returncode != 0 and "still runs" in alive.stderr

    before: FleetContext | None = load_context(f.context_file)
    assert before is not None
    old = next(a for a in before.agents if a.name == "host2")
    killed = f.ok("rig", "kill-host", "host2")
    assert "host2 is dead" in killed and "1 workload(s)" in killed, killed
    assert not procs.alive(old)
    # gone, or a zombie its new parent has not collected yet: it runs no more either way
    assert procs.is_zombie(pid), f"the workload (pid {pid}) still runs"
    wait_host(f, "host2", "down")
    again = f.cli("rig", "kill-host", "host2")
    assert again.returncode != 0 and "revive-host host2" in again.stderr

    f.ok("rig", "revive-host", "host2")
    wait_host(f, "host2", "up")
    after = load_context(f.context_file)
    assert after is not None
    new = next(a for a in after.agents if a.name == "host2")
    assert new.pid != old.pid and procs.alive(new)
    f.ok("rm", "--force", "victim")
