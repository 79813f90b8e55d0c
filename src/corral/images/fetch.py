"""An agent's chunk cache: fetch an image's manifest and only the chunks this host lacks.

This is what makes unshelving hundreds of instances cheap (USERS.md §3): each host asks the
server for the chunks it does not already hold, in batches, so a base image shared by 100
instances crosses the network once per host, not once per instance.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import httpx

from corral.errors import CorralError, from_dict
from corral.images.http import MAX_BATCH, encode_records, parse_records
from corral.images.packstore import PackStore
from corral.images.tree import Manifest, materialize, snapshot


@dataclass(frozen=True)
class FetchStats:
    chunks: int
    bytes: int  # bytes on the wire (compressed)


def _raise(resp: httpx.Response) -> None:
    if resp.status_code >= 400:
        try:
            raise from_dict(resp.json()["error"])
        except (ValueError, KeyError):
            raise CorralError(f"image service answered {resp.status_code}: {resp.text[:200]}",
                              hint="check the server log") from None


def manifest(client: httpx.Client, name: str) -> Manifest:
    resp = client.get(f"/v1/images/{name}/manifest")
    _raise(resp)
    return Manifest.from_json(resp.content)


def fetch_missing(client: httpx.Client, cache: PackStore, ids: list[bytes],
                  batch: int = 256) -> FetchStats:
    want = [i for i, have in zip(ids, cache.has_many(ids), strict=True) if not have]
    want = list(dict.fromkeys(want))
    chunks = moved = 0
    for start in range(0, len(want), min(batch, MAX_BATCH)):
        part = want[start:start + batch]
        resp = client.post("/v1/chunks/fetch", json={"ids": [i.hex() for i in part]})
        _raise(resp)
        records = parse_records(resp.content)
        got = {r[0] for r in records}
        if got != set(part):
            raise CorralError(f"image service sent {len(got)} of {len(part)} chunks",
                              hint="the image may have been collected meanwhile; retry",
                              retryable=True)
        cache.put_compressed(records)
        chunks += len(records)
        moved += len(resp.content)
    return FetchStats(chunks, moved)


def materialize_image(client: httpx.Client, cache: PackStore, name: str,
                      dest: Path) -> FetchStats:
    """Fill the cache with what ``name`` needs, then build its tree at ``dest``."""
    m = manifest(client, name)
    stats = fetch_missing(client, cache, [bytes.fromhex(c) for c in m.chunk_ids()])
    materialize(m, cache, dest)
    return stats


def push_tree(client: httpx.Client, cache: PackStore, root: Path, name: str,
              batch: int = 256, replace: bool = False) -> FetchStats:
    """Snapshot ``root`` into the local cache, upload the chunks the server lacks, then name
    the manifest there (shelving: the disk goes to the store, each unique byte once)."""
    m = snapshot(root, cache)
    ids = [bytes.fromhex(c) for c in m.chunk_ids()]
    lacking: list[bytes] = []
    for start in range(0, len(ids), MAX_BATCH):
        resp = client.post("/v1/chunks/missing",
                           json={"ids": [i.hex() for i in ids[start:start + MAX_BATCH]]})
        _raise(resp)
        lacking += [bytes.fromhex(h) for h in resp.json()["missing"]]
    chunks = moved = 0
    for start in range(0, len(lacking), min(batch, MAX_BATCH)):
        records = []
        for cid in lacking[start:start + batch]:
            got = cache.read_compressed(cid)
            if got is None:
                raise CorralError(f"chunk {cid.hex()} vanished from the local cache",
                                  hint="retry the shelve", retryable=True)
            records.append((cid, got[0], got[1]))
        body = encode_records(records)
        resp = client.post("/v1/chunks/upload", content=body,
                           headers={"Content-Type": "application/octet-stream"})
        _raise(resp)
        chunks += len(records)
        moved += len(body)
    resp = client.put(f"/v1/images/{name}", content=m.to_json(),
                      params={"replace": str(replace).lower()},
                      headers={"Content-Type": "application/json"})
    _raise(resp)
    return FetchStats(chunks, moved)
