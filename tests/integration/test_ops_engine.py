"""Operation engine against a real SQLite file, with kill -9 at every step."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict

from corral.ops.engine import Engine, Kind, OpContext, Step
from corral.ops.hooks import Hooks
from corral.ops.store import OperationStore, OpRecord, OpState, StepState

STEPS = ["reserve", "copy", "switch", "cleanup"]  # "switch" is the point of no return

HARNESS = textwrap.dedent(
    """
    import asyncio, os, signal, sys
    from pathlib import Path
    import sqlalchemy as sa
    sys.path.insert(0, {tests!r})
    from test_ops_engine import build_engine
    work, die_at, phase = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    engine = build_engine(work, die_at=die_at, phase=phase)
    if sys.argv[4] == "submit":
        asyncio.run(engine.submit("demo", "web", {{"n": 1}}))
    else:
        asyncio.run(engine.resume_all())
    """
)



class AnyParams(BaseModel):
    """The demo kind takes whatever the test passes."""

    model_config = ConfigDict(extra="allow")

def build_engine(work: Path, die_at: str = "", phase: str = "") -> Engine:
    """Each step creates a marker (its side effect); undo removes it. ``die_at`` kills the
    process with SIGKILL inside that step, ``phase`` before or after its side effect."""
    store = OperationStore(sa.create_engine(f"sqlite:///{work / 'ops.db'}"), create=True)
    engine = Engine(store, Hooks(work / "hooks"), retry_delay=0.01)

    def make(name: str) -> Step:
        marker = work / f"{name}.marker"

        async def do(ctx: OpContext) -> None:
            if name == die_at and phase == "before":
                os.kill(os.getpid(), signal.SIGKILL)
            marker.write_text(name)
            if name == die_at and phase == "after":
                os.kill(os.getpid(), signal.SIGKILL)
            if (work / f"fail-{name}").exists():
                raise RuntimeError(f"{name} broke")

        async def undo(ctx: OpContext) -> None:
            if (work / f"undo-fails-{name}").exists():
                raise RuntimeError(f"cannot undo {name}")
            marker.unlink(missing_ok=True)

        return Step(name, do, undo, commit=name == "switch")

    engine.register(Kind("demo", lambda rec: [make(n) for n in STEPS], AnyParams))
    return engine


def markers(work: Path) -> set[str]:
    return {p.stem for p in work.glob("*.marker")}


def only_record(work: Path) -> OpRecord:
    recs = OperationStore(sa.create_engine(f"sqlite:///{work / 'ops.db'}")).list()
    assert len(recs) == 1
    return recs[0]


def run_harness(work: Path, die_at: str, phase: str, mode: str) -> int:
    script = HARNESS.format(tests=str(Path(__file__).parent))
    proc = subprocess.run([sys.executable, "-c", script, str(work), die_at, phase, mode],
                          timeout=60)
    return proc.returncode


@pytest.mark.parametrize("phase", ["before", "after"])
@pytest.mark.parametrize("die_at", STEPS)
def test_kill_9_at_every_step_then_resume(tmp_path: Path, die_at: str, phase: str) -> None:
    code = run_harness(tmp_path, die_at, phase, "submit")
    assert code == -signal.SIGKILL
    rec = only_record(tmp_path)
    assert rec.state == OpState.RUNNING
    # a new server process resumes
    assert run_harness(tmp_path, "", "", "resume") == 0
    rec = only_record(tmp_path)
    # "switch" is only past the point of no return once recorded done; killed inside it (even
    # after its side effect) the operation is still undone.
    if STEPS.index(die_at) > STEPS.index("switch"):
        assert rec.state == OpState.SUCCEEDED
        assert markers(tmp_path) == set(STEPS)
    else:
        assert rec.state == OpState.ROLLED_BACK
        assert markers(tmp_path) == set()
        assert rec.error is not None and "interrupted" in rec.error["message"]
    # and the next operation on the same target works
    engine = build_engine(tmp_path)
    nxt = asyncio.run(engine.submit("demo", "web", {}))
    assert nxt.state == OpState.SUCCEEDED


def test_failure_rolls_back_in_reverse_and_runs_failed_hook(tmp_path: Path) -> None:
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    seen = tmp_path / "failed-hook.json"
    (hooks / "demo-failed").write_text(f"#!/bin/sh\ncat > {seen}\n")
    (hooks / "demo-failed").chmod(0o755)
    (tmp_path / "fail-copy").touch()
    engine = build_engine(tmp_path)
    rec = asyncio.run(engine.submit("demo", "web", {"n": 1}))
    assert rec.state == OpState.ROLLED_BACK
    assert markers(tmp_path) == set()
    assert [s.state for s in rec.steps] == [
        StepState.UNDONE, StepState.UNDONE, StepState.PENDING, StepState.PENDING]
    payload = json.loads(seen.read_text())
    assert payload["hook"] == "demo-failed"
    assert payload["operation"]["error"]["step"] == "copy"
    assert "copy broke" in payload["operation"]["error"]["message"]


def test_failing_pre_hook_aborts_before_any_step(tmp_path: Path) -> None:
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "pre-demo").write_text("#!/bin/sh\necho 'database not flushed' >&2\nexit 3\n")
    (hooks / "pre-demo").chmod(0o755)
    rec = asyncio.run(build_engine(tmp_path).submit("demo", "web", {}))
    assert rec.state == OpState.ROLLED_BACK
    assert markers(tmp_path) == set()
    assert rec.error is not None and "database not flushed" in rec.error["message"]


def test_a_pre_hook_that_cannot_run_rolls_back_and_frees_the_target(tmp_path: Path) -> None:
    """A hook without a '#!' line used to raise out of the engine, leaving the operation
    running and its instance busy until the server restarted."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "pre-demo").write_text("echo forgot the shebang\n")
    (hooks / "pre-demo").chmod(0o755)
    engine = build_engine(tmp_path)
    rec = asyncio.run(engine.submit("demo", "web", {}))
    assert rec.state == OpState.ROLLED_BACK and markers(tmp_path) == set()
    assert rec.error is not None and "#!" in rec.error["message"]
    assert "web" not in engine.locks.instances
    (hooks / "pre-demo").unlink()
    assert asyncio.run(engine.submit("demo", "web", {})).state == OpState.SUCCEEDED


