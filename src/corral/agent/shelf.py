"""Agent calls of shelving: a disk into the server's image store, back out of it, and dropped.

Shelving moves each unique byte once (USERS.md §3). ``disk_push`` chunks the instance's disk
into this host's chunk cache (chunks of the image it was made from are already there, so only
new data is written) and uploads only the chunks the server's store lacks; the manifest is
named in the store by the server's choice of name. ``disk_pull`` builds a disk from a shelved
manifest, fetching only the chunks this host does not cache: concurrent pulls on one host fetch
one after the other, so the second finds the base image's chunks already here instead of
fetching them again. Everything else about an unshelve (create, start) is the ordinary create,
which uses a disk it finds at ``DISK_ROOT/NAME`` as it is.

``chunks_cached`` answers how many of a list of chunk ids this host holds: the server sends a
sample of a shelved disk's ids and prefers hosts that hold more of them. ``disk_drop`` removes a
kept disk (the offload delay passed, or the instance came back elsewhere); it refuses while an
instance of that name lives here, because then the disk is that instance's root.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path
from typing import Any

from corral.agent.disks import HostDisks
from corral.agent.imagecache import ImageCache
from corral.agent.report import is_alive
from corral.agent.state import AgentState, Handler
from corral.agent.store import check_name
from corral.api.client import TransportError
from corral.bus import rpc
from corral.errors import Conflict, HostUnavailable, InvalidRequest, NotFound
from corral.images.transfer import fetch_missing, push_tree
from corral.images.tree import Manifest, materialize

log = logging.getLogger(__name__)

#: one fetch at a time per agent process (see the module doc); materialising runs in parallel
_FETCH = threading.Lock()


def _disks(st: AgentState) -> HostDisks:
    if st.disks is None:
        raise InvalidRequest("this agent keeps no instance disks", hint="this is an agent bug")
    return st.disks


def _cache(st: AgentState) -> ImageCache:
    cache = st.images
    if cache is None:
        raise InvalidRequest("this agent has no chunk cache", hint="this is an agent bug")
    if not cache.api_url:
        raise HostUnavailable("this agent does not know the server's API address yet",
                              hint="it learns it with the next heartbeat; try again",
                              retryable=True)
    return cache


def _push(cache: ImageCache, root: Path, image: str) -> dict[str, Any]:
    with cache.in_use(), cache.client() as client:
        stats = push_tree(client, cache.packs, root, image)
    cache.write_stats()  # the push filled the cache too
    return {"uploaded_chunks": stats.chunks, "uploaded_bytes": stats.bytes}


def _pull(cache: ImageCache, image: str, dest: Path) -> dict[str, Any]:
    with cache.in_use():
        with cache.client() as client:
            raw, _ = client.manifest(image)
            manifest = Manifest.from_json(raw)
            ids = sorted(bytes.fromhex(c) for c in manifest.chunk_ids())
            with _FETCH:
                stats = fetch_missing(client, cache.packs, ids)
        materialize(manifest, cache.packs, dest)
    cache.count_fetched(stats.chunks, stats.bytes)
    return {"chunks": len(ids), "fetched_chunks": stats.chunks, "fetched_bytes": stats.bytes,
            "existing": False}


async def disk_push(st: AgentState, args: rpc.PushArgs) -> rpc.PushResult:
    """Snapshot the (stopped) instance's disk into the store under ``image``."""
    name, image = check_name(args.name), args.image
    disks, cache = _disks(st), _cache(st)
    async with st.lock(name):
        rec = st.records.get(name)
        if rec is not None:
            await st.refresh(rec)
            if is_alive(rec):
                raise Conflict(f"instance '{name}' is {rec.state}; a disk is shelved stopped",
                               hint="this is a server bug: shelve stops it first")
        if not disks.exists(name):
            raise NotFound(f"no disk for '{name}' on this host",
                           hint="an instance run from a host path (--from) cannot be shelved")
        try:
            out = await asyncio.to_thread(_push, cache, disks.path(name), image)
        except TransportError as exc:
            raise HostUnavailable(f"cannot reach the image store at {cache.api_url}: "
                                  f"{exc.reason}",
                                  hint="check that this host reaches the server's API",
                                  retryable=True) from exc
    log.info("disk of %s shelved as %s: %d chunks (%d bytes) uploaded", name, image,
             out["uploaded_chunks"], out["uploaded_bytes"])
    return rpc.PushResult.model_validate(out)


async def disk_pull(st: AgentState, args: rpc.PullArgs) -> rpc.PullResult:
    """Make ``DISK_ROOT/NAME`` from the shelved manifest ``image``. A disk already there is
    kept (fast respawn) unless ``replace``: then it is an old copy and is built again."""
    name, image, replace = check_name(args.name), args.image, args.replace
    disks = _disks(st)
    async with st.lock(name):
        if name in st.records:
            raise Conflict(f"instance '{name}' already exists on this host",
                           hint="remove it first; its disk is in use")
        if disks.exists(name):
            if not replace:
                return rpc.PullResult(chunks=0, fetched_chunks=0, fetched_bytes=0,
                                      existing=True)
            await st.call(disks.delete, name)
        cache = _cache(st)
        fill = await st.call(disks.new_dir, name)
        try:
            out = await asyncio.to_thread(_pull, cache, image, fill)
        except TransportError as exc:
            raise HostUnavailable(f"cannot fetch '{image}' from {cache.api_url}: {exc.reason}",
                                  hint="check that this host reaches the server's API",
                                  retryable=True) from exc
        await st.call(disks.publish, name, fill)
    log.info("disk of %s built from %s: %d chunks, %d fetched (%d bytes)", name, image,
             out["chunks"], out["fetched_chunks"], out["fetched_bytes"])
    return rpc.PullResult.model_validate(out)


async def disk_drop(st: AgentState, args: rpc.NameArgs) -> rpc.DropResult:
    """Remove a kept disk (idempotent); refused while an instance here uses it."""
    name = check_name(args.name)
    disks = _disks(st)
    async with st.lock(name):
        if name in st.records:
            raise Conflict(f"instance '{name}' exists on this host; its disk is in use",
                           hint="this is a server bug: only a shelved disk is dropped")
        existed = disks.exists(name)
        if existed:
            await st.call(disks.delete, name)
    if existed:
        log.info("kept disk of %s dropped", name)
    return rpc.DropResult(dropped=existed)


async def chunks_cached(st: AgentState, args: rpc.ChunksArgs) -> rpc.ChunksCached:
    """How many of ``ids`` (hex) this host's chunk cache holds."""
    if st.images is None or not args.ids:
        return rpc.ChunksCached(have=0, of=len(args.ids))
    try:
        ids = [bytes.fromhex(i) for i in args.ids]
    except ValueError as exc:
        raise InvalidRequest(f"bad chunk id: {exc}", hint="this is a server bug") from exc
    have = await asyncio.to_thread(st.images.packs.has_many, ids)
    return rpc.ChunksCached(have=sum(have), of=len(ids))

HANDLERS: dict[str, Handler] = {
    "disk_push": disk_push,
    "disk_pull": disk_pull,
    "disk_drop": disk_drop,
    "chunks_cached": chunks_cached,
}
