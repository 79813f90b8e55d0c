"""Standby refresh: corral's warm standby beside what users run instead, an rsync cron job, on
the same tree and the same changes, in one run, through corral's own path.

corral: a local fleet (``corral up``, process driver, dir disks), an instance whose disk holds
the tree, then ``corral standby add`` (the initial copy) and ``corral standby sync`` (a refresh:
a live pass, then a frozen pass over the inotify dirty list); the figures are the operations'
own results (bytes, freeze_ms) and their duration (created to finished on the server), with the
CLI's wall time beside them.

Baseline: the cron job rsync's docs advise for a mirror, ``rsync -aHAX --delete --numeric-ids
--inplace``, from the same source disk to an rsync daemon on loopback TCP (ssh is not set up
here). corral's passes are rsync over its data channel, TLS on loopback TCP: the same class of
transport, with encryption only on corral's side. The cron job never freezes the workload, so
its copy is not crash-consistent while something writes; corral's is.

Each round applies the same change to the source (1 % of files rewritten, 0.5 % appended to,
0.1 % new, 0.1 % deleted; seeded), then runs both methods, alternating which goes first; after
every copy the copy's tree (paths, kinds, modes, owners, sizes, content hashes) must equal the
source's (bench/treecmp.py). The instance only sleeps while the bench changes its disk, so the
source is still between the changes and the checks.

    python bench/standby.py                  # 200 MB in 20,000 files, a few minutes
    python bench/standby.py --long           # 10 GB in 1,000,000 files (tree cached in /var/tmp)
    python bench/standby.py --long --cleanup # drop that cached tree afterwards
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rsyncd import CRON_FLAGS, RsyncDaemon, run_rsync
from treecmp import compare

from corral.api.client import Client
from corral.rig.context import load_context

CLI = [sys.executable, "-m", "corral.cli"]
CACHE = Path("/var/tmp")


def cli(env: dict[str, str], *args: str, timeout: float = 7200) -> str:
    proc = subprocess.run([*CLI, *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"corral {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}")
    return proc.stdout


# -- the tree ---------------------------------------------------------------------------------
def build_tree(root: Path, total_mb: int, files: int, seed: int = 1) -> None:
    """``files`` files (lognormal sizes, scaled to ``total_mb``) in two levels of directories,
    with a few symlinks, hard links, modes and owners that a copy must keep."""
    rnd = random.Random(seed)
    sizes = [rnd.lognormvariate(8.5, 1.3) for _ in range(files)]
    scale = total_mb * 1024 * 1024 / sum(sizes)
    block = os.urandom(4 * 1024 * 1024)
    per_dir = 50
    for i, raw in enumerate(sizes):
        d = root / f"d{i // (per_dir * 40):04d}" / f"s{i // per_dir % 40:02d}"
        if i % per_dir == 0:
            d.mkdir(parents=True, exist_ok=True)
        size = max(1, int(raw * scale))
        off = rnd.randrange(len(block))
        p = d / f"f{i}"
        with p.open("wb") as fh:
            while size > 0:
                piece = block[off:off + size]
                fh.write(piece)
                size -= len(piece)
                off = 0
        if i % 97 == 0:
            p.chmod(0o755)
        elif i % 89 == 0:
            p.chmod(0o600)
        if i % 101 == 0:
            os.chown(p, 1000, 1000)
        if i % 211 == 0:
            (d / f"l{i}").symlink_to(f"f{i}")
        if i % 307 == 0:
            os.link(p, d / f"h{i}")


def cached_tree(total_mb: int, files: int, cleanup: bool) -> tuple[Path, bool]:
    """The --long tree, built once under /var/tmp (a marker says it is whole)."""
    path = CACHE / f"corral-bench-standby-tree-{total_mb}mb-{files}"
    if (path / ".complete").exists():
        return path / "tree", False
    shutil.rmtree(path, ignore_errors=True)
    (path / "tree").mkdir(parents=True)
    build_tree(path / "tree", total_mb, files)
    (path / ".complete").touch()
    return path / "tree", cleanup


def file_list(root: Path) -> list[Path]:
    return sorted(Path(d) / f for d, _, fs in os.walk(root) for f in fs
                  if f.startswith("f") and not os.path.islink(os.path.join(d, f)))


def change(root: Path, files: list[Path], rnd: random.Random) -> dict[str, int]:
    """A realistic change: rewrites (same size, like page files), appends (logs), new and
    deleted files. ``files`` is updated in place."""
    n = len(files)
    k = {"rewritten": max(1, n // 100), "appended": max(1, n // 200),
         "new": max(1, n // 1000), "deleted": max(1, n // 1000)}
    picked = rnd.sample(files, k["rewritten"] + k["appended"] + k["deleted"])
    rew, app = picked[:k["rewritten"]], picked[k["rewritten"]:k["rewritten"] + k["appended"]]
    gone = picked[k["rewritten"] + k["appended"]:]
    moved = 0
    for p in rew:
        size = p.stat().st_size
        with p.open("r+b") as fh:
            fh.write(rnd.randbytes(size))
        moved += size
    for p in app:
        extra = rnd.randbytes(rnd.randrange(512, 16384))
        with p.open("ab") as fh:
            fh.write(extra)
        moved += len(extra)
    for p in gone:
        p.unlink()
        files.remove(p)
    for _ in range(k["new"]):
        d = rnd.choice(files).parent
        p = d / f"fnew{rnd.getrandbits(48):x}"
        data = rnd.randbytes(rnd.randrange(1024, 65536))
        p.write_bytes(data)
        files.append(p)
        moved += len(data)
    k["changed_bytes"] = moved
    return k


# -- the run ----------------------------------------------------------------------------------
def med(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f} ({min(xs):.2f}/{max(xs):.2f})"


def op_figures(raw: str, wall: float) -> dict[str, float]:
    o: dict[str, Any] = json.loads(raw)
    r = o.get("result") or {}
    return {"op_s": float(o["updated_at"]) - float(o["created_at"]), "wall_s": wall,
            "bytes": float(r.get("bytes") or 0), "freeze_ms": float(r.get("freeze_ms") or 0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=200)
    ap.add_argument("--files", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--long", action="store_true", help="10 GB in 1,000,000 files")
    ap.add_argument("--cleanup", action="store_true",
                    help="remove the cached --long tree from /var/tmp at the end")
    ap.add_argument("--keep", action="store_true", help="leave the fleet's files")
    args = ap.parse_args()
    if args.long:
        args.size_mb, args.files = 10240, 1_000_000
    if os.geteuid() != 0:
        sys.exit("bench/standby.py needs root (the rsync daemon keeps owners; the fleet's "
                 "disks are root's)")
    if shutil.which("rsync") is None:
        sys.exit("bench/standby.py needs rsync (apt-get install rsync)")
    # the tree, the source disk, corral's standby and the rsync copy
    cached = (CACHE / f"corral-bench-standby-tree-{args.size_mb}mb-{args.files}" /
              ".complete").exists()
    copies = 3 if args.long and cached else 4  # the tree itself, the disk, two copies
    need = (args.size_mb * 1024 * 1024 * 1.2 + 4096.0 * args.files) * copies
    free = shutil.disk_usage(CACHE if args.long else tempfile.gettempdir()).free
    if free < need:
        sys.exit(f"not enough disk: this run needs about {need / 1e9:.1f} GB free, "
                 f"{free / 1e9:.1f} GB is; try a smaller --size-mb/--files")
    # SIGTERM (timeout, a CI runner) unwinds like Ctrl-C, so the fleet is stopped
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    work = Path(tempfile.mkdtemp(prefix="corral-bench-standby-", dir=CACHE if args.long
                                 else None))
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    env.update(CORRAL_CONTEXT=str(work / "context.json"), NO_COLOR="1")
    drop: Path | None = None
    try:
        drop = run(args, work, env)
    finally:
        subprocess.run([*CLI, "down", "--timeout", "5"], env=env, capture_output=True)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        if drop is not None:
            shutil.rmtree(drop.parent, ignore_errors=True)


def run(args: argparse.Namespace, work: Path, env: dict[str, str]) -> Path | None:
    drop = None
    t0 = time.monotonic()
    if args.long:
        template, cleanup = cached_tree(args.size_mb, args.files, args.cleanup)
        drop = template if cleanup or args.cleanup else None
    else:
        template = work / "template"
        template.mkdir()
        build_tree(template, args.size_mb, args.files)
    print(f"tree: {args.files:,} files, {args.size_mb} MB, ready in "
          f"{time.monotonic() - t0:.1f}s", flush=True)
    data = work / "data"
    cli(env, "up", "--data", str(data), "--hosts", "2")
    ctx = load_context(work / "context.json")
    assert ctx is not None
    cli(env, "run", "web", "--host", "host1", "--driver", "process", "--", "sleep", "86400")
    src = data / "hosts" / "host1" / "disks" / "web"
    deadline = time.monotonic() + 30
    while not src.is_dir():
        if time.monotonic() > deadline:
            raise SystemExit(f"the instance's disk {src} did not appear")
        time.sleep(0.2)
    subprocess.run(["cp", "-a", f"{template}/.", str(src)], check=True)
    standby = data / "hosts" / "host2" / "disks" / ".standby" / "web"
    mirror = work / "mirror"
    mirror.mkdir()
    files = file_list(src)
    print(f"source disk {src}: {len(files):,} regular files", flush=True)

    with RsyncDaemon(work, {"mirror": mirror}) as rsyncd:
        rsync_args = [*CRON_FLAGS, f"{src}/", rsyncd.url("mirror")]

        def corral_initial() -> dict[str, float]:
            t = time.monotonic()
            out = cli(env, "standby", "add", "web", "--host", "host2", "--every", "24h",
                      "--json")
            fig = op_figures(out, time.monotonic() - t)
            fig["checked"] = compare(src, standby, "corral standby add")
            return fig

        def corral_refresh() -> dict[str, float]:
            t = time.monotonic()
            out = cli(env, "standby", "sync", "web", "--json")
            fig = op_figures(out, time.monotonic() - t)
            fig["checked"] = compare(src, standby, "corral standby sync")
            return fig

        def rsync_pass(what: str) -> dict[str, float]:
            took, sent, _ = run_rsync(rsync_args)
            return {"op_s": took, "wall_s": took, "bytes": float(sent), "freeze_ms": 0.0,
                    "checked": compare(src, mirror, what)}

        def rsync_initial() -> dict[str, float]:
            shutil.rmtree(mirror)
            mirror.mkdir()
            return rsync_pass("rsync initial")

        results: dict[str, list[dict[str, float]]] = {k: [] for k in
                                                      ("ci", "ri", "cr", "rr")}
        rm_s: list[float] = []
        for r in range(args.rounds):
            if r:
                # through the API with a long timeout: the CLI's 30 s can run out while the
                # server waits on the agent (see the report of this bench's run)
                t = time.monotonic()
                with Client(ctx.url, ctx.token, timeout=600, ca_file=ctx.ca_file) as c:
                    c.standby_rm("web")
                rm_s.append(time.monotonic() - t)
            first = [("ci", corral_initial), ("ri", rsync_initial)]
            for key, fn in first if r % 2 == 0 else first[::-1]:
                results[key].append(fn())
            print(f"initial {r + 1}: corral {results['ci'][-1]['op_s']:.2f}s, "
                  f"rsync {results['ri'][-1]['op_s']:.2f}s", flush=True)
        if rm_s:
            print(f"standby rm (drops the copy) took {med(rm_s)} s", flush=True)
        rnd = random.Random(7)
        for r in range(args.rounds):
            k = change(src, files, rnd)
            both = [("cr", corral_refresh), ("rr", lambda: rsync_pass("rsync refresh"))]
            for key, fn in both if r % 2 == 0 else both[::-1]:
                results[key].append(fn())
            print(f"refresh {r + 1} ({k['rewritten']} rewritten, {k['appended']} appended, "
                  f"{k['new']} new, {k['deleted']} deleted, {k['changed_bytes'] / 1e6:.1f} MB "
                  f"changed): corral {results['cr'][-1]['op_s']:.2f}s "
                  f"({results['cr'][-1]['freeze_ms']:.1f} ms frozen), "
                  f"rsync {results['rr'][-1]['op_s']:.2f}s", flush=True)
    report(args, results)
    return drop


def report(args: argparse.Namespace, res: dict[str, list[dict[str, float]]]) -> None:
    def col(key: str, field: str, scale: float = 1.0) -> list[float]:
        return [x[field] * scale for x in res[key]]

    print(f"\nstandby of {args.files:,} files / {args.size_mb} MB, {args.rounds} rounds each, "
          "median (min/max); every copy checked equal to the source")
    print(f"{'':30} {'duration s':>20} {'CLI wall s':>20} {'MB sent':>20} {'freeze ms':>20}")
    rows = [("initial: corral standby add", "ci"), ("initial: rsync (cron job)", "ri"),
            ("refresh: corral standby sync", "cr"), ("refresh: rsync (cron job)", "rr")]
    for label, key in rows:
        fz = med(col(key, "freeze_ms")) if key[0] == "c" else "never (not consistent)"
        print(f"{label:30} {med(col(key, 'op_s')):>20} {med(col(key, 'wall_s')):>20} "
              f"{med(col(key, 'bytes', 1e-6)):>20} {fz:>20}")
    print(f"paths checked per copy: {int(res['cr'][-1]['checked']):,}")

    def m(key: str, field: str, scale: float = 1.0) -> float:
        return statistics.median(col(key, field, scale))

    print(f"figure: standby.initial_s {m('ci', 'op_s'):.2f} s")
    print(f"figure: standby.rsync_initial_s {m('ri', 'op_s'):.2f} s")
    print(f"figure: standby.corral_refresh_s {m('cr', 'op_s'):.2f} s")
    print(f"figure: standby.corral_refresh_wall_s {m('cr', 'wall_s'):.2f} s")
    print(f"figure: standby.rsync_refresh_s {m('rr', 'op_s'):.2f} s")
    print(f"figure: standby.corral_freeze_ms {m('cr', 'freeze_ms'):.1f} ms")
    print(f"figure: standby.corral_refresh_mb {m('cr', 'bytes', 1e-6):.2f} MB")
    print(f"figure: standby.rsync_refresh_mb {m('rr', 'bytes', 1e-6):.2f} MB")


if __name__ == "__main__":
    main()
