"""The user namespace of runc containers: which host ids a container's ids are, and its root's.

A container's root is not the host's root: every runc container runs in a user namespace where
its ids 0..65535 are the host's ``HOST_BASE + 0 .. HOST_BASE + 65535``. So whatever a workload
does to the files of its disk, the host sees them owned by those ids: a setuid binary it leaves
there is setuid to an id that owns nothing but container files, never to the host's root; it
cannot chown a file to an id outside the range (the kernel refuses unmapped ids); capabilities
it holds (CAP_CHOWN, CAP_FOWNER, CAP_FSETID, CAP_SETFCAP...) act only on files and processes of
its own ids; a file capability it sets is namespaced and means nothing on the host.

One range for every container on every host, fixed here: disks travel host to host with
``rsync --numeric-ids``, ``btrfs send`` and the image store's manifests, which all keep numeric
owners, so a disk arrives owned by the same ids its next host's containers run as.
``HOST_BASE`` is the first id past systemd's container ranges (524288..1879048191, see
https://systemd.io/UIDS-GIDS/), so no nspawn container and no ordinary user shares it.

The files of a root filesystem must be owned by the container's ids for its root to use them,
so :func:`shift_tree` moves every owner in 0..65535 (what images, the busybox template and
disks made before the user namespace have) into the range, before each start; ids already in
the range are left alone, so a second pass has nothing to do. Safety of the walk:

- it never follows a symlink and never leaves the tree's filesystem (``os.fwalk`` with
  directory descriptors, ``lchown`` relative to them), so a tree changed under it, or a
  symlink to ``/etc``, never makes it touch a host file;
- a hard-linked file also linked from outside the tree (the busybox binary shared with the
  template and every other copy) keeps its owner: changing it would change the other trees;
  it stays root's, which the container can run but not change;
- the kernel takes the setuid bit, a setgid bit with group execute and any file capability
  off a file whose owner changes; the walk takes those bits off every file too (containers run
  with ``noNewPrivileges``, so they are inert inside, and on the host they would be setuid to
  a container id).

A tree that is the host's own (``/``, or one holding the agent's interpreter, runc or
``/etc/passwd``) is refused outright rather than given away to a container.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

from corral.errors import DriverError, InvalidRequest

#: container ids 0..CONTAINER_IDS-1 are host ids HOST_BASE..HOST_BASE+CONTAINER_IDS-1
CONTAINER_IDS = 65536
HOST_BASE = 0x7000_0000
#: setuid, and setgid where it means something (group execute)
_PRIVILEGED_BITS = stat.S_ISUID | stat.S_ISGID


def id_mappings() -> list[dict[str, int]]:
    """The OCI ``uidMappings``/``gidMappings`` entry (the same for users and groups)."""
    return [{"containerID": 0, "hostID": HOST_BASE, "size": CONTAINER_IDS}]


def to_host(cid: int) -> int:
    """The host id of container id ``cid`` (its own for ids outside 0..65535: left as is)."""
    return HOST_BASE + cid if 0 <= cid < CONTAINER_IDS else cid


def user_namespaces_enabled() -> bool:
    """Whether this kernel lets root make a user namespace (the sysctl can forbid it)."""
    try:
        return int(Path("/proc/sys/user/max_user_namespaces").read_text()) > 0
    except (OSError, ValueError):
        return Path("/proc/self/ns/user").exists()


def check_container_root(rootfs: str) -> None:
    """Refuse a root filesystem that is the host's own: shifting its owners would hand the
    host's files to every container (and break the host)."""
    root = Path(rootfs).resolve()
    host_files = [Path("/etc/passwd"), Path(sys.executable).resolve()]
    runc = shutil.which("runc")
    if runc:
        host_files.append(Path(runc).resolve())
    if root == Path("/") or any(f.is_relative_to(root) for f in host_files):
        raise InvalidRequest(
            f"{rootfs} holds the host's own system files and cannot be a container's root: "
            "its owners would be moved into the containers' id range",
            hint="give a directory made for the container (a busybox root, an image) with "
                 "--from, or use --image")


@dataclass
class Shifted:
    """What a pass did: entries seen, owners changed, privileged bits taken off."""

    seen: int = 0
    chowned: int = 0
    stripped: int = 0


