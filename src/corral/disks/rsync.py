"""rsync passes between hosts, over the data channel: full, or only the paths that changed.

Files are never updated in place on the receiving side (no ``--inplace``): rsync writes a temp
file and renames it, so a standby never holds a truncated file even if the pass is cut off.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from corral.disks.channel import ChannelTls
from corral.disks.rsh import READY_ENV, TICKET_ENV
from corral.errors import TransferFailed as TransferFailed  # lives in errors.py with the rest

#: ``--modify-window=-1``: compare mtimes to the nanosecond (rsync >= 3.1.3). By default rsync
#: compares whole seconds, so a file rewritten in the second after a standby refresh copied it
#: (same size: a WAL segment, a database page file) looked unchanged to the next live pass, and
#: a promotion lost those writes. Seen with PostgreSQL: acknowledged commits gone.
BASE_FLAGS = ["-aHAX", "--numeric-ids", "--delete", "--stats", "--modify-window=-1"]


@dataclass(frozen=True)
class Endpoint:
    """Where a pass goes: a host's data channel and a directory there, and what lets it in."""

    #: the receiving host's address and data port
    host: str
    port: int
    path: str
    #: the server's ticket for this pass (handed to the remote shell in its environment)
    ticket: str = ""
    #: the receiving host's name, which its certificate must carry (TLS only)
    peer: str = ""
    #: this host's certificate, key and the fleet's CA; None: the channel runs in clear
    tls: ChannelTls | None = None


@dataclass(frozen=True)
class PassResult:
    files: int
    bytes_sent: int
    seconds: float


def rsh_argv(ep: Endpoint) -> list[str]:
    """The remote shell, up to the host it connects to (rsync appends that itself)."""
    argv = [sys.executable, "-m", "corral.disks.rsh", "--port", str(ep.port)]
    if ep.tls is not None:
        files = {"--cert": ep.tls.cert_file, "--key": ep.tls.key_file, "--ca": ep.tls.ca_file}
        argv += [a for opt, f in files.items() if f for a in (opt, f)] + ["--peer", ep.peer]
    return argv


def rsh(ep: Endpoint) -> str:
    return shlex.join(rsh_argv(ep))


def channel_env(ep: Endpoint, ready: Path | None = None) -> dict[str, str]:
    """The environment of a tool whose remote shell connects to ``ep``: the ticket goes there,
    not on a command line every user of the host can read (``ps``)."""
    env = {**os.environ, TICKET_ENV: ep.ticket}
    if ready is not None:
        env[READY_ENV] = str(ready)
    return env


_FILES = re.compile(r"Number of regular files transferred: ([\d,.]+)")
_SENT = re.compile(r"Total bytes sent: ([\d,.]+)")


def _num(rx: re.Pattern[str], text: str) -> int:
    m = rx.search(text)
    return int(re.sub(r"[,.]", "", m.group(1))) if m else 0


def _check(proc_code: int | None, err: bytes, ep: Endpoint) -> None:
    # 24 = some source files vanished during the live pass: expected while the instance runs
    if proc_code not in (0, 24):
        msg = err.decode(errors="replace").strip()[-800:]
        raise TransferFailed(
            f"rsync to {ep.host}:{ep.path} failed (exit {proc_code}): {msg}",
            hint="check the target agent's log and its free disk; the pass can be retried",
        )


DIRTY_FLAGS = ["--files-from=-", "--from0", "--delete-missing-args", "--force", "-r"]


class PreparedPass:
    """An rsync already connected to the target and waiting for its list of paths.

    The frozen pass of a refresh must not pay for process start-up, the remote shell and the
    protocol handshake while the instance is frozen; rsync only reads ``--files-from`` after it
    has connected, so we start it before the freeze, wait for the remote shell to report the
    handshake done, and hand it the dirty list once frozen.
    """

    def __init__(self, proc: asyncio.subprocess.Process, ep: Endpoint, ready: Path) -> None:
        self.proc, self.ep, self._ready = proc, ep, ready

    @classmethod
    async def start(cls, src: Path, ep: Endpoint, timeout: float = 15.0,
                    extra: list[str] | None = None) -> PreparedPass:
        ready = Path(tempfile.mkdtemp(prefix="corral-rsync-")) / "ready"
        argv = ["rsync", *BASE_FLAGS, *(extra or []), "-e", rsh(ep), *DIRTY_FLAGS, f"{src}/",
                f"{ep.host}:{ep.path}/"]
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=channel_env(ep, ready),
        )
        prepared = cls(proc, ep, ready)
        deadline = time.monotonic() + timeout
        while not ready.exists():
            if proc.returncode is not None or time.monotonic() > deadline:
                why = ("rsync exited" if proc.returncode is not None
                       else f"the remote shell did not connect within {timeout:.0f}s")
                await prepared.abort()
                _, err = await proc.communicate()
                raise TransferFailed(
                    f"preparing a pass to {ep.host}:{ep.path} failed: {why}: "
                    f"{err.decode(errors='replace').strip()[-600:]}",
                    hint="check the target agent's data port and log")
            await asyncio.sleep(0.005)
        return prepared

    async def finish(self, paths: Iterable[str]) -> PassResult:
        listing = b"".join(n.encode() + b"\0" for n in sorted(set(paths)))
        start = time.monotonic()
        out, err = await self.proc.communicate(listing)
        seconds = time.monotonic() - start
        self._cleanup()
        _check(self.proc.returncode, err, self.ep)
        text = out.decode(errors="replace")
        return PassResult(_num(_FILES, text), _num(_SENT, text), seconds)

    async def abort(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        self._cleanup()

    def _cleanup(self) -> None:
        shutil.rmtree(self._ready.parent, ignore_errors=True)


async def run_pass(src: Path, ep: Endpoint, paths: Iterable[str] | None = None,
                   extra: list[str] | None = None) -> PassResult:
    """One rsync pass of ``src`` to ``ep``; with ``paths``, only those (deleted ones removed)."""
    argv = ["rsync", *BASE_FLAGS, *(extra or []), "-e", rsh(ep)]
    listing: bytes | None = None
    if paths is not None:
        names = sorted(set(paths))
        if not names:
            return PassResult(0, 0, 0.0)
        argv += DIRTY_FLAGS
        listing = b"\0".join(n.encode() for n in names) + b"\0"
    argv += [f"{src}/", f"{ep.host}:{ep.path}/"]
    start = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE if listing is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=channel_env(ep),
    )
    out, err = await proc.communicate(listing)
    seconds = time.monotonic() - start
    text = out.decode(errors="replace")
    _check(proc.returncode, err, ep)
    return PassResult(_num(_FILES, text), _num(_SENT, text), seconds)
