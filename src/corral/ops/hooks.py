"""Operator hooks: executables named ``pre-<op>``, ``post-<op>``, ``<op>-failed``, ``pre-freeze``,
``post-thaw`` in the hooks directory.

A hook gets the operation as JSON on stdin, never in a command line or a shell string, so no
instance name or path can be interpreted by a shell. It runs with a timeout; its output is kept
(bounded) for the operation's record. A missing hook is not an error; a hook that is present but
not executable is, because an operator who dropped a script there expects it to run.
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corral.errors import ConfigError

OUTPUT_LIMIT = 16 * 1024


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
        path = self.path(name)
        if path is None:
            return HookResult(name, ran=False)
        data = json.dumps({"hook": name, **payload}).encode()
        proc = await asyncio.create_subprocess_exec(
            str(path),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            cwd=str(path.parent),
            start_new_session=True,
        )
        try:
            out, _ = await asyncio.wait_for(proc.communicate(data), self.timeout)
        except TimeoutError:
            proc.kill()
            out, _ = await proc.communicate()
            return HookResult(name, True, proc.returncode, _tail(out), timed_out=True)
        return HookResult(name, True, proc.returncode, _tail(out))


def _tail(out: bytes | None) -> str:
    return (out or b"")[-OUTPUT_LIMIT:].decode(errors="replace")
