"""Image store fill curve: 4 KiB object PUT/GET rates as the store fills, in-process and over
HTTP, beside a one-file-per-object store (hashed directories, as Swift's object servers keep
them).

USERS.md §6: Swift's PUT rate fell from 1,200/s to 300-400/s as it filled, and halved again
past 15 million objects. This bench fills both stores on the same disk in the same run and prints
the rate in each slice of the fill, so a slowdown shows as a falling column.

Both stores make each batch of 1,000 objects durable before the next (pack store: one fsync of
the pack + one index commit; file store: syncfs), so neither gets to cheat with the page cache
on writes. GETs read random objects already stored (after dropping nothing: a warm cache for
both, which favours the file store's small-file reads).

    python bench/store.py                      # 300,000 objects, slices of 100,000
    python bench/store.py --objects 15000000 --slice 1000000 --dir /big/disk    # the long run
"""

from __future__ import annotations

import argparse
import ctypes
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import httpx
import uvicorn
from fastapi import FastAPI, Request, Response

from corral.images.packstore import PackStore, chunk_id

OBJ = 4096
BATCH = 1000

_libc = ctypes.CDLL(None, use_errno=True)


def syncfs(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        _libc.syncfs(fd)
    finally:
        os.close(fd)


def obj(i: int) -> bytes:
    """4 KiB, unique per i, half noise and half text: compresses about 2:1 like small files."""
    noise = random.Random(i).randbytes(OBJ // 2)
    return (noise + b"corral object payload %016d " % i * 60)[:OBJ]


class FileStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, cid: bytes) -> Path:
        h = cid.hex()
        return self.root / h[:2] / h[2:4] / h

    def put_many(self, items: list[bytes]) -> None:
        for data in items:
            p = self._path(chunk_id(data))
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_suffix(".tmp")
            with open(tmp, "wb") as fh:
                fh.write(data)
            os.rename(tmp, p)
        syncfs(self.root)

    def get(self, cid: bytes) -> bytes:
        data = self._path(cid).read_bytes()
        if chunk_id(data) != cid:
            raise RuntimeError("corrupt")
        return data


class HttpStore:
    """The same store behind HTTP on loopback (uvicorn, one worker): PUT a batch of objects in
    one request, GET one object per request, as a client of the image service would."""

    def __init__(self, store: PackStore | FileStore) -> None:
        import socket
        import threading

        app = FastAPI()

        @app.post("/put")
        async def put(request: Request) -> Response:
            body = await request.body()
            store.put_many([body[i:i + OBJ] for i in range(0, len(body), OBJ)])
            return Response(status_code=204)

        @app.get("/get/{hexid}")
        def get(hexid: str) -> Response:
            return Response(store.get(bytes.fromhex(hexid)),
                            media_type="application/octet-stream")

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                                    log_level="error", access_log=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)

    def put_many(self, items: list[bytes]) -> None:
        self.http.post("/put", content=b"".join(items)).raise_for_status()

    def get(self, cid: bytes) -> bytes:
        resp = self.http.get(f"/get/{cid.hex()}")
        resp.raise_for_status()
        return resp.content

    def close(self) -> None:
        self.http.close()
        self.server.should_exit = True
        self.thread.join(10)


def measure(name: str, store: PackStore | FileStore | HttpStore, start: int, count: int,
            rnd: random.Random, gets: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    for b in range(start, start + count, BATCH):
        store.put_many([obj(i) for i in range(b, min(b + BATCH, start + count))])
    put_rate = count / (time.perf_counter() - t0)
    ids = [chunk_id(obj(rnd.randrange(start + count))) for _ in range(gets)]
    t0 = time.perf_counter()
    for cid in ids:
        store.get(cid)
    get_rate = gets / (time.perf_counter() - t0)
    return put_rate, get_rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--objects", type=int, default=300_000)
    ap.add_argument("--slice", type=int, default=100_000)
    ap.add_argument("--gets", type=int, default=20_000, help="random GETs measured per slice")
    ap.add_argument("--dir", type=Path, default=None, help="where both stores live (same disk)")
    ap.add_argument("--keep", action="store_true", help="keep the stores afterwards")
    ap.add_argument("--http-objects", type=int, default=100_000,
                    help="objects for the over-HTTP run (0 skips it)")
    args = ap.parse_args()
    in_process(args)
    if args.http_objects:
        over_http(args)


def over_http(args: argparse.Namespace) -> None:
    base = Path(tempfile.mkdtemp(prefix="corral-bench-store-http-", dir=args.dir))
    (base / "files").mkdir()
    packs = PackStore(base / "packs")
    hp, hf = HttpStore(packs), HttpStore(FileStore(base / "files"))
    rnd = random.Random(8)
    n = args.http_objects
    step = max(1, n // 2)
    print(f"\nover HTTP (loopback, batches of {BATCH} per PUT, one object per GET), "
          f"{n:,} objects")
    print(f"{'filled to':>12} | {'corral PUT/s':>12} {'files PUT/s':>12} {'ratio':>6} | "
          f"{'corral GET/s':>12} {'files GET/s':>12} {'ratio':>6}")
    try:
        for start in range(0, n, step):
            count = min(step, n - start)
            p_put, p_get = measure("packs", hp, start, count, rnd, min(args.gets, 5000))
            f_put, f_get = measure("files", hf, start, count, rnd, min(args.gets, 5000))
            print(f"{start + count:>12,} | {p_put:>12,.0f} {f_put:>12,.0f} {p_put / f_put:>5.1f}x"
                  f" | {p_get:>12,.0f} {f_get:>12,.0f} {p_get / f_get:>5.1f}x", flush=True)
    finally:
        hp.close()
        hf.close()
        packs.close()
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)


def in_process(args: argparse.Namespace) -> None:

    base = Path(tempfile.mkdtemp(prefix="corral-bench-store-", dir=args.dir))
    packs = PackStore(base / "packs")
    files = FileStore(base / "files")
    (base / "files").mkdir()
    rnd = random.Random(7)
    print(f"4 KiB objects, {args.objects:,} in slices of {args.slice:,}, in {base}")
    print(f"{'filled to':>12} | {'corral PUT/s':>12} {'files PUT/s':>12} {'ratio':>6} | "
          f"{'corral GET/s':>12} {'files GET/s':>12} {'ratio':>6}")
    try:
        for start in range(0, args.objects, args.slice):
            count = min(args.slice, args.objects - start)
            p_put, p_get = measure("packs", packs, start, count, rnd, args.gets)
            f_put, f_get = measure("files", files, start, count, rnd, args.gets)
            print(f"{start + count:>12,} | {p_put:>12,.0f} {f_put:>12,.0f} {p_put / f_put:>5.1f}x"
                  f" | {p_get:>12,.0f} {f_get:>12,.0f} {p_get / f_get:>5.1f}x", flush=True)
        used = sum(f.stat().st_size for f in (base / "packs" / "packs").iterdir())
        print(f"pack bytes on disk: {used / 1e6:,.0f} MB for {args.objects * OBJ / 1e6:,.0f} MB "
              "of objects")
    finally:
        packs.close()
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
