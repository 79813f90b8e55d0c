"""btrfs disk backend: one subvolume per instance, read-only snapshots, incremental send.

The freeze an instance sees is only as long as ``btrfs subvolume snapshot -r`` (milliseconds,
whatever the tree's size); the transfer happens after thaw, from the snapshot, with
``btrfs send -p <previous>`` so only blocks changed since the last refresh move. The receiving
agent runs ``btrfs receive`` behind the authenticated data channel.

Layout under the backend root (which must be on btrfs):
``<root>/<name>`` the instance's writable subvolume; ``<root>/.snap/<name>/<name>@<tag>`` its
read-only snapshots (received ones land in the same place on the target).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

from corral.disks.rsync import Endpoint, PassResult, TransferFailed
from corral.errors import DriverError, InvalidRequest


def _run(*argv: str) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise DriverError(f"{' '.join(argv[:3])} failed: {proc.stderr.strip()[-500:]}",
                          hint="check that the disk root is on btrfs and has free space")
    return proc.stdout


def _syncfs(fd: int) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def drop_partial_receives(directory: Path) -> list[str]:
    """Delete subvolumes under ``directory`` that a failed ``btrfs receive`` left behind (they
    have no Received UUID), so a standby never holds a half-received snapshot."""
    dropped: list[str] = []
    if not directory.is_dir():
        return dropped
    for entry in directory.iterdir():
        proc = subprocess.run(["btrfs", "subvolume", "show", str(entry)], capture_output=True,
                              text=True)
        if proc.returncode != 0:
            continue
        for line in proc.stdout.splitlines():
            key, _, value = line.strip().partition(":")
            if key == "Received UUID" and value.strip() == "-":
                _run("btrfs", "subvolume", "delete", str(entry))
                dropped.append(entry.name)
    return dropped


def is_btrfs(path: Path) -> bool:
    return os.path.exists(path) and _run("stat", "-f", "-c", "%T", str(path)).strip() == "btrfs"


class BtrfsBackend:
    name = "btrfs"

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def available(self) -> str | None:
        if not is_btrfs(self.root):
            return f"{self.root} is not on a btrfs filesystem"
        return None

    def path(self, name: str) -> Path:
        return self.root / name

    def snap_dir(self, name: str) -> Path:
        return self.root / ".snap" / name

    def create(self, name: str) -> Path:
        dest = self.path(name)
        if dest.exists():
            raise InvalidRequest(f"disk {dest} exists", hint="remove it first")
        _run("btrfs", "subvolume", "create", str(dest))
        return dest

    def preflush(self, name: str) -> None:
        """Write dirty data out while the instance still runs, so the snapshot taken while it
        is frozen only has to commit what changed in the last moments (the freeze shrinks from
        a full flush to a small one)."""
        fd = os.open(self.path(name), os.O_RDONLY)
        try:
            os.fsync(fd)
            _syncfs(fd)
        finally:
            os.close(fd)

    def snapshot(self, name: str, tag: str) -> Path:
        """Read-only snapshot; this is the only step that needs the instance frozen."""
        d = self.snap_dir(name)
        d.mkdir(parents=True, exist_ok=True)
        snap = d / f"{name}@{tag}"
        _run("btrfs", "subvolume", "snapshot", "-r", str(self.path(name)), str(snap))
        return snap

    def snapshots(self, name: str) -> list[Path]:
        d = self.snap_dir(name)
        return sorted(d.iterdir(), key=lambda p: p.stat().st_mtime) if d.exists() else []

    def delete_snapshot(self, snap: Path) -> None:
        if snap.exists():
            _run("btrfs", "subvolume", "delete", str(snap))

    def promote(self, name: str, snap: Path) -> Path:
        """Make a writable instance root from a (received) snapshot."""
        dest = self.path(name)
        if dest.exists():
            raise InvalidRequest(f"disk {dest} exists", hint="remove the stale copy first")
        _run("btrfs", "subvolume", "snapshot", str(snap), str(dest))
        return dest

    def delete(self, name: str) -> None:
        for snap in self.snapshots(name):
            self.delete_snapshot(snap)
        if self.path(name).exists():
            _run("btrfs", "subvolume", "delete", str(self.path(name)))

    async def send(self, snap: Path, ep: Endpoint, parent: Path | None = None) -> PassResult:
        """Stream ``snap`` (incremental from ``parent``) into ``btrfs receive`` at ``ep.path``."""
        send_argv = ["btrfs", "send", "-q"]
        if parent is not None:
            send_argv += ["-p", str(parent)]
        send_argv.append(str(snap))
        rsh = [sys.executable, "-m", "corral.disks.rsh", "--port", str(ep.port),
               "--token-file", str(ep.token_file), ep.host, "btrfs", "receive", "--quiet",
               ep.path]
        start = time.monotonic()
        sender = await asyncio.create_subprocess_exec(
            *send_argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        pipe = await asyncio.create_subprocess_exec(
            *rsh, stdin=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        assert sender.stdout is not None and pipe.stdin is not None
        moved = 0
        try:
            while data := await sender.stdout.read(1024 * 1024):
                moved += len(data)
                pipe.stdin.write(data)
                await pipe.stdin.drain()
        finally:
            pipe.stdin.close()
        send_err = (await sender.stderr.read()).decode() if sender.stderr else ""
        s_code = await sender.wait()
        _, pipe_err = await pipe.communicate()
        if s_code != 0 or pipe.returncode != 0:
            raise TransferFailed(
                f"btrfs send to {ep.host}:{ep.path} failed (send {s_code}, receive "
                f"{pipe.returncode}): {(send_err + pipe_err.decode()).strip()[-600:]}",
                hint="the target drops a half-received snapshot; retry the refresh",
            )
        return PassResult(files=0, bytes_sent=moved, seconds=time.monotonic() - start)
