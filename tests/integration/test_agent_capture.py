"""The agent's capture manager over a real nats-server: every instance's stdout, stderr and
tailed files reach the stream; a new manager (agent restart) resumes from the offsets; delete
pumps the last lines before the workdir goes; a tail path escaping the rootfs is refused."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import pytest

from corral.agent import capture, handlers
from corral.agent.capture import CaptureManager
from corral.agent.state import AgentState
from corral.bus import rpc, streams
from corral.bus.embedded import EmbeddedNats
from corral.bus.messages import WireSpec
from corral.drivers.fake import FakeDriver
from corral.telemetry.logsink import LogSink

TOKEN = "agent-capture-token"


@pytest.fixture
async def nc(tmp_path: Path) -> AsyncIterator[Any]:
    server = EmbeddedNats(tmp_path / "nats", TOKEN)
    (tmp_path / "nats").mkdir()
    server.start()
    conn = await nats.connect(server.url, token=TOKEN)
    # the server makes the log stream (agents have no JetStream API on a fleet's bus)
    await streams.ensure(conn.jetstream(), streams.logs_config())
    try:
        yield conn
    finally:
        await conn.close()
        server.stop()


async def create(st: AgentState, name: str, rootfs: Path | None = None,
                 tail: dict[str, str] | None = None) -> Path:
    spec = WireSpec(name=name, driver="fake", command=["true"],
                    rootfs=str(rootfs) if rootfs else None, tail=tail or {}, epoch=1)
    await handlers.create(st, rpc.CreateArgs(spec=spec))
    return st.store.dir_for(name)


async def sink_lines(nc: Any, d: Path, want: int, path: str) -> list[str]:
    sink = LogSink(d, "t")
    stop = asyncio.Event()
    task = asyncio.create_task(sink.run(nc, stop, idle_timeout=0.2))
    deadline = time.monotonic() + 20
    f = d / path
    while time.monotonic() < deadline:
        if f.exists() and len(f.read_text().splitlines()) >= want:
            break
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.3)
    stop.set()
    await task
    sink.close()
    return f.read_text().splitlines() if f.exists() else []


@contextlib.asynccontextmanager
async def running(mgr: CaptureManager, nc: Any) -> AsyncIterator[asyncio.Event]:
    stop = asyncio.Event()
    task = asyncio.create_task(mgr.run(nc, stop))
    try:
        yield stop
    finally:
        stop.set()
        await task


async def test_sources_restart_and_delete(nc: Any, tmp_path: Path) -> None:
    st = AgentState(tmp_path / "agent", {"fake": FakeDriver()}, 5.0)
    root = tmp_path / "root"
    (root / "var/log").mkdir(parents=True)
    wd = await create(st, "web", rootfs=root, tail={"access": "/var/log/access.log"})
    (wd / "stdout.log").write_text("".join(f"out {i}\n" for i in range(1, 101)))
    (wd / "stderr.log").write_text("err 1\n")
    (root / "var/log/access.log").write_text("hit 1\nhit 2\n")

    mgr = CaptureManager(st, "h1", interval=0.05)
    async with running(mgr, nc):
        for _ in range(100):
            if mgr.sent >= 103:
                break
            await asyncio.sleep(0.05)
    assert mgr.sent == 103
    assert (wd / "capture" / "stdout.json").exists()

    # a new manager (an agent restarted) resumes after the acknowledged lines
    with (wd / "stdout.log").open("a") as fh:
        fh.write("".join(f"out {i}\n" for i in range(101, 151)))
    mgr2 = CaptureManager(st, "h1", interval=0.05)
    st.before_delete.append(mgr2.before_delete)  # as the agent wires it
    async with running(mgr2, nc):
        for _ in range(100):
            if mgr2.sent >= 50:
                break
            await asyncio.sleep(0.05)
        # delete: the last lines go out before the workdir is removed
        mgr2.interval = 3600  # no regular pump can take them now: only the final one
        mgr2.wake_on_write = False
        await asyncio.sleep(0.3)
        (wd / "stderr.log").write_text("err 1\nerr last\n")
        await handlers.delete(st, rpc.DeleteArgs(name="web"))
    assert not wd.exists()
    assert mgr2.sent == 51

    d = tmp_path / "sink"
    got = await sink_lines(nc, d, 150, "web/stdout.log")
    assert got == [f"out {i}" for i in range(1, 151)]
    assert (d / "web/stderr.log").read_text().splitlines() == ["err 1", "err last"]
    assert (d / "web/access.log").read_text().splitlines() == ["hit 1", "hit 2"]
    info = await nc.jetstream().stream_info(streams.LOGS)
    assert info.state.messages >= 4


async def test_tail_escaping_the_rootfs_is_refused(nc: Any, tmp_path: Path) -> None:
    st = AgentState(tmp_path / "agent", {"fake": FakeDriver()}, 5.0)
    secret = tmp_path / "host-secret"
    secret.write_text("do not publish\n")
    root = tmp_path / "root"
    (root / "var/log").mkdir(parents=True)
    (root / "var/log/access.log").symlink_to(secret)
    await create(st, "evil", rootfs=root, tail={"access": "/var/log/access.log"})
    mgr = CaptureManager(st, "h1", interval=0.05)
    async with running(mgr, nc):
        await asyncio.sleep(0.5)
    assert mgr.sent == 0
    info = await nc.jetstream().stream_info(streams.LOGS)
    assert info.state.messages == 0


async def test_a_write_starts_a_pump_without_waiting_for_the_interval(
        nc: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With an interval (and a wait after a busy pump) no test outlives, lines appended after
    the first pump can only go out because the write woke the manager (inotify on the file it
    opened). Several writes, each after the last went out: every line once, in order."""
    monkeypatch.setattr(capture, "BUSY_PUMP_SECONDS", 3600.0)
    st = AgentState(tmp_path / "agent", {"fake": FakeDriver()}, 5.0)
    root = tmp_path / "root"
    (root / "var/log").mkdir(parents=True)
    await create(st, "web", rootfs=root, tail={"access": "/var/log/access.log"})
    access = root / "var/log/access.log"
    access.write_text("")  # opened (and watched) by the first pump, which sends nothing
    mgr = CaptureManager(st, "h1", interval=3600)
    async with running(mgr, nc):
        for want in (1, 2, 4, 7):
            with access.open("a") as fh:
                fh.write("".join(f"hit {i}\n" for i in range(mgr.sent + 1, want + 1)))
            for _ in range(200):  # bounded: 10 s
                if mgr.sent >= want:
                    break
                await asyncio.sleep(0.05)
            assert mgr.sent == want
    got = await sink_lines(nc, tmp_path / "sink", 7, "web/access.log")
    assert got == [f"hit {i}" for i in range(1, 8)]
