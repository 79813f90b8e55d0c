"""Standard container images in and out of the store: ``corral image pull`` and ``push``.

Transport is skopeo's (Debian's ``skopeo``): it speaks every registry protocol, auth file and
archive format, and verifies every blob's digest as it copies. A pull has it copy the image into
an OCI layout in a temporary directory; corral then reads that layout itself and trusts none of
it: each blob is named by a digest checked for its shape (it names a file under ``blobs/``),
its size and digest are checked again against its descriptor before a byte of it is parsed (a
layer longer or shorter than declared is refused), and each layer's uncompressed digest against
the config's ``diff_ids``. The layers are applied in memory (:mod:`corral.images.oci_layers`),
their files chunked into a scratch store; only when the whole image has been read does
anything reach the server: the chunks it lacks, then the manifest, named in one step. So a pull
that fails at any point leaves nothing named and nothing half-written in the fleet's store.

A push goes the other way (:mod:`corral.images.oci_push`): the image's tree as one layer in an
OCI layout, with the config it was pulled with, copied out by skopeo.

The image's manifest keeps in its ``meta``: ``source`` (the reference pulled), ``digest`` (of
the image manifest read, as the layout holds it: for an OCI image the registry's digest; skopeo
converts a Docker v2 manifest, whose digest then differs), ``config`` (how to run it, see
:mod:`corral.images.oci_config`), ``os``, ``architecture`` and ``layers``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

import zstandard

from corral.errors import CorralError, InvalidRequest
from corral.images import skopeo
from corral.images.oci_config import run_config
from corral.images.oci_layers import TreeBuilder
from corral.images.packstore import PackStore
from corral.images.records import MAX_BATCH
from corral.images.transfer import ChunkService
from corral.images.tree import Manifest

INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
#: layer media types by how they are compressed
LAYER_TYPES = {
    "application/vnd.oci.image.layer.v1.tar": "",
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar": "",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": "zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": "gzip",
}
#: the largest index, manifest or config read (they are JSON of a few KiB)
JSON_LIMIT = 4 * 1024 * 1024
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128}")
_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386",
         "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64"}
_BAD = "the image is damaged or was tampered with; nothing was stored. Pull it again from a " \
       "source you trust"

#: told the bytes read (or moved) so far
OnBytes = Callable[[int], None]


def host_arch() -> str:
    machine = os.uname().machine
    return _ARCH.get(machine, machine)


# --- reading an OCI layout ----------------------------------------------------------------------


def _verify(fh: IO[bytes], desc: dict[str, Any], what: str) -> None:
    """Read a whole blob and check its length and digest against its descriptor, before any
    of it is parsed or unpacked: a blob that is not what it claims is refused as such."""
    alg, _, want = str(desc["digest"]).partition(":")
    h = hashlib.new(alg)
    seen = 0
    while chunk := fh.read(1024 * 1024):
        seen += len(chunk)
        if seen > desc["size"]:
            break
        h.update(chunk)
    if seen != desc["size"]:
        raise InvalidRequest(f"{what} is {'larger' if seen > desc['size'] else 'smaller'} "
                             f"than its descriptor says ({desc['size']} bytes)", hint=_BAD)
    if h.hexdigest() != want:
        raise InvalidRequest(f"{what} does not match its digest {desc['digest']}", hint=_BAD)
    fh.seek(0)


class _Counting:
    """Tells ``on_bytes`` what is read through it (a compressed layer, for progress)."""

    def __init__(self, fh: IO[bytes], on_bytes: OnBytes | None) -> None:
        self.fh, self.on_bytes = fh, on_bytes

    def read(self, n: int = -1) -> bytes:
        data = self.fh.read(n)
        if self.on_bytes is not None and data:
            self.on_bytes(len(data))
        return data


class _Hashing:
    """Hashes what is read through it (an uncompressed layer, for its diff_id)."""

    def __init__(self, fh: IO[bytes]) -> None:
        self.fh = fh
        self.hash = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.fh.read(n)
        self.hash.update(data)
        return data


@dataclass
class Layout:
    """An OCI image layout on disk (what skopeo wrote), read through checked descriptors."""

    root: Path

    def blob_path(self, desc: Any, what: str) -> Path:
        if not isinstance(desc, dict) or not isinstance(desc.get("digest"), str) \
                or not _DIGEST.fullmatch(desc["digest"]) or type(desc.get("size")) is not int \
                or desc["size"] < 0:
            raise InvalidRequest(f"{what}: a descriptor without a valid digest and size",
                                 hint=_BAD, details={"descriptor": repr(desc)[:300]})
        alg, _, hexd = str(desc["digest"]).partition(":")
        path = self.root / "blobs" / alg / hexd
        try:
            st = os.lstat(path)
        except OSError:
            st = None
        if st is None or not stat.S_ISREG(st.st_mode):  # a symlink is not a blob either
            raise InvalidRequest(f"{what} {desc['digest']} is not in the layout", hint=_BAD)
        if st.st_size != desc["size"]:
            more = "larger" if st.st_size > desc["size"] else "smaller"
            raise InvalidRequest(f"{what} {desc['digest']} is {st.st_size} bytes, {more} than "
                                 f"its descriptor says ({desc['size']})", hint=_BAD)
        return path

    def json_blob(self, desc: Any, what: str) -> dict[str, Any]:
        path = self.blob_path(desc, what)
        if desc["size"] > JSON_LIMIT:
            raise InvalidRequest(f"{what} is {desc['size']} bytes; at most {JSON_LIMIT}",
                                 hint=_BAD)
        with _open(path) as fh:
            _verify(fh, desc, what)
            raw = fh.read(JSON_LIMIT + 1)
        return _parse(raw, what)

    def image_manifest(self, tag: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
        """(descriptor, manifest) of the image tagged ``tag`` (or the only one), through an
        index to this host's platform if need be."""
        try:
            index = _parse((self.root / "index.json").read_bytes()[:JSON_LIMIT + 1], "index.json")
        except OSError as exc:
            raise InvalidRequest(f"no OCI layout at {self.root}: {exc}", hint=_BAD) from exc
        found = [d for d in index.get("manifests") or [] if isinstance(d, dict)]
        if tag is not None:  # that tag, or the one image when it has no tag at all
            found = [d for d in found if _ref_name(d) == tag] or [
                d for d in found if len(found) == 1 and _ref_name(d) is None]
        if len(found) != 1:
            raise InvalidRequest(f"the layout lists {len(found)} images for tag {tag!r}",
                                 hint="name the tag: oci:DIR:TAG")
        desc = found[0]
        for _ in range(4):  # an index of indexes, at most this deep
            doc = self.json_blob(desc, "the image manifest")
            kind = doc.get("mediaType") or desc.get("mediaType")
            if kind not in (INDEX, DOCKER_LIST) and "manifests" not in doc:
                return desc, doc
            desc = _platform(doc)
        raise InvalidRequest("image indexes nested too deep", hint=_BAD)


