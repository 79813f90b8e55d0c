"""The image store over HTTP: the server's side of "fetch only the chunks you lack".

Chunks travel as they are stored (zstd), in batches: one request names up to ``MAX_BATCH`` ids
and the answer is a stream of records ``id(32) | raw_len(u32) | comp_len(u32) | bytes``
(:mod:`corral.images.records`, shared with clients). The receiver verifies every chunk against
its id before keeping it (``PackStore.put_compressed``), so a damaged server store can never
poison an agent's cache.

The server's one event loop also answers heartbeats, so nothing here burns CPU on it: reading
a body is the only awaited work; parsing, decompressing, hashing, zstd and the LMDB batches run
in the worker threads (sync routes run there already; the two that take a body hand their work
over with ``run_in_threadpool``). Each body is bounded here too (the API's guard bounds them
first, per route; these bounds keep the router safe on its own).

A shelved disk's name (``@shelf-...``) is made by an agent for the server's shelve operation,
once; nothing over HTTP may replace one (a replaced shelf would hand another tree to whoever
unshelves it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Annotated

from fastapi import APIRouter, Request, Response
from fastapi import Path as PathParam
from fastapi.params import Depends
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from corral.errors import InvalidRequest, NotFound
from corral.images.records import MAX_BATCH, MAX_UPLOAD_BYTES, RECORD, parse_records
from corral.images.store import ImageInfo, ImageStore, is_shelf
from corral.images.tree import MAX_CHUNK, Manifest

#: the largest manifest taken: ~70 bytes per chunk and ~200 per file, a disk of ~100 GB or a
#: million files (the API's guard takes the same)
MAX_MANIFEST_BYTES = 128 * 1024 * 1024

#: an image's name (``corral.api.names.IMAGE_PATTERN``: no '/', '..', NUL, newline, unicode)
NAME_PATTERN = r"^@?[A-Za-z0-9][A-Za-z0-9._:-]{0,199}$"
ChunkId = Annotated[str, Field(pattern=r"^[0-9a-fA-F]{64}$", description="BLAKE3, 64 hex")]


class ChunkIds(BaseModel):
    ids: list[ChunkId] = Field(max_length=MAX_BATCH, description="chunk ids, hex")


class Missing(BaseModel):
    missing: list[str]


class ImageRow(BaseModel):
    name: str
    manifest: str
    files: int
    size: int
    unique_size: int
    stored_size: int
    dedup_ratio: float
    source: str | None = Field(default=None, description="what it was pulled from (empty: "
                               "imported from a tree)")
    digest: str | None = Field(default=None, description="digest of the image manifest pulled")


#: bytes of records a fetch's answer sends at once (see ``fetch``)
FETCH_PIECE = 1024 * 1024


def _ids(raw: list[str]) -> list[bytes]:
    try:
        ids = [bytes.fromhex(i) for i in raw]
    except ValueError as exc:
        raise InvalidRequest(f"bad chunk id: {exc}", hint="chunk ids are 64 hex digits") from exc
    if any(len(i) != 32 for i in ids):
        raise InvalidRequest("bad chunk id length", hint="chunk ids are 64 hex digits")
    return ids


async def _body(request: Request, limit: int, what: str, hint: str) -> bytes:
    """The body, refused as soon as it is known to pass ``limit`` (never read whole first)."""
    declared = request.headers.get("content-length", "")
    too_big = InvalidRequest(f"{what} is larger than {limit} bytes", hint=hint)
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    buf = bytearray()
    async for part in request.stream():
        buf += part
        if len(buf) > limit:
            raise too_big
    return bytes(buf)


def _row(i: ImageInfo) -> ImageRow:
    return ImageRow(name=i.name, manifest=i.manifest, files=i.files, size=i.size,
                    unique_size=i.unique_size, stored_size=i.stored_size,
                    dedup_ratio=round(i.dedup_ratio, 3), source=i.source or None,
                    digest=i.digest or None)


def router(store: ImageStore, dependencies: Sequence[Depends] = (),
           on_change: Callable[[str], None] | None = None) -> APIRouter:
    """``on_change(name)`` runs after an image is removed or replaced (the server broadcasts
    an invalidation so agents drop what they no longer need)."""
    r = APIRouter(dependencies=list(dependencies), tags=["images"])

    @r.get("/v1/images")
    def images() -> list[ImageRow]:
        return [_row(i) for i in store.list()]

    @r.get("/v1/images/{name}/manifest")
    def manifest(name: str) -> Response:
        ref = store.packs.get_ref("image:" + name)
        if ref is None:
            raise NotFound(f"no image named '{name}'", hint="see 'corral image ls'")
        return Response(store.packs.get(ref), media_type="application/json",
                        headers={"X-Manifest-Id": ref.hex()})

    @r.delete("/v1/images/{name}", status_code=204)
    def remove(name: str) -> Response:
        """Drop the name; its chunks go at the next gc unless another image uses them."""
        store.remove(name)
        if on_change is not None:
            on_change(name)
        return Response(status_code=204)

    @r.post("/v1/images/verify")
    def verify() -> dict[str, object]:
        """Read every chunk back; list damaged ones with the images they break."""
        return {"damaged": store.verify()}

    @r.post("/v1/images/gc")
    def gc() -> dict[str, object]:
        res = store.gc()
        return {"dropped": res.dropped, "packs_rewritten": res.packs_rewritten,
                "bytes_freed": res.bytes_freed, "damaged": res.damaged}

    @r.post("/v1/chunks/missing")
    def missing(body: ChunkIds) -> Missing:
        """Which ids the store lacks; the ones it has are kept for the push that asked
        (``PackStore.present``), even if a gc starts before the push names its tree."""
        ids = _ids(body.ids)
        have = store.packs.present(ids)
        return Missing(missing=[i.hex() for i, h in zip(ids, have, strict=True) if not h])

    @r.post("/v1/chunks/fetch", response_class=StreamingResponse,
            responses={200: {"content": {"application/octet-stream": {}},
                             "description": "the chunks' records, in the order asked"}})
    def fetch(body: ChunkIds) -> StreamingResponse:
        ids = _ids(body.ids)
        absent = [i.hex() for i, h in zip(ids, store.packs.has_many(ids), strict=True) if not h]
        if absent:
            raise NotFound(f"{len(absent)} chunk(s) not in the store, e.g. {absent[0]}",
                           hint="the image changed or was collected; fetch its manifest again",
                           details={"missing": absent[:50]})

        def stream() -> Iterator[bytes]:
            # records go out in pieces of about FETCH_PIECE bytes: each piece of a sync
            # iterator is a hop to a worker thread and a write, and one per 4 KiB chunk cost
            # two thirds of a cold fetch's time (bench/store.py)
            buf: list[bytes] = []
            size = 0
            for cid in ids:
                got = store.packs.read_compressed(cid)
                if got is None:  # collected between the check and now: end short, client sees
                    break
                raw_len, comp = got
                buf.append(RECORD.pack(cid, raw_len, len(comp)) + comp)
                size += len(buf[-1])
                if size >= FETCH_PIECE:
                    yield b"".join(buf)
                    buf, size = [], 0
            if buf:
                yield b"".join(buf)

        return StreamingResponse(stream(), media_type="application/octet-stream")

    @r.post("/v1/chunks/upload")
    async def upload(request: Request) -> dict[str, int]:
        """Records as :func:`parse_records` reads them; each verified before it is kept."""
        body = await _body(request, MAX_UPLOAD_BYTES, "an upload", "send smaller batches")

        def work() -> int:
            records = parse_records(body)
            if len(records) > MAX_BATCH:
                raise InvalidRequest(f"at most {MAX_BATCH} chunks per upload",
                                     hint="send smaller batches")
            for cid, raw_len, _ in records:
                if raw_len > MAX_CHUNK:  # it bounds the decompression: refuse it unread
                    raise InvalidRequest(f"chunk {cid.hex()} claims {raw_len} bytes; a chunk "
                                         f"is at most {MAX_CHUNK}",
                                         hint="upload chunks as corral cuts them")
            store.packs.put_compressed(records)
            return len(records)

        return {"stored": await run_in_threadpool(work)}

    @r.put("/v1/images/{name}")
    async def put_image(name: Annotated[str, PathParam(pattern=NAME_PATTERN)], request: Request,
                        replace: bool = False) -> ImageRow:
        """Name a tree whose chunks were uploaded: the manifest is the body. Refused unless
        every path of it stays inside the tree and every chunk it lists is already in the
        store, so a name never points at a hole nor out of its destination."""
        if not name or "/" in name or len(name) > 200:
            raise InvalidRequest(f"bad image name {name!r}", hint="letters, digits, '-', '.'")
        if replace and is_shelf(name):
            raise InvalidRequest(f"'{name}' is a shelved instance's disk; it is never replaced",
                                 hint="only the server's shelve operation names shelved "
                                      "disks, each under a name of its own")
        raw = await _body(request, MAX_MANIFEST_BYTES, "a manifest",
                          "this tree is too large for one manifest; split it")

        def work() -> ImageRow:
            store.put_manifest(name, Manifest.from_json(raw), replace=replace)
            if replace and on_change is not None:
                on_change(name)
            return _row(store.info(name))

        return await run_in_threadpool(work)

    return r
