"""Moving trees between a local chunk cache and the server's image store, each unique chunk once.

This is what makes unshelving hundreds of instances cheap (USERS.md §3): a host asks the server
only for the chunks it does not already hold, in batches, so a base image shared by 100
instances crosses the network once per host, not once per instance; pushing a tree (``corral
image import``, shelving a disk) uploads only the chunks the store lacks.

The HTTP routes are spoken by the one API client (:class:`corral.api.client.Client`); this module
decides what to ask for and checks what comes back, against the :class:`ChunkService` it is
given, so the image package depends on no client code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from corral.errors import CorralError, InvalidRequest
from corral.images.packstore import PackStore
from corral.images.records import MAX_BATCH, MAX_UPLOAD_BYTES, RECORD, Record
from corral.images.tree import Manifest, materialize, snapshot


class ChunkService(Protocol):
    """The image routes of the server, as the API client offers them."""

    def manifest(self, name: str) -> tuple[bytes, str]:
        """(manifest JSON, manifest id) of a named image."""
        ...

    def put_manifest(self, name: str, manifest: bytes, replace: bool = False) -> Any:
        """Name a manifest whose chunks are all stored."""
        ...

    def missing_chunks(self, ids: Sequence[bytes]) -> list[bytes]:
        """Which of at most ``MAX_BATCH`` ids the store lacks."""
        ...

    def fetch_chunks(self, ids: Sequence[bytes]) -> tuple[list[Record], int]:
        """The records of at most ``MAX_BATCH`` stored chunks, and the bytes that moved."""
        ...

    def upload_chunks(self, records: Sequence[Record]) -> int:
        """Store at most ``MAX_BATCH`` records; returns the bytes sent."""
        ...


@dataclass(frozen=True)
class FetchStats:
    chunks: int
    bytes: int  # bytes on the wire (compressed)


def fetch_missing(client: ChunkService, cache: PackStore, ids: list[bytes],
                  batch: int = 256) -> FetchStats:
    """Fetch the chunks of ``ids`` that ``cache`` lacks; each batch must come back whole and
    each chunk verify against its id (``PackStore.put_compressed``) before it is kept."""
    want = [i for i, have in zip(ids, cache.has_many(ids), strict=True) if not have]
    want = list(dict.fromkeys(want))
    chunks = moved = 0
    for start in range(0, len(want), min(batch, MAX_BATCH)):
        part = want[start:start + batch]
        records, nbytes = client.fetch_chunks(part)
        got = {r[0] for r in records}
        if got != set(part):
            raise CorralError(f"image service sent {len(got)} of {len(part)} chunks",
                              hint="the image may have been collected meanwhile; retry",
                              retryable=True)
        cache.put_compressed(records)
        chunks += len(records)
        moved += nbytes
    return FetchStats(chunks, moved)


def materialize_image(client: ChunkService, cache: PackStore, name: str,
                      dest: Path) -> FetchStats:
    """Fill the cache with what ``name`` needs, then build its tree at ``dest``. The manifest
    is checked before a chunk is fetched (and again by :func:`materialize`)."""
    raw, _ = client.manifest(name)
    m = Manifest.from_json(raw)
    m.check()
    stats = fetch_missing(client, cache, [bytes.fromhex(c) for c in m.chunk_ids()])
    materialize(m, cache, dest)
    return stats


#: how often a push uploads what went missing and names its tree again (see push_tree)
NAME_ATTEMPTS = 3


def push_tree(client: ChunkService, cache: PackStore, root: Path, name: str,
              batch: int = 256, replace: bool = False) -> FetchStats:
    """Snapshot ``root`` into the local cache, upload the chunks the server lacks, then name
    the manifest there (shelving: the disk goes to the store, each unique byte once).

    Batches are cut at ``batch`` chunks and at :data:`MAX_UPLOAD_BYTES` of records, the most
    the server takes in one request. The server keeps what a push uploaded or was told it
    holds through one whole gc; a push slow enough to span two may find a chunk collected when
    it names the tree, which the server then refuses (a name never points at a hole): the push
    uploads what is missing again and names it again, up to :data:`NAME_ATTEMPTS` times."""
    m = snapshot(root, cache)
    m.check()  # the server checks it too; refuse here before a byte moves
    raw = m.to_json()
    ids = [bytes.fromhex(c) for c in sorted(m.chunk_ids())]
    chunks = moved = 0
    for attempt in range(1, NAME_ATTEMPTS + 1):
        lacking: list[bytes] = []
        for start in range(0, len(ids), MAX_BATCH):
            lacking += client.missing_chunks(ids[start:start + MAX_BATCH])
        sent, nbytes = _upload(client, cache, lacking, min(batch, MAX_BATCH))
        chunks, moved = chunks + sent, moved + nbytes
        try:
            client.put_manifest(name, raw, replace=replace)
        except InvalidRequest as exc:
            if "missing" not in exc.details or attempt == NAME_ATTEMPTS:
                raise
            continue  # collected meanwhile: upload what is missing now, name it again
        break
    return FetchStats(chunks, moved)


def _upload(client: ChunkService, cache: PackStore, ids: list[bytes],
            batch: int) -> tuple[int, int]:
    """Upload ``ids`` from ``cache`` in requests of at most ``batch`` chunks and
    :data:`MAX_UPLOAD_BYTES` of records; (chunks, bytes) sent."""
    chunks = moved = size = 0
    records: list[Record] = []
    for cid in ids:
        got = cache.read_compressed(cid)
        if got is None:
            raise CorralError(f"chunk {cid.hex()} vanished from the local cache",
                              hint="retry the push", retryable=True)
        rec_size = RECORD.size + len(got[1])
        if records and (len(records) >= batch or size + rec_size > MAX_UPLOAD_BYTES):
            moved += client.upload_chunks(records)
            chunks += len(records)
            records, size = [], 0
        records.append((cid, got[0], got[1]))
        size += rec_size
    if records:
        moved += client.upload_chunks(records)
        chunks += len(records)
    return chunks, moved
