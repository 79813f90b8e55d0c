"""Which paths of an instance's root changed since the last sync, from inotify.

The frozen pass of a standby refresh or a migration must be short (USERS.md §2: suspend time is
the critical figure). rsync's own scan of a large tree is what makes it slow, so while the
instance runs we keep the list of paths that changed and the frozen pass hands rsync only those.
Whenever the list may be incomplete — the kernel queue overflowed, we ran out of watches, a
directory was renamed (its watch paths went stale) — the tracker says ``overflowed`` and the
caller falls back to a full pass. Never a wrong short list: a missed path would be a silently stale
file in the standby.
"""

from __future__ import annotations

import errno
import os
import select
import threading
from dataclasses import dataclass
from pathlib import Path

from inotify_simple import INotify
from inotify_simple import flags as F

WATCH = (F.CREATE | F.MODIFY | F.ATTRIB | F.CLOSE_WRITE | F.DELETE | F.MOVED_FROM | F.MOVED_TO
         | F.DELETE_SELF | F.MOVE_SELF)


@dataclass(frozen=True)
class DirtySet:
    paths: frozenset[str]
    overflowed: bool
    reason: str = ""


class DirtyTracker:
    def __init__(self, root: Path, max_paths: int = 200_000) -> None:
        self.root = Path(root)
        self.max_paths = max_paths
        self._ino = INotify()
        self._wds: dict[int, str] = {}
        self._dirty: set[str] = set()
        self._overflow = ""
        self._lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._watch_tree("")
        self._thread = threading.Thread(target=self._run, name=f"dirty:{self.root.name}",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self._ino.close()

    def take(self) -> DirtySet:
        """The changes so far, and start a new list (call right before a pass)."""
        with self._read_lock:
            self._handle(self._ino.read(timeout=0))
            with self._lock:
                out = DirtySet(frozenset(self._dirty), bool(self._overflow), self._overflow)
                self._dirty = set()
                self._overflow = ""
        return out

    def drain(self) -> None:
        """Handle every event the kernel has queued now (the pass must not miss the last ones)."""
        with self._read_lock:
            self._handle(self._ino.read(timeout=0))

    # -- internals ---------------------------------------------------------------------------
    def _mark_overflow(self, why: str) -> None:
        with self._lock:
            self._overflow = self._overflow or why

    def _watch_tree(self, rel: str) -> None:
        """Watch ``rel`` and every directory under it. Each directory is watched *before* it
        is listed: listed first, a subdirectory made between the listing and the watch was
        in neither (a new ``var/`` with ``var/lib/db`` made at once lost ``var/lib``, and a
        refresh built on the list would have left it out of the standby)."""
        todo = [rel]
        while todo:
            rel_dir = todo.pop()
            path = self.root / rel_dir if rel_dir else self.root
            try:
                wd = self._ino.add_watch(str(path), WATCH)
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    self._mark_overflow("out of inotify watches (fs.inotify.max_user_watches)")
                    return
                if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                    continue  # gone (or replaced) already: its parent's events say so
                raise
            self._wds[wd] = rel_dir
            try:
                with os.scandir(path) as it:
                    entries = [(e.name, e.is_dir(follow_symlinks=False)) for e in it]
            except OSError:
                entries = []  # gone since: its removal is an event of its parent
            names = [os.path.join(rel_dir, n) if rel_dir else n for n, _ in entries]
            todo += [n for n, (_, is_dir) in zip(names, entries, strict=True) if is_dir]
            if rel:  # a directory that appeared while we watch: everything in it is new
                with self._lock:
                    self._add({rel_dir, *names})

    def _run(self) -> None:
        fd = self._ino.fileno()
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([fd], [], [], 0.2)
                if ready:
                    self.drain()
            except (OSError, ValueError):
                return

    def _handle(self, events: list) -> None:  # type: ignore[type-arg]
        for ev in events:
            if ev.mask & F.Q_OVERFLOW:
                self._mark_overflow("inotify queue overflowed")
                continue
            parent = self._wds.get(ev.wd)
            if parent is None:
                continue
            if ev.mask & F.IGNORED:
                self._wds.pop(ev.wd, None)
                continue
            rel = os.path.join(parent, ev.name) if ev.name else parent
            is_dir = bool(ev.mask & F.ISDIR)
            if is_dir and ev.mask & (F.MOVED_FROM | F.MOVED_TO | F.MOVE_SELF):
                self._mark_overflow(f"directory {rel or '.'} was renamed")
            if is_dir and ev.mask & F.CREATE:
                self._watch_tree(rel)
            if rel:
                with self._lock:
                    self._add({rel})

    def _add(self, paths: set[str]) -> None:
        """Note changed paths (under the lock); past ``max_paths`` the list is dropped and the
        tracker says so: the next frozen pass is a full one, and memory stays bounded."""
        if self._overflow:
            return  # a full pass is due anyway: nothing more to remember
        self._dirty |= paths
        if len(self._dirty) > self.max_paths:
            self._overflow = "more changed paths than max_paths"
            self._dirty.clear()
