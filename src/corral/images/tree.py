"""A directory tree as a manifest of chunk lists, and back.

The manifest keeps everything a root filesystem needs to come back identical: file types, modes,
owners, times, symlink targets, hard links (as links to the first path, not as copies), device
nodes, extended attributes, and holes in sparse files (only data extents are chunked, found with
SEEK_DATA/SEEK_HOLE, so a 10 GB sparse image with 1 MB of data costs 1 MB).

Chunk boundaries come from FastCDC over each file's data extents, so an edit in the middle of a
file changes only the chunks around it, and identical files across images share every chunk.
"""

from __future__ import annotations

import base64
import errno
import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastcdc import fastcdc

from corral.errors import InvalidRequest
from corral.images.packstore import PackStore, chunk_id

MIN_CHUNK, AVG_CHUNK, MAX_CHUNK = 16 * 1024, 64 * 1024, 256 * 1024
#: chunk ids are batched into one durable put per this many bytes of file data
BATCH_BYTES = 16 * 1024**2


@dataclass
class Entry:
    path: str
    kind: str  # f file, d dir, l symlink, h hard link, c/b char/block device, p fifo, s socket
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    size: int = 0
    target: str = ""  # symlink target, or the first path of a hard-link group
    rdev: int = 0
    xattrs: dict[str, str] = field(default_factory=dict)  # name -> base64 value
    #: data extents: [offset, [chunk hex, ...]]; gaps between them are holes
    extents: list[list[Any]] = field(default_factory=list)


@dataclass
class Manifest:
    entries: list[Entry]

    def to_json(self) -> bytes:
        return json.dumps({"version": 1, "entries": [e.__dict__ for e in self.entries]},
                          separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Manifest:
        data = json.loads(raw)
        if data.get("version") != 1:
            raise InvalidRequest(f"unknown manifest version {data.get('version')!r}",
                                 hint="upgrade corral to read this image")
        return cls([Entry(**e) for e in data["entries"]])

    def chunk_ids(self) -> set[str]:
        return {c for e in self.entries for _, chunks in e.extents for c in chunks}

    def size(self) -> int:
        return sum(e.size for e in self.entries if e.kind == "f")


def _xattrs(path: str) -> dict[str, str]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM):
            return {}
        raise
    out: dict[str, str] = {}
    for name in sorted(names):
        try:
            out[name] = base64.b64encode(os.getxattr(path, name, follow_symlinks=False)).decode()
        except OSError:
            continue
    return out


def _extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(offset, length) of the data regions of a file; the whole file if holes are unknown."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                return
            yield pos, size - pos
            return
        end = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, end - start
        pos = end


def _walk(root: Path) -> Iterator[tuple[str, os.stat_result]]:
    yield ".", os.lstat(root)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, root)
        for name in sorted(dirnames + filenames):
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            yield rel, os.lstat(os.path.join(dirpath, name))


def snapshot(root: Path, store: PackStore) -> Manifest:
    """Chunk every file of ``root`` into ``store`` and return the tree's manifest."""
    if not root.is_dir():
        raise InvalidRequest(f"{root} is not a directory", hint="give the path of a root tree")
    entries: list[Entry] = []
    links: dict[tuple[int, int], str] = {}
    pending: list[bytes] = []
    pending_bytes = 0

    def flush() -> None:
        nonlocal pending, pending_bytes
        if pending:
            store.put_many(pending)
        pending, pending_bytes = [], 0

    for rel, st in _walk(root):
        full = str(root / rel)
        mode = st.st_mode
        e = Entry(rel, "d", stat.S_IMODE(mode), st.st_uid, st.st_gid, st.st_mtime_ns,
                  xattrs=_xattrs(full))
        if stat.S_ISDIR(mode):
            pass
        elif stat.S_ISLNK(mode):
            e.kind, e.target = "l", os.readlink(full)
        elif stat.S_ISREG(mode) and st.st_nlink > 1 and (st.st_dev, st.st_ino) in links:
            e.kind, e.target = "h", links[(st.st_dev, st.st_ino)]
        elif stat.S_ISREG(mode):
            if st.st_nlink > 1:
                links[(st.st_dev, st.st_ino)] = rel
            e.kind, e.size = "f", st.st_size
            fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW)
            try:
                for off, length in _extents(fd, st.st_size):
                    ids: list[str] = []
                    for piece in _chunks(fd, off, length):
                        pending.append(piece)
                        pending_bytes += len(piece)
                        ids.append(chunk_id(piece).hex())
                        if pending_bytes >= BATCH_BYTES:
                            flush()
                    e.extents.append([off, ids])
            finally:
                os.close(fd)
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            e.kind, e.rdev = ("c" if stat.S_ISCHR(mode) else "b"), st.st_rdev
        elif stat.S_ISFIFO(mode):
            e.kind = "p"
        elif stat.S_ISSOCK(mode):
            e.kind = "s"
        entries.append(e)
    flush()
    return Manifest(entries)


