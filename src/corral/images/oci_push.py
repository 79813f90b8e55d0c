"""An image of the store as an OCI layout of one layer, for ``corral image push``.

The layer is the image's tree as a tar made straight from its manifest (names, numeric owners,
modes, times, symlinks, hard links as links, devices, xattrs as ``SCHILY.xattr`` records,
file data from the chunks), so a push needs no root and writes no tree on disk. One layer and
not the layers it was pulled with: the store keeps merged trees, not layers. The config is the
one the image was pulled with (how to run it), with this layer's diff_id; an imported image
gets an empty one.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import os
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, cast

from corral.images import skopeo
from corral.images.oci import LAYER_TYPES, MANIFEST, OnBytes, host_arch
from corral.images.packstore import PackStore
from corral.images.records import MAX_BATCH
from corral.images.transfer import ChunkService
from corral.images.tree import Entry, Manifest

LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
CONFIG = "application/vnd.oci.image.config.v1+json"
assert LAYER in LAYER_TYPES
_TYPES = {"f": tarfile.REGTYPE, "d": tarfile.DIRTYPE, "l": tarfile.SYMTYPE,
          "h": tarfile.LNKTYPE, "c": tarfile.CHRTYPE, "b": tarfile.BLKTYPE,
          "p": tarfile.FIFOTYPE}


class _FileData(io.RawIOBase):
    """A regular file's bytes, read from its chunks in order, holes as zeros."""

    def __init__(self, e: Entry, packs: PackStore) -> None:
        self.buf = b""
        self._pieces = self._walk(e, packs)

    @staticmethod
    def _walk(e: Entry, packs: PackStore) -> Iterator[bytes]:
        pos = 0
        for off, ids in e.extents:
            if int(off) > pos:
                yield bytes(int(off) - pos)
                pos = int(off)
            for cid in ids:
                data = packs.get(bytes.fromhex(cid))
                yield data
                pos += len(data)
        if pos < e.size:
            yield bytes(e.size - pos)

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        while n < 0 or len(self.buf) < n:
            piece = next(self._pieces, None)
            if piece is None:
                break
            self.buf += piece
        cut = len(self.buf) if n < 0 else n
        out, self.buf = self.buf[:cut], self.buf[cut:]
        return out


def _info(e: Entry) -> tarfile.TarInfo | None:
    kind = _TYPES.get(e.kind)
    if kind is None:
        return None  # a socket is made by whoever listens on it, it has no place in a tar
    t = tarfile.TarInfo(e.path)
    t.type = kind
    t.mode, t.uid, t.gid = e.mode, e.uid, e.gid
    t.mtime = e.mtime_ns // 1_000_000_000
    t.uname = t.gname = ""
    if e.kind == "f":
        t.size = e.size
    elif e.kind in ("l", "h"):
        t.linkname = e.target
    elif e.kind in ("c", "b"):
        t.devmajor, t.devminor = os.major(e.rdev), os.minor(e.rdev)
    t.pax_headers = {"SCHILY.xattr." + name: base64.b64decode(value).decode(
        "utf-8", "surrogateescape") for name, value in e.xattrs.items()}
    return t


class _Sink(io.RawIOBase):
    """Where the compressed layer goes: a file, hashed and counted on the way."""

    def __init__(self, fh: IO[bytes], on_bytes: Callable[[int], None] | None) -> None:
        self.fh, self.hash, self.size, self.on_bytes = fh, hashlib.sha256(), 0, on_bytes

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        raw = bytes(data)
        self.fh.write(raw)
        self.hash.update(raw)
        self.size += len(raw)
        if self.on_bytes is not None:
            self.on_bytes(len(raw))
        return len(raw)


class _Plain(io.RawIOBase):
    """The uncompressed tar on its way to gzip, hashed for the diff_id."""

    def __init__(self, gz: gzip.GzipFile) -> None:
        self.gz, self.hash = gz, hashlib.sha256()

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        raw = bytes(data)
        self.gz.write(raw)
        self.hash.update(raw)
        return len(raw)


def write_layout(manifest: Manifest, packs: PackStore, dest: Path, tag: str = "latest",
                 on_bytes: Callable[[int], None] | None = None) -> str:
    """Write the image as an OCI layout at ``dest`` (new); returns its manifest's digest."""
    blobs = dest / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    tmp = blobs / ".layer.tmp"
    with tmp.open("wb") as fh:
        sink = _Sink(fh, on_bytes)
        with gzip.GzipFile(fileobj=sink, mode="wb", mtime=0) as gz:
            plain = _Plain(gz)
            with tarfile.open(fileobj=cast(IO[bytes], plain), mode="w|",
                              format=tarfile.PAX_FORMAT, errors="surrogateescape") as tar:
                for e in manifest.entries:
                    if e.path == ".":
                        continue
                    info = _info(e)
                    if info is not None:
                        tar.addfile(info, _FileData(e, packs) if e.kind == "f" else None)
    layer = {"mediaType": LAYER, "digest": f"sha256:{sink.hash.hexdigest()}", "size": sink.size}
    tmp.rename(blobs / sink.hash.hexdigest())
    meta = manifest.meta
    config = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "architecture": str(meta.get("architecture") or host_arch()),
        "os": str(meta.get("os") or "linux"),
        "config": dict(meta.get("config") or {}),
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{plain.hash.hexdigest()}"]},
        "history": [{"created_by": "corral image push"}],
    }
    cfg = _blob(blobs, json.dumps(config, sort_keys=True).encode(), CONFIG)
    doc = {"schemaVersion": 2, "mediaType": MANIFEST, "config": cfg, "layers": [layer]}
    desc = _blob(blobs, json.dumps(doc, sort_keys=True).encode(), MANIFEST)
    desc["annotations"] = {"org.opencontainers.image.ref.name": tag}
    (dest / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [desc]}))
    (dest / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    return str(desc["digest"])


def _blob(blobs: Path, raw: bytes, media_type: str) -> dict[str, Any]:
    digest = hashlib.sha256(raw).hexdigest()
    (blobs / digest).write_bytes(raw)
    return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(raw)}


def push(client: ChunkService, name: str, ref: str, work: Path, packs: PackStore, *,
         authfile: str | None = None, insecure: bool = False,
         on_fetch: OnBytes | None = None, on_layer: OnBytes | None = None) -> str:
    """Fetch image ``name``'s chunks into ``packs`` (``on_fetch``: bytes moved so far), write
    it as an OCI layout in ``work/layout`` and have skopeo copy that to ``ref``; returns the
    manifest digest."""
    from corral.images.transfer import fetch_missing

    ref = skopeo.check_ref(ref)
    raw, _ = client.manifest(name)
    manifest = Manifest.from_json(raw)
    manifest.check()
    ids = [bytes.fromhex(i) for i in sorted(manifest.chunk_ids())]
    moved = 0
    for start in range(0, len(ids), MAX_BATCH):
        moved += fetch_missing(client, packs, ids[start:start + MAX_BATCH]).bytes
        if on_fetch is not None:
            on_fetch(moved)
    digest = write_layout(manifest, packs, work / "layout", on_bytes=on_layer)
    skopeo.copy(f"oci:{work / 'layout'}:latest", ref, dest_authfile=authfile,
                dest_insecure=insecure)
    return digest
