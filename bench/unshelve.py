"""Shelve and unshelve: corral beside moving each whole disk, on the same disks, through the
same capped link, in one run on one fleet.

USERS.md §3: unshelving downloads the whole snapshot again, so unshelving many at once floods
the network between storage and compute. corral stores each shelved disk as chunks (the base
image's chunks are stored once) and each host fetches only the chunks it lacks, so the base
crosses the link once per host, not once per instance.

The run: ``corral up`` a local fleet (process driver), import a base image (a large
incompressible library plus compressible small files), run N instances of it that each write
their own data; then, each round:

* baseline shelve: every disk pushed whole to a store (``rsync -aHAX --numeric-ids -z
  --compress-choice=zstd`` into a fresh directory of an rsync daemon: a tar+zstd upload, done
  by rsync), P at a time;
* corral shelve: ``shelve --offload-after 0`` of every instance (the disks leave the hosts);
* a wait until every agent's chunk cache has swept itself empty (a cold unshelve);
* baseline unshelve: every disk pulled whole from the store into an empty directory, P at a
  time; corral unshelve: ``corral unshelve --all --parallel P``;
* every unshelved disk, both methods, checked against the tree recorded before the shelve
  (bench/treecmp.py: paths, kinds, modes, owners, sizes, content hashes).

The link: ``tc`` is refused on this kernel, so a rate-limiting TCP proxy (bench/rateproxy.py,
``--rate-mbit`` each way, shared by all connections) stands in front of the server's API port
(agents reach it through an iptables REDIRECT of that loopback port, so they need no setting)
and in front of the baseline's rsync daemon. ``--rate-mbit 0`` runs without the proxy.

    python bench/unshelve.py              # 8 instances of a 32 MB base, 3 rounds, 100 Mbit/s
    python bench/unshelve.py --long       # 24 instances of a 128 MB base
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rateproxy import RateProxy, redirect
from rsyncd import RsyncDaemon, run_rsync
from treecmp import Entry, check, manifest

from corral.api.client import Client
from corral.api.models import CreateInstance, OperationView
from corral.rig.context import load_context

CLI = [sys.executable, "-m", "corral.cli"]
#: the baseline's transfer: an exact copy, compressed on the wire like tar | zstd
STORE_FLAGS = ["-aHAX", "--numeric-ids", "--stats", "-z", "--compress-choice=zstd"]


def cli(env: dict[str, str], *args: str, timeout: float = 3600) -> str:
    proc = subprocess.run([*CLI, *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"corral {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}")
    return proc.stdout


def base_tree(root: Path, mb: int) -> None:
    """Three quarters in one incompressible library, a quarter in 300 text-like files."""
    (root / "usr" / "lib").mkdir(parents=True)
    with (root / "usr" / "lib" / "libbig.so").open("wb") as fh:
        for _ in range(mb * 3 // 4):
            fh.write(os.urandom(1024 * 1024))
    small = mb * 1024 * 1024 // 4 // 300
    words = [os.urandom(6).hex() for _ in range(2000)]
    for i in range(300):
        d = root / "usr" / "share" / f"d{i % 20}"
        d.mkdir(parents=True, exist_ok=True)
        text = " ".join(words[(i * 7 + k * 13) % len(words)] for k in range(small // 12))
        (d / f"f{i}").write_text(text[:small])
        if i % 50 == 0:
            (d / f"f{i}").chmod(0o755)


def follow(c: Client, o: OperationView, timeout: float = 1800) -> OperationView:
    deadline = time.monotonic() + timeout
    while not o.finished:
        if time.monotonic() > deadline:
            raise SystemExit(f"operation {o.id} still {o.state} after {timeout:g}s")
        time.sleep(0.2)
        o = c.op(o.id)
    if o.state != "succeeded":
        raise SystemExit(f"{o.kind} of {o.target} {o.state}: {o.error}")
    return o


def not_swept(data: Path, hosts: set[str], since: float) -> dict[str, Any]:
    """Hosts whose chunk cache has not been swept empty since ``since``. The figures file is
    written by a sweep, not when an unshelve fetches chunks, so ``chunks`` alone may be stale:
    only a sweep later than the shelve says the cache is empty."""
    out: dict[str, Any] = {}
    for host in sorted(hosts):
        path = data / "hosts" / host / "image-cache.json"
        stats = json.loads(path.read_text()) if path.exists() else {}
        if int(stats.get("chunks", 1)) or float(stats.get("last_sweep_at") or 0) < since:
            out[host] = {k: stats.get(k) for k in ("chunks", "last_sweep_at")}
    return out


def disk_of(data: Path, host: str, name: str) -> Path:
    return data / "hosts" / host / "disks" / name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--instances", type=int, default=8)
    ap.add_argument("--hosts", type=int, default=2)
    ap.add_argument("--base-mb", type=int, default=32)
    ap.add_argument("--own-kb", type=int, default=1024, help="each instance's own data")
    ap.add_argument("--parallel", type=int, default=4, help="transfers in flight")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rate-mbit", type=float, default=100.0,
                    help="the link's cap each way (0: no proxy, loopback speed)")
    ap.add_argument("--sweep-timeout", type=float, default=150.0,
                    help="longest wait for the agents' chunk caches to empty")
    ap.add_argument("--warm", action="store_true",
                    help="do not wait for the chunk caches to empty (a smoke run, not a figure)")
    ap.add_argument("--long", action="store_true", help="24 instances of a 128 MB base")
    ap.add_argument("--keep", action="store_true", help="leave the fleet's files")
    args = ap.parse_args()
    if args.long:
        args.instances, args.base_mb, args.own_kb = 24, 128, 4096
    if os.geteuid() != 0:
        sys.exit("bench/unshelve.py needs root (iptables for the capped link, the rsync "
                 "daemon keeps owners)")
    for tool in ("rsync", "iptables"):
        if shutil.which(tool) is None:
            sys.exit(f"bench/unshelve.py needs {tool}")
    need = (args.instances * 3 + 2) * (args.base_mb * 1024 * 1024 + args.own_kb * 1024)
    free = shutil.disk_usage(tempfile.gettempdir()).free
    if free < need * 1.3:
        sys.exit(f"not enough disk: about {need * 1.3 / 1e9:.1f} GB needed, "
                 f"{free / 1e9:.1f} GB free")
    # SIGTERM (timeout, a CI runner) unwinds like Ctrl-C, so the fleet is stopped
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    work = Path(tempfile.mkdtemp(prefix="corral-bench-unshelve-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    env.update(CORRAL_CONTEXT=str(work / "context.json"), NO_COLOR="1")
    try:
        run(args, work, env)
    finally:
        subprocess.run([*CLI, "down", "--timeout", "5"], env=env, capture_output=True)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


@contextlib.contextmanager
def capped(upstream: tuple[str, int], rate_mbit: float, redirect_port: bool
           ) -> Iterator[RateProxy | None]:
    if not rate_mbit:
        yield None
        return
    with RateProxy(upstream, rate_mbit * 1e6) as proxy:
        if redirect_port:
            with redirect(upstream[1], proxy):
                yield proxy
        else:
            yield proxy


def run(args: argparse.Namespace, work: Path, env: dict[str, str]) -> None:
    n = args.instances
    data = work / "data"
    cli(env, "up", "--data", str(data), "--hosts", str(args.hosts))
    ctx = load_context(work / "context.json")
    assert ctx is not None
    api = urlsplit(ctx.url.split(",")[0])
    assert api.hostname == "127.0.0.1" and api.port, ctx.url
    base_tree(work / "base", args.base_mb)
    cli(env, "image", "import", "base", str(work / "base"))
    names = [f"i{k:03d}" for k in range(n)]
    own = args.own_kb * 1024
    cmd = ["sh", "-c", f"[ -f own.bin ] || {{ head -c {own} /dev/urandom > own.tmp && "
                       "mv own.tmp own.bin; }; exec sleep 36000"]
    store = work / "store"
    store.mkdir()
    with Client(ctx.url, ctx.token, timeout=600, ca_file=ctx.ca_file) as c, \
            ThreadPoolExecutor(max(args.parallel, 4)) as pool:
        list(pool.map(lambda nm: c.create(CreateInstance(
            name=nm, command=cmd, image="base", cpus=0.01, memory_bytes=1 << 20)), names))
        wait_own(c, data, names, own)
        print(f"{n} instances of a {args.base_mb} MB base (+{args.own_kb} KB own data each) on "
              f"{args.hosts} hosts; " + (f"link capped at {args.rate_mbit:g} Mbit/s each way "
                                         "(rate-limiting proxy)" if args.rate_mbit else
                                         "no link cap (loopback)"), flush=True)
    rows: list[dict[str, float]] = []
    with RsyncDaemon(work, {"store": store}) as rsyncd, \
            capped(("127.0.0.1", rsyncd.port), args.rate_mbit, False) as bproxy, \
            capped(("127.0.0.1", api.port), args.rate_mbit, True) as cproxy:
        store_port = bproxy.port if bproxy else rsyncd.port
        for r in range(args.rounds):
            rows.append(one_round(args, r, data, work, env, ctx.url, ctx.token, ctx.ca_file,
                                  names, store, rsyncd, store_port, bproxy, cproxy))
    report(args, rows)


def wait_own(c: Client, data: Path, names: list[str], own: int) -> None:
    deadline = time.monotonic() + 300
    while True:
        views = {v.name: v for v in c.instances()}
        ready = [nm for nm in names if views.get(nm) and views[nm].host and
                 (disk_of(data, str(views[nm].host), nm) / "own.bin").exists()]
        if len(ready) == len(names):
            return
        if time.monotonic() > deadline:
            late = sorted(set(names) - set(ready))
            raise SystemExit("instances without their own data after 300s: " + ", ".join(
                f"{nm} ({views[nm].state} on {views[nm].host})" if nm in views else nm
                for nm in late))
        time.sleep(0.3)


def moved(proxy: RateProxy | None) -> int:
    return sum(proxy.moved) if proxy else 0


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.monotonic()
    out = fn()
    return time.monotonic() - t0, out


def one_round(args: argparse.Namespace, r: int, data: Path, work: Path, env: dict[str, str],
              url: str, token: str, ca_file: str | None, names: list[str], store: Path,
              rsyncd: RsyncDaemon, store_port: int, bproxy: RateProxy | None,
              cproxy: RateProxy | None) -> dict[str, float]:
    p = args.parallel
    with Client(url, token, timeout=600, ca_file=ca_file) as c:
        hosts = {v.name: str(v.host) for v in c.instances() if v.name in names}
    disks = {nm: disk_of(data, hosts[nm], nm) for nm in names}
    want: dict[str, dict[str, Entry]] = {nm: manifest(disks[nm]) for nm in names}
    row: dict[str, float] = {}
    tag = f"r{r}"

    # baseline shelve: each whole disk to the store
    def push(nm: str) -> int:
        _, sent, _ = run_rsync([*STORE_FLAGS, f"{disks[nm]}/",
                                rsyncd.url("store", f"{tag}-{nm}/", port=store_port)])
        return sent

    b0 = moved(bproxy)
    with ThreadPoolExecutor(p) as pool:
        row["base_shelve_s"], sent = timed(lambda: sum(pool.map(push, names)))
    row["base_shelve_mb"] = sent / 1e6
    row["base_shelve_link_mb"] = (moved(bproxy) - b0) / 1e6

    # corral shelve: every disk leaves its host
    c0 = moved(cproxy)
    with Client(url, token, timeout=600, ca_file=ca_file) as c, ThreadPoolExecutor(p) as pool:
        row["corral_shelve_s"], ops = timed(
            lambda: list(pool.map(lambda nm: follow(c, c.shelve(nm, 0)), names)))
    row["corral_shelve_mb"] = sum(int((o.result or {}).get("uploaded_bytes") or 0)
                                 for o in ops) / 1e6
    row["corral_shelve_link_mb"] = (moved(cproxy) - c0) / 1e6
    shelved_at = time.time()
    left = [str(d) for d in disks.values() if d.exists()]
    if left:
        raise SystemExit(f"shelve --offload-after 0 left disks on their hosts: {left}")

    deadline = time.monotonic() + args.sweep_timeout
    # agents sweep released chunks within a minute
    while not args.warm and not_swept(data, set(hosts.values()), shelved_at):
        if time.monotonic() > deadline:
            raise SystemExit(f"chunk caches not swept empty: "
                             f"{not_swept(data, set(hosts.values()), shelved_at)}")
        time.sleep(1.0)

    # baseline unshelve: each whole disk back from the store into an empty directory
    scratch = work / f"restored-{tag}"
    scratch.mkdir()

    def pull(nm: str) -> int:
        _, _, got = run_rsync([*STORE_FLAGS, rsyncd.url("store", f"{tag}-{nm}/",
                                                        port=store_port), f"{scratch / nm}/"])
        return got

    b0 = moved(bproxy)
    with ThreadPoolExecutor(p) as pool:
        row["base_unshelve_s"], got = timed(lambda: sum(pool.map(pull, names)))
    row["base_unshelve_mb"] = got / 1e6
    row["base_unshelve_link_mb"] = (moved(bproxy) - b0) / 1e6
    for nm in names:
        check(want[nm], scratch / nm, f"baseline unshelve of {nm}")
    shutil.rmtree(scratch)
    for nm in names:
        shutil.rmtree(store / f"{tag}-{nm}")

    # corral unshelve
    c0 = moved(cproxy)
    row["corral_unshelve_s"], out = timed(
        lambda: cli(env, "unshelve", "--all", "--parallel", str(p), "--json"))
    row["corral_unshelve_link_mb"] = (moved(cproxy) - c0) / 1e6
    results: list[dict[str, Any]] = json.loads(out)
    bad = [x for x in results if x["result"] != "succeeded"]
    if len(results) != len(names) or bad:
        raise SystemExit(f"corral unshelve: {bad or results}")
    row["corral_unshelve_mb"] = sum(int(x["fetched_bytes"] or 0) for x in results) / 1e6
    for x in results:
        check(want[x["name"]], disk_of(data, x["host"], x["name"]),
              f"corral unshelve of {x['name']} onto {x['host']}")
    print(f"round {r + 1}: shelve corral {row['corral_shelve_s']:.1f}s / baseline "
          f"{row['base_shelve_s']:.1f}s; unshelve corral {row['corral_unshelve_s']:.1f}s "
          f"({row['corral_unshelve_mb']:.1f} MB fetched, {row['corral_unshelve_link_mb']:.1f} "
          f"MB on the link) / baseline {row['base_unshelve_s']:.1f}s "
          f"({row['base_unshelve_mb']:.1f} MB, {row['base_unshelve_link_mb']:.1f} MB on the "
          f"link); {len(names)} + {len(names)} unshelved trees checked", flush=True)
    return row


def report(args: argparse.Namespace, rows: list[dict[str, float]]) -> None:
    def col(k: str) -> list[float]:
        return [x[k] for x in rows]

    def med(k: str) -> str:
        xs = col(k)
        return f"{statistics.median(xs):.1f} ({min(xs):.1f}/{max(xs):.1f})"

    cap = f"{args.rate_mbit:g} Mbit/s" if args.rate_mbit else "no cap"
    if args.warm:
        cap += " (WARM chunk caches: not a figure to quote)"
    print(f"\n{args.instances} instances, {args.parallel} in flight, {args.rounds} rounds, link "
          f"{cap}; median (min/max); every unshelved tree checked against the original")
    print(f"{'':34} {'wall s':>18} {'MB (tool)':>18} {'MB on the link':>18}")
    for label, k in (("shelve: corral", "corral_shelve"), ("shelve: rsync+zstd whole disk",
                                                          "base_shelve"),
                     ("unshelve: corral", "corral_unshelve"),
                     ("unshelve: rsync+zstd whole disk", "base_unshelve")):
        link = med(f"{k}_link_mb") if args.rate_mbit else "-"
        print(f"{label:34} {med(f'{k}_s'):>18} {med(f'{k}_mb'):>18} {link:>18}")

    def m(k: str) -> float:
        return statistics.median(col(k))

    suffix = f"_{args.rate_mbit:g}mbit" if args.rate_mbit else "_uncapped"
    print(f"figure: unshelve.corral_s{suffix} {m('corral_unshelve_s'):.2f} s")
    print(f"figure: unshelve.corral_s{suffix}.baseline {m('base_unshelve_s'):.2f} s")
    print(f"figure: unshelve.corral_mb {m('corral_unshelve_mb'):.1f} MB")
    print(f"figure: unshelve.corral_mb.baseline {m('base_unshelve_mb'):.1f} MB")
    print(f"figure: unshelve.shelve_s{suffix} {m('corral_shelve_s'):.2f} s")
    print(f"figure: unshelve.shelve_s{suffix}.baseline {m('base_shelve_s'):.2f} s")
    print(f"figure: unshelve.speedup{suffix} "
          f"{m('base_unshelve_s') / m('corral_unshelve_s'):.2f} x")


if __name__ == "__main__":
    main()
