"""Durable log sinks against a real nats-server with JetStream on disk: kill -9 of a sink and
of the NATS server lose no line and write none twice."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest

from corral.bus import streams, subjects
from corral.bus.embedded import EmbeddedNats
from corral.bus.messages import LogBatch
from corral.telemetry.logsink import LogSink

TOKEN = "sink-test-token"


@pytest.fixture
async def bus(tmp_path: Path) -> AsyncIterator[EmbeddedNats]:
    server = EmbeddedNats(tmp_path / "nats", TOKEN)
    (tmp_path / "nats").mkdir()
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def publish(url: str, sources: list[tuple[str, str]], batches: int, per: int,
                  start: int = 1) -> None:
    nc = await nats.connect(url, token=TOKEN)
    js = nc.jetstream()
    await streams.ensure(js, streams.logs_config())
    for b in range(batches):
        for host, inst in sources:
            first = start + b * per
            batch = LogBatch(host=host, instance=inst, source="stdout", first_seq=first,
                             lines=[f"{inst} line {first + i}" for i in range(per)], ts=time.time())
            await js.publish(subjects.logs(host, inst), batch.model_dump_json().encode(),
                             headers={"Nats-Msg-Id": batch.msg_id})
    await nc.close()


def expected(inst: str, n: int) -> list[str]:
    return [f"{inst} line {i}" for i in range(1, n + 1)]


def read_lines(d: Path, inst: str) -> list[str]:
    p = d / inst / "stdout.log"
    return p.read_text().splitlines() if p.exists() else []


def start_sink(url: str, d: Path, name: str, token_file: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "corral.telemetry.logsink", "--dir", str(d),
                             "--name", name, "--nats", url, "--token-file", str(token_file)],
                            stderr=subprocess.DEVNULL)


async def wait_for(pred: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():  # type: ignore[operator]
            return
        await asyncio.sleep(0.1)
    raise AssertionError("condition not met in time")


SOURCES = [("h1", "web"), ("h2", "db"), ("h3", "cache")]


async def test_two_sinks_survive_sink_and_nats_kill_9(bus: EmbeddedNats, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    d1, d2 = tmp_path / "sink1", tmp_path / "sink2"
    s1 = start_sink(bus.url, d1, "one", token_file)
    s2 = start_sink(bus.url, d2, "two", token_file)
    try:
        await publish(bus.url, SOURCES, batches=40, per=25)  # 1000 lines per instance
        # kill -9 sink one in the middle of its work, and restart it
        await wait_for(lambda: len(read_lines(d1, "web")) > 0)
        os.kill(s1.pid, signal.SIGKILL)
        s1.wait(10)
        await publish(bus.url, SOURCES, batches=40, per=25, start=1001)
        s1 = start_sink(bus.url, d1, "one", token_file)
        # a re-sent batch (agent restart) is dropped by JetStream's dedup or by the sink
        await publish(bus.url, SOURCES, batches=1, per=25, start=1976)
        # kill -9 the NATS server itself; JetStream's files bring the stream back
        assert bus.proc is not None
        os.kill(bus.proc.pid, signal.SIGKILL)
        bus.proc.wait(10)
        bus.proc = None
        bus.requested_port = bus.port
        bus.start()
        await publish(bus.url, SOURCES, batches=20, per=25, start=2001)
        for d in (d1, d2):
            for _, inst in SOURCES:
                await wait_for(lambda d=d, inst=inst: len(read_lines(d, inst)) >= 2500, 60)
        await asyncio.sleep(1.0)
        for d in (d1, d2):
            for _, inst in SOURCES:
                assert read_lines(d, inst) == expected(inst, 2500)
            assert not (d / "gaps.jsonl").exists()
    finally:
        for s in (s1, s2):
            s.kill()
            s.wait(10)


def test_gap_is_reported_not_hidden(tmp_path: Path) -> None:
    sink = LogSink(tmp_path, "g")
    mk = lambda first, n: LogBatch(host="h", instance="i", source="stdout",  # noqa: E731
                                   first_seq=first, lines=[f"l{first + k}" for k in range(n)],
                                   ts=0).model_dump_json().encode()
    sink.apply(1, mk(1, 3))
    sink.apply(2, mk(7, 2))  # 4..6 missing
    sink.apply(3, mk(8, 3))  # 8 repeated, 9-10 new
    sink.checkpoint()
    assert read_lines(tmp_path, "i") == ["l1", "l2", "l3", "l7", "l8", "l9", "l10"]
    assert sink.cp.gaps == 1
    assert '"first": 4, "last": 6' in (tmp_path / "gaps.jsonl").read_text()


def test_restart_cuts_unckeckpointed_tail(tmp_path: Path) -> None:
    sink = LogSink(tmp_path, "c")
    raw = LogBatch(host="h", instance="i", source="stdout", first_seq=1, lines=["a", "b"],
                   ts=0).model_dump_json().encode()
    sink.apply(1, raw)
    sink.checkpoint()
    more = LogBatch(host="h", instance="i", source="stdout", first_seq=3, lines=["c"],
                    ts=0).model_dump_json().encode()
    sink.apply(2, more)  # written, never checkpointed: a crash here
    sink._files["i/stdout.log"].flush()
    sink.close()
    again = LogSink(tmp_path, "c")
    assert read_lines(tmp_path, "i") == ["a", "b"]
    again.apply(2, more)
    again.checkpoint()
    assert read_lines(tmp_path, "i") == ["a", "b", "c"]


def test_restart_cuts_a_file_written_before_the_first_checkpoint(tmp_path: Path) -> None:
    """Killed after its files reached the disk but before the checkpoint that names them:
    the replay must not double them (seen once in a full run under load)."""
    sink = LogSink(tmp_path, "f")
    raw = LogBatch(host="h", instance="i", source="stdout", first_seq=1, lines=["a", "b"],
                   ts=0).model_dump_json().encode()
    sink.apply(1, raw)
    sink._files["i/stdout.log"].flush()  # on disk, no checkpoint yet: a crash here
    sink.close()
    again = LogSink(tmp_path, "f")
    assert read_lines(tmp_path, "i") == []
    again.apply(1, raw)
    again.checkpoint()
    assert read_lines(tmp_path, "i") == ["a", "b"]


SINK_MANY = """
import resource, sys
from pathlib import Path
from corral.bus.messages import LogBatch
from corral.telemetry.logsink import LogSink
resource.setrlimit(resource.RLIMIT_NOFILE, (300, 300))
sink = LogSink(Path(sys.argv[1]), "t")
seq = 0
for rnd in range(2):
    for i in range(600):
        seq += 1
        b = LogBatch(host="h1", instance=f"i{i}", source="stdout", first_seq=rnd + 1,
                     lines=[f"i{i} line {rnd + 1}"], ts=0.0)
        sink.apply(seq, b.model_dump_json().encode())
    sink.checkpoint()
