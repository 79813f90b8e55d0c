"""Image store fill curve: 4 KiB object PUT/GET rates as the store fills, in-process and over
HTTP, beside one file per object (hashed directories, as Swift's object servers keep them).

USERS.md §6: Swift's PUT rate fell from 1,200/s to 300-400/s as it filled, and halved again
past 15 million objects. This bench fills corral's pack store and the file store in the same
run, slice by slice, so a slowdown shows as a falling column.

Fair to both:
- each store lives on a filesystem of its own, a sparse loop image made (and removed) here,
  XFS made and mounted as Swift's deployment guide advises (``mkfs.xfs -i size=1024``,
  ``noatime``; ext4 when mkfs.xfs is missing), so a ``syncfs`` flushes that store's writes
  only, and neither store's reads find the other's pages;
- every batch is durable before the next: the pack store fsyncs its pack and commits its index
  (its contract: a chunk acknowledged is on disk); the file store writes a batch of files and
  ``syncfs``; the Swift-like variant does what Swift's object server does per object (write a
  temp file, fdatasync, rename, fsync the directory);
- the file store's 65,536 directories are made before anything is timed (Swift makes them as
  it goes; counting that against it would flatter corral);
- objects are made outside the timed regions; every GET is checked against the object that
  was put; the page cache is dropped before each GET phase (``drop_caches``), so GETs read the
  disk as a store fuller than memory would; then each store's metadata is read back (the pack
  store's index file, the file store's directories: what a running server keeps cached)
  before the next PUTs.

Over HTTP, corral is the real server (``ControlPlane``: its routes, the guard and the bearer
token, the receive-side checks) and the product's client: a PUT is ``/v1/chunks/missing`` then
``/v1/chunks/upload`` of the missing ones, a GET is a batched ``/v1/chunks/fetch``, each chunk
checked by the client. The file store is a uvicorn server (the same framework, one process)
taking batches of objects (written, then ``syncfs``) and single objects Swift's way (one
request each, fsynced). Clients are threads, 16 and 64 at once by default.

Figures are the median (min/max) of the rounds a slice is cut into.

Needs root (loop devices, drop_caches); otherwise it says so and stops.

    python bench/store.py            # 300,000 objects in-process, 40,000 over HTTP: ~3 minutes
    python bench/store.py --objects 15000000 --slice 1000000 --baseline-budget 1500 \
        --http-objects 0             # the long run: rates per million filled (~1 hour)
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import http.client
import json
import os
import random
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import blake3
import zstandard

from corral.api.client import Client
from corral.images.packstore import PackStore, chunk_id
from corral.images.records import Record

OBJ = 4096
BATCH = 1000
_libc = ctypes.CDLL(None, use_errno=True)
_POOL = random.Random(1).randbytes(1 << 20)


def obj(i: int) -> bytes:
    """4 KiB, unique per i, half noise and half text: compresses about 2:1 like small files."""
    off = (i * 7919 * 64) % (len(_POOL) - OBJ // 2)
    return _POOL[off:off + OBJ // 2] + (b"corral object payload %016d " % i * 60)[:OBJ // 2]


def syncfs(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.syncfs(fd) != 0:
            raise OSError(ctypes.get_errno(), "syncfs failed")
    finally:
        os.close(fd)


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def spread(values: Sequence[float]) -> str:
    return f"{statistics.median(values):>8,.0f} ({min(values):,.0f}/{max(values):,.0f})"


# -- filesystems -----------------------------------------------------------------------------
@contextlib.contextmanager
def loop_fs(where: Path, name: str, size: int) -> Iterator[Path]:
    """A filesystem of its own on a sparse image under ``where``: removed afterwards."""
    img = where / f"corral-bench-{name}-{secrets.token_hex(4)}.img"
    mnt = where / f"corral-bench-{name}-{secrets.token_hex(4)}"
    mnt.mkdir()
    try:
        with img.open("wb") as fh:
            fh.truncate(size)
        if shutil.which("mkfs.xfs"):
            subprocess.run(["mkfs.xfs", "-q", "-f", "-i", "size=1024", str(img)], check=True)
        else:
            subprocess.run(["mkfs.ext4", "-q", "-F", str(img)], check=True)
        subprocess.run(["mount", "-o", "loop,noatime", str(img), str(mnt)], check=True)
        try:
            yield mnt
        finally:
            if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
    finally:
        img.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            mnt.rmdir()


def fs_kind(mnt: Path) -> str:
    out = subprocess.run(["findmnt", "-n", "-o", "FSTYPE", str(mnt)], capture_output=True,
                         text=True)
    return out.stdout.strip() or "?"


def make_dirs(root: Path) -> None:
    for a in range(256):
        for b in range(256):
            (root / f"{a:02x}" / f"{b:02x}").mkdir(parents=True, exist_ok=True)


# -- the stores, in-process ------------------------------------------------------------------
class Corral:
    name = "corral"

    def __init__(self, root: Path) -> None:
        self.store = PackStore(root)

    def put_many(self, items: list[bytes]) -> None:
        self.store.put_many(items)

    def get(self, cid: bytes) -> bytes:
        return self.store.get(cid)  # verified against cid

    def close(self) -> None:
        self.store.close()


class Files:
    """One file per object under ``aa/bb/<id>``; a batch is durable after one ``syncfs``."""

    name = "files"

    def __init__(self, root: Path) -> None:
        self.root = root
        make_dirs(root)

    def _path(self, hexid: str) -> str:
        return f"{self.root}/{hexid[:2]}/{hexid[2:4]}/{hexid}"

    def _write(self, data: bytes, durable: bool) -> None:
        path = self._path(blake3.blake3(data).hexdigest())
        fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, data)
            if durable:
                os.fdatasync(fd)
        finally:
            os.close(fd)
        os.rename(path + ".tmp", path)
        if durable:
            dfd = os.open(os.path.dirname(path), os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)

    def put_many(self, items: list[bytes]) -> None:
        for data in items:
            self._write(data, durable=False)
        syncfs(self.root)

    def get(self, cid: bytes) -> bytes:
        with open(self._path(cid.hex()), "rb") as fh:
            data = fh.read()
        if chunk_id(data) != cid:
            raise RuntimeError(f"object {cid.hex()} is corrupt")
        return data

    def close(self) -> None:
        pass


class SwiftLike(Files):
    """Swift's object server's way: each object fdatasynced, renamed, its directory fsynced."""

    name = "swift-like"

    def put_many(self, items: list[bytes]) -> None:
        for data in items:
            self._write(data, durable=True)


@dataclass
class Track:
    store: Corral | Files
    filled: int = 0
    put_s: float = 0.0  # PUT time spent so far (the budget counts it)
    limit: int = 0  # objects it fills to at most
    puts: dict[int, list[float]] = field(default_factory=dict)  # filled -> round rates
    gets: dict[int, list[float]] = field(default_factory=dict)
    stopped: str = ""


def put_rounds(t: Track, count: int, rounds: int) -> list[float]:
    """Fill ``count`` more objects in ``rounds`` rounds; objects/s of each (puts only)."""
    rates = []
    per = max(BATCH, count // rounds)
    end = t.filled + count
    while t.filled < end:
        n = min(per, end - t.filled)
        spent = 0.0
        for b in range(t.filled, t.filled + n, BATCH):
            items = [obj(i) for i in range(b, min(b + BATCH, t.filled + n))]
            t0 = time.perf_counter()
            t.store.put_many(items)
            spent += time.perf_counter() - t0
        t.filled += n
        t.put_s += spent
        rates.append(n / spent)
    return rates


def warm(t: Track) -> None:
    """Read a store's metadata back into the page cache after a cache drop, as a running
    server has it (untimed): the pack store's index file, the file store's directories."""
    if isinstance(t.store, Corral):
        with open(t.store.store.root / "index" / "data.mdb", "rb") as fh:
            while fh.read(1 << 20):
                pass
    else:
        root = t.store.root
        for a in range(256):
            for b in range(256):
                os.listdir(f"{root}/{a:02x}/{b:02x}")


def get_rounds(t: Track, gets: int, rounds: int, rnd: random.Random) -> list[float]:
    rates = []
    for _ in range(rounds):
        picks = [rnd.randrange(t.filled) for _ in range(max(1, gets // rounds))]
        ids = [chunk_id(obj(i)) for i in picks]
        t0 = time.perf_counter()
        got = [t.store.get(c) for c in ids]
        rates.append(len(ids) / (time.perf_counter() - t0))
        if any(g != obj(i) for g, i in zip(got, picks, strict=True)):
            raise SystemExit(f"{t.store.name}: a GET returned the wrong object")
    return rates


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def in_process(args: argparse.Namespace, pack_fs: Path, file_fs: Path) -> dict[str, float]:
    corral = Track(Corral(pack_fs / "packs"), limit=args.objects)
    files = Track(Files(file_fs / "files"), limit=args.objects)
    swift = Track(SwiftLike(file_fs / "swift"), limit=min(args.swift_objects, args.objects))
    tracks = [corral, files, swift]
    rnd = random.Random(7)
    print(f"\nin-process, 4 KiB objects, {args.objects:,} in slices of {args.slice:,} "
          f"({args.rounds} rounds each); pack store on {fs_kind(pack_fs)}, files on "
          f"{fs_kind(file_fs)}; PUT and GET objects/s, median (min/max)")
    print(f"{'filled to':>11} | {'store':>10} | {'PUT/s':>27} | {'GET/s (cold cache)':>27} | "
          f"index B/obj (tree, file)")
    figures: dict[str, float] = {}
    try:
        for start in range(0, args.objects, args.slice):
            count = min(args.slice, args.objects - start)
            active = []
            for t in tracks:
                if t.stopped or t.filled >= t.limit:
                    continue
                if args.baseline_budget and t is not corral and t.put_s > args.baseline_budget:
                    t.stopped = (f"stopped at {t.filled:,}: its {args.baseline_budget:.0f} s of "
                                 "PUT time are spent")
                    continue
                # the disk under both images keeps room for the rest of corral's fill
                reserve = (args.objects - corral.filled) * 2400 + (8 << 30)
                if t is not corral and (free_bytes(file_fs) < count * 12 * 1024 or
                                        free_bytes(args.where) < reserve + count * 6 * 1024):
                    t.stopped = f"stopped at {t.filled:,}: the disk is nearly full"
                    continue
                rates = put_rounds(t, min(count, t.limit - t.filled), args.rounds)
                t.puts[t.filled] = rates
                active.append(t)
            drop_caches()
            for t in active:
                t.gets[t.filled] = get_rounds(t, args.gets, args.rounds, rnd)
            for t in active:
                warm(t)
            for t in active:
                extra = ""
                if isinstance(t.store, Corral):
                    st = t.store.store.index_stat()
                    extra = (f"{st['pages'] * st['page_size'] / st['entries']:.1f}, "
                             f"{st['file_bytes'] / st['entries']:.1f}")
                print(f"{t.filled:>11,} | {t.store.name:>10} | {spread(t.puts[t.filled]):>27} | "
                      f"{spread(t.gets[t.filled]):>27} | {extra}", flush=True)
        for t in tracks:
            if t.stopped:
                print(f"  {t.store.name}: {t.stopped}")
    finally:
        for t in tracks:
            t.store.close()
    first = min(corral.puts)
    last = max(corral.puts)
    at = max(f for f in files.puts if f <= last)
    figures["store.put_rate.first_slice"] = statistics.median(corral.puts[first])
    figures["store.put_rate.first_slice.baseline"] = statistics.median(files.puts[min(files.puts)])
    figures["store.put_rate.last_slice"] = statistics.median(corral.puts[last])
    figures["store.put_rate.last_slice.baseline"] = statistics.median(files.puts[at])
    figures["store.put_rate_kept_pct"] = 100 * figures["store.put_rate.last_slice"] / \
        figures["store.put_rate.first_slice"]
    figures["store.put_rate_kept_pct.baseline"] = 100 * statistics.median(files.puts[at]) / \
        figures["store.put_rate.first_slice.baseline"]
    figures["store.get_rate_cold.last_slice"] = statistics.median(corral.gets[last])
    figures["store.get_rate_cold.last_slice.baseline"] = statistics.median(files.gets[at])
    if swift.puts:
        sfirst = min(swift.puts)
        figures["store.put_rate_vs_swift"] = statistics.median(corral.puts[first])
        figures["store.put_rate_vs_swift.baseline"] = statistics.median(swift.puts[sfirst])
    with PackStore(pack_fs / "packs") as reopened:
        ix = reopened.index_stat()
    figures["store.index_bytes_per_object"] = ix["pages"] * ix["page_size"] / ix["entries"]
    figures["_filled"] = last
    figures["_baseline_filled"] = at
    return figures


# -- over HTTP -------------------------------------------------------------------------------
CORRAL_SERVER = """
import asyncio, sys
from pathlib import Path
from corral.config import Settings
from corral.control.server import ControlPlane
async def main():
    plane = ControlPlane(Settings(data_dir=Path(sys.argv[1]), token=sys.argv[2], api_port=0))
    await plane.start()
    print(plane.api_url, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await plane.stop()
asyncio.run(main())
"""

FILES_SERVER = """
import ctypes, json, os, sys
import blake3, uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response
from starlette.routing import Route
root, OBJ = sys.argv[1], 4096
libc = ctypes.CDLL(None, use_errno=True)
def path(h):
    return f"{root}/{h[:2]}/{h[2:4]}/{h}"
def write(h, data, durable):
    p = path(h)
    fd = os.open(p + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        if durable:
            os.fdatasync(fd)
    finally:
        os.close(fd)
    os.rename(p + ".tmp", p)
    if durable:
        d = os.open(os.path.dirname(p), os.O_RDONLY)
        os.fsync(d)
        os.close(d)
def syncfs():
    fd = os.open(root, os.O_RDONLY)
    assert libc.syncfs(fd) == 0
    os.close(fd)
def read(h):
    with open(path(h), "rb") as f:
        return f.read()
async def batch(req):
    body = await req.body()
    def work():
        for i in range(0, len(body), OBJ):
            d = body[i:i + OBJ]
            write(blake3.blake3(d).hexdigest(), d, False)
        syncfs()
    await run_in_threadpool(work)
    return Response(status_code=204)
async def fetch(req):
    ids = json.loads(await req.body())
    data = await run_in_threadpool(lambda: b"".join(read(h) for h in ids))
    return Response(data, media_type="application/octet-stream")
async def put(req):
    h, body = req.path_params["h"], await req.body()
    def work():
        if blake3.blake3(body).hexdigest() != h:
            return 422
        write(h, body, True)
        return 201
    return Response(status_code=await run_in_threadpool(work))
async def get(req):
    data = await run_in_threadpool(read, req.path_params["h"])
    return Response(data, media_type="application/octet-stream")
app = Starlette(routes=[Route("/batch", batch, methods=["POST"]),
                        Route("/fetch", fetch, methods=["POST"]),
                        Route("/obj/{h}", put, methods=["PUT"]),
                        Route("/obj/{h}", get, methods=["GET"])])
sock = __import__("socket").socket()
sock.bind(("127.0.0.1", 0))
print(f"http://127.0.0.1:{sock.getsockname()[1]}", flush=True)
uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False)).run(sockets=[sock])
"""


@contextlib.contextmanager
def server(script: str, *argv: str) -> Iterator[str]:
    """A server in a process of its own (the clients' threads do not share its GIL)."""
    proc = subprocess.Popen([sys.executable, "-c", script, *argv], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        if not url.startswith("http"):
            raise SystemExit(f"the server did not start: {url!r}")
        yield url
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


class Conn(threading.local):
    """One kept-open connection per client thread."""

    def __init__(self, url: str) -> None:
        host, _, port = url.removeprefix("http://").rpartition(":")
        self.http = http.client.HTTPConnection(host, int(port), timeout=120)

    def call(self, method: str, path: str, body: bytes = b"",
             headers: dict[str, str] | None = None) -> bytes:
        self.http.request(method, path, body=body, headers=headers or {})
        resp = self.http.getresponse()
        data = resp.read()
        if resp.status >= 300:
            raise SystemExit(f"{method} {path}: {resp.status} {data[:200]!r}")
        return data


def run_clients(clients: int, jobs: list[Callable[[], object]]) -> float:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for f in [pool.submit(j) for j in jobs]:
            f.result()
    return time.perf_counter() - t0


def http_corral(url: str, token: str, n: int, per: int, clients: int, rounds: int,
                gets: int, rnd: random.Random, offset: int) -> tuple[list[float], list[float]]:
    local = threading.local()

    def client() -> Client:
        if not hasattr(local, "c"):
            local.c = Client(url, token, timeout=120)
        return local.c  # type: ignore[no-any-return]

    cctx = zstandard.ZstdCompressor(level=3)
    put_rates, get_rates = [], []
    size = max(per, n // rounds)
    for r0 in range(offset, offset + n, size):
        recs: list[Record] = []
        for i in range(r0, min(r0 + size, offset + n)):
            data = obj(i)
            recs.append((chunk_id(data), len(data), cctx.compress(data)))
        batches = [recs[b:b + per] for b in range(0, len(recs), per)]

        def push(batch: list[Record]) -> None:
            c = client()
            lacking = set(c.missing_chunks([r[0] for r in batch]))
            c.upload_chunks([r for r in batch if r[0] in lacking])

        put_rates.append(len(recs) / run_clients(clients, [partial(push, b) for b in batches]))
        assert client().missing_chunks([r[0] for r in recs[:1000]]) == []
    drop_caches()
    for _ in range(rounds):
        picks = [rnd.randrange(offset, offset + n) for _ in range(max(per, gets // rounds))]

        def fetch(part: list[int]) -> None:
            records, _ = client().fetch_chunks([chunk_id(obj(i)) for i in part])
            for (cid, raw_len, comp), i in zip(records, part, strict=True):
                # a decompression context per call: one shared by the client threads
                # corrupts (zstd contexts are not thread-safe)
                data = zstandard.ZstdDecompressor().decompress(comp, max_output_size=raw_len)
                if chunk_id(data) != cid or data != obj(i):
                    raise SystemExit("corral over HTTP returned a wrong object")

        parts = [picks[b:b + per] for b in range(0, len(picks), per)]
        get_rates.append(len(picks) / run_clients(clients, [partial(fetch, p) for p in parts]))
    return put_rates, get_rates


def http_files(url: str, n: int, per: int, clients: int, rounds: int, gets: int,
               rnd: random.Random, offset: int, swift: bool) -> tuple[list[float], list[float]]:
    conn = Conn(url)
    put_rates, get_rates = [], []
    size = max(per, n // rounds)
    for r0 in range(offset, offset + n, size):
        objs = [obj(i) for i in range(r0, min(r0 + size, offset + n))]
        if swift:
            jobs: list[Callable[[], object]] = [
                partial(conn.call, "PUT", f"/obj/{blake3.blake3(d).hexdigest()}", d)
                for d in objs]
        else:
            jobs = [partial(conn.call, "POST", "/batch", b"".join(objs[b:b + per]))
                    for b in range(0, len(objs), per)]
        put_rates.append(len(objs) / run_clients(clients, jobs))
    drop_caches()
    for _ in range(rounds):
        picks = [rnd.randrange(offset, offset + n) for _ in range(max(per, gets // rounds))]

        def one(i: int) -> None:
            data = conn.call("GET", f"/obj/{chunk_id(obj(i)).hex()}")
            if chunk_id(data) != chunk_id(obj(i)):
                raise SystemExit("the file store returned a wrong object")

        def many(part: list[int]) -> None:
            body = conn.call("POST", "/fetch", json.dumps(
                [chunk_id(obj(i)).hex() for i in part]).encode())
            for k, i in enumerate(part):
                data = body[k * OBJ:(k + 1) * OBJ]
                if chunk_id(data) != chunk_id(obj(i)):
                    raise SystemExit("the file store returned a wrong object")

        if swift:
            jobs = [partial(one, i) for i in picks]
        else:
            jobs = [partial(many, picks[b:b + per]) for b in range(0, len(picks), per)]
        get_rates.append(len(picks) / run_clients(clients, jobs))
    return put_rates, get_rates


def over_http(args: argparse.Namespace, pack_fs: Path, file_fs: Path) -> dict[str, float]:
    token = secrets.token_hex(16)
    per = args.http_batch
    rnd = random.Random(8)
    figures: dict[str, float] = {}
    print(f"\nover HTTP on loopback: corral's server and client ({per} chunks per upload and "
          f"per fetch, missing-check first), the file store batched the same way (syncfs per "
          f"batch) and Swift's way (one object per request, fsynced); objects/s, median "
          f"(min/max) of {args.rounds} rounds")
    print(f"{'clients':>7} | {'store':>10} | {'objects':>8} | {'PUT/s':>27} | "
          f"{'GET/s (cold cache)':>27}")
    (file_fs / "http").mkdir()
    make_dirs(file_fs / "http")
    offset = 10**9  # other objects than the in-process part's
    with server(CORRAL_SERVER, str(pack_fs / "server"), token) as curl, \
            server(FILES_SERVER, str(file_fs / "http")) as furl:
        for clients in args.clients:
            swift_n = min(args.http_objects, args.swift_objects)
            got = {}
            for name in ("corral", "files", "swift-like"):
                n = swift_n if name == "swift-like" else args.http_objects
                if name == "corral":
                    puts, gets = http_corral(curl, token, n, per, clients, args.rounds, args.gets,
                                             rnd, offset)
                else:
                    puts, gets = http_files(furl, n, per, clients, args.rounds,
                                            min(args.gets, n), rnd, offset,
                                            swift=name == "swift-like")
                offset += n
                got[name] = (puts, gets)
                print(f"{clients:>7} | {name:>10} | {n:>8,} | {spread(puts):>27} | "
                      f"{spread(gets):>27}", flush=True)
            tag = f"c{clients}"
            med = {k: (statistics.median(p), statistics.median(g)) for k, (p, g) in got.items()}
            figures[f"store.http_put_rate.{tag}"] = med["corral"][0]
            figures[f"store.http_put_rate.{tag}.baseline"] = med["files"][0]
            figures[f"store.http_get_rate_cold.{tag}"] = med["corral"][1]
            figures[f"store.http_get_rate_cold.{tag}.baseline"] = med["files"][1]
            figures[f"store.http_put_rate_vs_swift.{tag}"] = med["corral"][0]
            figures[f"store.http_put_rate_vs_swift.{tag}.baseline"] = med["swift-like"][0]
    return figures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--objects", type=int, default=300_000, help="in-process fill")
    ap.add_argument("--slice", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=5, help="rounds per slice (median, min, max)")
    ap.add_argument("--gets", type=int, default=10_000, help="random GETs per slice")
    ap.add_argument("--swift-objects", type=int, default=4_000,
                    help="objects the Swift-like variant fills to (it fsyncs each)")
    ap.add_argument("--baseline-budget", type=float, default=0,
                    help="seconds of PUT time after which the file store stops filling (0: none)")
    ap.add_argument("--http-objects", type=int, default=40_000,
                    help="objects per store over HTTP (0 skips it)")
    ap.add_argument("--http-batch", type=int, default=256, help="objects per upload/fetch")
    ap.add_argument("--clients", type=lambda s: [int(x) for x in s.split(",")],
                    default=[16, 64], help="concurrent HTTP clients, e.g. 16,64")
    ap.add_argument("--where", type=Path, default=Path(tempfile.gettempdir()),
                    help="where the sparse filesystem images go")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/store.py skipped: it needs root, to give each store a loop filesystem of "
              "its own (so a syncfs flushes that store's writes only) and to drop the page "
              "cache before GETs; run it with sudo")
        return
    total = args.objects + 2 * len(args.clients) * args.http_objects
    need_pack = total * 3 * 1024 + (24 << 30)  # the server keeps its bus there too (8 GiB+)
    need_file = total * 9 * 1024 + (4 << 30)
    print(f"load before: {os.getloadavg()[0]:.2f} (1 min), {os.cpu_count()} cpus; images in "
          f"{args.where} (free {free_bytes(args.where) / 1e9:,.0f} GB)")
    t0 = time.perf_counter()
    figures: dict[str, float] = {}
    with loop_fs(args.where, "packs", need_pack) as pack_fs, \
            loop_fs(args.where, "files", need_file) as file_fs:
        figures.update(in_process(args, pack_fs, file_fs))
        if args.http_objects:
            figures.update(over_http(args, pack_fs, file_fs))
    print(f"\ntook {time.perf_counter() - t0:,.0f} s; load after: {os.getloadavg()[0]:.2f}")
    print(f"(in-process: corral filled to {figures.pop('_filled'):,.0f}, the file store's last "
          f"slice at {figures.pop('_baseline_filled'):,.0f})")
    units = {"pct": "%", "bytes": "bytes"}
    for name, value in figures.items():
        unit = next((u for k, u in units.items() if k in name), "objects/s")
        print(f"figure: {name} {value:.1f} {unit}")


if __name__ == "__main__":
    main()