def _chunks(fd: int, off: int, length: int, window: int = 32 * 1024**2) -> Iterator[bytes]:
    """FastCDC pieces of one data extent, read a window at a time so memory stays bounded; the
    last piece of a window is carried into the next, so boundaries stay content-defined."""
    carry = b""
    pos, end = off, off + length
    while pos < end or carry:
        data = carry + (os.pread(fd, min(window, end - pos), pos) if pos < end else b"")
        pos += len(data) - len(carry)
        last = pos >= end
        pieces = [bytes(c.data) for c in fastcdc(data, min_size=MIN_CHUNK, avg_size=AVG_CHUNK,
                                                 max_size=MAX_CHUNK, fat=True)]
        carry = pieces.pop() if not last and len(pieces) > 1 else b""
        yield from pieces
        if last:
            return


def materialize(manifest: Manifest, store: PackStore, dest: Path) -> None:
    """Recreate the tree at ``dest`` (which must not exist or be empty)."""
    if dest.exists() and any(dest.iterdir()):
        raise InvalidRequest(f"{dest} is not empty", hint="materialise into a new directory")
    dest.mkdir(parents=True, exist_ok=True)
    dirs: list[Entry] = []
    for e in manifest.entries:
        full = os.path.join(dest, e.path)
        if e.kind == "d":
            os.makedirs(full, exist_ok=True)
            dirs.append(e)
            continue
        if e.kind == "f":
            fd = os.open(full, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                for off, ids in e.extents:
                    pos = int(off)
                    for hexid in ids:
                        data = store.get(bytes.fromhex(hexid))
                        os.pwrite(fd, data, pos)
                        pos += len(data)
                os.ftruncate(fd, e.size)
            finally:
                os.close(fd)
        elif e.kind == "l":
            os.symlink(e.target, full)
        elif e.kind == "h":
            os.link(os.path.join(dest, e.target), full)
            continue  # shares the inode's metadata with its first path
        elif e.kind in ("c", "b"):
            kind = stat.S_IFCHR if e.kind == "c" else stat.S_IFBLK
            os.mknod(full, kind | e.mode, e.rdev)
        elif e.kind == "p":
            os.mkfifo(full, e.mode)
        elif e.kind == "s":
            continue  # sockets are not content; they are made by whoever listens
        _apply_meta(full, e)
    for e in reversed(dirs):  # after their contents, so times and modes stick
        _apply_meta(os.path.join(dest, e.path), e)


def _apply_meta(full: str, e: Entry) -> None:
    is_link = e.kind == "l"
    if os.geteuid() == 0:
        os.chown(full, e.uid, e.gid, follow_symlinks=False)
    for name, value in e.xattrs.items():
        try:
            os.setxattr(full, name, base64.b64decode(value), follow_symlinks=False)
        except OSError as exc:
            if exc.errno not in (errno.ENOTSUP, errno.EPERM):
                raise
    if not is_link:
        os.chmod(full, e.mode)
    os.utime(full, ns=(e.mtime_ns, e.mtime_ns), follow_symlinks=False)
