"""Health checks (agent/health.py): parsing, one probe of each kind against real sockets and
processes, and the monitor's threshold on the fake driver."""

from __future__ import annotations

import asyncio
import http.server
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agentkit import ok

from corral.agent.health import HEALTHY, UNHEALTHY, UNKNOWN, HealthMonitor, parse, run_probe
from corral.agent.state import AgentState
from corral.api.models import CheckSpec, CreateInstance
from corral.drivers.base import Driver
from corral.drivers.fake import FakeDriver
from corral.errors import InvalidRequest


def test_parse() -> None:
    assert parse("http://:8080/health").kind == "http"
    p = parse("http://:8080/health")
    assert (p.host, p.port, p.path) == ("127.0.0.1", 8080, "/health")
    assert parse("http://10.0.0.5:80").path == "/"
    assert (parse("tcp::5432").host, parse("tcp::5432").port) == ("127.0.0.1", 5432)
    assert parse("tcp:[::1]:22").host == "::1"
    assert parse("exec:test -f ready").command == "test -f ready"
    for bad in ("ftp://x", "http://:0/", "tcp:5432", "exec:", "http://:70000/"):
        with pytest.raises(InvalidRequest):
            parse(bad)


@pytest.mark.parametrize(("target", "words"), [
    ("http://:99999/", "port 99999"), ("tcp:5432", "tcp::PORT"), ("exec:  ", "no command"),
    ("gopher://x", "http://:PORT/PATH"),
])
def test_the_api_refuses_bad_checks_with_a_hint(target: str, words: str) -> None:
    with pytest.raises(ValueError, match="check") as err:
        CreateInstance(name="a", command=["x"], check={"target": target})  # type: ignore[arg-type]
    assert words in str(err.value)
    for field, value in (("interval", 0), ("timeout", 0), ("threshold", 0)):
        with pytest.raises(ValueError, match=field):
            CheckSpec.model_validate({"target": "tcp::1", field: value})


