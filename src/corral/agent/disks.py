"""This host's instance disks: where they live, how they are made, sent, received and adopted.

Every instance whose spec names no host path (``--from``) gets a disk of its own at
``DISK_ROOT/NAME``, made by the host's backend (a plain directory, or a btrfs subvolume). A disk
is always filled somewhere else first (``.new/NAME``) and renamed into place, so a disk at its
final path is complete by construction: a create repeated after a crash, or one that finds a disk
a migration or a promotion put there, uses it as it is.

Copies of other hosts' disks arrive in *slots*: ``.incoming/NAME`` (a migration in flight) and
``.standby/NAME`` (a warm standby). Files land there through rsync's temp-file-and-rename (or a
btrfs receive that is dropped when it did not finish), so no file in a slot is ever truncated.
At agent start, ``.new``, ``.incoming`` and rsync's temp directories are emptied: a migration
whose copy was there when the agent died fails its next step and rolls back anyway.

Permissions (:mod:`corral.rig.perms`): the disk root and every disk are 0711, so a workload that
drops privileges still reaches its own disk (its working directory, or a container's root) while
no one but root lists the disks; the slots are 0700 (they hold copies of other instances); the
agent's data directory is private except for the way down to the disk root.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corral.disks.btrfs import BtrfsBackend, drop_partial_receives, is_btrfs
from corral.disks.channel import DataServer
from corral.disks.dirty import DirtyTracker
from corral.disks.rsync import Endpoint, PassResult, PreparedPass, TransferFailed, run_pass
from corral.errors import ConfigError, InvalidRequest, NotFound
from corral.rig import perms

log = logging.getLogger(__name__)

SLOTS = ("incoming", "standby")
#: directories of the disk root that are not disks: copies, half-made disks, temp files
PRIVATE_SUBDIRS = (".new", ".incoming", ".standby", ".tmp", ".orphaned")
BACKENDS = ("dir", "btrfs")

Freeze = Callable[[], Awaitable[None]]


@dataclass(frozen=True)
class SendResult:
    """One pass from this host to another; ``gen`` ties a frozen pass to its live pass."""

    bytes_sent: int
    files: int
    seconds: float
    freeze_ms: float | None
    full: bool
    gen: str
    #: when the copy's content was taken (the snapshot, or the end of the frozen pass)
    data_at: float

    def to_dict(self) -> dict[str, Any]:
        return {"bytes": self.bytes_sent, "files": self.files, "seconds": self.seconds,
                "freeze_ms": self.freeze_ms, "full": self.full, "gen": self.gen,
                "data_at": self.data_at}


def _rm(path: Path) -> None:
    """Remove a file or a tree. Subvolumes in it (a btrfs disk, received read-only snapshots,
    which rmtree cannot empty) are deleted as subvolumes."""
    if not os.path.lexists(path):
        return
    if not path.is_dir() or path.is_symlink():
        path.unlink()
        return
    if _is_subvol(path) and subprocess.run(["btrfs", "subvolume", "delete", str(path)],
                                           capture_output=True).returncode == 0:
        return
    for child in path.iterdir():
        if child.is_dir() and not child.is_symlink() and _is_subvol(child):
            _rm(child)
    shutil.rmtree(path, ignore_errors=True)


def _is_subvol(path: Path) -> bool:
    """A subvolume's root is inode 256 on btrfs (checked first: no subprocess on other
    filesystems but for the rare directory that happens to be inode 256)."""
    try:
        return (path.stat().st_ino == 256 and shutil.which("btrfs") is not None
                and is_btrfs(path))
    except OSError:
        return False


class HostDisks:
    """The backend, the data channel and the dirty trackers of one agent."""

    def __init__(self, root: Path, backend: str, token: str, data_dir: Path,
                 listen: str = "127.0.0.1", port: int = 0) -> None:
        if backend not in BACKENDS:
            raise ConfigError(f"disk_backend {backend!r} is not known",
                              hint=f"use one of: {', '.join(BACKENDS)}")
        self.root = perms.make_dirs(Path(root).absolute(), perms.TRAVERSE)
        self.kind = backend
        self.btrfs = BtrfsBackend(self.root) if backend == "btrfs" else None
        if self.btrfs is not None and (why := self.btrfs.available()):
            raise ConfigError(f"disk_backend btrfs: {why}",
                              hint="point disk_root at a btrfs filesystem, or use dir")
        self.data_dir = Path(data_dir).absolute()
        self.token_file = self.data_dir / "data-token"
        _write_secret(self.token_file, token)
        self.secure_layout()
        self.channel = DataServer(token, [self.root], host=listen, port=port)
        self._trackers: dict[str, tuple[str, DirtyTracker]] = {}

    # -- lifecycle -----------------------------------------------------------------------------
    def secure_layout(self) -> None:
        """Private data directory, traverse-only way to the disks, each disk 0711, the slots
        0700; repeated at every start, so a data directory an older agent made is fixed too."""
        private = [self.root / d for d in PRIVATE_SUBDIRS]
        if self.btrfs is not None:
            private.append(self.btrfs.snap_dir("-").parent)
        if os.geteuid() == 0:
            # the runc driver's state root (drivers/registry.py), made later on first start:
            # made private now, so no container name is ever listed through it
            private.append(self.data_dir / "runc")
        for d in private:
            perms.make_dirs(d, perms.PRIVATE_DIR)
        perms.secure_chain(self.data_dir.resolve(), self.root.resolve())
        for entry in self.root.iterdir():
            if not entry.name.startswith(".") and entry.is_dir() and not entry.is_symlink():
                perms.chmod(entry, perms.TRAVERSE)

    def reachable(self) -> str | None:
        """Why a workload that dropped privileges cannot reach its disk here, if it cannot."""
        blocking = perms.blocking_ancestor(self.root)
        return None if blocking is None else perms.blocked_message(self.root, blocking)

    async def start(self) -> None:
        if os.geteuid() == 0 and (why := self.reachable()):
            log.warning("%s", why)
        self.cleanup_leftovers()
        await self.channel.start()
        log.info("data channel on %s:%d (disks in %s, %s)", self.channel.host, self.channel.port,
                 self.root, self.kind)

    async def stop(self) -> None:
        await self.channel.stop()
        for _, tracker in self._trackers.values():
            tracker.stop()
        self._trackers.clear()

    @property
    def port(self) -> int:
        return self.channel.port

    def cleanup_leftovers(self) -> list[str]:
        """Remove what a crash left half-made: unfinished creates, migrations' copies, rsync
        temp files, half-received snapshots. Standby copies stay (they are whole files)."""
        removed: list[str] = []
        for sub in (".new", ".incoming", ".tmp"):
            d = self.root / sub
            if d.is_dir():
                for entry in d.iterdir():
                    _rm(entry)
                    removed.append(f"{sub}/{entry.name}")
        standby = self.root / ".standby"
        if self.btrfs is not None and standby.is_dir():
            for d in standby.iterdir():
                removed += [f".standby/{d.name}/{n}" for n in drop_partial_receives(d)]
        if removed:
            log.warning("removed leftovers of interrupted disk work: %s", ", ".join(removed))
        return removed

    # -- paths ---------------------------------------------------------------------------------
    def path(self, name: str) -> Path:
        return self.root / name

    def slot(self, name: str, slot: str) -> Path:
        if slot not in SLOTS:
            raise InvalidRequest(f"unknown disk slot {slot!r}", hint="this is a server bug")
        return self.root / f".{slot}" / name

    def _temp_dir(self, name: str, slot: str) -> Path:
        return self.root / ".tmp" / f"{name}.{slot}"

    def exists(self, name: str) -> bool:
        return self.path(name).is_dir()

    # -- making and removing -------------------------------------------------------------------
    def new_dir(self, name: str) -> Path:
        """An empty place to fill a new disk in (renamed into place by :meth:`publish`)."""
        tmp = self.root / ".new" / name
        _rm(tmp)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        if self.btrfs is not None:
            subprocess.run(["btrfs", "subvolume", "create", str(tmp)], check=True,
                           capture_output=True)
        else:
            tmp.mkdir()
        return tmp

    def publish(self, name: str, filled: Path) -> Path:
        dest = self.path(name)
        perms.chmod(filled, perms.TRAVERSE)  # corral's directory; what is in it is the workload's
        os.rename(filled, dest)
        _fsync_dir(dest.parent)
        return dest

    def set_aside(self, name: str) -> Path:
        """Move a disk out of the way, keeping it (``.orphaned/NAME.<time>``) for a person to
        look at: nothing is ever deleted on a guess."""
        dest = self.root / ".orphaned" / f"{name}.{time.strftime('%Y%m%dT%H%M%S')}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.rename(self.path(name), dest)
        return dest

    def delete(self, name: str) -> None:
        entry = self._trackers.pop(name, None)
        if entry is not None:
            entry[1].stop()
        _rm(self.path(name))
        if self.btrfs is not None:
            _rm(self.btrfs.snap_dir(name))

    # -- receiving side ------------------------------------------------------------------------
    def recv_prepare(self, name: str, slot: str) -> dict[str, Any]:
        """Make the slot ready for a pass; returns where the sender writes and, on btrfs, the
        snapshots already here (the sender's candidates for an incremental parent)."""
        dest = self.slot(name, slot)
        dest.mkdir(parents=True, exist_ok=True)
        tmp = self._temp_dir(name, slot)
        _rm(tmp)
        tmp.mkdir(parents=True)
        have: list[str] = []
        if self.btrfs is not None:
            drop_partial_receives(dest)
            have = sorted(p.name for p in dest.iterdir())
        return {"path": str(dest), "temp_dir": str(tmp), "have": have, "backend": self.kind}

    def discard(self, name: str, slot: str) -> None:
        _rm(self.slot(name, slot))
        _rm(self._temp_dir(name, slot))

    def _newest_received(self, name: str, slot: str) -> Path | None:
        d = self.slot(name, slot)
        snaps = sorted(d.iterdir(), key=lambda p: p.name) if d.is_dir() else []
        return snaps[-1] if snaps else None

    def adopt(self, name: str, slot: str) -> Path:
        """The slot's copy becomes this host's live disk of ``name`` (idempotent)."""
        dest = self.path(name)
        src = self.slot(name, slot)
        if not src.exists():
            if dest.is_dir():
                return dest  # done before a crash
            raise NotFound(f"no {slot} copy of '{name}' on this host",
                           hint="the copy was removed or never completed; sync it again")
        if dest.exists():
            raise InvalidRequest(f"this host already has a disk for '{name}'",
                                 hint="remove the stale instance on this host first")
        if self.btrfs is None:
            self.publish(name, src)
        else:
            snap = self._newest_received(name, slot)
            if snap is None:
                raise NotFound(f"the {slot} copy of '{name}' holds no complete snapshot",
                               hint="sync it again")
            tmp = self.root / ".new" / name
            _rm(tmp)
            tmp.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(["btrfs", "subvolume", "snapshot", str(snap), str(tmp)], check=True,
                           capture_output=True)
            self.publish(name, tmp)
            _rm(src)
        _rm(self._temp_dir(name, slot))
        return dest

    def demote(self, name: str) -> Path:
        """This host's live disk of ``name`` becomes its standby copy (after a promotion moved
        the instance away); idempotent."""
        src, dest = self.path(name), self.slot(name, "standby")
        if not src.exists():
            if dest.exists():
                return dest
            raise NotFound(f"no disk for '{name}' on this host")
        _rm(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if self.btrfs is None:
            os.rename(src, dest)
        else:
            dest.mkdir()
            self.btrfs.snapshot(name, f"{time.time():.6f}-demoted")
            self.delete(name)
        _fsync_dir(dest.parent)
        return dest

    # -- sending side --------------------------------------------------------------------------
    def endpoint(self, target: dict[str, Any]) -> Endpoint:
        return Endpoint(host=str(target["address"]), port=int(target["port"]),
                        token_file=self.token_file, path=str(target["path"]))

    async def send(self, name: str, target: dict[str, Any], mode: str, gen: str,
                   freeze: Freeze | None, thaw: Freeze | None, keep_frozen: bool = False
                   ) -> SendResult:
        """One pass of ``name``'s disk to ``target`` (what :meth:`recv_prepare` returned there,
        plus ``address`` and ``port``). ``live``: while the instance runs; ``frozen``: the short
        pass while it is frozen (``freeze`` None: it is not running, nothing to freeze)."""
        if not self.exists(name):
            raise NotFound(f"no disk for '{name}' on this host",
                           hint="it runs from a host path (--from), which corral cannot move")
        if mode not in ("live", "frozen"):
            raise InvalidRequest(f"unknown pass {mode!r}", hint="this is a server bug")
        if str(target.get("backend", "dir")) != self.kind:
            raise InvalidRequest(
                f"this host keeps disks in {self.kind} but the target uses "
                f"{target.get('backend')}", hint="use hosts with the same disk_backend")
        ep = self.endpoint(target)
        if self.btrfs is not None:
            return await self._send_btrfs(name, ep, target, mode, gen, freeze, thaw, keep_frozen)
        return await self._send_dir(name, ep, target, mode, gen, freeze, thaw, keep_frozen)

    def _tracker(self, name: str) -> tuple[str, DirtyTracker]:
        entry = self._trackers.get(name)
        if entry is None:
            tracker = DirtyTracker(self.path(name))
            tracker.start()
            entry = self._trackers[name] = (uuid.uuid4().hex[:12], tracker)
        return entry

    async def _send_dir(self, name: str, ep: Endpoint, target: dict[str, Any], mode: str,
                        gen: str, freeze: Freeze | None, thaw: Freeze | None,
                        keep_frozen: bool) -> SendResult:
        src = self.path(name)
        extra = [f"--temp-dir={target['temp_dir']}"] if target.get("temp_dir") else []
        if mode == "live":
            tgen, tracker = self._tracker(name)
            tracker.take()  # what changes from here on goes into the frozen pass
            res = await run_pass(src, ep, extra=extra)
            return SendResult(res.bytes_sent, res.files, res.seconds, None, True, tgen,
                              time.time())
        entry = self._trackers.get(name)
        known = entry is not None and entry[0] == gen  # else the list may miss changes
        prepared: PreparedPass | None = None
        if known and freeze is not None:
            try:
                prepared = await PreparedPass.start(src, ep, extra=extra)
            except TransferFailed as exc:
                log.warning("could not prepare the frozen pass of %s (%s); it will connect "
                            "while frozen", name, exc)
        frozen_at = time.monotonic()
        thawed = False
        try:
            if freeze is not None:
                await freeze()
                frozen_at = time.monotonic()
            full = True
            if known and entry is not None:
                dirty = entry[1].take()
                full = dirty.overflowed
                if full:
                    log.info("frozen pass of %s is a full pass: %s", name, dirty.reason)
            if full:
                if prepared is not None:
                    await prepared.abort()
                res = await run_pass(src, ep, extra=extra)
            elif prepared is not None:
                res = await prepared.finish(dirty.paths)
            else:
                res = await run_pass(src, ep, dirty.paths, extra=extra)
            data_at = time.time()
            freeze_ms = (time.monotonic() - frozen_at) * 1000 if freeze is not None else None
            if thaw is not None and not keep_frozen:
                thawed = True
                await thaw()
        except BaseException:
            if prepared is not None:
                await prepared.abort()
            if thaw is not None and not thawed:
                await thaw()  # never leave an instance frozen because a pass failed
            raise
        return SendResult(res.bytes_sent, res.files, res.seconds, freeze_ms, full, gen, data_at)

    async def _send_btrfs(self, name: str, ep: Endpoint, target: dict[str, Any], mode: str,
                          gen: str, freeze: Freeze | None, thaw: Freeze | None,
                          keep_frozen: bool) -> SendResult:
        assert self.btrfs is not None
        b = self.btrfs
        have = set(target.get("have") or [])
        if gen:  # a frozen pass follows its live pass: that snapshot just arrived there
            have.add(gen)
        parent = next((s for s in reversed(b.snapshots(name)) if s.name in have), None)
        tag = f"{time.time():.6f}"
        freeze_ms: float | None = None
        thawed = False
        if mode == "live":
            await asyncio.to_thread(b.preflush, name)
            snap = await asyncio.to_thread(b.snapshot, name, tag)
        else:
            # flushed first, so the freeze commits only the last moments
            await asyncio.to_thread(b.preflush, name)
            t0 = time.monotonic()
            try:
                if freeze is not None:
                    await freeze()
                    t0 = time.monotonic()
                snap = await asyncio.to_thread(b.snapshot, name, tag)
                if freeze is not None:
                    freeze_ms = (time.monotonic() - t0) * 1000
                if thaw is not None and not keep_frozen:
                    thawed = True
                    await thaw()
            except BaseException:
                if thaw is not None and not thawed:
                    await thaw()
                raise
        data_at = time.time()
        res: PassResult = await b.send(snap, ep, parent)
        # keep the snapshot just sent (the next parent) and drop older ones
        for old in b.snapshots(name):
            if old != snap:
                await asyncio.to_thread(b.delete_snapshot, old)
        return SendResult(res.bytes_sent, 0, res.seconds, freeze_ms, parent is None,
                          snap.name, data_at)

    def prune_received(self, name: str, slot: str) -> None:
        """Keep only the newest received snapshot in a btrfs slot (the next parent)."""
        if self.btrfs is None:
            return
        d = self.slot(name, slot)
        snaps = sorted(d.iterdir(), key=lambda p: p.name) if d.is_dir() else []
        for old in snaps[:-1]:
            self.btrfs.delete_snapshot(old)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_secret(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text + "\n")