def test_failed_undo_needs_attention(tmp_path: Path) -> None:
    (tmp_path / "fail-copy").touch()
    (tmp_path / "undo-fails-reserve").touch()
    rec = asyncio.run(build_engine(tmp_path).submit("demo", "web", {}))
    assert rec.state == OpState.NEEDS_ATTENTION
    assert rec.steps[0].state == StepState.UNDO_FAILED
    assert markers(tmp_path) == {"reserve"}


def test_failure_past_commit_is_retried_forward(tmp_path: Path) -> None:
    (tmp_path / "fail-cleanup").touch()
    rec = asyncio.run(build_engine(tmp_path).submit("demo", "web", {}))
    assert rec.state == OpState.NEEDS_ATTENTION  # never rolled back past the switch
    assert markers(tmp_path) == set(STEPS)
    assert rec.steps[2].state == StepState.DONE


def test_one_operation_per_target(tmp_path: Path) -> None:
    """A crash left an operation on 'web' unfinished: a restarted engine holds it again
    before anything else may start (the server does so at start), so a new one is refused
    as busy, naming the holder."""
    assert run_harness(tmp_path, "copy", "after", "submit") == -signal.SIGKILL
    from corral.errors import Busy

    engine = build_engine(tmp_path)
    (held,) = engine.hold_unfinished()
    with pytest.raises(Busy, match=f"busy with operation {held.id}"):
        asyncio.run(engine.submit("demo", "web", {}))
