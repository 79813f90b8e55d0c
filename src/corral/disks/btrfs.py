"""btrfs disk backend: one subvolume per instance, read-only snapshots, incremental send.

The freeze an instance sees is only as long as ``btrfs subvolume snapshot -r`` (milliseconds,
whatever the tree's size); the transfer happens after thaw, from the snapshot, with
``btrfs send -p <previous>`` so only blocks changed since the last refresh move. The receiving
agent runs ``btrfs receive`` behind the data channel, into the slot its transfer ticket names.

Layout under the disk root (which must be on btrfs): ``<root>/<name>`` the instance's writable
subvolume; ``<root>/.snap/<name>/<name>@<tag>`` its read-only snapshots, of which the newest is
kept after a pass (the next parent). A slot holds received read-only snapshots
(``<slot>/<name>@<tag>``), of which the newest is the copy. ``btrfs receive`` makes a snapshot
read-only and gives it a Received UUID only once it is complete, so a writable subvolume without
one in a slot is what a cut-off receive left: it is dropped, never adopted.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from pathlib import Path

from corral.disks.base import Capabilities, FreezeWindow, Hold, Mode, SendResult, Target
from corral.disks.rsync import Endpoint, PassResult, TransferFailed, channel_env, rsh_argv
from corral.disks.tree import fs_type, remove_tree
from corral.errors import DriverError


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


def _show(path: Path) -> dict[str, str] | None:
    """``btrfs subvolume show`` as key -> value; None when ``path`` is no subvolume."""
    proc = subprocess.run(["btrfs", "subvolume", "show", str(path)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        return None
    fields = (line.strip().partition(":") for line in proc.stdout.splitlines())
    return {key: value.strip() for key, _, value in fields}


def drop_partial_receives(directory: Path) -> list[str]:
    """Delete subvolumes under ``directory`` that a failed ``btrfs receive`` left behind
    (writable, no Received UUID), so a slot never holds a half-received snapshot. A read-only
    snapshot made here (a demoted disk) is complete and stays."""
    dropped: list[str] = []
    if not directory.is_dir():
        return dropped
    for entry in directory.iterdir():
        info = _show(entry)
        if (info is not None and info.get("Received UUID") == "-"
                and "readonly" not in info.get("Flags", "")):
            _run("btrfs", "subvolume", "delete", str(entry))
            dropped.append(entry.name)
    return dropped


def _kill(*procs: asyncio.subprocess.Process) -> None:
    for proc in procs:
        if proc.returncode is None:
            proc.kill()


def is_btrfs(path: Path) -> bool:
    return os.path.exists(path) and fs_type(path) == "btrfs"


def _by_name(slot: Path) -> list[Path]:
    """A slot's snapshots, oldest first (``<name>@<time>``: the name sorts by time)."""
    return sorted(slot.iterdir(), key=lambda p: p.name) if slot.is_dir() else []


