"""An image's layers applied in order into one tree, straight from their tar streams.

Unpacking layers onto a filesystem would need root (owners, devices), would have to resolve
every path through directory handles (a symlink one layer brings could lead a later layer's
write out of the tree) and would leave a half-made tree behind on any error. Here the tree is
built in memory instead: a path is only a key, so nothing a layer says is ever followed on a
filesystem. File contents are cut into chunks as they stream by, into the (scratch) store the
builder is given, with the same FastCDC windows as :func:`corral.images.tree.snapshot`, so a file
pulled and the same file imported share every chunk. The result is a :class:`Manifest` like the
one ``snapshot`` makes of the unpacked tree: checked and named as any other.

OCI rules (image-spec ``layer.md``): a whiteout ``.wh.NAME`` hides NAME as the lower layers left
it, and ``.wh..wh..opq`` hides everything the lower layers put in its directory; both act on
lower layers only, wherever their layer lists them. An entry over a directory of a lower layer
replaces it (a directory over a directory merges with it); a hard link names a path of the tree
built so far and shares that inode (its data, owner, mode and times).

Refused, naming the layer and the entry: an absolute path or one with ``..`` (in an entry or a
hard link's target), an entry whose directory is a symlink or a file in the tree (a real layer
diff never writes through a symlink: it lists the directory's real path), a hard link to
nothing or to a directory, an entry type tar has but a root filesystem does not. A symlink's
target is data and may point anywhere, as in any root filesystem: materialise never follows one.
"""

from __future__ import annotations

import base64
import os
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import zstandard
from fastcdc import fastcdc

from corral.errors import InvalidRequest
from corral.images.packstore import PackStore, chunk_id
from corral.images.tree import (
    AVG_CHUNK,
    BATCH_BYTES,
    MAX_CHUNK,
    MIN_CHUNK,
    NAME_MAX,
    PATH_MAX,
    Entry,
    Manifest,
)

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
#: bytes of a file chunked at once (``tree._chunks``'s window: the same cuts for the same data)
WINDOW = 32 * 1024**2
_XATTR = "SCHILY.xattr."


@dataclass(eq=False)
class Inode:
    """What hard links share."""

    kind: str  # as Entry.kind, never "h"
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    xattrs: dict[str, str]
    size: int = 0
    target: str = ""
    rdev: int = 0
    extents: list[list[Any]] = field(default_factory=list)


@dataclass(eq=False)
class Node:
    ino: Inode
    #: the layer that made (or last replaced) it: whiteouts only hide lower layers' nodes
    layer: int
    #: a directory's entries by name (None: not a directory)
    children: dict[str, Node] | None = None


def refuse(label: str, path: str, why: str) -> InvalidRequest:
    return InvalidRequest(f"{label}, entry {path[:200]!r}: {why}",
                          hint="the image is damaged or built to escape its root; nothing was "
                               "stored. Pull an image you trust",
                          details={"layer": label, "path": path[:200]})


def parts_of(name: str, label: str, what: str = "path") -> list[str]:
    """The components of a layer's path: relative, without ``..``, bounded."""
    if name.startswith("/"):
        raise refuse(label, name, f"absolute {what}: a layer's paths are relative to the "
                                  "image's root")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise refuse(label, name, f"'..' in the {what} would leave the image's root")
    if "\x00" in name or len(os.fsencode(name)) > PATH_MAX \
            or any(len(os.fsencode(p)) > NAME_MAX for p in parts):
        raise refuse(label, name, f"{what} too long or with a NUL byte")
    return parts


