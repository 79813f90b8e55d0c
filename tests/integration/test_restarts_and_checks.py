"""Restart policies and health checks with a real server (ControlPlane: uvicorn, SQLite,
embedded nats-server) and a real agent in this process running real processes (the
``process`` driver): a workload that exits 1 is restarted by its agent up to N times, then
stays failed; each restart is an event and counted in the API; an http check against
``python3 -m http.server`` goes healthy, unhealthy when it is SIGSTOPped, and on-failure
restarts it; bad policies and checks are refused before anything is created."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from test_api import TOKEN, Harness, settings_for, start_harness

from corral.agent.daemon import Agent
from corral.config import Settings

#: every wait is bounded by this (seconds)
WAIT = 30.0


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[Harness]:
    async for h in start_harness(settings_for(tmp_path / "server", heartbeat_seconds=0.5)):
        stop = asyncio.Event()
        task = await start_agent(h, tmp_path / "agent", stop)
        try:
            yield h
        finally:
            with contextlib.suppress(Exception):
                for inst in (await h.http.get("/v1/instances")).json():
                    await h.http.delete(f"/v1/instances/{inst['name']}",
                                        params={"force": "true"})
            stop.set()
            await asyncio.wait_for(task, WAIT)


async def start_agent(h: Harness, data: Path, stop: asyncio.Event) -> asyncio.Task[None]:
    """A real agent in this process, enrolled as a real host is (the admin token and the
    server's URL buy a join token), running real processes."""
    agent = Agent(Settings(data_dir=data, server_url=h.plane.api_url, token=TOKEN,
                           host_name="h1", drivers="process", heartbeat_seconds=0.5,
                           sample_seconds=0.2, lease_seconds=30.0, stop_timeout=2.0))
    task = asyncio.create_task(agent.run(stop))

    async def joined() -> bool:
        if task.done():
            task.result()  # the agent's own error, at once
        return await _hosts_up(h)

    await until(h, joined)
    return task


async def _hosts_up(h: Harness) -> bool:
    hosts = (await h.http.get("/v1/hosts")).json()
    return any(x["name"] == "h1" and x["state"] == "up" for x in hosts)


async def until(h: Harness, pred: Any, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await pred():
            return
        await asyncio.sleep(0.1)
    raise AssertionError("condition not met in time")


async def view(h: Harness, name: str) -> dict[str, Any]:
    r = await h.http.get(f"/v1/instances/{name}")
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


async def events(h: Harness, name: str, type_: str) -> list[dict[str, Any]]:
    r = await h.http.get("/v1/events", params={"instance": name, "type": type_})
    assert r.status_code == 200, r.text
    return [json.loads(line) for line in r.text.splitlines() if line.strip()]


async def test_exit_1_is_restarted_n_times_then_failed(fleet: Harness, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    r = await fleet.create("crashy", command=["sh", "-c", f"echo x >> {runs}; exit 1"],
                           restart={"mode": "on-failure", "attempts": 2, "interval": 600,
                                    "delay": 0.2})
    assert r.status_code == 201, r.text
    assert r.json()["restart"] == {"mode": "on-failure", "attempts": 2, "interval": 600.0,
                                   "delay": 0.2}

    async def given_up() -> bool:
        v = await view(fleet, "crashy")
        return v["state"] == "failed" and v["restarts"] == 2

    await until(fleet, given_up)
    # it stays failed: no third restart (the agent gave up), then its runs are counted
    await asyncio.sleep(1.0)
    v = await view(fleet, "crashy")
    assert v["state"] == "failed" and v["restarts"] == 2 and v["exit_code"] == 1
    assert runs.read_text().count("x") == 3  # the first run and two restarts

    async def restarted_events() -> bool:  # the server may see a restart as soon as the
        return len(await events(fleet, "crashy", "instance.restarted")) >= 1  # next exit

    await until(fleet, restarted_events)
    evs = await events(fleet, "crashy", "instance.restarted")
    assert {e["data"]["mode"] for e in evs} == {"on-failure"}
    assert max(e["data"]["restarts"] for e in evs) == 2


async def test_default_policy_leaves_a_crash_failed(fleet: Harness) -> None:
    r = await fleet.create("plain", command=["sh", "-c", "exit 1"])
    assert r.status_code == 201, r.text
    assert r.json()["restart"]["mode"] == "no"

    async def failed() -> bool:
        return (await view(fleet, "plain"))["state"] == "failed"

    await until(fleet, failed)
    await asyncio.sleep(0.5)
    v = await view(fleet, "plain")
    assert v["state"] == "failed" and v["restarts"] == 0


async def test_a_stop_is_never_undone(fleet: Harness) -> None:
    r = await fleet.create("keeper", command=["sleep", "60"],
                           restart={"mode": "always", "delay": 0})
    assert r.status_code == 201, r.text
    r = await fleet.http.post("/v1/instances/keeper/stop", json={"timeout": 5})
    assert r.status_code == 200, r.text
    await asyncio.sleep(1.0)
    v = await view(fleet, "keeper")
    assert v["state"] == "stopped" and v["restarts"] == 0


@pytest.mark.parametrize(("policy", "words"), [
    ({"mode": "sometimes"}, "on-failure"),
    ({"mode": "on-failure", "interval": 0}, "interval"),
    ({"mode": "on-failure", "attempts": 0}, "attempts"),
    ({"mode": "always", "delay": -1}, "delay"),
])
async def test_bad_policies_are_refused_before_anything_is_made(
        fleet: Harness, policy: dict[str, Any], words: str) -> None:
    r = await fleet.create("bad", restart=policy)
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert "restart" in err["message"] and words in err["message"], err
    assert err["hint"]
    assert (await fleet.http.get("/v1/instances/bad")).status_code == 404


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


async def test_http_check_goes_unhealthy_and_on_failure_restarts(
        fleet: Harness, tmp_path: Path) -> None:
    """``python3 -m http.server`` is healthy; SIGSTOPped it stops answering, turns unhealthy,
    is ended by its agent and restarted under on-failure, and is healthy again."""
    port, pidfile = _free_port(), tmp_path / "web.pid"
    script = (f"python3 -m http.server {port} --bind 127.0.0.1 >/dev/null 2>&1 & "
              f"echo $! > {pidfile}; wait")
    r = await fleet.create("web", command=["sh", "-c", script],
                           restart={"mode": "on-failure", "attempts": 3, "delay": 0.2},
                           check={"target": f"http://:{port}/", "interval": 0.3,
                                  "timeout": 0.5, "threshold": 2})
    assert r.status_code == 201, r.text
    assert r.json()["check"]["target"] == f"http://:{port}/"

    async def health_is(want: str, restarts: int) -> bool:
        v = await view(fleet, "web")
        return v["health"] == want and v["restarts"] == restarts and v["state"] == "running"

    await until(fleet, lambda: health_is("healthy", 0))
    metrics = (await fleet.http.get("/metrics")).text
    assert 'corral_instance_healthy{driver="process",host="h1",instance="web"} 1.0' in metrics
    first = int(pidfile.read_text())
    os.kill(first, signal.SIGSTOP)
    try:
        async def unhealthy_seen() -> bool:
            evs = await events(fleet, "web", "instance.health")
            return any(e["data"]["to"] == "unhealthy" for e in evs)

        await until(fleet, unhealthy_seen)
        await until(fleet, lambda: health_is("healthy", 1))
        assert int(pidfile.read_text()) != first
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(first, signal.SIGKILL)
    evs = await events(fleet, "web", "instance")
    kinds = [e["type"] for e in evs]
    assert "instance.restarted" in kinds
    tos = [e["data"]["to"] for e in evs if e["type"] == "instance.health"]
    assert tos[0] == "healthy" and "unhealthy" in tos and tos[-1] == "healthy"


async def test_bad_checks_are_refused_before_anything_is_made(fleet: Harness) -> None:
    for check in ({"target": "http://:0/"}, {"target": "udp::53"},
                  {"target": "tcp::80", "interval": 0}):
        r = await fleet.create("bad", check=check)
        assert r.status_code == 422, r.text
        err = r.json()["error"]
        assert "check" in err["message"] and err["hint"], err
    assert (await fleet.http.get("/v1/instances/bad")).status_code == 404
