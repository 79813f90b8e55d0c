"""Capture -> JetStream -> sink, across a kill -9 of the capturing process."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import pytest

from corral.bus import streams, subjects
from corral.bus.embedded import EmbeddedNats
from corral.telemetry.capture import LogCapture
from corral.telemetry.logsink import LogSink

TOKEN = "capture-token"

PUMP = """
import asyncio, sys
from pathlib import Path
import nats
from corral.bus import streams, subjects
from corral.telemetry.capture import LogCapture
async def main():
    nc = await nats.connect(sys.argv[1], token=sys.argv[2])
    js = nc.jetstream()
    await streams.ensure(js, streams.logs_config())
    cap = LogCapture(Path(sys.argv[3]), Path(sys.argv[4]), "h1", "web", "stdout", max_batch=7)
    while True:
        await cap.pump(js)
        await asyncio.sleep(0.01)
asyncio.run(main())
"""


@pytest.fixture
async def bus(tmp_path: Path) -> AsyncIterator[EmbeddedNats]:
    (tmp_path / "nats").mkdir()
    server = EmbeddedNats(tmp_path / "nats", TOKEN)
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def drain_sink(url: str, d: Path, want: int, timeout: float = 30) -> list[str]:
    nc = await nats.connect(url, token=TOKEN)
    sink = LogSink(d, "t")
    stop = asyncio.Event()
    task = asyncio.create_task(sink.run(nc, stop, idle_timeout=0.2))
    deadline = time.monotonic() + timeout
    path = d / "web" / "stdout.log"
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= want:
            break
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.5)  # anything extra (a duplicate) would arrive now
    stop.set()
    await task
    sink.close()
    await nc.close()
    return path.read_text().splitlines()


async def test_capture_survives_kill_9(bus: EmbeddedNats, tmp_path: Path) -> None:
    log = tmp_path / "stdout.log"
    state = tmp_path / "stdout.offsets"
    log.write_text("")
    argv = [sys.executable, "-c", PUMP, bus.url, TOKEN, str(log), str(state)]
    pump = subprocess.Popen(argv)
    try:
        with log.open("a") as fh:
            for i in range(1, 3001):
                fh.write(f"line {i}\n")
                if i % 100 == 0:
                    fh.flush()
                    time.sleep(0.005)
                if i == 1500:
                    fh.flush()
                    time.sleep(0.2)
                    os.kill(pump.pid, signal.SIGKILL)
                    pump.wait(10)
                    pump = subprocess.Popen(argv)
            fh.write("partial without newline")
        lines = await drain_sink(bus.url, tmp_path / "sink", 3000)
    finally:
        pump.kill()
        pump.wait(10)
    assert lines == [f"line {i}" for i in range(1, 3001)]


async def test_truncation_restarts_at_zero_and_numbers_go_on(bus: EmbeddedNats,
                                                             tmp_path: Path) -> None:
    log = tmp_path / "out.log"
    log.write_text("a\nb\n")
    nc = await nats.connect(bus.url, token=TOKEN)
    js = nc.jetstream()
    await streams.ensure(js, streams.logs_config())
    cap = LogCapture(log, tmp_path / "off", "h1", "web", "stdout")
    assert await cap.pump(js) == 2
    log.write_text("c\n")  # truncated and rewritten
    assert await cap.pump(js) == 1
    assert cap.pos.next_seq == 4
    again = LogCapture(log, tmp_path / "off", "h1", "web", "stdout")  # restart: nothing resent
    assert await again.pump(js) == 0
    await nc.close()
    assert await drain_sink(bus.url, tmp_path / "sink", 3) == ["a", "b", "c"]


async def test_a_burst_of_long_lines_never_makes_a_batch_the_bus_refuses(
        bus: EmbeddedNats, tmp_path: Path) -> None:
    """500 lines of 16 KiB, each full of control characters that JSON escapes six-fold: by
    count alone that was one 8 MiB batch, refused by the bus (1 MiB max_payload), and capture
    wedged on it for every source. Batches are cut by size: all of it goes out, in order."""
    log = tmp_path / "burst.log"
    body = "\x01" * 16_000
    log.write_text("".join(f"{i:04d}{body}\n" for i in range(500)) + "after\n")
    nc = await nats.connect(bus.url, token=TOKEN)
    js = nc.jetstream()
    await streams.ensure(js, streams.logs_config())
    cap = LogCapture(log, tmp_path / "off", "h1", "web", "stdout")
    sizes: list[int] = []

    class Recording:
        async def publish(self, subject: str, payload: bytes, **kw: Any) -> Any:
            sizes.append(len(payload))
            return await js.publish(subject, payload, **kw)

    assert await cap.pump(Recording()) == 501
    await nc.close()
    assert len(sizes) > 1 and max(sizes) < 1024 * 1024
    assert cap.pos.next_seq == 502  # every line went out (the count pins the ack'd offsets)
    lines = await drain_sink(bus.url, tmp_path / "sink", 501)
    assert [ln[:4] for ln in lines[:500]] == [f"{i:04d}" for i in range(500)]
    assert lines[500] == "after" and len(lines) == 501


async def test_one_chatty_instance_cannot_push_the_others_out_of_the_log_stream(
        bus: EmbeddedNats) -> None:
    """Each instance may keep a bounded number of batches in the shared stream: past it, its
    own oldest go, and the others' stay."""
    nc = await nats.connect(bus.url, token=TOKEN)
    js = nc.jetstream()
    await streams.ensure(js, streams.logs_config(per_instance=3))
    for i in range(10):
        await js.publish(subjects.logs("h1", "chatty"), f"{i}".encode())
    for i in range(2):
        await js.publish(subjects.logs("h1", "quiet"), f"{i}".encode())
    info = await js.stream_info(streams.LOGS)
    assert info.state.messages == 5  # 3 of chatty's (its newest), both of quiet's
    quiet = await js.get_last_msg(streams.LOGS, subjects.logs("h1", "quiet"))
    assert quiet.data == b"1"
    await nc.close()