class TreeBuilder:
    """Layers go in with :meth:`apply`, bottom first; :meth:`manifest` is the merged tree."""

    def __init__(self, packs: PackStore) -> None:
        self.packs = packs
        self.root = Node(Inode("d", 0o755, 0, 0, 0, {}), -1, {})
        self._pending: list[bytes] = []
        self._pending_bytes = 0

    # --- applying a layer ---------------------------------------------------------------------
    def apply(self, stream: IO[bytes], layer: int, label: str) -> None:
        """Apply one layer, an uncompressed tar ``stream`` read once to its end, as number
        ``layer`` (increasing). A tar that ends early or is not one is refused."""
        try:
            with tarfile.open(fileobj=stream, mode="r|", errors="surrogateescape") as tar:
                for member in tar:
                    self._member(tar, member, layer, label)
            while stream.read(1024 * 1024):  # the rest counts in the layer's digests
                pass
        except tarfile.TarError as exc:
            raise refuse(label, "", f"not a complete tar archive ({exc})") from exc
        except (EOFError, OSError, zlib.error, zstandard.ZstdError, ValueError) as exc:
            raise refuse(label, "", f"cannot be read or decompressed ({exc})") from exc
        finally:
            self._flush()

    def _member(self, tar: tarfile.TarFile, m: tarfile.TarInfo, layer: int,
                label: str) -> None:
        parts = parts_of(m.name, label)
        if not parts:  # the layer's own root, "./"
            if not m.isdir():
                raise refuse(label, m.name, "the image's root must be a directory")
            self.root.ino = _meta(m, "d")
            return
        *dirs, name = parts
        if name.startswith(WHITEOUT):
            self._whiteout(dirs, name, layer, label, m.name)
            return
        parent = self._dir(dirs, label, m.name, layer, create=True)
        assert parent is not None and parent.children is not None
        old = parent.children.get(name)
        if m.isdir():
            if old is not None and old.children is not None:
                old.ino, old.layer = _meta(m, "d"), layer  # merged with the lower directory
            else:
                parent.children[name] = Node(_meta(m, "d"), layer, {})
            return
        if m.islnk():
            node = Node(self._link_target(m.linkname, label, m.name).ino, layer)
        elif m.isreg():
            ino = _meta(m, "f")
            ino.size = m.size
            reader = tar.extractfile(m)
            assert reader is not None
            ino.extents = self._content(reader, m.size, label, m.name)
            node = Node(ino, layer)
        elif m.issym():
            if not m.linkname or "\x00" in m.linkname:
                raise refuse(label, m.name, "a symlink needs a target")
            ino = _meta(m, "l")
            ino.target = m.linkname
            node = Node(ino, layer)
        elif m.ischr() or m.isblk():
            ino = _meta(m, "c" if m.ischr() else "b")
            ino.rdev = os.makedev(m.devmajor, m.devminor)
            node = Node(ino, layer)
        elif m.isfifo():
            node = Node(_meta(m, "p"), layer)
        else:
            raise refuse(label, m.name, f"tar entry type {m.type!r} has no place in a root "
                                        "filesystem")
        parent.children[name] = node  # over a lower file, or a whole lower directory

    def _whiteout(self, dirs: list[str], name: str, layer: int, label: str, path: str) -> None:
        parent = self._dir(dirs, label, path, layer, create=False)
        if parent is None:
            return  # nothing below to hide
        assert parent.children is not None
        if name == OPAQUE:
            _hide_lower(parent, layer)
            return
        hidden = name[len(WHITEOUT):]
        if hidden in ("", ".", ".."):
            raise refuse(label, path, "a whiteout that names no entry")
        old = parent.children.get(hidden)
        if old is None:
            return
        if old.layer < layer:
            del parent.children[hidden]
        elif old.children is not None:  # this layer's directory: hide what was below it
            _hide_lower(old, layer)

    def _dir(self, dirs: list[str], label: str, path: str, layer: int,
             create: bool) -> Node | None:
        """The directory ``dirs`` of the tree, made (as a plain 0755 root directory, as tar
        does) where missing when ``create``; a symlink or a file on the way is refused."""
        node = self.root
        for i, part in enumerate(dirs):
            assert node.children is not None
            child = node.children.get(part)
            if child is None:
                if not create:
                    return None
                child = Node(Inode("d", 0o755, 0, 0, node.ino.mtime_ns, {}), layer, {})
                node.children[part] = child
            elif child.children is None:
                what = "a symlink" if child.ino.kind == "l" else "not a directory"
                raise refuse(label, path, f"its directory {'/'.join(dirs[:i + 1])!r} is {what} "
                                          "in the image: corral never writes through one")
            node = child
        return node

    def _link_target(self, linkname: str, label: str, path: str) -> Node:
        *dirs, name = parts_of(linkname, label, "hard link target") or [""]
        parent = self._dir(dirs, label, path, 0, create=False)
        node = parent.children.get(name) if parent is not None and parent.children else None
        if node is None or node.children is not None:
            raise refuse(label, path, f"hard link to {linkname[:200]!r}, which is not a file "
                                      "of the image so far")
        return node

    # --- file contents ------------------------------------------------------------------------
    def _content(self, reader: IO[bytes], size: int, label: str, path: str) -> list[list[Any]]:
        if size == 0:
            return []
        ids: list[str] = []
        for piece in _pieces(reader, size, label, path):
            self._pending.append(piece)
            self._pending_bytes += len(piece)
            ids.append(chunk_id(piece).hex())
            if self._pending_bytes >= BATCH_BYTES:
                self._flush()
        return [[0, ids]]

    def _flush(self) -> None:
        if self._pending:
            self.packs.put_many(self._pending)
        self._pending, self._pending_bytes = [], 0

    # --- the result ---------------------------------------------------------------------------
    def manifest(self, meta: dict[str, Any] | None = None) -> Manifest:
        """Entries in the order ``snapshot`` walks a tree (each directory's entries together,
        by name; then its subdirectories, depth first), so parents come first; the first path
        of a hard-linked file holds its data, the others link to it."""
        first: dict[int, str] = {}
        entries = [_entry(".", self.root.ino, first)]
        stack: list[tuple[str, Node]] = [("", self.root)]
        while stack:
            path, node = stack.pop()
            assert node.children is not None
            subdirs = []
            for name in sorted(node.children):
                child = node.children[name]
                rel = f"{path}/{name}" if path else name
                entries.append(_entry(rel, child.ino, first))
                if child.children is not None:
                    subdirs.append((rel, child))
            stack.extend(reversed(subdirs))
        m = Manifest(entries, dict(meta or {}))
        m.check()
        return m


