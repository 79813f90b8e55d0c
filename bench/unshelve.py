"""Bulk unshelve: wall time and bytes moved to bring back 100 instances shelved from the same
base image, corral beside a baseline that moves each full disk, in one run on one fleet.

USERS.md §3: unshelving downloads the whole snapshot again, so unshelving hundreds at once floods
the network between storage and compute. corral stores each shelved disk as chunks (the base
image's chunks are stored once) and each host fetches only the chunks it lacks, so the base
crosses the network once per host, not once per instance.

The run: ``corral up`` a local fleet (process driver), import a base image (one incompressible
blob plus small files), run N instances of it that each write their own data, shelve them all
with ``--offload-after 0`` (the disks leave the hosts: every unshelve must come from the store),
wait until every agent's chunk cache has swept itself empty (a cold unshelve), then:

* baseline: every shelved disk fetched in full (all its chunks, no cache shared between
  instances) and built into a scratch directory, as many at a time as corral runs;
* corral: ``corral unshelve --all --parallel P``; bytes are what the agents report fetching.

The baseline runs first, so if anything it warms the server's page cache for corral.

    python bench/unshelve.py              # 100 instances of a 16 MB base, a few minutes
    python bench/unshelve.py --long       # 100 instances of a 128 MB base
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from corral.api.client import Client
from corral.api.models import CreateInstance, OperationView
from corral.images.packstore import PackStore
from corral.images.transfer import materialize_image
from corral.rig.context import load_context

CLI = [sys.executable, "-m", "corral.cli"]


def cli(env: dict[str, str], *args: str, timeout: float = 3600) -> str:
    proc = subprocess.run([*CLI, *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"corral {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}")
    return proc.stdout


def base_tree(root: Path, mb: int) -> None:
    """One large incompressible file and a few hundred small ones (a root fs in miniature)."""
    (root / "usr" / "lib").mkdir(parents=True)
    with (root / "usr" / "lib" / "libbig.so").open("wb") as fh:
        for _ in range(mb * 3 // 4):
            fh.write(os.urandom(1024 * 1024))
    small = mb * 1024 * 1024 // 4 // 300
    for i in range(300):
        d = root / "usr" / "share" / f"d{i % 20}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}").write_bytes(os.urandom(small))


def follow(c: Client, o: OperationView, timeout: float = 600) -> OperationView:
    deadline = time.monotonic() + timeout
    while not o.finished:
        if time.monotonic() > deadline:
            raise SystemExit(f"operation {o.id} still {o.state} after {timeout:g}s")
        time.sleep(0.2)
        o = c.op(o.id)
    if o.state != "succeeded":
        raise SystemExit(f"{o.kind} of {o.target} {o.state}: {o.error}")
    return o


def cache_chunks(data: Path) -> dict[str, int]:
    out = {}
    for d in sorted((data / "hosts").iterdir()):
        stats = d / "image-cache.json"
        out[d.name] = int(json.loads(stats.read_text())["chunks"]) if stats.exists() else 0
    return out


def baseline(url: str, token: str, shelves: list[str], scratch: Path, parallel: int,
             ca_file: str | None = None) -> tuple[float, int]:
    """Every shelved disk fetched in full into its own empty cache and built: (seconds, bytes)."""

    def one(i_name: tuple[int, str]) -> int:
        i, name = i_name
        with tempfile.TemporaryDirectory(dir=scratch) as tmp, \
                PackStore(Path(tmp) / "cache") as cache, \
                Client(url, token, timeout=600, ca_file=ca_file) as http:
            stats = materialize_image(http, cache, name, Path(tmp) / f"disk{i}")
            return stats.bytes

    t0 = time.monotonic()
    with ThreadPoolExecutor(parallel) as pool:
        moved = sum(pool.map(one, enumerate(shelves)))
    return time.monotonic() - t0, moved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--instances", type=int, default=100)
    ap.add_argument("--hosts", type=int, default=3)
    ap.add_argument("--base-mb", type=int, default=16)
    ap.add_argument("--own-kb", type=int, default=256, help="each instance's own data")
    ap.add_argument("--parallel", type=int, default=8, help="unshelves in flight")
    ap.add_argument("--long", action="store_true", help="a 128 MB base, 1 MB own data")
    ap.add_argument("--keep", action="store_true", help="leave the fleet's files")
    args = ap.parse_args()
    if args.long:
        args.base_mb, args.own_kb = 128, 1024
    work = Path(tempfile.mkdtemp(prefix="corral-bench-unshelve-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    env.update(CORRAL_CONTEXT=str(work / "context.json"), NO_COLOR="1")
    try:
        run(args, work, env)
    finally:
        subprocess.run([*CLI, "down", "--timeout", "5"], env=env, capture_output=True)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, work: Path, env: dict[str, str]) -> None:
    n = args.instances
    data = work / "data"
    cli(env, "up", "--data", str(data), "--hosts", str(args.hosts))
    ctx = load_context(work / "context.json")
    assert ctx is not None
    base_tree(work / "base", args.base_mb)
    cli(env, "image", "import", "base", str(work / "base"))
    names = [f"i{k:03d}" for k in range(n)]
    cmd = ["sh", "-c", f"[ -f own.bin ] || head -c {args.own_kb * 1024} /dev/urandom > own.bin;"
                       " exec sleep 36000"]
    t0 = time.monotonic()
    with Client(ctx.url, ctx.token, timeout=600, ca_file=ctx.ca_file) as c, \
            ThreadPoolExecutor(args.parallel) as pool:
        list(pool.map(lambda nm: c.create(CreateInstance(
            name=nm, command=cmd, image="base", cpus=0.01, memory_bytes=1 << 20)), names))
        print(f"{n} instances of a {args.base_mb} MB base (+{args.own_kb} KB own data each) on "
              f"{args.hosts} hosts, created in {time.monotonic() - t0:.1f}s", flush=True)
        time.sleep(1.0)  # let each write its own data
        t0 = time.monotonic()
        ops = list(pool.map(lambda nm: follow(c, c.shelve(nm, 0)), names))
        pushed = sum(int(o.data["push"]["uploaded_bytes"]) for o in ops)
        disks = sum(int(o.data["push"]["size"]) for o in ops)
        print(f"shelved in {time.monotonic() - t0:.1f}s: {disks / 1e6:.0f} MB of disks, "
              f"{pushed / 1e6:.1f} MB uploaded to the store", flush=True)
        shelves = [s.shelf for s in c.shelves() if s.shelf]
    deadline = time.monotonic() + 150
    while any(cache_chunks(data).values()):  # agents sweep released chunks within a minute
        if time.monotonic() > deadline:
            raise SystemExit(f"chunk caches did not empty: {cache_chunks(data)}")
        time.sleep(1.0)
    print("every agent's chunk cache is empty: a cold unshelve", flush=True)

    scratch = work / "baseline"
    scratch.mkdir()
    base_s, base_bytes = baseline(ctx.url, ctx.token, shelves, scratch, args.parallel,
                                  ctx.ca_file)
    t0 = time.monotonic()
    out = cli(env, "unshelve", "--all", "--parallel", str(args.parallel), "--json")
    corral_s = time.monotonic() - t0
    rows: list[dict[str, Any]] = json.loads(out)
    assert len(rows) == n and all(r["result"] == "succeeded" for r in rows), rows
    corral_bytes = sum(int(r["fetched_bytes"] or 0) for r in rows)
    hosts = sorted({r["host"] for r in rows})

    print(f"\nunshelve {n} instances at once ({args.parallel} in flight, onto "
          f"{len(hosts)} hosts)")
    print(f"{'method':36} {'wall s':>8} {'MB moved':>9}")
    print(f"{'corral (chunks each host lacks)':36} {corral_s:8.1f} {corral_bytes / 1e6:9.1f}")
    print(f"{'baseline (each full disk)':36} {base_s:8.1f} {base_bytes / 1e6:9.1f}")
    print(f"{'baseline / corral':36} {base_s / corral_s:7.1f}x "
          f"{base_bytes / max(corral_bytes, 1):8.1f}x")


if __name__ == "__main__":
    main()
