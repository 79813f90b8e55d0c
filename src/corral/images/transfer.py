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

from corral.errors import CorralError
from corral.images.packstore import PackStore
from corral.images.records import MAX_BATCH, Record
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
    """Fill the cache with what ``name`` needs, then build its tree at ``dest``."""
    raw, _ = client.manifest(name)
    m = Manifest.from_json(raw)
    stats = fetch_missing(client, cache, [bytes.fromhex(c) for c in m.chunk_ids()])
    materialize(m, cache, dest)
    return stats


def push_tree(client: ChunkService, cache: PackStore, root: Path, name: str,
              batch: int = 256, replace: bool = False) -> FetchStats:
    """Snapshot ``root`` into the local cache, upload the chunks the server lacks, then name
    the manifest there (shelving: the disk goes to the store, each unique byte once)."""
    m = snapshot(root, cache)
    ids = [bytes.fromhex(c) for c in m.chunk_ids()]
    lacking: list[bytes] = []
    for start in range(0, len(ids), MAX_BATCH):
        lacking += client.missing_chunks(ids[start:start + MAX_BATCH])
    chunks = moved = 0
    for start in range(0, len(lacking), min(batch, MAX_BATCH)):
        records = []
        for cid in lacking[start:start + batch]:
            got = cache.read_compressed(cid)
            if got is None:
                raise CorralError(f"chunk {cid.hex()} vanished from the local cache",
                                  hint="retry the shelve", retryable=True)
            records.append((cid, got[0], got[1]))
        moved += client.upload_chunks(records)
        chunks += len(records)
    client.put_manifest(name, m.to_json(), replace=replace)
    return FetchStats(chunks, moved)