class BtrfsBackend:
    name = "btrfs"
    capabilities = Capabilities(incremental=True, needs_filesystem="btrfs")
    private_dirs: tuple[str, ...] = (".snap",)

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def available(self) -> str | None:
        if not is_btrfs(self.root):
            return f"{self.root} is not on a btrfs filesystem"
        return None

    def snap_dir(self, name: str) -> Path:
        return self.root / ".snap" / name

    # -- disks -----------------------------------------------------------------------------------
    def make(self, path: Path) -> None:
        _run("btrfs", "subvolume", "create", str(path))

    def rename(self, src: Path, dest: Path) -> None:
        os.rename(src, dest)  # a subvolume moves like a directory within its filesystem

    def remove(self, path: Path) -> None:
        remove_tree(path)

    def delete(self, name: str) -> None:
        remove_tree(self.root / name)
        remove_tree(self.snap_dir(name))

    # -- snapshots of the live disk --------------------------------------------------------------
    def preflush(self, name: str) -> None:
        """Write dirty data out while the instance still runs, so the snapshot taken while it
        is frozen only has to commit what changed in the last moments (the freeze shrinks from
        a full flush to a small one)."""
        fd = os.open(self.root / name, os.O_RDONLY)
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
        _run("btrfs", "subvolume", "snapshot", "-r", str(self.root / name), str(snap))
        return snap

    def snapshots(self, name: str) -> list[Path]:
        d = self.snap_dir(name)
        return sorted(d.iterdir(), key=lambda p: p.stat().st_mtime) if d.exists() else []

    def delete_snapshot(self, snap: Path) -> None:
        if snap.exists():
            _run("btrfs", "subvolume", "delete", str(snap))

    # -- receiving -------------------------------------------------------------------------------
    def prepare(self, slot: Path) -> list[str]:
        drop_partial_receives(slot)
        return sorted(p.name for p in slot.iterdir())

    def commit(self, slot: Path) -> None:
        for old in _by_name(slot)[:-1]:
            self.delete_snapshot(old)

    def copy_path(self, slot: Path) -> Path | None:
        snaps = _by_name(slot)
        return snaps[-1] if snaps else None

    def adopt(self, slot: Path, fill: Path) -> Path | None:
        snap = self.copy_path(slot)
        if snap is None:
            return None
        remove_tree(fill)
        fill.parent.mkdir(parents=True, exist_ok=True)
        _run("btrfs", "subvolume", "snapshot", str(snap), str(fill))  # writable
        return fill

    def demote(self, name: str, slot: Path) -> None:
        slot.mkdir()
        _run("btrfs", "subvolume", "snapshot", "-r", str(self.root / name),
             str(slot / f"{name}@{time.time():.6f}-demoted"))
        self.delete(name)

    def clean(self, slot: Path) -> list[str]:
        return drop_partial_receives(slot)

    def close(self) -> None:
        return None  # nothing runs between passes

    # -- sending ---------------------------------------------------------------------------------
    async def send(self, name: str, target: Target, mode: Mode, gen: str,
                   hold: Hold) -> SendResult:
        have = set(target.have)
        if gen:  # a frozen pass follows its live pass: that snapshot just arrived there
            have.add(gen)
        parent = next((s for s in reversed(self.snapshots(name)) if s.name in have), None)
        tag = f"{time.time():.6f}"
        freeze_ms: float | None = None
        # flushed first, so the snapshot (and a freeze around it) commits only the last moments
        await asyncio.to_thread(self.preflush, name)
        if mode == "live":
            snap = await asyncio.to_thread(self.snapshot, name, tag)
        else:
            async with FreezeWindow(hold) as window:
                await window.freeze()
                snap = await asyncio.to_thread(self.snapshot, name, tag)
                freeze_ms = await window.thaw()
        data_at = time.time()
        res = await self.stream(snap, target.endpoint, parent)
        # keep the snapshot just sent (the next parent) and drop older ones
        for old in self.snapshots(name):
            if old != snap:
                await asyncio.to_thread(self.delete_snapshot, old)
        return SendResult(res.bytes_sent, 0, res.seconds, freeze_ms, parent is None,
                          snap.name, data_at)

    async def stream(self, snap: Path, ep: Endpoint, parent: Path | None = None) -> PassResult:
        """Stream ``snap`` (incremental from ``parent``) into ``btrfs receive`` at ``ep.path``."""
        send_argv = ["btrfs", "send", "-q"]
        if parent is not None:
            send_argv += ["-p", str(parent)]
        send_argv.append(str(snap))
        rsh = [*rsh_argv(ep), ep.host, "btrfs", "receive", "--quiet", ep.path]
        start = time.monotonic()
        sender = await asyncio.create_subprocess_exec(
            *send_argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        pipe = await asyncio.create_subprocess_exec(
            *rsh, stdin=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env=channel_env(ep))
        assert sender.stdout is not None and pipe.stdin is not None
        moved, broken = 0, False
        try:
            while data := await sender.stdout.read(1024 * 1024):
                moved += len(data)
                try:
                    pipe.stdin.write(data)
                    await pipe.stdin.drain()
                except (BrokenPipeError, ConnectionResetError):
                    broken = True
                    break  # the receiving side ended early: its status below says why
        except BaseException:
            _kill(sender, pipe)  # cancelled: no send may go on writing into nowhere
            raise
        finally:
            pipe.stdin.close()
        if broken:
            _kill(sender)
            while await sender.stdout.read(1024 * 1024):
                pass  # unread output would keep its pipe, and so wait(), from ever finishing
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
