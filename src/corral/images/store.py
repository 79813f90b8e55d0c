"""Named images over the pack store: import a tree or tarball, list with dedup figures, remove,
collect garbage.

An image is a ref ``image:<name>`` pointing at its manifest, which is itself stored as a chunk,
so the whole store is one content-addressed space and a copy of it is a copy of its files.

A shelved instance's disk is stored the same way under a reserved name, ``@shelf-<instance>-<op>``
(``@`` never starts a name an operator gives): agents fetch it through the same routes and gc
keeps its chunks like any image's, but it is not an image to run or remove by hand, so listings
(``corral image ls``) leave it out and ``remove`` refuses it; ``corral shelved`` lists them.
Only the server's shelve operation makes those names (an agent uploads the disk and names it,
fresh, under the name the operation chose); nothing over HTTP may replace one.

Every manifest is checked (:meth:`Manifest.check`) before it is named, built here or pushed
from elsewhere, and named only with every chunk it lists stored (:meth:`PackStore.name_if_whole`),
so a name never points at a hole nor at a tree that would escape its destination. The pack store
runs with generations, so a gc never sweeps what a push in flight relies on.
"""

from __future__ import annotations

import builtins
import itertools
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from corral.errors import (
    Conflict,
    CorralError,
    CorruptChunk,
    InvalidRequest,
    MissingChunk,
    NotFound,
)
from corral.images.packstore import PackStore, SweepResult
from corral.images.tree import Manifest, materialize, snapshot

PREFIX = "image:"
#: names of shelved disks start with this (see the module doc)
SHELF_PREFIX = "@shelf-"


def is_shelf(name: str) -> bool:
    return name.startswith(SHELF_PREFIX)


@dataclass(frozen=True)
class ImageInfo:
    name: str
    manifest: str
    files: int
    size: int  # logical bytes of its files
    unique_size: int  # bytes of chunks no other image uses
    stored_size: int  # bytes of its distinct chunks (what it costs alone, before compression)
    #: what it was pulled from and the digest of the image manifest pulled ("" when imported:
    #: kept in the manifest's ``meta``, see ``corral.images.oci``)
    source: str = ""
    digest: str = ""

    @property
    def dedup_ratio(self) -> float:
        return self.size / self.stored_size if self.stored_size else 1.0


