"""Everything that grows with what workloads or peers do has a bound, and says what happens
there (issue 10, item 12): the live index's clients, the dirty list, the data port's
connections, the agent's commands in flight. (The log sink's open files and the log stream's
share per instance are tested with real files and a real NATS in tests/integration.)"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from corral.bus.codec import decode
from corral.bus.messages import Reply
from corral.disks import channel
from corral.disks.channel import DataServer
from corral.disks.dirty import DirtyTracker
from corral.telemetry.live_index import OnlineIndex


def test_the_online_index_forgets_the_oldest_client_past_its_bound() -> None:
    idx = OnlineIndex(window_s=60.0, max_clients=3)
    for i, url in enumerate(["/a", "/a", "/b", "/b", "/c"]):
        idx.hit(f"c{i}", url, 100.0 + i)
    assert idx.count() == 3 and idx.evicted == 2
    assert [c for c, _ in idx.on_url("/b")] == ["c3", "c2"]
    assert idx.on_url("/a") == [] and idx.count_on("/a") == 0  # its clients were the oldest
    idx.hit("c2", "/c", 105.0)  # a known client moving on does not evict anyone
    assert idx.count() == 3 and idx.evicted == 2


def test_the_dirty_list_stops_growing_past_max_paths(tmp_path: Path) -> None:
    tracker = DirtyTracker(tmp_path, max_paths=10)
    tracker.start()
    try:
        for i in range(50):
            (tmp_path / f"f{i}").write_text("x")
        deadline = time.monotonic() + 10
        while not tracker._overflow and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(tracker._dirty) == 0  # nothing more is kept: a full pass is due anyway
        got = tracker.take()
        assert got.overflowed and "max_paths" in got.reason and not got.paths
    finally:
        tracker.stop()


async def test_the_data_port_refuses_connections_past_its_bound(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(channel, "MAX_CONNECTIONS", 2)
    server = DataServer("h1", lambda name, slot: [tmp_path / name])
    await server.start()
    idle = []
    try:
        for _ in range(2):  # connected, never saying who they are
            _, w = await asyncio.open_connection("127.0.0.1", server.port)
            idle.append(w)
        deadline = time.monotonic() + 5
        while server.active < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        r, w = await asyncio.open_connection("127.0.0.1", server.port)
        answer = json.loads(await asyncio.wait_for(r.readline(), 5))
        assert answer == {"ok": False, "error": "too many connections on the data port; retry"}
        w.close()
        assert server.active == 2
    finally:
        for w in idle:
            w.close()
        await server.stop()


async def test_the_agent_answers_busy_past_its_commands_in_flight(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from corral.agent import daemon as service
    from corral.config import Settings

    agent = service.Agent(Settings(data_dir=tmp_path, nats_url="nats://127.0.0.1:1",
                                   token="t", drivers="fake", host_name="h1"))
    monkeypatch.setattr(service, "MAX_INFLIGHT", 1)
    gate = asyncio.Event()

    async def slow(msg: Any) -> None:
        await gate.wait()

    monkeypatch.setattr(agent, "handle", slow)
    answers: list[bytes] = []

    async def respond(data: bytes) -> None:
        answers.append(data)

    msg = SimpleNamespace(data=b"{}", reply="r", respond=respond)
    await agent.on_command(msg)
    await agent.on_command(msg)  # the one too many
    reply = decode(answers[0], Reply)
    assert not reply.ok and reply.error is not None and reply.error["retryable"]
    assert "busy with 1 commands" in reply.error["message"]
    gate.set()
    await asyncio.gather(*agent._inflight)