def _parse(raw: bytes, what: str) -> dict[str, Any]:
    if len(raw) > JSON_LIMIT:
        raise InvalidRequest(f"{what} is larger than {JSON_LIMIT} bytes", hint=_BAD)
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"{what} is not JSON: {exc}", hint=_BAD) from exc
    if not isinstance(doc, dict):
        raise InvalidRequest(f"{what} is not a JSON object", hint=_BAD)
    return doc


def _ref_name(desc: dict[str, Any]) -> str | None:
    notes = desc.get("annotations")
    name = notes.get("org.opencontainers.image.ref.name") if isinstance(notes, dict) else None
    return name if isinstance(name, str) else None


def _platform(index: dict[str, Any]) -> dict[str, Any]:
    arch = host_arch()
    for d in index.get("manifests") or []:
        p = (d.get("platform") or {}) if isinstance(d, dict) else None
        if isinstance(p, dict) and p.get("os", "linux") == "linux" \
                and p.get("architecture", arch) == arch:
            return dict(d)
    raise InvalidRequest(f"the image has no linux/{arch} variant",
                         hint="pull an image built for this machine")


def read_image(layout_dir: Path, packs: PackStore, *, tag: str | None = None,
               source: str = "", on_bytes: OnBytes | None = None) -> Manifest:
    """The merged tree of the image in ``layout_dir`` as a checked manifest whose chunks are
    in ``packs``; refused (naming the blob or the layer entry) on anything that does not
    check out."""
    layout = Layout(layout_dir)
    desc, doc = layout.image_manifest(tag)
    cfg = layout.json_blob(doc.get("config"), "the image config")
    layers = doc.get("layers")
    if not isinstance(layers, list):
        raise InvalidRequest("the image manifest lists no layers", hint=_BAD)
    rootfs = cfg.get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list):
        diff_ids = []
    if diff_ids and len(diff_ids) != len(layers):
        raise InvalidRequest(f"the manifest lists {len(layers)} layers, the config "
                             f"{len(diff_ids)}", hint=_BAD)
    builder = TreeBuilder(packs)
    for i, layer in enumerate(layers):
        label = f"layer {i + 1} of {len(layers)}"
        path = layout.blob_path(layer, label)
        kind = LAYER_TYPES.get(str(layer.get("mediaType")))
        if kind is None:
            raise InvalidRequest(f"{label} has media type {layer.get('mediaType')!r}, which "
                                 "corral cannot unpack", hint="use an image with tar layers "
                                 "(plain, gzip or zstd)")
        with _open(path) as fh:
            _verify(fh, layer, f"{label} ({layer['digest'][:19]}…)")
            plain = _Hashing(_decompressed(_Counting(fh, on_bytes), kind))
            builder.apply(cast(IO[bytes], plain), i, label)
        want = diff_ids[i] if diff_ids else None
        if want is not None and want != f"sha256:{plain.hash.hexdigest()}":
            raise InvalidRequest(f"{label}: its content does not match the config's diff_id "
                                 f"{str(want)[:80]}", hint=_BAD)
    config = cfg.get("config") or {}
    if not isinstance(config, dict):
        raise InvalidRequest("the image config's config is not an object", hint=_BAD)
    meta = {"source": source, "digest": desc["digest"], "config": run_config(config),
            "os": str(cfg.get("os") or "linux"),
            "architecture": str(cfg.get("architecture") or host_arch()),
            "layers": len(layers)}
    return builder.manifest(meta)


