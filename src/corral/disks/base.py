"""The disk backend contract: what every way of keeping instance disks (dir, btrfs) offers.

The agent (:mod:`corral.agent.disks`) owns the layout of the disk root and everything that is
the same for every backend: which path is the live disk (``ROOT/NAME``), where a disk is filled
before it is published (``.new``), where copies arrive (``.incoming``, ``.standby``), rsync's
temp directories (``.tmp``), permissions, the data channel, the checks that refuse a call. A
backend owns only what differs: what a disk *is* on this host (a directory, a subvolume), how a
pass carries it to another host (rsync with a dirty list, incremental ``btrfs send``), what it
keeps between passes (dirty trackers, snapshots) and what an interrupted pass can leave.

So a backend is built on the disk root and is told paths, never chooses them: methods about the
live disk take the instance's name (the disk is ``root / name``, and the backend keys its own
state by that name); methods about copies take the slot path the agent chose. A new backend
(zfs, lvm thin) is one module implementing :class:`DiskBackend`, one line in
:mod:`corral.disks.registry`, and one root maker in the conformance suite's harness.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Protocol, runtime_checkable

from corral.disks.rsync import Endpoint

Hook = Callable[[], Awaitable[None]]
#: ``live``: while the instance runs; ``frozen``: the short pass while it is held still
Mode = Literal["live", "frozen"]


@dataclass(frozen=True)
class Capabilities:
    """What a backend does differently, for the operations layer and ``corral host ls``."""

    #: passes build on a snapshot both hosts hold (``send -p``), so only changed blocks move
    #: and the freeze lasts one snapshot whatever the tree's size. A copy the target did not
    #: receive itself (a demoted disk) is no base: the next pass after a promotion is full.
    #: False: rsync compares files with whatever the target has (a demoted disk is a good
    #: base) and the frozen pass sends the paths an inotify dirty list saw change.
    incremental: bool = False
    #: the filesystem ``disk_root`` must be on (``btrfs``); None: any directory will do
    needs_filesystem: str | None = None


@dataclass(frozen=True)
class Target:
    """Where a pass goes, as the receiving agent prepared it (``HostDisks.recv_prepare``)."""

    endpoint: Endpoint
    #: what the slot already holds that a pass may build on (received snapshots' names)
    have: frozenset[str] = frozenset()
    #: where rsync keeps its temp files there, so a slot never shows a half-written file
    temp_dir: str | None = None
    #: top-level files a live pass leaves out, reporting only their sizes (``SendResult
    #: .shapes``): a VM's raw disk, which QEMU's block migration sends whole anyway. A backend
    #: that cannot leave files out (btrfs sends a snapshot) sends them and reports nothing.
    shape_only: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Hold:
    """How a frozen pass holds the instance still: both hooks None when it is not running.
    ``keep_frozen``: a migration's final pass, after which the instance is stopped anyway."""

    freeze: Hook | None = None
    thaw: Hook | None = None
    keep_frozen: bool = False


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
    #: sizes of the files left out (``Target.shape_only``), for the receiver to make
    shapes: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"bytes": self.bytes_sent, "files": self.files, "seconds": self.seconds,
                "freeze_ms": self.freeze_ms, "full": self.full, "gen": self.gen,
                "data_at": self.data_at, "shapes": dict(self.shapes)}


class FreezeWindow:
    """The instance's frozen moment in a pass, shared by every backend because its one rule
    matters more than any backend's detail: the instance is thawed exactly once, even when the
    pass fails or is cancelled (never left frozen because a transfer broke), and not at all
    on success when the caller keeps it frozen.

    ``async with FreezeWindow(hold) as w: await w.freeze(); ...; ms = await w.thaw()``
    """

    def __init__(self, hold: Hold) -> None:
        self._hold = hold
        self._thawed = False
        self._t0 = time.monotonic()

    async def __aenter__(self) -> FreezeWindow:
        return self

    async def freeze(self) -> None:
        if self._hold.freeze is not None:
            await self._hold.freeze()
        self._t0 = time.monotonic()

    async def thaw(self) -> float | None:
        """Ends the frozen moment; returns its length in ms (None: nothing was frozen)."""
        ms = (time.monotonic() - self._t0) * 1000 if self._hold.freeze is not None else None
        if self._hold.thaw is not None and not self._hold.keep_frozen:
            self._thawed = True
            await self._hold.thaw()
        return ms

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        if exc_type is not None and self._hold.thaw is not None and not self._thawed:
            await self._hold.thaw()