sink.close()
"""


def test_a_sink_writes_for_more_instances_than_it_may_open_files(tmp_path: Path) -> None:
    """600 instances under a limit of 300 open files: it used to keep one file open per
    instance and source for ever (EMFILE); now the least recently written is closed."""
    proc = subprocess.run([sys.executable, "-c", SINK_MANY, str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for i in (0, 299, 599):
        assert (tmp_path / f"i{i}" / "stdout.log").read_text() == \
            f"i{i} line 1\ni{i} line 2\n"
    again = LogSink(tmp_path, "t")  # what the checkpoint vouches for is all there
    assert again.cp.lengths["i42/stdout.log"] == len("i42 line 1\ni42 line 2\n")
    again.close()


async def test_a_second_visit_to_a_host_is_kept_whole(bus: EmbeddedNats, tmp_path: Path) -> None:
    """An instance that left a host and came back captures from a fresh offsets file, so its
    lines are numbered from 1 again: the stream (dedup ids) and the sink (line numbers) keep
    them, since each visit is a run of its own; an agent restart within a visit still repeats
    its batches, and those are dropped."""
    from corral.telemetry.capture import LogCapture

    nc = await nats.connect(bus.url, token=TOKEN)
    js = nc.jetstream()
    await streams.ensure(js, streams.logs_config())
    out = tmp_path / "stdout.log"
    runs = []
    for visit in (1, 2):
        out.write_text("".join(f"visit{visit} {i}\n" for i in range(1, 4)))
        state = tmp_path / f"offsets-{visit}.json"  # a new copy: a new instance dir
        cap = LogCapture(out, state, "h1", "web", "stdout")
        assert await cap.pump(js) == 3
        runs.append(cap.pos.run)
        # the agent restarted before its offsets were saved: the same batch again
        again = LogCapture(out, state, "h1", "web", "stdout")
        again.pos.offset, again.pos.next_seq = 0, 1
        again._save()
        assert await LogCapture(out, state, "h1", "web", "stdout").pump(js) == 3
    assert runs[0] != runs[1]
    info = await js.stream_info(streams.logs_config().name)
    assert info.state.messages == 2  # one batch per visit; the repeats were dropped
    await nc.close()
    sink = LogSink(tmp_path / "sink", "v")
    sub_nc = await nats.connect(bus.url, token=TOKEN)
    sub = await sub_nc.jetstream().subscribe(subjects.LOGS_ALL, ordered_consumer=True)
    for seq in (1, 2):
        msg = await sub.next_msg(timeout=5)
        sink.apply(seq, msg.data, msg.subject)
    await sub_nc.close()
    sink.checkpoint()
    assert read_lines(tmp_path / "sink", "web") == [
        *(f"visit1 {i}" for i in range(1, 4)), *(f"visit2 {i}" for i in range(1, 4))]
    assert sink.cp.gaps == 0
