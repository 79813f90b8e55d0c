"""A directory tree as a manifest of chunk lists, and back.

The manifest keeps everything a root filesystem needs to come back identical: file types, modes,
owners, times, symlink targets, hard links (as links to the first path, not as copies), device
nodes, extended attributes, and holes in sparse files (only data extents are chunked, found with
SEEK_DATA/SEEK_HOLE, so a 10 GB sparse image with 1 MB of data costs 1 MB).

Chunk boundaries come from FastCDC over each file's data extents, so an edit in the middle of a
file changes only the chunks around it, and identical files across images share every chunk.

A manifest read back is data from the store or a peer, never trusted as paths: it is checked
(:meth:`Manifest.check`) when it is named and again before it is materialised, and
:func:`materialize` creates every entry relative to a descriptor of its directory reached
without following symlinks, so nothing a workload put in its disk, nor a forged manifest, can
make it write outside the destination.
"""

from __future__ import annotations

import base64
import errno
import json
import os
import posixpath
import stat
from collections import OrderedDict
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


#: entry kinds (see :class:`Entry`)
KINDS = frozenset("fdlhcbps")
_FIELDS = frozenset(Entry.__dataclass_fields__)
_REQUIRED = frozenset({"path", "kind", "mode", "uid", "gid", "mtime_ns"})
_INTS = ("mode", "uid", "gid", "mtime_ns", "size", "rdev")
_HEX = frozenset("0123456789abcdef")
#: longest name of one path component (NAME_MAX) and of a whole path (PATH_MAX)
NAME_MAX, PATH_MAX = 255, 4095


def _refuse(i: int, path: object, why: str) -> InvalidRequest:
    return InvalidRequest(f"manifest entry {i} ({path!r}): {why}",
                          hint="the manifest was damaged or forged; import the tree again",
                          details={"entry": i, "path": repr(path)})


def _entry(i: int, raw: object) -> Entry:
    """One entry as stored, with the type of every field checked: a manifest comes from the
    store or from a peer, and a wrong type must be a refusal naming the entry, not a crash
    deep in gc or materialise."""
    if not isinstance(raw, dict):
        raise _refuse(i, raw, "not an object")
    path = raw.get("path")
    if set(raw) - _FIELDS or _REQUIRED - set(raw):
        raise _refuse(i, path, f"fields {sorted(raw)} are not an entry's "
                               f"(needs {sorted(_REQUIRED)})")
    if not isinstance(path, str) or not isinstance(raw["kind"], str) \
            or raw["kind"] not in KINDS:
        raise _refuse(i, path, f"bad path or kind {raw['kind']!r}")
    for name in _INTS:
        if name in raw and type(raw[name]) is not int:
            raise _refuse(i, path, f"{name} is not an integer")
    if not isinstance(raw.get("target", ""), str):
        raise _refuse(i, path, "target is not a string")
    xattrs = raw.get("xattrs", {})
    if not isinstance(xattrs, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in xattrs.items()):
        raise _refuse(i, path, "xattrs are not names to base64 values")
    extents = raw.get("extents", [])
    if not isinstance(extents, list) or not all(
            isinstance(x, list) and len(x) == 2 and type(x[0]) is int and x[0] >= 0
            and isinstance(x[1], list)
            and all(isinstance(c, str) and len(c) == 64 and _HEX.issuperset(c) for c in x[1])
            for x in extents):
        raise _refuse(i, path, "extents are not [offset, [64 hex digit chunk ids]] pairs")
    return Entry(**raw)


#: the most bytes of JSON a manifest's ``meta`` may take (an image's config is a few KiB)
META_MAX = 256 * 1024


