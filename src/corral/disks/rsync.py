"""rsync passes between hosts, over the data channel: full, or only the paths that changed.

Files are never updated in place on the receiving side (no ``--inplace``): rsync writes a temp
file and renames it, so a standby never holds a truncated file even if the pass is cut off.
"""

from __future__ import annotations

import asyncio
import re
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from corral.errors import CorralError

BASE_FLAGS = ["-aHAX", "--numeric-ids", "--delete", "--stats"]


class TransferFailed(CorralError):
    code = "transfer_failed"
    http_status = 502
    exit_code = 13
    default_retryable = True


@dataclass(frozen=True)
class Endpoint:
    """Where a pass goes: a host's data channel and a directory there."""

    host: str
    port: int
    token_file: Path
    path: str


@dataclass(frozen=True)
class PassResult:
    files: int
    bytes_sent: int
    seconds: float


def rsh(ep: Endpoint) -> str:
    return f"{sys.executable} -m corral.disks.rsh --port {ep.port} --token-file {ep.token_file}"


_FILES = re.compile(r"Number of regular files transferred: ([\d,.]+)")
_SENT = re.compile(r"Total bytes sent: ([\d,.]+)")


def _num(rx: re.Pattern[str], text: str) -> int:
    m = rx.search(text)
    return int(re.sub(r"[,.]", "", m.group(1))) if m else 0


async def run_pass(src: Path, ep: Endpoint, paths: Iterable[str] | None = None,
                   extra: list[str] | None = None) -> PassResult:
    """One rsync pass of ``src`` to ``ep``; with ``paths``, only those (deleted ones removed)."""
    argv = ["rsync", *BASE_FLAGS, *(extra or []), "-e", rsh(ep)]
    listing: bytes | None = None
    if paths is not None:
        names = sorted(set(paths))
        if not names:
            return PassResult(0, 0, 0.0)
        argv += ["--files-from=-", "--from0", "--delete-missing-args", "--force", "-r"]
        listing = b"\0".join(n.encode() for n in names) + b"\0"
    argv += [f"{src}/", f"{ep.host}:{ep.path}/"]
    start = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE if listing is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate(listing)
    seconds = time.monotonic() - start
    text = out.decode(errors="replace")
    # 24 = some source files vanished during the live pass: expected while the instance runs
    if proc.returncode not in (0, 24):
        msg = err.decode(errors="replace").strip()[-800:]
        raise TransferFailed(
            f"rsync to {ep.host}:{ep.path} failed (exit {proc.returncode}): {msg}",
            hint="check the target agent's log and its free disk; the pass can be retried",
        )
    return PassResult(_num(_FILES, text), _num(_SENT, text), seconds)
