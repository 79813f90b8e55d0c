"""The agent's chunk cache: roots of image-based instances, built from chunks fetched once.

An instance created with an image gets its root at ``<instance dir>/rootfs``, materialised from
the host's cache (``<data_dir>/chunks``, a :class:`PackStore`) after fetching only the chunks the
cache lacks, so a second instance of the same image on this host moves no chunk at all.

What the cache may keep is decided locally, with no call to the server: next to each instance
record lies ``image-chunks.json`` (image, manifest id, chunk ids) and the live set is the union of
those files. A sweep (on a ``corral.invalidate`` message, when an instance of an invalidated image
is deleted, and at most once a minute when something was released) drops every other chunk.
Creates and sweeps exclude each other (many creates at once, or one sweep), so a sweep never drops
chunks a create has fetched but not yet recorded.

``<data_dir>/image-cache.json`` holds the cache's figures (chunks, bytes on disk, chunks and bytes
fetched so far, sweeps): operators and tests read it; every change is also logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from corral.agent.store import write_atomic
from corral.api.client import Client, TransportError
from corral.errors import CorralError, HostUnavailable
from corral.images.packstore import PackStore
from corral.images.transfer import fetch_missing
from corral.images.tree import Manifest, materialize

log = logging.getLogger(__name__)

CHUNKS_FILE = "image-chunks.json"
STATS_FILE = "image-cache.json"
#: a sweep for released instances runs at most this often (invalidations sweep at once).
SWEEP_EVERY = 60.0
HTTP_TIMEOUT = 60.0


class ImageCache:
    """Thread-safe: :meth:`materialize` and :meth:`sweep` run in worker threads."""

    def __init__(self, data_dir: Path, instances_root: Path, token: str) -> None:
        self.data_dir = Path(data_dir)
        self.instances_root = Path(instances_root)
        self.packs = PackStore(self.data_dir / "chunks")
        self.token = token
        #: the server's API, from the join (or a heartbeat) reply
        self.api_url = ""
        #: the fleet's CA, when the API speaks HTTPS
        self.ca_file = ""
        self._cond = threading.Condition()
        self._active = 0
        self._sweeping = False
        #: something may have become garbage since the last sweep
        self.dirty = True
        #: images removed or replaced on the server whose chunks some instance may still hold
        self.invalidated: set[str] = set()
        self._async_lock: asyncio.Lock | None = None
        self.totals: dict[str, Any] = {"fetched_chunks": 0, "fetched_bytes": 0, "sweeps": 0,
                                       "dropped_chunks": 0, "freed_bytes": 0,
                                       "last_sweep_at": None}
        self._load_totals()
        self.write_stats()

    # --- mutual exclusion of creates and sweeps --------------------------------------------
    @contextlib.contextmanager
    def _using(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._sweeping)
            self._active += 1
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._sweeping and self._active == 0)
            self._sweeping = True
        try:
            yield
        finally:
            with self._cond:
                self._sweeping = False
                self._cond.notify_all()

    def in_use(self) -> contextlib.AbstractContextManager[None]:
        """Hold sweeps off while chunks are written or read outside :meth:`materialize`
        (shelving pushes a disk through this cache and pulls one back, agent/shelf.py)."""
        return self._using()

    def count_fetched(self, chunks: int, nbytes: int) -> None:
        """Add chunks fetched outside :meth:`materialize` to the cache's figures, and write
        them out (they said 0 chunks while an unshelve had just filled the cache)."""
        with self._cond:
            self.totals["fetched_chunks"] += chunks
            self.totals["fetched_bytes"] += nbytes
        self.write_stats()

    def client(self) -> Client:
        """The server's image routes, through the one API client; a new one per call, as
        each call runs in its own worker thread."""
        return Client(self.api_url, self.token, timeout=HTTP_TIMEOUT,
                      ca_file=self.ca_file or None)

    # --- creates ----------------------------------------------------------------------------
    def materialize(self, image: str, dest: Path, chunk_file: Path,
                    into_empty: bool = False) -> dict[str, Any]:
        """Fetch ``image``'s manifest and the chunks this host lacks, build its tree at ``dest``
        and record what it used in ``chunk_file``. Returns what was fetched (for the record).
        ``into_empty``: ``dest`` is a new empty directory (or subvolume) to fill, not a path to
        replace."""
        if not self.api_url:
            raise HostUnavailable(
                "this agent does not know the server's API address yet",
                hint="it learns it with the next heartbeat; try again in a few seconds",
                retryable=True)
        with self._using():
            try:
                with self.client() as client:
                    raw, manifest_id = client.manifest(image)
                    manifest = Manifest.from_json(raw)
                    ids = sorted(manifest.chunk_ids())
                    stats = fetch_missing(client, self.packs, [bytes.fromhex(i) for i in ids])
            except TransportError as exc:
                raise HostUnavailable(
                    f"cannot fetch image '{image}' from {self.api_url}: {exc.reason}",
                    hint="check that this host reaches the server's API", retryable=True
                ) from exc
            if dest.exists() and not into_empty:
                shutil.rmtree(dest)  # left by a create that crashed: no record points at it
            materialize(manifest, self.packs, dest)
            chunk_file.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(chunk_file, json.dumps(
                {"image": image, "manifest_id": manifest_id, "chunks": ids}).encode())
            with self._cond:
                self.totals["fetched_chunks"] += stats.chunks
                self.totals["fetched_bytes"] += stats.bytes
        log.info("image %s (manifest %s) materialised: %d chunks, %d fetched (%d bytes); "
                 "cache %s", image, manifest_id[:12], len(ids), stats.chunks, stats.bytes,
                 self.describe())
        self.write_stats()
        return {"image": image, "manifest_id": manifest_id, "chunks": len(ids),
                "fetched_chunks": stats.chunks, "fetched_bytes": stats.bytes}

    # --- sweeps -----------------------------------------------------------------------------
    def live(self) -> tuple[set[bytes], set[str]]:
        """Chunks and image names recorded next to the instances this host holds."""
        chunks: set[bytes] = set()
        images: set[str] = set()
        for path in self.instances_root.glob(f"*/{CHUNKS_FILE}"):
            try:
                raw = json.loads(path.read_text())
                chunks.update(bytes.fromhex(c) for c in raw["chunks"])
                images.add(str(raw["image"]))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                # cannot tell what it needs: keep everything rather than break an instance
                raise CorralError(f"unreadable {path}: {exc}",
                                  hint="fix or remove that file; the cache was not swept"
                                  ) from exc
        return chunks, images

    def sweep(self) -> dict[str, Any]:
        """Drop every cached chunk no instance here needs."""
        with self._exclusive():
            self.dirty = False
            live, images = self.live()
            before = len(self.packs)
            self.packs.seal()
            res = self.packs.sweep(live)
            self.invalidated &= images
            with self._cond:
                self.totals["sweeps"] += 1
                self.totals["dropped_chunks"] += res.dropped
                self.totals["freed_bytes"] += res.bytes_freed
                self.totals["last_sweep_at"] = time.time()
        log.info("chunk cache swept: %d of %d chunks dropped, %d bytes freed, %d packs "
                 "rewritten%s; cache %s", res.dropped, before, res.bytes_freed,
                 res.packs_rewritten, f", damaged {res.damaged}" if res.damaged else "",
                 self.describe())
        self.write_stats()
        return {"dropped": res.dropped, "freed_bytes": res.bytes_freed,
                "damaged": res.damaged}

    async def sweep_async(self) -> None:
        """One sweep at a time from the event loop; errors are logged, never raised."""
        if self._async_lock is None:
            self._async_lock = asyncio.Lock()
        async with self._async_lock:
            try:
                await asyncio.to_thread(self.sweep)
            except Exception as exc:
                log.error("chunk cache sweep failed: %s", exc)

    async def on_invalidate(self, msg: Any) -> None:
        """``corral.invalidate`` callback: ``{"image": name}`` was removed or replaced."""
        try:
            name = str(json.loads(msg.data)["image"])
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring a malformed invalidation: %r", msg.data[:200])
            return
        log.info("image %s was removed or replaced on the server; sweeping the chunk cache",
                 name)
        self.invalidated.add(name)
        await self.sweep_async()

    async def released(self, image: str) -> None:
        """An instance of ``image`` was deleted: sweep now if the image was invalidated,
        else within :data:`SWEEP_EVERY`."""
        self.dirty = True
        if image in self.invalidated:
            await self.sweep_async()

    async def sweep_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=SWEEP_EVERY)
            if self.dirty and not stop.is_set():
                await self.sweep_async()

    # --- figures ----------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        packs = self.data_dir / "chunks" / "packs"
        size = sum(p.stat().st_size for p in packs.glob("pack-*.dat") if p.exists())
        with self._cond:
            totals = dict(self.totals)
        return {"chunks": len(self.packs), "pack_bytes": size, **totals,
                "invalidated": sorted(self.invalidated), "updated_at": time.time()}

    def describe(self) -> str:
        s = self.stats()
        return f"{s['chunks']} chunks, {s['pack_bytes']} bytes"

    def write_stats(self) -> None:
        try:
            write_atomic(self.data_dir / STATS_FILE,
                         json.dumps(self.stats(), indent=1, sort_keys=True).encode())
        except OSError as exc:
            log.warning("cannot write %s: %s", STATS_FILE, exc)

    def _load_totals(self) -> None:
        """Counters survive agent restarts (the cache does too)."""
        with contextlib.suppress(OSError, ValueError, TypeError):
            raw = json.loads((self.data_dir / STATS_FILE).read_text())
            for key in self.totals:
                if key in raw:
                    self.totals[key] = raw[key]

    def close(self, timeout: float = 10.0) -> None:
        """Close the index once no create or sweep uses it; a worker thread still busy after
        ``timeout`` (the process is exiting) keeps it open rather than crash under it."""
        with self._cond:
            free = self._cond.wait_for(lambda: not self._sweeping and self._active == 0,
                                       timeout=timeout)
            if not free:
                log.warning("chunk cache still in use at shutdown; leaving it open")
                return
            self._sweeping = True  # nothing may start after the close
        self.packs.close()
