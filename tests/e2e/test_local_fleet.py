"""The default fleet (3 unprivileged hosts, process driver, loopback) driven through the CLI."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest
from fleetkit import Fleet

from corral.errors import InvalidTransition, NoCapacity, NotFound, NotSupported, Unauthorized

pytestmark = pytest.mark.timeout(600)


def test_lifecycle_through_the_cli(local_fleet: Fleet) -> None:
    f = local_fleet
    out = f.ok("run", "life", "--cpus", "0.2", "--memory", "32M", "--", "sleep", "600")
    assert "life" in out
    listed = {i["name"]: i for i in f.json("ls")}
    assert listed["life"]["state"] == "running"
    assert listed["life"]["memory_bytes"] == 32 * 1024**2
    view = f.instance("life")
    assert view["host"] in {"host1", "host2", "host3"}
    assert view["pid"]
    assert "stop" in view["allowed"] and "thaw" not in view["allowed"]

    # freeze/thaw when this host's process driver can freeze, else a clear "not supported"
    host = next(h for h in f.json("host", "ls") if h["name"] == view["host"])
    frozen = f.cli("freeze", "life")
    if host["drivers"]["process"].get("can_freeze"):
        assert frozen.returncode == 0, frozen.stderr
        assert f.instance("life")["state"] == "frozen"
        f.ok("thaw", "life")
        assert f.instance("life")["state"] == "running"
    else:
        assert frozen.returncode == NotSupported.exit_code
        assert frozen.stderr.startswith("error: ")

    f.ok("stop", "life", "--timeout", "5")
    assert f.instance("life")["state"] == "stopped"
    refused = f.cli("thaw", "life")
    assert refused.returncode == InvalidTransition.exit_code
    assert "error: cannot thaw instance 'life': it is stopped" in refused.stderr
    assert "hint: " in refused.stderr and "start" in refused.stderr

    f.ok("start", "life")
    running = f.wait_state("life", {"running"})
    assert running["pid"] and running["pid"] != view["pid"]
    busy = f.cli("rm", "life")
    assert busy.returncode == InvalidTransition.exit_code, busy.stderr
    f.ok("stop", "life", "--timeout", "5")
    f.ok("rm", "life")
    assert "life" not in {i["name"] for i in f.json("ls")}
    gone = f.cli("show", "life")
    assert gone.returncode == NotFound.exit_code
    assert gone.stderr.startswith("error: ")


def test_oversized_request_names_the_shortfall(local_fleet: Fleet) -> None:
    proc = local_fleet.cli("run", "huge", "--cpus", "512", "--", "sleep", "1")
    assert proc.returncode == NoCapacity.exit_code, proc.stderr
    assert proc.stderr.startswith("error: ")
    for host in ("host1", "host2", "host3"):
        assert host in proc.stderr
    assert "huge" not in {i["name"] for i in local_fleet.json("ls")}


def test_run_count_places_many_real_processes_together(local_fleet: Fleet) -> None:
    f = local_fleet
    out = f.ok("run", "many", "--count", "7", "--cpus", "0.1", "--memory", "16M", "--",
               "sleep", "600")
    assert [ln.split(":")[0] for ln in out.splitlines()] == [f"many-{i}" for i in range(1, 8)]
    listed = {i["name"]: i for i in f.json("ls") if i["name"].startswith("many-")}
    assert len(listed) == 7 and all(i["state"] == "running" and i["pid"] for i in
                                    listed.values())
    assert len({i["host"] for i in listed.values()}) == 3  # spread over the three hosts
    for i in listed.values():  # each a real process of its own
        assert Path(f"/proc/{i['pid']}").exists()
    # a batch where some cannot be made: each line says so, the command fails, the rest run
    again = f.cli("run", "many", "--count", "8", "--json", "--", "sleep", "600")
    assert again.returncode != 0
    items = json.loads(again.stdout)
    assert [x["status"] for x in items] == [409] * 7 + [201]
    assert items[0]["error"]["code"] == "conflict" and items[7]["instance"]["state"] == \
        "running"
    assert "1 of 8" not in again.stderr and "7 of 8 instances were not made" in again.stderr
    refused = f.cli("run", "shared", "--count", "2", "--vip", "10.9.9.9/32", "--", "true")
    assert refused.returncode == 2 and "cannot share one virtual IP" in refused.stderr
    for i in range(1, 9):
        f.ok("rm", "--force", f"many-{i}")


def test_bad_token_is_refused(local_fleet: Fleet) -> None:
    assert local_fleet.ctx is not None
    env = {**local_fleet.env, "CORRAL_URL": local_fleet.ctx.url, "CORRAL_TOKEN": "not-the-token"}
    proc = local_fleet.cli("ls", env=env)
    assert proc.returncode == Unauthorized.exit_code
    assert proc.stderr.startswith("error: ")
    assert "hint: " in proc.stderr
    raw = httpx.get(local_fleet.ctx.url + "/v1/instances", verify=local_fleet.ctx.ca_file or True,
                    headers={"Authorization": "Bearer not-the-token"})
    assert raw.status_code == 401
    assert raw.json()["error"]["code"] == "unauthorized"


def test_malformed_input_gets_field_level_422(local_fleet: Fleet) -> None:
    assert local_fleet.ctx is not None
    raw = httpx.post(local_fleet.ctx.url + "/v1/instances", verify=local_fleet.ctx.ca_file or True,
                     headers={"Authorization": f"Bearer {local_fleet.ctx.token}"},
                     json={"name": "ok-name", "command": ["sleep"], "cpus": -1})
    assert raw.status_code == 422
    assert "cpus" in json.dumps(raw.json())


def test_top_once_json_shows_a_burner(local_fleet: Fleet) -> None:
    f = local_fleet
    f.ok("run", "burn", "--cpus", "1", "--", "sh", "-c", "while :; do :; done")
    try:
        deadline = time.monotonic() + 30
        frame = f.json("top", "--once")
        while time.monotonic() < deadline:
            burner = next(i for i in frame["instances"] if i["name"] == "burn")
            if burner["usage"]["cpu_core_pct"] is not None:
                break
            time.sleep(1)
            frame = f.json("top", "--once")
        assert {h["name"] for h in frame["hosts"]} == {"host1", "host2", "host3"}
        assert frame["instances"][0]["name"] == "burn"  # sorted by CPU, busiest first
        usage = frame["instances"][0]["usage"]
        assert usage["cpu_core_pct"] > 30  # a whole core when the machine is quiet
        cores = next(h["cores"] for h in frame["hosts"] if h["name"] == burner["host"])
        assert usage["cpu_host_pct"] == pytest.approx(usage["cpu_core_pct"] / cores, abs=0.2)
        table = f.ok("top", "--once")
        assert "CPU%(core)" in table and "burn" in table and "rest" in table
        assert "CPU%core" in f.ok("ls")
    finally:
        f.cli("rm", "--force", "burn")


def test_second_up_is_refused(local_fleet: Fleet) -> None:
    proc = local_fleet.cli("up", "--hosts", "1", "--data", str(local_fleet.tmp / "other"))
    assert proc.returncode == 5
    assert "already running" in proc.stderr
    assert "corral down" in proc.stderr


def test_restart_policy_through_the_cli(local_fleet: Fleet) -> None:
    """A workload that exits 1 is restarted by its agent twice, then stays failed; `show`
    and `ls` say so; bad policies and checks are refused before anything is made."""
    f = local_fleet
    f.ok("run", "crashy", "--restart", "on-failure", "--restart-attempts", "2",
         "--restart-interval", "10m", "--restart-delay", "0.2", "--", "sh", "-c", "exit 1")
    deadline = time.monotonic() + 60
    view = f.instance("crashy")
    while not (view["state"] == "failed" and view["restarts"] == 2):
        assert time.monotonic() < deadline, view
        time.sleep(0.2)
        view = f.instance("crashy")
    assert view["restart"]["mode"] == "on-failure" and view["health"] is None
    shown = f.ok("show", "crashy")
    assert "on-failure, 2 in 600s" in shown and "restarts: 2" in shown
    assert "HEALTH" in f.ok("ls")
    for bad in (("--restart", "sometimes"), ("--restart-interval", "0"),
                ("--check", "udp::53"), ("--check", "tcp::80", "--check-interval", "0")):
        refused = f.cli("run", "bad", *bad, "--", "true")
        assert refused.returncode != 0 and refused.stderr.startswith(("error: ", "usage: ")), \
            refused.stderr
    assert "bad" not in {i["name"] for i in f.json("ls")}
    f.ok("rm", "crashy")
