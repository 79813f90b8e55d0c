"""Helpers for e2e tests: a fleet started with ``corral up`` and driven through the CLI.

Every fleet gets its own data dir and its own ``CORRAL_CONTEXT`` under the test's temp dir, so
tests never touch a real user's fleet; finalizers run ``corral down`` and then, whatever that
did, kill the processes the context lists and remove the fleet's namespaces and bridge.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corral.rig import netns, procs
from corral.rig.context import FleetContext, load_context, save_context

CLI = [sys.executable, "-m", "corral.cli"]


def parts_missing() -> str | None:
    for mod in ("corral.control.server", "corral.agent.daemon"):
        if importlib.util.find_spec(mod) is None:
            return f"{mod} is not built yet"
    return None


@dataclass
class Fleet:
    """A running fleet and the environment that points the CLI at it."""

    tmp: Path
    env: dict[str, str]
    ctx: FleetContext | None = None
    calls: list[list[str]] = field(default_factory=list)

    @property
    def context_file(self) -> Path:
        return Path(self.env["CORRAL_CONTEXT"])

    def cli(self, *args: str, timeout: float = 120, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
        self.calls.append(list(args))
        return subprocess.run([*CLI, *args], env=env or self.env, capture_output=True,
                              text=True, timeout=timeout)

    def ok(self, *args: str, timeout: float = 120) -> str:
        proc = self.cli(*args, timeout=timeout)
        assert proc.returncode == 0, (
            f"corral {' '.join(args)} exited {proc.returncode}\n"
            f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}\n{self.logs()}")
        return proc.stdout

    def json(self, *args: str) -> Any:
        return json.loads(self.ok(*args, "--json"))

    def instance(self, name: str) -> dict[str, Any]:
        return dict(self.json("show", name))

    def wait_state(self, name: str, states: set[str], timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        view = self.instance(name)
        while view["state"] not in states and time.monotonic() < deadline:
            time.sleep(0.3)
            view = self.instance(name)
        assert view["state"] in states, f"{name} is {view['state']}, wanted {states}"
        return view

    def logs(self, lines: int = 20) -> str:
        ctx = load_context(self.context_file) if self.context_file.exists() else self.ctx
        if ctx is None:
            return ""
        parts = [p for p in [ctx.server, *ctx.servers, *ctx.agents] if p is not None]
        return "\n".join(f"--- {p.log}\n{procs.tail(p.log, lines)}" for p in parts)

    def up(self, *args: str, timeout: float = 180) -> None:
        self.ok("up", "--data", str(self.tmp / "data"), *args, timeout=timeout)
        self.ctx = load_context(self.context_file)
        assert self.ctx is not None


@contextlib.contextmanager
def fleet_for(tmp: Path, *up_args: str) -> Iterator[Fleet]:
    """A fleet in ``tmp`` (started with ``corral up UP_ARGS`` when any are given), skipped when
    the server or agent is not built, and always torn down."""
    import pytest

    missing = parts_missing()
    if missing:
        pytest.skip(missing)
    fleet = Fleet(tmp=tmp, env=make_env(tmp))
    try:
        if up_args:
            fleet.up(*up_args)
        yield fleet
    finally:
        teardown(fleet)


def teardown(fleet: Fleet) -> None:
    """``corral down``, then make sure: kill what is left, remove the network."""
    ctx = load_context(fleet.context_file) if fleet.context_file.exists() else None
    ctx = ctx or fleet.ctx
    with contextlib.suppress(Exception):
        fleet.cli("down", "--timeout", "5", timeout=180)
    if ctx is None:
        return
    for proc in [*ctx.agents, *([ctx.server] if ctx.server else []), *ctx.servers,
                 *([ctx.postgres] if ctx.postgres else [])]:
        if procs.alive(proc):
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
    if ctx.network:
        netns.cleanup(str(ctx.network["tag"]))
    fleet.context_file.unlink(missing_ok=True)


def make_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    env["CORRAL_CONTEXT"] = str(tmp / "context.json")
    env["NO_COLOR"] = "1"
    env["COLUMNS"] = "200"
    return env


def restart_agent(fleet: Fleet, name: str) -> None:
    """Start ``name``'s agent again with exactly its recorded command (inside its namespace),
    and record the new process so ``corral down`` stops it."""
    ctx = load_context(fleet.context_file)
    assert ctx is not None
    old = next(a for a in ctx.agents if a.name == name)
    env = {**fleet.env, "CORRAL_TOKEN": ctx.token}
    log = Path(old.log)
    start = log.stat().st_size if log.exists() else 0
    new = procs.spawn(old.name, old.argv, log, env=env, netns=old.netns,
                      address=old.address)
    ctx.agents = [new if a.name == name else a for a in ctx.agents]
    save_context(ctx, fleet.context_file)
    fleet.ctx = ctx
    # back only once it has joined: until then the server may still count the killed agent
    # "up" (its lease has not run out) and a command sent to it finds no one
    deadline = time.monotonic() + 60
    while True:
        with log.open("rb") as fh:
            fh.seek(start)
            if b"joined as " in fh.read():
                return
        assert procs.alive(new), f"the restarted agent of {name} died:\n{procs.tail(log)}"
        assert time.monotonic() < deadline, f"the restarted agent of {name} did not join"
        time.sleep(0.05)
