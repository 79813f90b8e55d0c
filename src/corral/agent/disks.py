"""This host's instance disks: the layout of the disk root, around one disk backend.

Every instance whose spec names no host path (``--from``) gets a disk of its own at
``DISK_ROOT/NAME``, of the kind the host's backend makes (:mod:`corral.disks.registry`). A disk
is always filled somewhere else first (``.new/NAME``) and renamed into place, so a disk at its
final path is complete by construction: a create repeated after a crash, or one that finds a disk
a migration or a promotion put there, uses it as it is.

Copies of other hosts' disks arrive in *slots*: ``.incoming/NAME`` (a migration in flight) and
``.standby/NAME`` (a warm standby); rsync keeps its temp files in ``.tmp/NAME.SLOT``. Every
backend lands a pass so that no file in a slot is ever truncated (see
:class:`corral.disks.base.DiskBackend`). At agent start, ``.new``, ``.incoming`` and ``.tmp``
are emptied and the backend drops what an interrupted pass left in standby slots: a migration
whose copy was there when the agent died fails its next step and rolls back anyway.

This module holds what is the same for every backend: the paths, the checks that refuse a call,
permissions and the data channel; what a disk is and how a pass moves it is the backend's.

Permissions (:mod:`corral.perms`): the disk root and every disk are 0711, so a workload that
drops privileges still reaches its own disk (its working directory, or a container's root) while
no one but root lists the disks; the slots are 0700 (they hold copies of other instances); the
agent's data directory is private except for the way down to the disk root.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from corral import perms
from corral.agent.store import check_name
from corral.disks.base import Hold, Hook, SendResult, Target
from corral.disks.channel import ChannelTls, DataServer, server_context
from corral.disks.registry import make_backend
from corral.disks.rsync import Endpoint
from corral.errors import Conflict, InvalidRequest, NotFound

__all__ = ["PRIVATE_SUBDIRS", "SLOTS", "HostDisks", "SendResult"]

log = logging.getLogger(__name__)

SLOTS = ("incoming", "standby")
#: directories of the disk root that are not disks: copies, half-made disks, temp files
PRIVATE_SUBDIRS = (".new", ".incoming", ".standby", ".tmp", ".orphaned", ".trash")
#: emptied at every start: nothing in them outlives the agent that was filling them
SCRATCH_SUBDIRS = (".new", ".incoming", ".tmp", ".trash")

Freeze = Hook


class HostDisks:
    """The disk backend, the slot layout and the data channel of one agent."""

    def __init__(self, root: Path, backend: str, data_dir: Path, host: str,
                 listen: str = "127.0.0.1", port: int = 0) -> None:
        self.root = perms.make_dirs(Path(root).absolute(), perms.TRAVERSE)
        self.backend = make_backend(backend, self.root)
        self.kind = self.backend.name
        self.data_dir = Path(data_dir).absolute()
        #: this host's name, as tickets and certificates say it
        self.host = host
        self.data_dir.mkdir(parents=True, exist_ok=True)
        #: an older agent kept the fleet's admin token here for the channel: no longer
        (self.data_dir / "data-token").unlink(missing_ok=True)
        self.secure_layout()
        self.channel = DataServer(host, self.transfer_places, host=listen, port=port,
                                  after_failure=_after_failed_receive)
        self.tls: ChannelTls | None = None
        #: one thread at a time empties ``.trash``
        self._trash_lock = threading.Lock()

    @property
    def ticket_key(self) -> str:
        """The public key (hex) of the server's tickets; "" until the host joined, and then
        the data channel refuses every transfer."""
        return self.channel.ticket_key

    @ticket_key.setter
    def ticket_key(self, value: str) -> None:
        self.channel.ticket_key = value

    def use_tls(self, cert_file: str, key_file: str, ca_file: str) -> None:
        """Mutual TLS on the data channel, both ways (before :meth:`start`). The files are
        loaded now, so a broken certificate stops the agent instead of its first transfer."""
        self.tls = ChannelTls(cert_file, key_file, ca_file)
        self.channel.tls = server_context(self.tls)

    # -- lifecycle -----------------------------------------------------------------------------
    def secure_layout(self) -> None:
        """Private data directory, traverse-only way to the disks, each disk 0711, the slots
        0700; repeated at every start, so a data directory an older agent made is fixed too."""
        private = [self.root / d for d in (*PRIVATE_SUBDIRS, *self.backend.private_dirs)]
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
        log.info("data channel on %s:%d (%s; disks in %s, %s)", self.channel.host,
                 self.channel.port, "mutual TLS" if self.tls else "in clear, tickets only",
                 self.root, self.kind)

    async def stop(self) -> None:
        await self.channel.stop()
        self.backend.close()

    @property
    def port(self) -> int:
        return self.channel.port

    def cleanup_leftovers(self) -> list[str]:
        """Remove what a crash left half-made: unfinished creates, migrations' copies, rsync
        temp files, what an interrupted pass left in a standby. Standby copies stay."""
        removed: list[str] = []
        for sub in SCRATCH_SUBDIRS:
            d = self.root / sub
            if d.is_dir():
                for entry in d.iterdir():
                    self.backend.remove(entry)
                    removed.append(f"{sub}/{entry.name}")
        standby = self.root / ".standby"
        if standby.is_dir():
            for d in standby.iterdir():
                removed += [f".standby/{d.name}/{n}" for n in self.backend.clean(d)]
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

    def transfer_places(self, name: str, slot: str) -> list[Path]:
        """Where a transfer ticket for ``name``'s ``slot`` lets a sender write: the slot and its
        rsync temp dir, as real paths (the root resolved, the rest as this layout names it, so
        a symlink planted at either is not followed but refused)."""
        real = Path(os.path.realpath(self.root))
        return [real / p.relative_to(self.root)
                for p in (self.slot(check_name(name), slot), self._temp_dir(name, slot))]

    def exists(self, name: str) -> bool:
        return self.path(name).is_dir()

    def copy_path(self, name: str, slot: str) -> Path | None:
        """Where the files of the slot's complete copy of ``name`` can be read, if any."""
        return self.backend.copy_path(self.slot(name, slot))

    # -- making and removing -------------------------------------------------------------------
    def new_dir(self, name: str) -> Path:
        """An empty place to fill a new disk in (renamed into place by :meth:`publish`)."""
        tmp = self.root / ".new" / name
        self.backend.remove(tmp)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        self.backend.make(tmp)
        return tmp

    def publish(self, name: str, filled: Path) -> Path:
        dest = self.path(name)
        perms.chmod(filled, perms.TRAVERSE)  # corral's directory; what is in it is the workload's
        self.backend.rename(filled, dest)
        _fsync_dir(dest.parent)
        return dest

    def set_aside(self, name: str) -> Path:
        """Move a disk out of the way, keeping it (``.orphaned/NAME.<time>``) for a person to
        look at: nothing is ever deleted on a guess."""
        dest = self.root / ".orphaned" / f"{name}.{time.strftime('%Y%m%dT%H%M%S')}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        self.backend.rename(self.path(name), dest)
        return dest

    def delete(self, name: str) -> None:
        self.backend.delete(name)

    # -- receiving side ------------------------------------------------------------------------
    def recv_prepare(self, name: str, slot: str) -> dict[str, Any]:
        """Make the slot ready for a pass; returns where the sender writes and what the slot
        already holds (the sender's candidates for an incremental parent)."""
        dest = self.slot(name, slot)
        dest.mkdir(parents=True, exist_ok=True)
        tmp = self._temp_dir(name, slot)
        self.backend.remove(tmp)
        tmp.mkdir(parents=True)
        have = self.backend.prepare(dest)
        return {"path": str(dest), "temp_dir": str(tmp), "have": have, "backend": self.kind}

    def discard(self, name: str, slot: str) -> None:
        """The slot's copy is gone at once (renamed into ``.trash``) and its files are removed
        in the background: removing a copy of a million files takes minutes, and the caller
        (``corral standby rm``, a migration's undo) waited for it, past its client's
        timeout. Whatever a crash leaves in ``.trash`` goes at the next start."""
        trash = self.root / ".trash"
        trash.mkdir(exist_ok=True)
        moved = False
        for path in (self.slot(name, slot), self._temp_dir(name, slot)):
            if path.exists() or path.is_symlink():
                self.backend.rename(path, trash / f"{name}.{slot}.{uuid.uuid4().hex[:12]}")
                moved = True
        if moved:
            threading.Thread(target=self.empty_trash, name="disk-trash", daemon=True).start()

    def empty_trash(self) -> None:
        with self._trash_lock:
            trash = self.root / ".trash"
            for entry in sorted(trash.iterdir()) if trash.is_dir() else []:
                try:
                    self.backend.remove(entry)
                except OSError as exc:  # tried again at the next discard or start
                    log.warning("could not remove %s: %s", entry, exc)

    def prune_received(self, name: str, slot: str) -> None:
        """A pass into the slot completed: keep only what the next pass builds on."""
        self.backend.commit(self.slot(name, slot))

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
        disk = self.backend.adopt(src, self.root / ".new" / name)
        if disk is None:
            raise NotFound(f"the {slot} copy of '{name}' holds no complete snapshot",
                           hint="sync it again")
        self.publish(name, disk)
        self.backend.remove(src)  # what is left of the slot (nothing when the copy moved)
        self.backend.remove(self._temp_dir(name, slot))
        return dest

    def demote(self, name: str) -> Path:
        """This host's live disk of ``name`` becomes its standby copy (after a promotion moved
        the instance away); idempotent."""
        src, dest = self.path(name), self.slot(name, "standby")
        if not src.exists():
            if dest.exists():
                return dest
            raise NotFound(f"no disk for '{name}' on this host")
        self.backend.remove(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        self.backend.demote(name, dest)
        _fsync_dir(dest.parent)
        return dest

    # -- sending side --------------------------------------------------------------------------
    def endpoint(self, target: dict[str, Any], ticket: str = "") -> Endpoint:
        peer = str(target.get("host") or "")
        if self.tls is not None and not peer:
            raise InvalidRequest("the transfer target does not say which host it is, so its "
                                 "certificate cannot be checked",
                                 hint="the operation began before an upgrade; run it again")
        return Endpoint(host=str(target["address"]), port=int(target["port"]),
                        path=str(target["path"]), ticket=ticket, peer=peer, tls=self.tls)

    async def send(self, name: str, target: dict[str, Any], mode: str, gen: str,
                   freeze: Freeze | None, thaw: Freeze | None, keep_frozen: bool = False,
                   ticket: str = "", shape_only: Iterable[str] = ()) -> SendResult:
        """One pass of ``name``'s disk to ``target`` (what :meth:`recv_prepare` returned there,
        plus ``address``, ``port`` and the receiving ``host``'s name), let in by the server's
        ``ticket``. ``live``: while the instance runs; ``frozen``: the short pass while it is
        frozen (``freeze`` None: it is not running, nothing to freeze)."""
        if not self.exists(name):
            raise NotFound(f"no disk for '{name}' on this host",
                           hint="it runs from a host path (--from), which corral cannot move")
        if mode not in ("live", "frozen"):
            raise InvalidRequest(f"unknown pass {mode!r}", hint="this is a server bug")
        if str(target.get("backend", "dir")) != self.kind:
            raise InvalidRequest(
                f"this host keeps disks in {self.kind} but the target uses "
                f"{target.get('backend')}", hint="use hosts with the same disk_backend")
        temp_dir = target.get("temp_dir")
        have = frozenset(str(h) for h in target.get("have") or [])
        to = Target(self.endpoint(target, ticket), have, str(temp_dir) if temp_dir else None,
                    frozenset(shape_only) if mode == "live" else frozenset())
        return await self.backend.send(name, to, "live" if mode == "live" else "frozen", gen,
                                       Hold(freeze, thaw, keep_frozen))


def make_shapes(root: Path, shapes: dict[str, int]) -> None:
    """The files the live pass left out, as sparse files of their sizes (QEMU's stream writes
    every block). One already there with that size is kept (a retried call); anything else
    there (another size, a symlink) is refused: the stream must not write through it."""
    for name, size in sorted(shapes.items()):
        if "/" in name or name.startswith("."):
            raise InvalidRequest(f"{name!r} is no file name of a disk's top level",
                                 hint="this is a server bug")
        path = root / name
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            st = os.lstat(path)
            if not (os.path.isfile(path) and not os.path.islink(path) and st.st_size == size):
                raise Conflict(f"{path} is already there, and not the {size}-byte file the "
                               "live migration expects", hint="the operation rolls back; run "
                               "it again") from None
            continue
        try:
            os.ftruncate(fd, size)
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _after_failed_receive(argv: list[str]) -> list[str]:
    """A ``btrfs receive`` that failed leaves a writable half-snapshot in its slot: drop it,
    so a slot never holds one (rsync writes into a temp dir of its own and needs nothing)."""
    if argv and argv[0] == "btrfs":
        from corral.disks.btrfs import drop_partial_receives

        return drop_partial_receives(Path(argv[-1]))
    return []