def _hide_lower(top: Node, layer: int) -> None:
    """Drop what layers below ``layer`` put under ``top``, keeping this layer's entries and
    the directories that lead to them (no recursion: a layer may nest deep)."""
    order: list[Node] = []
    todo = [top]
    while todo:
        node = todo.pop()
        order.append(node)
        todo.extend(c for c in (node.children or {}).values() if c.children is not None)
    for node in reversed(order):  # children before parents
        assert node.children is not None
        for name, child in list(node.children.items()):
            if child.layer < layer and not child.children:
                del node.children[name]


def _meta(m: tarfile.TarInfo, kind: str) -> Inode:
    xattrs = {}
    for key, value in sorted(m.pax_headers.items()):
        if key.startswith(_XATTR) and len(key) > len(_XATTR):
            raw = value.encode("utf-8", "surrogateescape")
            xattrs[key[len(_XATTR):]] = base64.b64encode(raw).decode()
    return Inode(kind, m.mode & 0o7777, m.uid, m.gid, round(m.mtime * 1_000_000_000), xattrs)


def _entry(path: str, ino: Inode, first: dict[int, str]) -> Entry:
    e = Entry(path, ino.kind, ino.mode, ino.uid, ino.gid, ino.mtime_ns, xattrs=dict(ino.xattrs))
    if ino.kind == "f":
        if id(ino) in first:
            e.kind, e.target = "h", first[id(ino)]
        else:
            first[id(ino)] = path
            e.size, e.extents = ino.size, [[off, list(ids)] for off, ids in ino.extents]
    elif ino.kind == "l":
        e.target = ino.target
    elif ino.kind in ("c", "b"):
        e.rdev = ino.rdev
    return e


def _read(reader: IO[bytes], n: int, label: str, path: str) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        got = reader.read(n - len(buf))
        if not got:
            raise refuse(label, path, "the layer ends inside this file")
        buf += got
    return bytes(buf)


def _pieces(reader: IO[bytes], size: int, label: str, path: str) -> Iterator[bytes]:
    """FastCDC pieces of ``size`` bytes read from ``reader``, a window at a time with the last
    piece of a window carried into the next: ``tree._chunks``'s cuts exactly."""
    carry = b""
    pos = 0
    while pos < size or carry:
        fresh = _read(reader, min(WINDOW, size - pos), label, path) if pos < size else b""
        data = carry + fresh
        pos += len(fresh)
        last = pos >= size
        pieces = [bytes(c.data) for c in fastcdc(data, min_size=MIN_CHUNK, avg_size=AVG_CHUNK,
                                                 max_size=MAX_CHUNK, fat=True)]
        carry = pieces.pop() if not last and len(pieces) > 1 else b""
        yield from pieces
        if last:
            return