@dataclass
class Manifest:
    entries: list[Entry]
    #: where the tree came from and how to run it, for an image pulled from a registry
    #: (``corral.images.oci``): ``source``, ``digest``, ``config``... Optional, and written only
    #: when set, so a tree without it keeps the manifest (and the manifest id) it always had
    #: and an older reader, which never looks at it, reads either.
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> bytes:
        doc: dict[str, Any] = {"version": 1, "entries": [e.__dict__ for e in self.entries]}
        if self.meta:
            doc["meta"] = self.meta
        return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Manifest:
        """Parse, checking the shape and types of every field (a refusal, never a crash);
        whether its paths are safe to create is :meth:`check`'s question."""
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidRequest(f"a manifest is not JSON: {exc}",
                                 hint="send the manifest as corral writes it") from exc
        if not isinstance(data, dict) or not isinstance(data.get("entries"), list):
            raise InvalidRequest("a manifest is an object with a list of entries",
                                 hint="send the manifest as corral writes it")
        if data.get("version") != 1:
            raise InvalidRequest(f"unknown manifest version {data.get('version')!r}",
                                 hint="upgrade corral to read this image")
        meta = data.get("meta", {})
        if not isinstance(meta, dict) or len(json.dumps(meta)) > META_MAX:
            raise InvalidRequest(f"a manifest's meta is an object of at most {META_MAX} bytes",
                                 hint="send the manifest as corral writes it")
        return cls([_entry(i, e) for i, e in enumerate(data["entries"])], meta)

    def check(self) -> None:
        """Refuse (naming the entry) a manifest that could make :func:`materialize` create
        anything outside its destination or through a symlink.

        Every path is relative and canonical (no ``/`` at either end, no empty, ``.`` or
        ``..`` component, no NUL), appears once, and lives in a directory that an *earlier*
        entry made (``.``, the destination itself, excepted): so every parent was created by
        materialise as a directory, never a symlink the tree brought. A hard link names an
        earlier regular file of the same manifest. A symlink's target is data and may point
        anywhere (a root filesystem's ``/etc/mtab -> /proc/mounts`` is normal): materialise
        makes the link and never writes through one."""
        kinds: dict[str, str] = {}
        for i, e in enumerate(self.entries):
            p = e.path
            if p == ".":
                if e.kind != "d":
                    raise _refuse(i, p, "the root of the tree must be a directory")
            else:
                parts = p.split("/")
                if "\x00" in p or not p or p.startswith("/") or p != posixpath.normpath(p) \
                        or ".." in parts:
                    raise _refuse(i, p, "not a canonical relative path inside the tree")
                try:
                    encoded = os.fsencode(p)
                except UnicodeEncodeError as exc:
                    raise _refuse(i, p, "not encodable as a file name") from exc
                if len(encoded) > PATH_MAX or any(
                        len(os.fsencode(c)) > NAME_MAX for c in parts):
                    raise _refuse(i, p, "path or name too long")
                parent = posixpath.dirname(p)
                if parent and kinds.get(parent) != "d":
                    raise _refuse(i, p, f"its directory {parent!r} is not a directory "
                                        "listed before it")
            if p in kinds:
                raise _refuse(i, p, "listed twice")
            if e.kind == "l" and (not e.target or "\x00" in e.target):
                raise _refuse(i, p, "a symlink needs a target without NUL")
            if e.kind == "h" and kinds.get(e.target) != "f":
                raise _refuse(i, p, f"hard link to {e.target!r}, which is not a regular "
                                    "file listed before it")
            if not (0 <= e.mode <= 0o7777 and 0 <= e.uid < 2**32 and 0 <= e.gid < 2**32
                    and 0 <= e.size < 2**63 and 0 <= e.rdev < 2**64
                    and -(2**63) <= e.mtime_ns < 2**63):
                raise _refuse(i, p, "mode, owner, size, device or time out of range")
            for name, value in e.xattrs.items():
                if not name or "\x00" in name:
                    raise _refuse(i, p, f"bad xattr name {name!r}")
                try:
                    base64.b64decode(value, validate=True)
                except ValueError as exc:
                    raise _refuse(i, p, f"xattr {name!r} is not base64") from exc
            if e.extents and (e.kind != "f" or any(int(off) > e.size for off, _ in e.extents)):
                raise _refuse(i, p, "data extents outside a regular file's size")
            kinds[p] = e.kind

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


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class _Dirs:
    """Directories of the tree being made, each opened from its parent's descriptor with
    ``O_NOFOLLOW``, so a path that meets a symlink fails (ELOOP/ENOTDIR) instead of leading out
    of the tree. The most recently used stay open (entries come grouped by directory, and a
    directory's parent is usually still open), so most entries cost no lookup at all."""

    KEEP = 64

    def __init__(self, root: int) -> None:
        self.root = root
        self._open: OrderedDict[str, int] = OrderedDict()

    def fd(self, rel: str) -> int:
        """A descriptor of directory ``rel`` ("" or "." is the destination); owned here."""
        if rel in ("", "."):
            return self.root
        fd = self._open.get(rel)
        if fd is not None:
            self._open.move_to_end(rel)
            return fd
        parent, name = posixpath.split(rel)
        fd = os.open(name, _DIR_FLAGS, dir_fd=self.fd(parent))
        self._open[rel] = fd
        while len(self._open) > self.KEEP:
            os.close(self._open.popitem(last=False)[1])
        return fd

    def close(self) -> None:
        for fd in self._open.values():
            os.close(fd)
        self._open.clear()


