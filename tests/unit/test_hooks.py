"""Hooks that misbehave never strand an operation: a grandchild holding the output past the
timeout is killed with its hook, a script that cannot run counts as a refusal, and no hook
sees the fleet token."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from corral.ops.hooks import CANNOT_RUN, Hooks


def hook(d: Path, name: str, body: str, mode: int = 0o755) -> Path:
    p = d / name
    p.write_text(body)
    p.chmod(mode)
    return p


async def test_a_grandchild_holding_the_output_is_killed_at_the_timeout(tmp_path: Path
                                                                          ) -> None:
    pidfile = tmp_path / "grandchild.pid"
    hook(tmp_path, "pre-demo", f"#!/bin/sh\nsleep 300 &\necho $! > {pidfile}\necho started\n"
                               "wait\n")
    started = time.monotonic()
    res = await Hooks(tmp_path, timeout=1.0).run("pre-demo", {})
    assert time.monotonic() - started < 10
    assert res.timed_out and not res.ok
    pid = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while True:  # the sleep was killed with its group (then reaped by whoever adopted it)
        try:
            os.kill(pid, 0)
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (ProcessLookupError, FileNotFoundError):
            break
        if state == "Z":
            break
        assert time.monotonic() < deadline, "the hook's grandchild outlived its timeout"
        time.sleep(0.05)


@pytest.mark.parametrize(("body", "mode", "says"), [
    ("echo no shebang here\n", 0o755, "#!"),
    ("#!/bin/sh\nexit 0\n", 0o644, "not an executable"),
])
async def test_a_hook_that_cannot_run_refuses(tmp_path: Path, body: str, mode: int,
                                              says: str) -> None:
    hook(tmp_path, "pre-demo", body, mode)
    res = await Hooks(tmp_path).run("pre-demo", {})
    assert res.ran and not res.ok and res.exit_code == CANNOT_RUN
    assert says in res.output


async def test_a_hook_gets_no_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORRAL_TOKEN", "s3cret-token")
    hook(tmp_path, "post-demo", "#!/bin/sh\nenv\n")
    res = await Hooks(tmp_path).run("post-demo", {})
    assert res.ok
    assert "s3cret-token" not in res.output and "PATH=" in res.output