class ImageStore:
    def __init__(self, root: Path) -> None:
        self.packs = PackStore(root, generations=True)
        self._imports: set[int] = set()
        self._seq = itertools.count()
        self._cond = threading.Condition()
        #: one gc at a time: a gc's generation and its marks belong together
        self._gc_lock = threading.Lock()

    def close(self) -> None:
        self.packs.close()

    def manifest(self, name: str) -> Manifest:
        ref = self.packs.get_ref(PREFIX + name)
        if ref is None:
            raise NotFound(f"no image named '{name}'", hint="see 'corral image ls'")
        return Manifest.from_json(self.packs.get(ref))

    def import_tree(self, name: str, path: Path, replace: bool = False) -> ImageInfo:
        if self.packs.get_ref(PREFIX + name) is not None and not replace:
            raise Conflict(f"image '{name}' exists", hint="pick another name or pass --replace")
        if path.is_file():
            return self._import_tarball(name, path)
        with self._cond:
            ticket = next(self._seq)
            self._imports.add(ticket)
        try:
            # the image exists once all of it is stored
            self.put_manifest(name, snapshot(path, self.packs), replace=replace)
        finally:
            with self._cond:
                self._imports.discard(ticket)
                self._cond.notify_all()
        return self.info(name)

    def put_manifest(self, name: str, manifest: Manifest, replace: bool = False) -> None:
        """Name a manifest whose chunks are all stored (an agent uploaded them): refused if a
        path of it is unsafe, if a chunk is missing, or if the name is taken (unless
        ``replace``)."""
        manifest.check()
        ids = [bytes.fromhex(c) for c in manifest.chunk_ids()]
        done = self.packs.name_if_whole(PREFIX + name, self.packs.put(manifest.to_json()), ids,
                                        replace=replace)
        if done.exists:
            raise Conflict(f"image '{name}' exists", hint="pick another name or pass replace")
        if done.missing:
            raise InvalidRequest(
                f"{len(done.missing)} chunk(s) of this manifest are not stored",
                hint="upload the missing chunks first (POST /v1/chunks/missing)",
                details={"missing": [c.hex() for c in done.missing[:50]]})

    def _import_tarball(self, name: str, tarball: Path) -> ImageInfo:
        with tempfile.TemporaryDirectory(prefix="corral-import-") as tmp:
            proc = subprocess.run(
                ["tar", "-x", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-p",
                 "-f", str(tarball), "-C", tmp],
                capture_output=True, text=True,
            )
            if proc.returncode != 0:
                raise InvalidRequest(f"cannot unpack {tarball}: {proc.stderr.strip()[-400:]}",
                                     hint="give a tar archive (optionally compressed) or a "
                                          "directory")
            return self.import_tree(name, Path(tmp), replace=True)

    def materialize(self, name: str, dest: Path) -> None:
        materialize(self.manifest(name), self.packs, dest)

    def remove(self, name: str, shelf: bool = False) -> None:
        """Drop a name; a shelved disk's only when ``shelf`` (unshelve and rm do that)."""
        if is_shelf(name) and not shelf:
            raise InvalidRequest(f"'{name}' is a shelved instance's disk, not an image",
                                 hint="it goes when the instance is unshelved or removed")
        if not self.packs.del_ref(PREFIX + name):
            raise NotFound(f"no image named '{name}'", hint="see 'corral image ls'")

    def names(self, shelves: bool = False) -> list[str]:
        """Image names; shelved disks too when ``shelves``."""
        return sorted(k[len(PREFIX):] for k in self.packs.refs()
                      if k.startswith(PREFIX) and (shelves or not is_shelf(k[len(PREFIX):])))

    def _chunk_sizes(self, manifest: Manifest) -> dict[str, int]:
        sizes: dict[str, int] = {}
        for cid in manifest.chunk_ids():
            loc = self.packs.locate(bytes.fromhex(cid))
            sizes[cid] = loc.raw_len if loc else 0
        return sizes

    def info(self, name: str) -> ImageInfo:
        return self.shelf_info(name) if is_shelf(name) else self.list([name])[0]

    def shelf_info(self, name: str) -> ImageInfo:
        """A shelved disk's figures; ``unique_size`` counts the bytes of chunks no image
        shares (what shelving it added to the store, at most), without reading other
        shelves' manifests (a hundred shelves must not make each shelve slower)."""
        m = self.manifest(name)
        in_images: set[str] = set()
        for n in self.names():
            in_images |= self.manifest(n).chunk_ids()
        sizes = self._chunk_sizes(m)
        ref = self.packs.get_ref(PREFIX + name)
        return ImageInfo(name=name, manifest=ref.hex() if ref else "",
                         files=sum(1 for e in m.entries if e.kind == "f"), size=m.size(),
                         unique_size=sum(sz for c, sz in sizes.items() if c not in in_images),
                         stored_size=sum(sizes.values()))

    def list(self, only: list[str] | None = None) -> list[ImageInfo]:
        names = self.names()
        manifests = {n: self.manifest(n) for n in names}
        users: dict[str, int] = {}
        for m in manifests.values():
            for cid in m.chunk_ids():
                users[cid] = users.get(cid, 0) + 1
        out = []
        for n in only if only is not None else names:
            m = manifests[n]
            sizes = self._chunk_sizes(m)
            ref = self.packs.get_ref(PREFIX + n)
            out.append(ImageInfo(
                name=n, manifest=ref.hex() if ref else "",
                files=sum(1 for e in m.entries if e.kind == "f"), size=m.size(),
                unique_size=sum(sz for cid, sz in sizes.items() if users[cid] == 1),
                stored_size=sum(sizes.values()),
                source=str(m.meta.get("source") or ""), digest=str(m.meta.get("digest") or ""),
            ))
        return out

    def verify(self) -> builtins.list[dict[str, object]]:
        """Read back every chunk; for each damaged one, the images it breaks (never raises for
        damage: the point is to list all of it)."""
        damage = self.packs.verify()
        if not damage:
            return []
        users: dict[str, list[str]] = {}
        for name in self.names(shelves=True):
            ref = self.packs.get_ref(PREFIX + name)
            if ref is not None:
                users.setdefault(ref.hex(), []).append(name)
            try:
                manifest = self.manifest(name)
            except CorralError:
                continue  # its manifest is itself damaged: listed through its ref above
            for cid in manifest.chunk_ids():
                users.setdefault(cid, []).append(name)
        return [{"pack": d.pack, "offset": d.offset, "chunk": d.chunk, "reason": d.reason,
                 "images": sorted(set(users.get(d.chunk, [])))} for d in damage]

    def verify_image(self, name: str) -> builtins.list[str]:
        """Read back the manifest of ``name`` and every chunk it lists; the ids of those that
        are missing or do not match their id (empty: the store's copy is whole). What a kept
        disk waits for before it is removed from its host."""
        ref = self.packs.get_ref(PREFIX + name)
        if ref is None:
            raise NotFound(f"no image named '{name}'", hint="see 'corral image ls'")
        try:
            manifest = Manifest.from_json(self.packs.get(ref))
        except (MissingChunk, CorruptChunk):
            return [ref.hex()]
        bad = []
        for cid in sorted(manifest.chunk_ids()):
            try:
                self.packs.get(bytes.fromhex(cid))
            except (MissingChunk, CorruptChunk):
                bad.append(cid)
        return bad

    def gc(self, min_dead_ratio: float = 0.25) -> SweepResult:
        """Mark from every ref, sweep the rest. Pushes and imports may go on meanwhile: the
        pack store's generations keep what they write or rely on (see its module doc)."""
        with self._gc_lock:
            generation = self.packs.begin_gc()
            try:
                # local imports that began before this gc may have written chunks in older
                # generations: wait for them to name their trees (later ones stamp this one)
                with self._cond:
                    before = set(self._imports)
                    self._cond.wait_for(lambda: not (before & self._imports))
                live: set[bytes] = set()
                for name, ref in self.packs.refs().items():
                    live.add(ref)
                    try:
                        manifest = Manifest.from_json(self.packs.get(ref))
                    except CorralError as exc:  # cannot tell what it keeps: sweep nothing
                        raise CorruptChunk(
                            f"gc stopped, nothing collected: the manifest of "
                            f"'{name.removeprefix(PREFIX)}' cannot be read: {exc.message}",
                            hint="run 'corral image verify'; remove or import that image "
                                 "again") from exc
                    live.update(bytes.fromhex(c) for c in manifest.chunk_ids())
                return self.packs.sweep(live, min_dead_ratio, generation=generation)
            finally:
                self.packs.end_gc()


def tar_available() -> bool:
    return shutil.which("tar") is not None