def materialize(manifest: Manifest, store: PackStore, dest: Path) -> None:
    """Recreate the tree at ``dest`` (which must not exist or be empty).

    The manifest is checked first (:meth:`Manifest.check`), so a damaged or forged one is
    refused before anything is written; then every entry is made relative to a descriptor of
    its directory, reached without following symlinks, so even a tree that changed under us
    cannot lead a write outside ``dest``."""
    manifest.check()
    if dest.exists() and any(dest.iterdir()):
        raise InvalidRequest(f"{dest} is not empty", hint="materialise into a new directory")
    dest.mkdir(parents=True, exist_ok=True)
    root = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    dirs = _Dirs(root)
    try:
        made: list[Entry] = []
        for e in manifest.entries:
            if e.path == ".":
                made.append(e)
                continue
            parent, name = posixpath.split(e.path)
            _make(e, parent, name, dirs, store)
            if e.kind == "d":
                made.append(e)
        for e in reversed(made):  # after their contents, so times and modes stick
            _apply_meta_fd(dirs.fd(e.path), e)
    finally:
        dirs.close()
        os.close(root)


def _make(e: Entry, parent: str, name: str, dirs: _Dirs, store: PackStore) -> None:
    """Create one entry ``name`` in the directory ``parent`` (a directory's metadata is
    applied at the end, after its contents)."""
    if e.kind == "h":  # shares the inode's metadata with its first path
        tparent, tname = posixpath.split(e.target)
        tfd = os.dup(dirs.fd(tparent))  # ours: looking up the other may close a cached one
        try:
            os.link(tname, name, src_dir_fd=tfd, dst_dir_fd=dirs.fd(parent),
                    follow_symlinks=False)
        finally:
            os.close(tfd)
        return
    pfd = dirs.fd(parent)
    if e.kind == "d":
        os.mkdir(name, 0o700, dir_fd=pfd)
        return
    if e.kind == "f":
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=pfd)
        try:
            for off, ids in e.extents:
                pos = int(off)
                for hexid in ids:
                    data = store.get(bytes.fromhex(hexid))
                    os.pwrite(fd, data, pos)
                    pos += len(data)
            os.ftruncate(fd, e.size)
            _apply_meta_fd(fd, e)
        finally:
            os.close(fd)
        return
    if e.kind == "l":
        os.symlink(e.target, name, dir_fd=pfd)
    elif e.kind in ("c", "b"):
        kind = stat.S_IFCHR if e.kind == "c" else stat.S_IFBLK
        os.mknod(name, kind | e.mode, e.rdev, dir_fd=pfd)
    elif e.kind == "p":
        os.mkfifo(name, e.mode, dir_fd=pfd)
    else:
        return  # sockets are not content; they are made by whoever listens
    _apply_meta_at(pfd, name, e)


def _set_xattrs(target: int | str, e: Entry) -> None:
    for name, value in e.xattrs.items():
        try:
            if isinstance(target, int):
                os.setxattr(target, name, base64.b64decode(value))
            else:
                os.setxattr(target, name, base64.b64decode(value), follow_symlinks=False)
        except OSError as exc:
            if exc.errno not in (errno.ENOTSUP, errno.EPERM):
                raise


def _apply_meta_fd(fd: int, e: Entry) -> None:
    """Owner, xattrs, mode and times of an open file or directory (chown first: it clears
    setuid bits, which the mode then sets)."""
    if os.geteuid() == 0:
        os.chown(fd, e.uid, e.gid)
    _set_xattrs(fd, e)
    os.chmod(fd, e.mode)
    os.utime(fd, ns=(e.mtime_ns, e.mtime_ns))


def _apply_meta_at(pfd: int, name: str, e: Entry) -> None:
    """The same for a symlink, device or fifo, by name in its directory and never following
    a symlink (a fifo or a device is not opened: that could block or touch hardware)."""
    if os.geteuid() == 0:
        os.chown(name, e.uid, e.gid, dir_fd=pfd, follow_symlinks=False)
    # setxattr takes no directory descriptor; /proc's name of ours is the same directory
    _set_xattrs(f"/proc/self/fd/{pfd}/{name}", e)
    if e.kind != "l":  # a symlink's mode means nothing; chmod would follow it
        st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        if not stat.S_ISLNK(st.st_mode):
            os.chmod(name, e.mode, dir_fd=pfd)
    os.utime(name, ns=(e.mtime_ns, e.mtime_ns), dir_fd=pfd, follow_symlinks=False)