@runtime_checkable
class DiskBackend(Protocol):
    """Required of every backend. Synchronous methods run in a worker thread (the agent's
    ``st.call``); only :meth:`send` is a coroutine, because it waits on other processes for
    as long as a transfer takes."""

    name: str
    capabilities: Capabilities
    root: Path
    #: directories under the root that hold the backend's own state (btrfs: ``.snap``); the
    #: agent makes them at start, private like its slots
    private_dirs: tuple[str, ...]

    def available(self) -> str | None:
        """None when usable at the root, else why not (checked once, at agent start, so a
        misconfigured host refuses to start instead of failing its first migration)."""
        ...

    def make(self, path: Path) -> None:
        """An empty disk at ``path`` (under ``.new``), filled there and then published."""
        ...

    def rename(self, src: Path, dest: Path) -> None:
        """Move a disk within the root (publish, set aside). Not every disk is a directory
        ``os.rename`` can move (a zfs dataset is renamed by ``zfs rename``)."""
        ...

    def remove(self, path: Path) -> None:
        """Remove whatever is at ``path``: a half-made disk, a slot's copy, a temp directory
        (missing: nothing to do). Disks made by this backend, even nested ones a workload
        made, must go too, which ``shutil.rmtree`` alone cannot do for subvolumes."""
        ...

    def delete(self, name: str) -> None:
        """Remove the live disk of ``name`` and all the backend keeps for it between passes
        (snapshots, a dirty tracker), so nothing of a deleted instance stays on the host."""
        ...

    def prepare(self, slot: Path) -> list[str]:
        """Make an existing slot ready to receive; returns what it holds that the sender may
        build on (btrfs: complete received snapshots, after dropping half-received ones)."""
        ...

    async def send(self, name: str, target: Target, mode: Mode, gen: str,
                   hold: Hold) -> SendResult:
        """One pass of ``name``'s live disk to ``target``. ``live`` while the instance runs,
        then ``frozen`` with ``gen`` from the live pass, inside a :class:`FreezeWindow` over
        ``hold``: the copy is exactly the tree as it was while frozen. A pass cut off at any
        point leaves the target's previous copy usable and no truncated file in it."""
        ...

    def commit(self, slot: Path) -> None:
        """After a complete pass into ``slot``: drop what the next pass no longer needs
        (btrfs: every received snapshot but the newest, the next parent)."""
        ...

    def copy_path(self, slot: Path) -> Path | None:
        """Where the files of the slot's complete copy can be read (the slot itself, or its
        newest snapshot); None when it holds none."""
        ...

    def adopt(self, slot: Path, fill: Path) -> Path | None:
        """Make the slot's copy a writable disk ready to publish: the slot itself when its copy
        already is one (dir), else a new disk at ``fill`` made from it (btrfs: a writable
        snapshot of the newest received one). None: the slot holds no complete copy."""
        ...

    def demote(self, name: str, slot: Path) -> None:
        """Turn the live disk of ``name`` into the copy in ``slot`` (a path that does not exist
        yet), as if a pass had brought it there; the live disk and its pass state are gone
        after. Used when a promotion moved the instance away and this host keeps its standby."""
        ...

    def clean(self, slot: Path) -> list[str]:
        """At agent start: drop what an interrupted pass left in a kept slot (a standby), so
        no copy is ever half-received; returns the names dropped."""
        ...

    def close(self) -> None:
        """Release what the backend keeps running between passes (inotify watches)."""
        ...
