"""The agent as a real subprocess on a real nats-server, with this test playing the server.

The test answers ``corral.join`` and ``corral.hb.*`` itself, listens to the metrics and sends
commands, so the agent is exercised exactly as the control plane will use it: real processes
(and real runc containers when root), real /proc and cgroup counters, kill -9 and restart.
Every workload carries a unique environment marker so the finalizer can find and kill whatever
a failed test leaves behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest

from corral.bus import subjects
from corral.bus.codec import decode, encode
from corral.bus.embedded import EmbeddedNats
from corral.bus.messages import (
    Command,
    Heartbeat,
    HeartbeatReply,
    JoinReply,
    JoinRequest,
    MetricsSample,
    Reply,
)
from corral.bus.rpc import CALLS

HB_S = 0.5
SAMPLE_S = 0.5
CORES = os.cpu_count() or 1
BURN = ["/bin/sh", "-c", "while :; do :; done"]


def marked_pids(marker: str) -> list[int]:
    """Processes whose environment carries ``marker`` (our workloads, however they were run)."""
    needle = f"CORRAL_TEST_MARK={marker}".encode()
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                if needle in fh.read().split(b"\0"):
                    out.append(int(entry))
        except OSError:
            continue
    return out


def kill_marked(marker: str) -> None:
    for pid in marked_pids(marker):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def remove_scope_cgroups(host: str) -> None:
    """Drivers leave the agent's parent cgroup ``corral/<host>-<id>``; remove it (empty) and
    below."""
    for top in Path("/sys/fs/cgroup").glob(f"*/corral/{host}-*"):
        for d in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            with contextlib.suppress(OSError):
                d.rmdir()
        with contextlib.suppress(OSError):
            top.rmdir()


class AgentProc:
    """``python -m corral.agent`` as a child we can kill -9 and start again."""

    def __init__(self, url: str, token: str, data: Path, host: str, drivers: str) -> None:
        self.argv = [sys.executable, "-m", "corral.agent", "--nats", url, "--token", token,
                     "--data-dir", str(data), "--host-name", host, "--drivers", drivers,
                     "--stop-timeout", "5", "--log-level", "debug"]
        self.log = data.parent / f"{host}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as fh:
            self.proc = subprocess.Popen(self.argv, stdout=fh, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def terminate(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def tail(self) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-40:])
        except OSError:
            return ""


class FakeServer:
    """Answers join and heartbeats, records everything, sends commands."""

    def __init__(self, nc: Any, host: str) -> None:
        self.nc = nc
        self.host = host
        self.joins: list[JoinRequest] = []
        self.heartbeats: list[Heartbeat] = []
        self.samples: list[MetricsSample] = []
        self.known = True
        #: (heartbeat, lease, sample seconds) each heartbeat's answer asks for (None: none)
        self.pace: tuple[float, float, float] | None = None
        #: heartbeats go unanswered (the server is away)
        self.silent = False
        #: when each heartbeat arrived (this loop's clock)
        self.beat_times: list[float] = []

    async def start(self) -> None:
        await self.nc.subscribe(subjects.JOIN_ALL, cb=self._join)
        await self.nc.subscribe(subjects.heartbeat(self.host), cb=self._hb)
        await self.nc.subscribe(subjects.metrics(self.host), cb=self._metrics)

    async def _join(self, msg: Any) -> None:
        self.joins.append(decode(msg.data, JoinRequest))
        self.known = True
        reply = JoinReply(lease_seconds=10, heartbeat_seconds=HB_S, sample_seconds=SAMPLE_S)
        await msg.respond(encode(reply))

    async def _hb(self, msg: Any) -> None:
        self.heartbeats.append(decode(msg.data, Heartbeat))
        self.beat_times.append(asyncio.get_running_loop().time())
        if self.silent:
            return
        reply = HeartbeatReply(known=self.known, lease_expires_at=0)
        if self.pace is not None:
            reply.heartbeat_seconds, reply.lease_seconds, reply.sample_seconds = self.pace
        await msg.respond(encode(reply))

    async def _metrics(self, msg: Any) -> None:
        self.samples.append(decode(msg.data, MetricsSample))

    async def call(self, verb: str, **args: Any) -> Reply:
        msg = await self.nc.request(subjects.command(self.host),
                                    encode(Command(verb=verb, args=args)),
                                    timeout=CALLS[verb].timeout + 30 if verb in CALLS else 10)
        return decode(msg.data, Reply)

    async def ok(self, verb: str, **args: Any) -> Any:
        reply = await self.call(verb, **args)
        assert reply.ok, reply.error
        return reply.result

    async def wait_for(self, what: str, pred: Callable[[], Any], timeout: float = 20.0) -> Any:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            got = pred()
            if got:
                return got
            await asyncio.sleep(0.05)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}")

    def report_in(self, hb: Heartbeat, name: str) -> dict[str, Any] | None:
        for r in hb.instances:
            if r.name == name:
                return r.model_dump()
        return None


@pytest.fixture
def marker() -> Iterator[str]:
    mark = secrets.token_hex(6)
    yield mark
    kill_marked(mark)


@pytest.fixture
def bus(tmp_path: Path) -> Iterator[EmbeddedNats]:
    server = EmbeddedNats(tmp_path / "bus", secrets.token_hex(16))
    (tmp_path / "bus").mkdir()
    server.start()
    yield server
    server.stop()


async def _setup(bus: EmbeddedNats, tmp_path: Path, drivers: str
                 ) -> tuple[FakeServer, AgentProc, Any]:
    host = f"h{secrets.token_hex(3)}"
    nc = await nats.connect(bus.url, token=bus.token, name="test-server")
    server = FakeServer(nc, host)
    await server.start()
    agent = AgentProc(bus.url, bus.token, tmp_path / host, host, drivers)
    return server, agent, nc


@pytest.fixture
async def fleet(bus: EmbeddedNats, tmp_path: Path, marker: str
                ) -> AsyncIterator[tuple[FakeServer, AgentProc]]:
    server, agent, nc = await _setup(bus, tmp_path, "process")
    agent.start()
    try:
        yield server, agent
    finally:
        agent.kill9()
        kill_marked(marker)
        await asyncio.sleep(0.2)
        remove_scope_cgroups(server.host)
        await nc.close()
        if os.environ.get("CORRAL_TEST_SHOW_AGENT_LOG"):
            print(agent.tail())


def _spec(name: str, command: list[str], marker: str, driver: str = "process",
          epoch: int = 1) -> dict[str, Any]:
    return {"name": name, "driver": driver, "command": command, "epoch": epoch,
            "env": {"CORRAL_TEST_MARK": marker}}


async def _burn_and_measure(server: FakeServer, name: str) -> list[tuple[float, float]]:
    """Wait for five CPU figures of ``name`` and return them as (core %, host %)."""
    start_at = len(server.samples)

    def figures() -> list[tuple[float, float]]:
        out = []
        for s in server.samples[start_at:]:
            for i in s.instances:
                if i.name == name and i.cpu_core_pct is not None and i.cpu_host_pct is not None:
                    out.append((i.cpu_core_pct, i.cpu_host_pct))
        return out

    return list(await server.wait_for("5 cpu figures", lambda: len(figures()) >= 5 and figures(),
                                      timeout=30))


def _check_burner(figs: list[tuple[float, float]]) -> None:
    core = statistics.median(f[0] for f in figs)
    host = statistics.median(f[1] for f in figs)
    assert 70.0 <= core <= 130.0, figs
    assert 70.0 / CORES <= host <= 130.0 / CORES, figs
    for c, h in figs:
        assert 0 <= c <= 150.0, figs  # no negative, no spike
        assert h == pytest.approx(c / CORES)


async def test_join_reports_capacity_and_drivers(fleet: tuple[FakeServer, AgentProc]) -> None:
    server, _agent = fleet
    join = await server.wait_for("join", lambda: server.joins and server.joins[0])
    assert join.host == server.host
    assert join.capacity.cores == CORES
    assert join.capacity.memory_bytes > 0 and join.capacity.disk_bytes > 0
    assert "process" in join.drivers
    assert join.instances == []
    await server.wait_for("heartbeats", lambda: len(server.heartbeats) >= 2)
    seqs = [hb.seq for hb in server.heartbeats]
    assert seqs == sorted(seqs)


async def test_bad_commands_get_typed_errors(fleet: tuple[FakeServer, AgentProc]) -> None:
    server, _ = fleet
    await server.wait_for("join", lambda: server.joins)
    reply = await server.call("no-such-verb")
    assert not reply.ok and reply.error and reply.error["code"] == "invalid_request"
    reply = await server.call("status", name="missing")
    assert not reply.ok and reply.error and reply.error["code"] == "not_found"
    reply = await server.call("create", spec={"name": "x", "driver": "nope", "command": ["true"]})
    assert not reply.ok and reply.error and reply.error["code"] == "invalid_request"
    msg = await server.nc.request(subjects.command(server.host), b"{garbage", timeout=10)
    assert decode(msg.data, Reply).error["code"] == "invalid_request"  # type: ignore[index]


async def test_burner_accounting_and_external_kill(
    fleet: tuple[FakeServer, AgentProc], marker: str
) -> None:
    server, _ = fleet
    await server.wait_for("join", lambda: server.joins)
    created = await server.ok("create", spec=_spec("burn", BURN, marker))
    assert created["state"] == "created"
    started = await server.ok("start", name="burn", epoch=1)
    assert started["state"] == "running" and started["pid"]
    _check_burner(await _burn_and_measure(server, "burn"))

    # Killed behind corral's back: one of the next two heartbeats must say so.
    before = len(server.heartbeats)
    os.kill(started["pid"], signal.SIGKILL)
    await server.wait_for("two heartbeats after the kill",
                          lambda: len(server.heartbeats) >= before + 2)
    seen = [server.report_in(hb, "burn") for hb in server.heartbeats[before:before + 2]]
    assert any(r and r["state"] == "failed" and r["pid"] is None for r in seen), seen
    assert marked_pids(marker) == []

    # After a restart the figures are right again: no spike, no negative.
    old_gens = {i.generation for s in server.samples for i in s.instances if i.name == "burn"}
    again = await server.ok("start", name="burn", epoch=1)
    assert again["state"] == "running" and again["pid"] != started["pid"]
    _check_burner(await _burn_and_measure(server, "burn"))
    fresh = [i for s in server.samples for i in s.instances
             if i.name == "burn" and i.generation not in old_gens]
    assert fresh[0].cpu_core_pct is None and fresh[0].cpu_host_pct is None  # a new baseline
    assert all(s.sample_cpu_s >= 0 for s in server.samples)
    assert any(s.sample_cpu_s > 0 for s in server.samples)
    stopped = await server.ok("stop", name="burn", timeout=5)
    assert stopped["state"] == "stopped"
    assert await server.ok("delete", name="burn") is None
    assert await server.ok("list") == []


async def test_stale_epoch_refused(fleet: tuple[FakeServer, AgentProc], marker: str) -> None:
    server, _ = fleet
    await server.wait_for("join", lambda: server.joins)
    await server.ok("create", spec=_spec("fence", ["sleep", "600"], marker, epoch=5))
    reply = await server.call("start", name="fence", epoch=4)
    assert not reply.ok and reply.error and reply.error["code"] == "conflict"
    assert reply.error["details"] == {"epoch": 4, "newest": 5}
    assert marked_pids(marker) == []
    assert (await server.ok("start", name="fence", epoch=7))["epoch"] == 7
    await server.ok("stop", name="fence", timeout=5)
    reply = await server.call("start", name="fence", epoch=6)
    assert not reply.ok and reply.error and reply.error["code"] == "conflict"
    await server.ok("delete", name="fence")


async def test_agent_kill9_and_restart_reattaches(
    fleet: tuple[FakeServer, AgentProc], marker: str
) -> None:
    server, agent = fleet
    await server.wait_for("join", lambda: server.joins)
    await server.ok("create", spec=_spec("keep", ["sleep", "3600"], marker))
    pid = (await server.ok("start", name="keep", epoch=1))["pid"]
    assert marked_pids(marker) == [pid]

    agent.kill9()
    await asyncio.sleep(2 * HB_S)
    assert marked_pids(marker) == [pid], "killing the agent must not kill its workloads"
    joins_before = len(server.joins)
    agent.start()
    join = await server.wait_for("re-join", lambda: server.joins[joins_before:] and
                                 server.joins[joins_before])
    reports = {r.name: r for r in join.instances}
    assert reports["keep"].state == "running" and reports["keep"].pid == pid
    assert marked_pids(marker) == [pid], "recovering must not start a second copy"

    # Commands still work on the recovered instance, and sampling picks it up again.
    assert (await server.ok("status", name="keep"))["pid"] == pid
    await server.wait_for("a sample of the recovered instance", lambda: any(
        i.name == "keep" for s in server.samples[-3:] for i in s.instances))
    assert (await server.ok("stop", name="keep", timeout=5))["state"] == "stopped"
    assert marked_pids(marker) == []
    await server.ok("delete", name="keep")


async def test_the_agent_takes_the_pace_and_the_lease_each_heartbeat_answer_asks_for(
    fleet: tuple[FakeServer, AgentProc], marker: str
) -> None:
    """A large fleet's server stretches the heartbeat and sample periods and the lease in
    its answers (control/pace.py): the agent beats and samples at the new period, and fences
    by the lease of the answer, not the one its join brought (10 s)."""
    server, _ = fleet
    await server.wait_for("join", lambda: server.joins)
    await server.ok("create", spec=_spec("paced", ["sleep", "3600"], marker))
    await server.ok("start", name="paced", epoch=1)
    await server.wait_for("heartbeats", lambda: len(server.heartbeats) >= 2)
    server.pace = (1.5, 4.0, 1.5)
    asked_at = len(server.beat_times)
    await server.wait_for("four paced heartbeats",
                          lambda: len(server.beat_times) >= asked_at + 5, timeout=30)
    gaps = [b - a for a, b in itertools.pairwise(server.beat_times[asked_at + 1:])]
    assert statistics.median(gaps) >= 1.2, gaps  # 0.5 s before
    wall = [s.wall_ns / 1e9 for s in server.samples[-3:]]
    assert statistics.median(b - a for a, b in itertools.pairwise(wall)) >= 1.2, wall
    assert marked_pids(marker) != []

    server.silent = True  # the server goes away: fence at lease 4 - margin 2 = 2 s
    loop = asyncio.get_running_loop()
    gone_at = loop.time()
    await server.wait_for("the fence", lambda: marked_pids(marker) == [], timeout=30)
    # by the join's lease it would be 8 s after the last answered heartbeat
    assert loop.time() - gone_at < 6.5


async def test_sigterm_leaves_instances_running_and_unknown_host_rejoins(
    fleet: tuple[FakeServer, AgentProc], marker: str
) -> None:
    server, agent = fleet
    await server.wait_for("join", lambda: server.joins)
    server.known = False  # the server forgot us: the next heartbeat reply makes the agent re-join
    await server.wait_for("re-join after known=False", lambda: len(server.joins) >= 2)
    await server.ok("create", spec=_spec("stay", ["sleep", "3600"], marker))
    pid = (await server.ok("start", name="stay", epoch=1))["pid"]
    assert agent.terminate() == 0
    assert marked_pids(marker) == [pid]


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("runc") is None, reason="needs root and runc")
async def test_runc_burner_with_built_rootfs(
    bus: EmbeddedNats, tmp_path: Path, marker: str
) -> None:
    server, agent, nc = await _setup(bus, tmp_path, "runc")
    agent.start()
    name = f"c{secrets.token_hex(3)}"
    try:
        join = await server.wait_for("join", lambda: server.joins and server.joins[0])
        assert join.drivers["runc"]["needs_rootfs"]
        await server.ok("create", spec=_spec(name, BURN, marker, driver="runc"))
        assert (tmp_path / server.host / "rootfs-template").is_dir()
        assert (tmp_path / server.host / "disks" / name / "bin" / "busybox").is_file()
        started = await server.ok("start", name=name, epoch=1)
        assert started["state"] == "running"
        _check_burner(await _burn_and_measure(server, name))

        agent.kill9()
        agent.start()
        await server.wait_for("re-join", lambda: len(server.joins) >= 2)
        (report,) = [r for r in server.joins[1].instances if r.name == name]
        assert report.state == "running" and report.pid == started["pid"]
        assert (await server.ok("stop", name=name, timeout=5))["state"] == "stopped"
        await server.ok("delete", name=name)
        assert not (tmp_path / server.host / "disks" / name).exists()
    finally:
        agent.kill9()
        subprocess.run(["runc", "--root", str(tmp_path / server.host / "runc"), "delete",
                        "--force", name], capture_output=True, check=False)
        kill_marked(marker)
        await asyncio.sleep(0.2)
        remove_scope_cgroups(server.host)
        await nc.close()
