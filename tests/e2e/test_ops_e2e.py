"""The operation engine in a real fleet: ``corral recreate`` (to another host, refused by a hook,
rolled back after a failed step, and resumed after the server is killed -9 mid-step), with
``corral ops ls/show`` and ``operation.changed`` events."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fleetkit import Fleet, fleet_for, restart_agent

from corral.rig import procs
from corral.rig.context import load_context, save_context

pytestmark = pytest.mark.timeout(600)

FAILED_EXIT = 12  # corral recreate: the operation finished but did not succeed


@pytest.fixture(scope="module")
def ops_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """Three process-driver hosts of our own (tests here kill agents and the server)."""
    with fleet_for(tmp_path_factory.mktemp("opsfleet"), "--hosts", "3") as fleet:
        yield fleet


def server_dir(f: Fleet) -> Path:
    assert f.ctx is not None and f.ctx.data_dir
    return Path(f.ctx.data_dir) / "server"


def workload(marker: str, slow_stop: float = 0.0) -> list[str]:
    """A shell loop whose argv carries ``marker`` (to find it in /proc); with ``slow_stop`` it
    traps SIGTERM and takes that long to exit."""
    trap = f"trap 'sleep {slow_stop}; exit 0' TERM; " if slow_stop else ""
    return ["sh", "-c", f"{trap}while :; do sleep 0.2; done # {marker}"]


def processes_with(marker: str) -> list[int]:
    """Live ``sh`` processes whose command line holds ``marker`` (one per running copy)."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            argv = (d / "cmdline").read_bytes().split(b"\0")
            if argv and argv[0].endswith(b"sh") and any(marker.encode() in a for a in argv):
                found.append(int(d.name))
    return found


def run(f: Fleet, name: str, host: str, cmd: list[str]) -> dict[str, Any]:
    f.ok("run", name, "--host", host, "--cpus", "0.1", "--memory", "16M", "--", *cmd)
    return f.wait_state(name, {"running"})


def api(f: Fleet) -> httpx.Client:
    assert f.ctx is not None
    return httpx.Client(base_url=f.ctx.url, verify=f.ctx.ca_file or True,
                        headers={"Authorization": f"Bearer {f.ctx.token}"},
                        timeout=30)


def wait_op(f: Fleet, op_id: str, timeout: float = 90) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        op = dict(f.json("ops", "show", op_id))
        if op["finished"] or time.monotonic() > deadline:
            assert op["finished"], f"operation still {op['state']}: {op}\n{f.logs(40)}"
            return op
        time.sleep(0.3)


def steps(op: dict[str, Any]) -> dict[str, str]:
    return {s["name"]: s["state"] for s in op["steps"]}


def test_recreate_on_another_host(ops_fleet: Fleet) -> None:
    f = ops_fleet
    before = run(f, "mover", "host1", workload("mover-" + uuid.uuid4().hex[:8]))
    out = f.ok("recreate", "mover", "--to", "host2")
    assert "succeeded" in out and "plan" in out and "create" in out
    after = f.wait_state("mover", {"running"})
    assert after["host"] == "host2"
    assert after["pid"] != before["pid"]
    assert after["epoch"] > before["epoch"]  # a start is a new epoch
    marker = before["command"][-1].split("# ")[-1]
    assert len(processes_with(marker)) == 1, "the old copy still runs (or none does)"

    listed = f.json("ops", "ls", "--target", "mover")
    assert listed[0]["kind"] == "recreate" and listed[0]["state"] == "succeeded"
    shown = f.json("ops", "show", listed[0]["id"])
    assert steps(shown) == {n: "done" for n in ("plan", "stop", "delete", "create", "start")}
    assert all(s["started_at"] and s["ended_at"] >= s["started_at"] for s in shown["steps"])
    assert shown["data"]["source"] == "host1" and shown["data"]["target"] == "host2"
    text = f.ok("ops", "show", listed[0]["id"])
    assert "recreate mover" in text and "done" in text

    # a verb while nothing runs still works, and the instance is no longer busy
    f.ok("stop", "mover", "--timeout", "5")
    f.ok("rm", "mover")


def test_failing_pre_hook_aborts_and_leaves_the_instance_alone(ops_fleet: Fleet) -> None:
    f = ops_fleet
    before = run(f, "hooked", "host1", workload("hooked-" + uuid.uuid4().hex[:8]))
    hook = server_dir(f) / "hooks" / "pre-recreate"
    hook.parent.mkdir(parents=True, exist_ok=True)
    hook.write_text("#!/bin/sh\ncat > /dev/null\necho 'change freeze until friday'\nexit 3\n")
    hook.chmod(0o755)
    try:
        proc = f.cli("recreate", "hooked", "--to", "host3")
    finally:
        hook.unlink()
    assert proc.returncode == FAILED_EXIT, proc.stdout + proc.stderr
    assert "change freeze until friday" in proc.stderr
    assert "rolled_back" in proc.stdout
    after = f.instance("hooked")
    assert (after["host"], after["pid"], after["epoch"], after["state"]) == (
        before["host"], before["pid"], before["epoch"], "running")
    op = f.json("ops", "ls", "--target", "hooked")[0]
    assert op["state"] == "rolled_back"
    assert set(steps(op).values()) == {"pending"}  # no step ran
    assert op["hooks"][0]["name"] == "pre-recreate" and op["hooks"][0]["exit_code"] == 3
    f.ok("rm", "--force", "hooked")


