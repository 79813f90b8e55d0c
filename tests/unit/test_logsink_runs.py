"""The sink's checkpoint stays bounded whatever runs a host names (its ``run`` is the host's
to choose), and a legitimate return of a copy to a host still numbers from 1."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from corral.bus.messages import LogBatch
from corral.telemetry.logsink import RUNS_PER_SOURCE, LogSink


def _raw(run: str, first: int, lines: list[str], source: str = "stdout") -> bytes:
    return LogBatch(host="h1", instance="web", source=source, first_seq=first, lines=lines,
                    ts=0.0, run=run).model_dump_json().encode()


def test_a_host_naming_a_new_run_per_batch_does_not_grow_the_checkpoint(tmp_path: Path) -> None:
    sink = LogSink(tmp_path, "s")
    for i in range(200):
        sink.apply(i + 1, _raw(f"{i:x}", 1, [f"line {i}"]), "corral.logs.h1.web")
    sink.checkpoint()
    keys = json.loads(sink.state_path.read_text())["last_line"]
    assert len(keys) == RUNS_PER_SOURCE
    assert f"h1/web/stdout/{199:x}" in keys  # the newest runs are kept
    assert sink.written == 200  # every line written once


def test_kept_runs_still_skip_repeats_after_a_restart(tmp_path: Path) -> None:
    sink = LogSink(tmp_path, "s")
    sink.apply(1, _raw("aa", 1, ["a1", "a2"]))
    sink.apply(2, _raw("bb", 1, ["b1"]))
    sink.checkpoint()
    sink.close()
    again = LogSink(tmp_path, "s")
    again.apply(3, _raw("aa", 1, ["a1", "a2", "a3"]))  # a resend overlapping what was written
    again.checkpoint()
    text = (tmp_path / "web" / "stdout.log").read_text().splitlines()
    assert text == ["a1", "a2", "b1", "a3"]
    # the run written last is the last one pushed out
    assert list(again.cp.last_line)[-1] == "h1/web/stdout/aa"


def test_a_source_name_with_a_slash_is_refused() -> None:
    with pytest.raises(ValidationError):
        LogBatch(host="h1", instance="web", source="std/out", first_seq=1, lines=[], ts=0.0)
    with pytest.raises(ValidationError):
        LogBatch(host="h1", instance="web", source="x" * 100, first_seq=1, lines=[], ts=0.0)
