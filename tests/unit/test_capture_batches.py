"""How a capture cuts a file into batches and where its offsets stand after a pump: a read of
a bounded size per batch, offsets written once per pump (not per batch)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from corral.bus.messages import LogBatch
from corral.telemetry.capture import LogCapture


class Bus:
    """Records what is published; refuses the ``fail_at``-th publish and every later one."""

    def __init__(self, fail_at: int = 0) -> None:
        self.batches: list[LogBatch] = []
        self.fail_at = fail_at

    async def publish(self, subject: str, payload: bytes, **kw: Any) -> None:
        if self.fail_at and len(self.batches) + 1 >= self.fail_at:
            raise ConnectionError("the bus went away")
        self.batches.append(LogBatch.model_validate_json(payload))


def expected(lines: list[str], max_line: int) -> list[str]:
    """Each line whole, or cut into ``max_line`` pieces when it is longer."""
    out = []
    for line in lines:
        if len(line) <= max_line:
            out.append(line)
        else:
            out.extend(line[i:i + max_line] for i in range(0, len(line), max_line))
    return out


async def test_a_backlog_read_a_bounded_slice_at_a_time_keeps_every_line_whole(
        tmp_path: Path) -> None:
    """Lines around every length that matters (empty, ``max_line``, one past it, overlong) so
    that batch ends fall everywhere: what comes out is every line once, in order, cut only when
    longer than ``max_line``, each batch within its JSON budget."""
    rng = random.Random(12)
    max_line, max_bytes = 10, 64
    lines = [("x" * rng.choice([0, 1, 9, 10, 11, 19, 20, 21, 35])) + f"{i}"[-1:] * (i % 2)
             for i in range(600)]
    log = tmp_path / "out.log"
    log.write_text("".join(f"{ln}\n" for ln in lines))
    cap = LogCapture(log, tmp_path / "off", "h1", "web", "stdout", max_batch=50,
                     max_line=max_line, max_bytes=max_bytes)
    bus = Bus()
    sent = await cap.pump(bus)
    got = [ln for b in bus.batches for ln in b.lines]
    assert got == expected(lines, max_line) and sent == len(got)
    assert [b.first_seq for b in bus.batches] == [
        1 + sum(len(b.lines) for b in bus.batches[:i]) for i in range(len(bus.batches))]
    assert all(sum(len(ln) + 3 for ln in b.lines) <= max_bytes or len(b.lines) == 1
               for b in bus.batches)
    assert cap.pos.offset == log.stat().st_size


async def test_a_pump_cut_short_keeps_what_was_acknowledged_and_nothing_more(
        tmp_path: Path) -> None:
    """The bus fails in the middle of a backlog: the offsets saved say exactly what it took, so
    a capture started again (an agent restarted) goes on from there, nothing lost or sent
    twice."""
    log = tmp_path / "out.log"
    log.write_text("".join(f"line {i}\n" for i in range(1, 1001)))
    first = Bus(fail_at=4)
    with pytest.raises(ConnectionError):
        await LogCapture(log, tmp_path / "off", "h1", "web", "stdout", max_batch=100).pump(first)
    assert len(first.batches) == 3
    again = LogCapture(log, tmp_path / "off", "h1", "web", "stdout", max_batch=100)
    second = Bus()
    await again.pump(second)
    got = [(b.first_seq + i, ln) for b in first.batches + second.batches
           for i, ln in enumerate(b.lines)]
    assert got == [(i, f"line {i}") for i in range(1, 1001)]
    assert {b.run for b in first.batches + second.batches} == {again.pos.run}
    again_idle = LogCapture(log, tmp_path / "off", "h1", "web", "stdout")
    assert await again_idle.pump(Bus()) == 0  # a restart after a whole pump resends nothing


async def test_a_run_is_on_disk_before_its_first_line_goes_out(tmp_path: Path) -> None:
    """A capture killed -9 before its first save (no ``finally``) must come back as the same
    run: the bus sees every line it sent again with the same run and numbers, which every
    reader drops, and never as new lines."""
    log = tmp_path / "out.log"
    log.write_text("".join(f"line {i}\n" for i in range(1, 301)))
    state = tmp_path / "off"
    runs_on_disk: list[str] = []

    class Killed(Bus):
        async def publish(self, subject: str, payload: bytes, **kw: Any) -> None:
            runs_on_disk.append(json.loads(state.read_text())["run"] if state.exists() else "")
            await super().publish(subject, payload, **kw)

    first = Killed()
    await LogCapture(log, state, "h1", "web", "stdout", max_batch=100).pump(first)
    assert runs_on_disk and runs_on_disk[0] == first.batches[0].run  # named before it went
    state.write_text(json.dumps({**json.loads(state.read_text()), "offset": 0,
                                 "next_seq": 1}))  # as the file stood before the first send
    second = Bus()
    await LogCapture(log, state, "h1", "web", "stdout", max_batch=100).pump(second)
    assert {b.run for b in first.batches + second.batches} == {first.batches[0].run}
    assert [b.first_seq for b in second.batches] == [b.first_seq for b in first.batches]
