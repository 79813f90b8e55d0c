"""Two hosts' disks for the disk backend conformance suite: how each backend gets a root here.

Every backend in ``corral.disks.registry.BUILTIN`` needs an entry in :data:`SITES` (a new
backend without one fails the suite, on purpose). Each host's root is a filesystem of its own
when the test runs as root (a loop btrfs, a small tmpfs), so a pass can be cut off by a full
target; every mount is undone in the fixture's finalizer, even when the test fails. The two
hosts speak mutual TLS with certificates from a throwaway CA, and every pass carries a ticket
from a throwaway server key, as in a fleet.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from channelkit import authority, host_tls
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from loopfs import loop_btrfs, unmount

from corral.agent.disks import Freeze, HostDisks, SendResult
from corral.disks import tickets
from corral.disks.base import Capabilities

IS_ROOT = os.geteuid() == 0


@dataclass(frozen=True)
class Site:
    """How to give one backend a host root here, and what an interrupted pass leaves in it."""

    #: why the backend cannot be tested here, or None
    unusable: Callable[[], str | None]
    #: a root for host ``label`` under ``tmp``; returns (root, mount to undo or None)
    make_root: Callable[[Path, str], tuple[Path, Path | None]]
    #: leave in ``slot`` what a receive cut off by a crash would leave there
    leave_partial: Callable[[Path], None]


def _tmpfs(tmp: Path, label: str) -> tuple[Path, Path | None]:
    mnt = tmp / label
    mnt.mkdir()
    if not IS_ROOT:
        return mnt, None
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m,mode=0711", f"crl-{label}",
                    str(mnt)], check=True)
    return mnt, mnt


def _btrfs(tmp: Path, label: str) -> tuple[Path, Path | None]:
    mnt = loop_btrfs(tmp, label)
    return mnt, mnt


def _rsync_temp_file(slot: Path) -> None:
    # rsync never leaves a partial file in a slot; a killed one leaves it in its temp dir
    temp = slot.parent.parent / ".tmp" / f"{slot.name}.{slot.parent.name.lstrip('.')}"
    temp.mkdir(parents=True, exist_ok=True)
    (temp / ".f3.Xy12ab").write_bytes(b"half")


def _half_received(slot: Path) -> None:
    # a receive killed midway: a writable subvolume without a Received UUID
    subprocess.run(["btrfs", "subvolume", "create", str(slot / f"{slot.name}@9999999999.0")],
                   check=True, capture_output=True)


def _no_rsync() -> str | None:
    return None if shutil.which("rsync") else "needs rsync"


def _no_btrfs() -> str | None:
    if not IS_ROOT:
        return "needs root to mount a loop btrfs"
    return None if shutil.which("mkfs.btrfs") else "needs btrfs-progs"


SITES: dict[str, Site] = {
    "dir": Site(_no_rsync, _tmpfs, _rsync_temp_file),
    "btrfs": Site(_no_btrfs, _btrfs, _half_received),
}


def host(kind: str, root: Path, data_dir: Path, name: str, key: Ed25519PrivateKey,
         tmp: Path) -> HostDisks:
    """An agent's disks as after it joined a TLS fleet (not started)."""
    h = HostDisks(root, kind, data_dir, name)
    h.ticket_key = tickets.public_hex(key)
    tls = host_tls(authority(tmp / "pki"), tmp / "certs", name)
    h.use_tls(tls.cert_file, tls.key_file, tls.ca_file)
    return h


@dataclass
class Pair:
    kind: str
    a: HostDisks
    b: HostDisks
    tmp: Path
    #: each root is a filesystem of its own (a full one cuts a pass off)
    bounded: bool
    #: the server's ticket key
    key: Ed25519PrivateKey
    hosts: list[HostDisks] = field(default_factory=list)

    @property
    def caps(self) -> Capabilities:
        return self.a.backend.capabilities

    def restart_b(self) -> HostDisks:
        """A new agent on b's root and data directory, as after a crash (not started)."""
        self.b = host(self.kind, self.b.root, self.b.data_dir, self.b.host, self.key, self.tmp)
        self.hosts.append(self.b)
        return self.b

    async def send(self, name: str, target: dict[str, object], mode: str, gen: str,
                   freeze: Freeze | None, thaw: Freeze | None,
                   shape_only: tuple[str, ...] = ()) -> SendResult:
        """A pass from a to what ``target`` names, with the ticket the server would issue."""
        ticket = tickets.issue(self.key, name, str(target["slot"]), source=self.a.host,
                               target=str(target["host"]))
        return await self.a.send(name, target, mode, gen, freeze, thaw, ticket=ticket,
                                 shape_only=shape_only)


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def make_disk(h: HostDisks, name: str, files: int = 200, size: int = 2000) -> Path:
    fill = h.new_dir(name)
    for i in range(files):
        (fill / f"f{i}").write_bytes(os.urandom(size))
    return h.publish(name, fill)


def target(h: HostDisks, name: str, slot: str) -> dict[str, object]:
    """What the server hands the sender: ``disk_recv``'s answer, the host and the slot."""
    return {**h.recv_prepare(name, slot), "address": "127.0.0.1", "port": h.port,
            "host": h.host, "slot": slot}


def copy_of(h: HostDisks, name: str, slot: str) -> dict[str, str]:
    path = h.copy_path(name, slot)
    assert path is not None, f"no complete {slot} copy of {name}"
    return digest(path)


def fill_up(mnt: Path, leave: int) -> Path:
    """A file taking all but about ``leave`` bytes of the filesystem at ``mnt``."""
    filler = mnt / f"filler-{uuid.uuid4().hex[:6]}"
    st = os.statvfs(mnt)
    size = st.f_bavail * st.f_frsize - leave
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while size > 0:
            try:
                os.posix_fallocate(fd, 0, size)
                break
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                size -= 4 << 20
    finally:
        os.close(fd)
    return filler


def unmount_all(mounts: list[Path]) -> None:
    for m in mounts:
        unmount(m)