def _wants(st: os.stat_result) -> tuple[int, int] | None:
    uid, gid = to_host(st.st_uid), to_host(st.st_gid)
    return None if (uid, gid) == (st.st_uid, st.st_gid) else (uid, gid)


def _privileged(st: os.stat_result) -> bool:
    mode = st.st_mode
    if not stat.S_ISREG(mode):
        return False
    return bool(mode & stat.S_ISUID) or (bool(mode & stat.S_ISGID) and bool(mode & stat.S_IXGRP))


class _Pass:
    def __init__(self, dev: int) -> None:
        self.dev = dev
        self.done = Shifted()
        #: (ino) -> links seen in the tree, for files with more than one link
        self.links: dict[int, int] = {}
        #: hard-linked files, shifted only once every link is known to be in the tree
        self.linked: list[tuple[int, str, int]] = []  # (ino, path from the root, nlink)

    def entry(self, name: str, dfd: int, rel: str) -> None:
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            return  # removed meanwhile: nothing to shift
        self.done.seen += 1
        if st.st_dev != self.dev:
            return
        if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
            self.links[st.st_ino] = self.links.get(st.st_ino, 0) + 1
            self.linked.append((st.st_ino, rel, st.st_nlink))
            return
        self.apply(name, dfd, st)

    def apply(self, name: str, dfd: int, st: os.stat_result) -> None:
        want = _wants(st)
        if want is not None:
            os.chown(name, *want, dir_fd=dfd, follow_symlinks=False)
            self.done.chowned += 1
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        if _privileged(st):
            try:
                os.chmod(name, stat.S_IMODE(st.st_mode) & ~_PRIVILEGED_BITS, dir_fd=dfd,
                         follow_symlinks=False)
            except (ValueError, NotImplementedError):
                return  # it became a symlink meanwhile: chmod would follow it, so not done
            self.done.stripped += 1


def _raise(err: OSError) -> None:
    raise err  # os.fwalk skips what it cannot read unless told otherwise: a half-given root


def shift_tree(root: Path) -> Shifted:
    """Move the owners of ``root`` and everything in it into the containers' range (see the
    module's docstring). A read-only tree is left as it is (its container can change nothing
    in it either); any other failure is a :class:`DriverError`: a container never starts on a
    root half given to it."""
    root = Path(root)
    try:
        top = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise DriverError(f"cannot open the root filesystem {root}: {e.strerror}",
                          hint="check that it is a directory (not a symlink) root can read") from e
    try:
        st = os.fstat(top)
        p = _Pass(st.st_dev)
        p.done.seen += 1
        p.apply(".", top, st)
        for dirpath, dirnames, filenames, dfd in os.fwalk(".", onerror=_raise, dir_fd=top,
                                                          follow_symlinks=False):
            if os.fstat(dfd).st_dev != p.dev:
                dirnames[:] = []  # another filesystem mounted in the tree: not ours
                continue
            for name in (*dirnames, *filenames):
                p.entry(name, dfd, os.path.join(dirpath, name))
        for ino, rel, nlink in p.linked:
            if p.links.get(ino, 0) >= nlink:  # every link is in the tree
                parent, name = os.path.split(rel)
                pfd = os.open(parent or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                              | os.O_CLOEXEC, dir_fd=top)
                try:
                    lst = os.stat(name, dir_fd=pfd, follow_symlinks=False)
                    if (lst.st_dev, lst.st_ino) == (p.dev, ino):  # the very file counted
                        p.apply(name, pfd, lst)
                finally:
                    os.close(pfd)
        return p.done
    except RecursionError as e:
        raise DriverError(f"the root filesystem {root} is nested too deep to walk",
                          hint="remove the deepest directories from it") from e
    except OSError as e:
        if e.errno == errno.EROFS:
            return Shifted()
        raise DriverError(f"cannot give the root filesystem {root} to the container's user "
                          f"namespace: {e}",
                          hint="the container's root must be owned by its ids "
                               f"({HOST_BASE}..{HOST_BASE + CONTAINER_IDS - 1}); check the "
                               "filesystem supports chown") from e
    finally:
        os.close(top)
