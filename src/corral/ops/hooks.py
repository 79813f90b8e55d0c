"""Operator hooks: executables named ``pre-<op>``, ``post-<op>``, ``<op>-failed``, ``pre-freeze``,
``post-thaw`` in the hooks directory.

A hook gets the operation as JSON on stdin, never in a command line or a shell string, so no
instance name or path can be interpreted by a shell. It runs with a timeout; its output is kept
(bounded) for the operation's record. A missing hook is not an error; a hook that is present but
cannot run (not executable, no ``#!`` line) counts as a hook that refused, because an operator
who dropped a script there expects it to run, and a ``pre-`` hook that did not run must not let
the operation go ahead. A hook gets no corral settings in its environment (no token).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corral.errors import ConfigError

OUTPUT_LIMIT = 16 * 1024
#: the exit code of a hook that could not run (as a shell reports "cannot execute")
CANNOT_RUN = 126
#: after killing a hook, how long its output may take to end
DRAIN_TIMEOUT = 2.0


@dataclass(frozen=True)
class HookResult:
    name: str
    ran: bool
    exit_code: int | None = None
    output: str = ""
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return not self.ran or (self.exit_code == 0 and not self.timed_out)


class Hooks:
    def __init__(self, directory: Path | None, timeout: float = 60.0) -> None:
        self.directory = directory
        self.timeout = timeout

    def path(self, name: str) -> Path | None:
        if self.directory is None:
            return None
        p = self.directory / name
        if not p.exists():
            return None
        if not p.is_file() or not os.access(p, os.X_OK):
            raise ConfigError(
                f"hook {p} exists but is not an executable file",
                hint=f"chmod +x {p}, or remove it if it should not run",
            )
        return p

    async def run(self, name: str, payload: dict[str, Any]) -> HookResult:
        """Run hook ``name`` if there is one. A hook that cannot run (not executable, no
        ``#!`` line) counts as one that said no, and a hook past its timeout is killed with
        everything it started: an operation never waits on a hook for ever."""
        try:
            path = self.path(name)
        except ConfigError as exc:
            return HookResult(name, True, CANNOT_RUN, str(exc))
        if path is None:
            return HookResult(name, ran=False)
        data = json.dumps({"hook": name, **payload}).encode()
        try:
            proc = await asyncio.create_subprocess_exec(
                str(path),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                cwd=str(path.parent),
                start_new_session=True,  # its own process group: killed whole on timeout
                env=hook_env(),
            )
        except OSError as exc:
            why = exc.strerror or str(exc)
            return HookResult(name, True, CANNOT_RUN,
                              f"cannot run hook {path}: {why}; a script needs a '#!' line "
                              "naming its interpreter")
        try:
            out, _ = await asyncio.wait_for(proc.communicate(data), self.timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the hook and what it left running
            out = await _drain(proc)
            return HookResult(name, True, proc.returncode, _tail(out), timed_out=True)
        return HookResult(name, True, proc.returncode, _tail(out))


def hook_env() -> dict[str, str]:
    """The server's environment without corral's own settings: a hook never gets the fleet
    token (nor anything else corral was configured with)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}


async def _drain(proc: asyncio.subprocess.Process) -> bytes:
    """What a killed hook wrote; bounded, since a process that escaped its group may still
    hold the pipe open."""
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), DRAIN_TIMEOUT)
        return out or b""
    except TimeoutError:
        if proc.stdout is not None:
            proc.stdout.feed_eof()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), DRAIN_TIMEOUT)
        return b""


def _tail(out: bytes | None) -> str:
    return (out or b"")[-OUTPUT_LIMIT:].decode(errors="replace")
