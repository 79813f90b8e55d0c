"""The image store over HTTP: the server's side of "fetch only the chunks you lack".

Chunks travel as they are stored (zstd), in batches: one request names up to ``MAX_BATCH`` ids
and the answer is a stream of records ``id(32) | raw_len(u32) | comp_len(u32) | bytes``
(:mod:`corral.images.records`, shared with clients). The receiver verifies every chunk against
its id before keeping it (``PackStore.put_compressed``), so a damaged server store can never
poison an agent's cache.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from fastapi import APIRouter, Request, Response
from fastapi.params import Depends
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from corral.errors import InvalidRequest, NotFound
from corral.images.records import MAX_BATCH, RECORD, parse_records
from corral.images.store import ImageStore


class ChunkIds(BaseModel):
    ids: list[str] = Field(max_length=MAX_BATCH, description="chunk ids, hex")


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


def _ids(raw: list[str]) -> list[bytes]:
    try:
        ids = [bytes.fromhex(i) for i in raw]
    except ValueError as exc:
        raise InvalidRequest(f"bad chunk id: {exc}", hint="chunk ids are 64 hex digits") from exc
    if any(len(i) != 32 for i in ids):
        raise InvalidRequest("bad chunk id length", hint="chunk ids are 64 hex digits")
    return ids


def router(store: ImageStore, dependencies: Sequence[Depends] = (),
           on_change: Callable[[str], None] | None = None) -> APIRouter:
    """``on_change(name)`` runs after an image is removed or replaced (the server broadcasts
    an invalidation so agents drop what they no longer need)."""
    r = APIRouter(dependencies=list(dependencies), tags=["images"])

    @r.get("/v1/images")
    def images() -> list[ImageRow]:
        return [ImageRow(name=i.name, manifest=i.manifest, files=i.files, size=i.size,
                         unique_size=i.unique_size, stored_size=i.stored_size,
                         dedup_ratio=round(i.dedup_ratio, 3)) for i in store.list()]

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
        ids = _ids(body.ids)
        have = store.packs.has_many(ids)
        return Missing(missing=[i.hex() for i, h in zip(ids, have, strict=True) if not h])

    @r.post("/v1/chunks/fetch")
    def fetch(body: ChunkIds) -> StreamingResponse:
        ids = _ids(body.ids)
        absent = [i.hex() for i, h in zip(ids, store.packs.has_many(ids), strict=True) if not h]
        if absent:
            raise NotFound(f"{len(absent)} chunk(s) not in the store, e.g. {absent[0]}",
                           hint="the image changed or was collected; fetch its manifest again",
                           details={"missing": absent[:50]})

        def stream() -> Iterator[bytes]:
            for cid in ids:
                got = store.packs.read_compressed(cid)
                if got is None:  # collected between the check and now: end short, client sees
                    return
                raw_len, comp = got
                yield RECORD.pack(cid, raw_len, len(comp)) + comp

        return StreamingResponse(stream(), media_type="application/octet-stream")

    @r.post("/v1/chunks/upload")
    async def upload(request: Request) -> dict[str, int]:
        """Records as :func:`parse_records` reads them; each verified before it is kept."""
        body = await request.body()
        records = parse_records(body)
        if len(records) > MAX_BATCH:
            raise InvalidRequest(f"at most {MAX_BATCH} chunks per upload",
                                 hint="send smaller batches")
        store.packs.put_compressed(records)
        return {"stored": len(records)}

    @r.put("/v1/images/{name}")
    async def put_image(name: str, request: Request, replace: bool = False) -> ImageRow:
        """Name a tree whose chunks were uploaded: the manifest is the body. Refused unless
        every chunk it lists is already in the store, so a name never points at a hole."""
        from corral.images.tree import Manifest

        if not name or "/" in name or len(name) > 200:
            raise InvalidRequest(f"bad image name {name!r}", hint="letters, digits, '-', '.'")
        raw = await request.body()
        m = Manifest.from_json(raw)
        ids = [bytes.fromhex(c) for c in m.chunk_ids()]
        lacking = [i.hex() for i, h in zip(ids, store.packs.has_many(ids), strict=True)
                   if not h]
        if lacking:
            raise InvalidRequest(f"{len(lacking)} chunk(s) of this manifest are not stored",
                                 hint="upload the missing chunks first (POST /v1/chunks/missing)",
                                 details={"missing": lacking[:50]})
        store.put_manifest(name, m, replace=replace)
        if replace and on_change is not None:
            on_change(name)
        i = store.info(name)
        return ImageRow(name=i.name, manifest=i.manifest, files=i.files, size=i.size,
                        unique_size=i.unique_size, stored_size=i.stored_size,
                        dedup_ratio=round(i.dedup_ratio, 3))

    return r
