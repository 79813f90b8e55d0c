"""dir disk backend: a disk is a plain directory; passes are rsync over the data channel.

Works on any filesystem. A live pass is a full rsync while the instance runs; the frozen pass
then sends only the paths an inotify :class:`~corral.disks.dirty.DirtyTracker` saw change since
the live pass began, with rsync already connected before the freeze (``PreparedPass``), so the
freeze lasts as long as the changes take, not as long as a scan of the tree. Whenever the list
may be incomplete (the tracker overflowed, or it is not the one the live pass started: the agent
restarted, the disk was replaced) the frozen pass is a full pass: slower, never wrong.

rsync writes each file to a temp file and renames it (no ``--inplace``), so a pass cut off at
any point leaves every file in the slot either as it was or complete.
"""

from __future__ import annotations

import logging
import os
import stat
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from corral.disks.base import Capabilities, FreezeWindow, Hold, Mode, SendResult, Target
from corral.disks.dirty import DirtyTracker
from corral.disks.rsync import PreparedPass, TransferFailed, run_pass
from corral.disks.tree import remove_tree

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Tracked:
    """A dirty tracker, the generation a live pass hands its frozen pass, and the inode of the
    tree it watches: inotify follows the directory, not the path, so a tracker whose disk was
    set aside or demoted would report the old tree's changes for the new one."""

    gen: str
    tracker: DirtyTracker
    inode: tuple[int, int]


def _inode(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


class DirBackend:
    name = "dir"
    capabilities = Capabilities(incremental=False, needs_filesystem=None)
    private_dirs: tuple[str, ...] = ()

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._tracked: dict[str, _Tracked] = {}

    def available(self) -> str | None:
        # rsync is needed only to move a disk: a host without it still runs its instances,
        # and a pass says what is missing in rsync's own words
        return None

    # -- disks -----------------------------------------------------------------------------------
    def make(self, path: Path) -> None:
        path.mkdir()

    def rename(self, src: Path, dest: Path) -> None:
        os.rename(src, dest)

    def remove(self, path: Path) -> None:
        remove_tree(path)

    def delete(self, name: str) -> None:
        self._forget(name)
        remove_tree(self.root / name)

    # -- receiving -------------------------------------------------------------------------------
    def prepare(self, slot: Path) -> list[str]:
        return []  # rsync builds on whatever files are there

    def commit(self, slot: Path) -> None:
        return None  # the slot is the copy; nothing else is kept

    def copy_path(self, slot: Path) -> Path | None:
        return slot if slot.is_dir() else None

    def adopt(self, slot: Path, fill: Path) -> Path | None:
        return self.copy_path(slot)

    def demote(self, name: str, slot: Path) -> None:
        self._forget(name)
        os.rename(self.root / name, slot)

    def clean(self, slot: Path) -> list[str]:
        return []  # rsync's partial files are in .tmp, which the agent empties

    def close(self) -> None:
        for entry in self._tracked.values():
            entry.tracker.stop()
        self._tracked.clear()

    # -- sending ---------------------------------------------------------------------------------
    def _forget(self, name: str) -> None:
        entry = self._tracked.pop(name, None)
        if entry is not None:
            entry.tracker.stop()

    def _current(self, name: str) -> _Tracked | None:
        """The tracker of ``name``'s live disk, if it still watches that very tree."""
        entry = self._tracked.get(name)
        if entry is not None and entry.inode != _inode(self.root / name):
            self._forget(name)
            return None
        return entry

    def _start_tracking(self, name: str) -> _Tracked:
        entry = self._current(name)
        if entry is None:
            src = self.root / name
            inode = _inode(src)
            tracker = DirtyTracker(src)
            tracker.start()
            entry = self._tracked[name] = _Tracked(uuid.uuid4().hex[:12], tracker,
                                                   inode or (0, 0))
        return entry

    async def send(self, name: str, target: Target, mode: Mode, gen: str,
                   hold: Hold) -> SendResult:
        src, ep = self.root / name, target.endpoint
        extra = [f"--temp-dir={target.temp_dir}"] if target.temp_dir else []
        if mode == "live":
            gen = ""  # no frozen pass can build on it: one after would be a full pass
            if not target.shape_only:
                entry = self._start_tracking(name)
                entry.tracker.take()  # what changes from here on goes into the frozen pass
                gen = entry.gen
            # else a VM's live migration: its stream moves the disk and the memory, and no
            # frozen pass follows (it would send the files left out whole, while frozen), so
            # no tracker is started, to be read by nothing
            shapes = _shapes(src, target.shape_only)
            extra += [f"--exclude=/{n}" for n in sorted(shapes)]
            res = await run_pass(src, ep, extra=extra)
            return SendResult(res.bytes_sent, res.files, res.seconds, None, True, gen,
                              time.time(), shapes)
        current = self._current(name)
        known = current if current is not None and current.gen == gen else None
        prepared: PreparedPass | None = None
        if known is not None and hold.freeze is not None:
            try:
                prepared = await PreparedPass.start(src, ep, extra=extra)
            except TransferFailed as exc:
                log.warning("could not prepare the frozen pass of %s (%s); it will connect "
                            "while frozen", name, exc)
        async with FreezeWindow(hold) as window:
            try:
                await window.freeze()
                full = True
                if known is not None:
                    dirty = known.tracker.take()
                    why = dirty.reason if dirty.overflowed else through_links(src, dirty.paths)
                    full = why is not None
                    if full:
                        log.info("frozen pass of %s is a full pass: %s", name, why)
                if full:
                    if prepared is not None:
                        await prepared.abort()
                    res = await run_pass(src, ep, extra=extra)
                elif prepared is not None:
                    res = await prepared.finish(dirty.paths)
                else:
                    res = await run_pass(src, ep, dirty.paths, extra=extra)
                data_at = time.time()
                freeze_ms = await window.thaw()
            except BaseException:
                if prepared is not None:
                    await prepared.abort()
                raise
        return SendResult(res.bytes_sent, res.files, res.seconds, freeze_ms, full, gen, data_at)


def _shapes(root: Path, names: Iterable[str]) -> dict[str, int]:
    """Sizes of the top-level regular files ``names`` (lstat: a symlink is sent as one)."""
    out: dict[str, int] = {}
    for n in names:
        if "/" in n or n in ("", ".", ".."):
            continue
        try:
            st = os.lstat(root / n)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode):
            out[n] = st.st_size
    return out


def through_links(root: Path, paths: Iterable[str]) -> str | None:
    """Why a pass of only ``paths`` could read outside ``root``, or None. rsync's
    ``--files-from`` resolves ``d/note`` through ``d``: a workload that swapped ``d`` for a
    symlink to a host directory after writing ``d/note`` would have a host file copied into
    its disk. So every parent of every path must be a real directory (lstat, the instance
    frozen); if one is not, the pass is a full one, which copies a symlink as a symlink."""
    checked: set[str] = set()
    for path in paths:
        parent = os.path.dirname(path)
        while parent and parent not in checked:
            try:
                mode = os.lstat(root / parent).st_mode
            except FileNotFoundError:
                checked.add(parent)  # gone: rsync has nothing to follow there
                parent = os.path.dirname(parent)
                continue
            if not stat.S_ISDIR(mode):
                return f"{parent} is no longer a directory (a symlink?)"
            checked.add(parent)
            parent = os.path.dirname(parent)
    return None