def _open(path: Path) -> IO[bytes]:
    return os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC), "rb")


def _decompressed(fh: _Counting, kind: str) -> IO[bytes]:
    raw = cast(IO[bytes], fh)
    if kind == "gzip":
        return cast(IO[bytes], gzip.GzipFile(fileobj=raw, mode="rb"))
    if kind == "zstd":
        return cast(IO[bytes], zstandard.ZstdDecompressor().stream_reader(
            raw, read_across_frames=True))
    return raw


# --- the whole pull -----------------------------------------------------------------------------


def pull(ref: str, work: Path, packs: PackStore, *, authfile: str | None = None,
         insecure: bool = False, on_fetch: OnBytes | None = None,
         on_total: Callable[[int | None], None] | None = None,
         on_layers: OnBytes | None = None) -> Manifest:
    """Copy ``ref`` into ``work/layout`` with skopeo and read it into ``packs``."""
    ref = skopeo.check_ref(ref)
    if on_total is not None:
        on_total(skopeo.size_of(ref, authfile=authfile, insecure=insecure))
    skopeo.copy(ref, f"oci:{work / 'layout'}:latest", src_authfile=authfile,
                 src_insecure=insecure, watch=work / "layout", on_bytes=on_fetch)
    return read_image(work / "layout", packs, tag="latest", source=ref, on_bytes=on_layers)


# --- naming it in the fleet's store -------------------------------------------------------------


@dataclass(frozen=True)
class Upload:
    chunks: int
    bytes: int


#: how often an upload sends what went missing and names the image again (see transfer.py)
NAME_ATTEMPTS = 3


def upload(client: ChunkService, packs: PackStore, manifest: Manifest, name: str,
           replace: bool = False, on_bytes: OnBytes | None = None) -> Upload:
    """Send the chunks the server lacks, then name the manifest there (one step: the name
    exists once every chunk is stored). A gc between the two may collect a chunk sent: the
    server then refuses the name, and the chunks missing are sent again."""
    manifest.check()
    raw = manifest.to_json()
    ids = [bytes.fromhex(c) for c in sorted(manifest.chunk_ids())]
    chunks = moved = 0
    for attempt in range(1, NAME_ATTEMPTS + 1):
        lacking: list[bytes] = []
        for start in range(0, len(ids), MAX_BATCH):
            lacking += client.missing_chunks(ids[start:start + MAX_BATCH])
        for start in range(0, len(lacking), 256):
            records = []
            for cid in lacking[start:start + 256]:
                got = packs.read_compressed(cid)
                if got is None:
                    raise CorralError(f"chunk {cid.hex()} vanished from the scratch store",
                                      hint="pull again", retryable=True)
                records.append((cid, got[0], got[1]))
            sent = client.upload_chunks(records)
            chunks, moved = chunks + len(records), moved + sent
            if on_bytes is not None:
                on_bytes(sent)
        try:
            client.put_manifest(name, raw, replace=replace)
        except InvalidRequest as exc:
            if "missing" not in exc.details or attempt == NAME_ATTEMPTS:
                raise
            continue
        break
    return Upload(chunks, moved)


# --- the whole push -----------------------------------------------------------------------------