def test_failed_step_rolls_back_to_the_original_host(ops_fleet: Fleet) -> None:
    f = ops_fleet
    marker = "rollback-" + uuid.uuid4().hex[:8]
    before = run(f, "backer", "host1", workload(marker))
    ctx = load_context(f.context_file)
    assert ctx is not None
    agent3 = next(a for a in ctx.agents if a.name == "host3")
    os.kill(agent3.pid, signal.SIGKILL)  # host3 is still "up" until its lease runs out
    try:
        proc = f.cli("recreate", "backer", "--to", "host3")
        assert proc.returncode == FAILED_EXIT, proc.stdout + proc.stderr
        assert "rolled_back" in proc.stdout
        assert "host3" in proc.stderr  # the create step's error names the host
    finally:
        restart_agent(f, "host3")
    op = f.json("ops", "ls", "--target", "backer")[0]
    assert op["state"] == "rolled_back", op
    assert op["error"]["step"] == "create"
    assert steps(op) == {"plan": "undone", "stop": "undone", "delete": "undone",
                         "create": "undone", "start": "pending"}
    after = f.wait_state("backer", {"running"})
    assert after["host"] == "host1"
    assert after["pid"] != before["pid"]  # it was stopped, deleted, then made again on host1
    assert after["epoch"] > before["epoch"]
    assert len(processes_with(marker)) == 1
    deadline = time.monotonic() + 30
    while {h["name"]: h["state"] for h in f.json("host", "ls")}.get("host3") != "up":
        assert time.monotonic() < deadline, "host3 did not re-join"
        time.sleep(0.3)
    f.ok("rm", "--force", "backer")


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/")[0])


def _wait_port_free(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) != 0:
                return
        time.sleep(0.1)
    raise AssertionError(f"port {port} still in use")


def restart_server(f: Fleet) -> None:
    """The same server command, on the same API and NATS ports (agents and the context keep
    pointing at them), recorded in the context so teardown stops it."""
    ctx = load_context(f.context_file)
    assert ctx is not None and ctx.server is not None and ctx.nats_url
    api_port, nats_port = _port(ctx.url), _port(ctx.nats_url)
    _wait_port_free(nats_port)
    _wait_port_free(api_port)
    argv = [*ctx.server.argv, "--api-port", str(api_port), "--nats-port", str(nats_port)]
    info = server_dir(f) / "server.json"
    info.unlink(missing_ok=True)
    env = {**f.env, "CORRAL_TOKEN": ctx.token}
    ctx.server = procs.spawn("server", argv, Path(ctx.server.log), env=env)
    save_context(ctx, f.context_file)
    f.ctx = ctx
    deadline = time.monotonic() + 60
    while not info.exists():
        assert procs.alive(ctx.server), f"the server died on restart:\n{f.logs(40)}"
        assert time.monotonic() < deadline, "the server did not come back"
        time.sleep(0.1)


def test_server_killed_mid_step_resumes_to_one_running_copy(ops_fleet: Fleet) -> None:
    f = ops_fleet
    marker = "crash-" + uuid.uuid4().hex[:8]
    run(f, "crashy", "host2", workload(marker, slow_stop=4))
    with api(f) as c:
        resp = c.post("/v1/instances/crashy/recreate", json={"to": "host1"})
        assert resp.status_code == 202, resp.text
        op_id = resp.json()["id"]
        deadline = time.monotonic() + 30
        while steps(c.get(f"/v1/ops/{op_id}").json())["stop"] != "running":
            assert time.monotonic() < deadline, "the stop step never started"
            time.sleep(0.05)
    ctx = load_context(f.context_file)
    assert ctx is not None and ctx.server is not None
    os.kill(ctx.server.pid, signal.SIGKILL)  # the agent is still stopping the workload
    time.sleep(0.5)
    restart_server(f)

    op = wait_op(f, op_id)
    assert op["state"] in {"rolled_back", "succeeded"}, op
    if op["state"] == "rolled_back":
        assert "interrupted" in op["error"]["message"]
        assert op["error"]["step"] == "stop"
    inst = f.wait_state("crashy", {"running"})
    assert inst["host"] == ("host2" if op["state"] == "rolled_back" else "host1")
    assert len(processes_with(marker)) == 1, "not exactly one running copy"

    proc = f.cli("events", "--type", "operation", "--json")
    assert proc.returncode == 0, proc.stderr
    evs = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    mine = [e for e in evs if e["data"].get("id") == op_id]
    assert mine and all(e["type"] == "operation.changed" for e in mine)
    assert mine[-1]["data"]["state"] == op["state"]
    assert any(e["data"]["state"] == "running" for e in mine)
    f.ok("rm", "--force", "crashy")