class _Handler(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(404 if self.path == "/missing" else 200)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def web() -> Iterator[int]:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield srv.server_address[1]
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.fixture
def silent() -> Iterator[int]:
    """A port that accepts connections (the kernel's backlog) and never answers."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    try:
        yield s.getsockname()[1]
    finally:
        s.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def test_probes(web: int, silent: int, tmp_path: Path) -> None:
    assert run_probe(parse(f"http://:{web}/ok"), 2.0, None, None) == ""
    assert run_probe(parse(f"http://:{web}/missing"), 2.0, None, None) == "HTTP 404"
    assert "within" in run_probe(parse(f"http://:{silent}/"), 0.3, None, None)
    assert run_probe(parse(f"http://:{_free_port()}/"), 2.0, None, None)  # refused
    assert run_probe(parse(f"tcp::{web}"), 2.0, None, None) == ""
    assert run_probe(parse(f"tcp::{_free_port()}"), 2.0, None, None)
    (tmp_path / "ready").touch()
    assert run_probe(parse("exec:test -f ready"), 2.0, None, str(tmp_path)) == ""
    assert run_probe(parse("exec:exit 3"), 2.0, None, str(tmp_path)) == "exit 3"
    assert "within" in run_probe(parse("exec:sleep 5"), 0.3, None, None)


def test_a_probe_in_another_network_namespace(web: int) -> None:
    """A namespace of its own has only a loopback that is down: the port open here is not
    there, so the probe fails there (and still passes here)."""
    import os
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("entering a network namespace needs root")
    proc = subprocess.Popen(["unshare", "--net", "sleep", "30"])
    try:
        for _ in range(100):  # bounded: until unshare has made the namespace
            if os.stat(f"/proc/{proc.pid}/ns/net").st_ino != os.stat("/proc/self/ns/net").st_ino:
                break
            threading.Event().wait(0.02)
        assert run_probe(parse(f"tcp::{web}"), 1.0, proc.pid, None) != ""
        assert run_probe(parse("exec:exit 0"), 5.0, proc.pid, None) == ""
        assert run_probe(parse(f"tcp::{web}"), 1.0, None, None) == ""
    finally:
        proc.kill()
        proc.wait()


async def _monitor(tmp_path: Path, target: str, threshold: int = 2, mode: str = "no",
                   grace: float = 0.0, clock: Any = None
                   ) -> tuple[AgentState, FakeDriver, HealthMonitor]:
    drv = FakeDriver("h1")
    drivers: dict[str, Driver] = {"fake": drv}
    st = AgentState(tmp_path, drivers, stop_timeout=1.0)
    spec = {"name": "a", "driver": "fake", "command": ["run"], "epoch": 1,
            "restart": {"mode": mode, "delay": 0},
            "check": {"target": target, "interval": 0.05, "timeout": 0.5,
                      "threshold": threshold, "grace": grace}}
    await ok(st, "create", spec=spec)
    await ok(st, "start", name="a", epoch=1)
    return st, drv, HealthMonitor(st) if clock is None else HealthMonitor(st, clock=clock)


async def _until(mon: HealthMonitor, pred: Any) -> None:
    for _ in range(200):  # bounded: 200 ticks
        mon.tick()
        if pred():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the monitor did not get there")


async def test_threshold_then_recovery(tmp_path: Path, web: int) -> None:
    flag = tmp_path / "sick"
    st, _drv, mon = await _monitor(tmp_path, f"exec:test ! -e {flag}")
    rec = st.records["a"]
    assert (await ok(st, "status", name="a"))["health"] == UNKNOWN
    await _until(mon, lambda: rec.extra.get("health") == HEALTHY)
    assert (await ok(st, "status", name="a"))["health"] == HEALTHY
    flag.touch()
    await _until(mon, lambda: rec.extra.get("health") == UNHEALTHY)
    assert rec.state == "running"  # restart "no": it is only reported
    flag.unlink()
    await _until(mon, lambda: rec.extra.get("health") == HEALTHY)
    # a stopped instance's health is unknown
    await ok(st, "stop", name="a")
    assert (await ok(st, "status", name="a"))["health"] == UNKNOWN
    # no check: no health at all
    st2 = AgentState(tmp_path / "b", {"fake": FakeDriver("h2")}, 1.0)
    await ok(st2, "create", spec={"name": "b", "driver": "fake", "command": ["x"]})
    assert (await ok(st2, "status", name="b"))["health"] is None


async def test_unhealthy_under_on_failure_ends_as_failed(tmp_path: Path) -> None:
    """Ended for its health, never marked as asked: it reads failed, for the policy."""
    seen: list[str] = []
    st, _drv, mon = await _monitor(tmp_path, "exec:exit 1", threshold=2, mode="on-failure")
    st.on_end.append(lambda rec: seen.append(rec.state))
    rec = st.records["a"]
    await _until(mon, lambda: rec.state != "running")
    assert rec.state == "failed" and not rec.stop_requested
    assert seen == ["failed"]


async def test_failures_within_the_grace_do_not_count(tmp_path: Path) -> None:
    """A slow start is not a sick one: failures in the first ``grace`` seconds of a run are
    not counted; after it, ``threshold`` failures in a row make it unhealthy as always."""
    now = [1000.0]
    st, _drv, mon = await _monitor(tmp_path, "exec:exit 1", threshold=1, grace=60.0,
                                   clock=lambda: now[0])
    rec = st.records["a"]
    checked = 0
    for _ in range(100):  # bounded: several failed checks, each past its interval
        mon.tick()
        track = mon.tracks["a"]
        if track.task is not None:
            await track.task
            checked += 1
        now[0] += 0.1
        if checked >= 5:
            break
    assert checked >= 5 and rec.extra.get("health", UNKNOWN) == UNKNOWN
    now[0] += 60.0  # the grace is over
    await _until(mon, lambda: rec.extra.get("health") == UNHEALTHY)
