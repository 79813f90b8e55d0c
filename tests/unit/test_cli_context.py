"""Finding the fleet: environment first, then the context file (always a temp path here)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from corral.errors import CorralError
from corral.rig import procs
from corral.rig.context import (
    FleetContext,
    ProcInfo,
    context_path,
    load_context,
    remove_context,
    resolve,
    save_context,
)


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CORRAL_CONTEXT", str(tmp_path / "ctx" / "context.json"))
    monkeypatch.delenv("CORRAL_URL", raising=False)
    monkeypatch.delenv("CORRAL_TOKEN", raising=False)


def test_default_path_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("CORRAL_CONTEXT")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    assert context_path() == tmp_path / "cfg" / "corral" / "context.json"


def test_roundtrip_is_private(tmp_path: Path) -> None:
    ctx = FleetContext(url="http://127.0.0.1:5", token="tok", data_dir="/d",
                       server=ProcInfo("server", 1, 2, ["a"], "/l"),
                       agents=[ProcInfo("host1", 3, 4, ["b"], "/m", netns="ns", address="1")],
                       network={"tag": "abcdef"})
    path = save_context(ctx)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_context() == ctx
    assert resolve() == ("http://127.0.0.1:5", "tok")
    remove_context()
    assert load_context() is None


def test_env_wins_and_needs_a_token(monkeypatch: pytest.MonkeyPatch) -> None:
    save_context(FleetContext(url="http://a:1", token="filetok"))
    monkeypatch.setenv("CORRAL_URL", "http://b:2")
    with pytest.raises(CorralError, match="CORRAL_TOKEN is not"):
        resolve()
    monkeypatch.setenv("CORRAL_TOKEN", "envtok")
    assert resolve() == ("http://b:2", "envtok")
    monkeypatch.delenv("CORRAL_TOKEN")
    monkeypatch.setenv("CORRAL_URL", "http://a:1/")
    assert resolve() == ("http://a:1/", "filetok")


def test_missing_and_broken_context() -> None:
    with pytest.raises(CorralError) as info:
        resolve()
    assert "corral up" in info.value.hint
    context_path().parent.mkdir(parents=True)
    context_path().write_text("{not json")
    with pytest.raises(CorralError, match="cannot be read"):
        load_context()
    context_path().write_text("{}")
    with pytest.raises(CorralError, match="not one corral wrote"):
        load_context()


def test_spawned_process_is_recognised_and_stopped(tmp_path: Path) -> None:
    info = procs.spawn("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"],
                       tmp_path / "logs" / "s.log")
    try:
        assert procs.alive(info)
        assert os.getsid(info.pid) == info.pid  # its own session: outlives our terminal
        forged = ProcInfo(**{**info.__dict__, "start": info.start + 1})
        assert not procs.alive(forged)  # a reused pid is never taken for ours
        assert procs.stop(forged) is False and procs.alive(info)
        assert procs.stop(info, timeout=5) is False  # SIGTERM was enough
        assert not procs.alive(info)
    finally:
        if procs.alive(info):
            os.kill(info.pid, 9)


def test_stop_escalates_to_sigkill(tmp_path: Path) -> None:
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', " \
           "flush=True); time.sleep(60)"
    info = procs.spawn("stubborn", [sys.executable, "-c", code], tmp_path / "s.log")
    try:
        for _ in range(100):
            if "ready" in procs.tail(info.log):
                break
            subprocess.run(["sleep", "0.05"], check=True)
        assert procs.stop(info, timeout=0.5) is True
        assert not procs.alive(info)
    finally:
        if procs.alive(info):
            os.kill(info.pid, 9)
