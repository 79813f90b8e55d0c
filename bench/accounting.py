#!/usr/bin/env python3
"""Figure: what watching costs -- the agent's CPU time per instance per sample.

Starts N instances (runc containers by default when root, each ``sleep 3600`` in its own busybox
root; ``--driver process`` needs no root) and measures, on the very same instances in the same
run:

* **corral**: one sampling pass as the agent runs it -- ``driver.stats(handles)`` for all of them,
  CPU accounting, building and encoding the metrics message -- as CPU time of this thread plus any
  children it waited for, averaged over several passes, divided by N;
* **baseline**: what a script would do without corral: shell out once per instance
  (``runc events --stats ID``, or ``ps -o cputime= -p PID`` for the process driver) and parse the
  answer; CPU time of this process and its children (``RUSAGE_CHILDREN``), divided by N.

Every instance is removed at the end, also on Ctrl-C or SIGTERM.

    .venv/bin/python bench/accounting.py            # 1, 100, 500 (runc when root)
    .venv/bin/python bench/accounting.py --quick    # 1, 10, 50
    .venv/bin/python bench/accounting.py --driver process
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from corral.agent.sampler import sample_pass
from corral.bus.codec import encode
from corral.drivers.base import Driver, Handle, Spec
from corral.drivers.registry import make_drivers
from corral.drivers.runc import RuncDriver
from corral.telemetry.accounting import CpuAccountant

WORKERS = 4


@dataclass
class Cost:
    cpu_s: float
    wall_s: float


def _cpu_now(thread_only: bool) -> float:
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    own = time.thread_time() if thread_only else time.process_time()
    return own + kids.ru_utime + kids.ru_stime


@contextmanager
def measured(out: list[Cost], thread_only: bool) -> Iterator[None]:
    c0, w0 = _cpu_now(thread_only), time.perf_counter()
    yield
    out.append(Cost(_cpu_now(thread_only) - c0, time.perf_counter() - w0))


def corral_cost(drv: Driver, handles: list[Handle], passes: int) -> Cost:
    """Average cost of one agent sampling pass over ``handles`` (after one warm-up pass)."""
    acc = CpuAccountant(os.cpu_count() or 1)
    drivers = {drv.name: drv}
    sample_pass(drivers, handles, acc, "bench", 1.0)  # warm-up and accounting baseline
    costs: list[Cost] = []
    figures = 0
    for _ in range(passes):
        with measured(costs, thread_only=True):
            res = sample_pass(drivers, handles, acc, "bench", 1.0)
            encode(res.sample)
        figures = sum(1 for i in res.sample.instances if i.cpu_core_pct is not None)
    if figures != len(handles):
        raise SystemExit(f"corral sampled {figures} of {len(handles)} instances; aborting")
    return Cost(sum(c.cpu_s for c in costs) / passes, sum(c.wall_s for c in costs) / passes)


def baseline_argv(drv: Driver, h: Handle) -> list[str]:
    if isinstance(drv, RuncDriver):
        return ["runc", "--root", str(drv.state_root), "events", "--stats", h.name]
    return ["ps", "-o", "cputime=", "-p", str(h.data["pid"])]


def baseline_cost(drv: Driver, handles: list[Handle]) -> Cost:
    """One pass of shelling out once per instance, parsing what comes back."""
    costs: list[Cost] = []
    with measured(costs, thread_only=False):
        for h in handles:
            out = subprocess.run(baseline_argv(drv, h), capture_output=True, text=True,
                                 check=True).stdout
            if drv.name == "runc":
                json.loads(out)["data"]["cpu"]["usage"]["total"]
    return costs[0]


def start_all(drv: Driver, n: int, root: Path, rootfs: Callable[[Path], str | None],
              handles: list[Handle]) -> None:
    """Grow ``handles`` to ``n`` started instances; each one is recorded as soon as it runs,
    so an interrupt or a failure midway still leaves every started instance to clean up."""
    lock = threading.Lock()

    def one(i: int) -> None:
        name = f"bench-{os.getpid()}-{i}"
        wd = root / "instances" / name
        wd.mkdir(parents=True)
        spec = Spec(name=name, command=["sleep", "3600"], workdir=str(wd), rootfs=rootfs(wd))
        h = drv.start(drv.create(spec))
        with lock:
            handles.append(h)
            if len(handles) % 50 == 0:
                print(f"  started {len(handles)}/{n}", file=sys.stderr, flush=True)

    pool = ThreadPoolExecutor(WORKERS)
    try:
        for fut in [pool.submit(one, i) for i in range(len(handles), n)]:
            fut.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def remove_all(drv: Driver, handles: list[Handle]) -> None:
    def one(h: Handle) -> None:
        with suppress(Exception):
            drv.kill(h, signal.SIGKILL)
        try:
            drv.stop(h, 1.0)
            drv.delete(h)
        except Exception as exc:
            print(f"  cleanup of {h.name} failed: {exc}", file=sys.stderr)

    with ThreadPoolExecutor(WORKERS) as pool:
        list(pool.map(one, handles))


def remove_scope_cgroups(scope: str) -> None:
    """The drivers leave the per-agent parent ``corral/<scope>`` behind; a bench leaves none."""
    for d in Path("/sys/fs/cgroup").glob(f"*/corral/{scope}"):
        with suppress(OSError):
            d.rmdir()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--driver", choices=("runc", "process"),
                   default="runc" if os.geteuid() == 0 and shutil.which("runc") else "process")
    p.add_argument("--counts", default="1,100,500", help="comma-separated instance counts")
    p.add_argument("--quick", action="store_true", help="counts 1,10,50")
    p.add_argument("--passes", type=int, default=10, help="corral passes averaged per count")
    args = p.parse_args(argv)
    counts = sorted({int(c) for c in ("1,10,50" if args.quick else args.counts).split(",")})

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    root = Path(tempfile.mkdtemp(prefix="corral-bench-"))
    scope = f"bench{os.getpid()}"
    drivers, reasons = make_drivers([args.driver], scope, root)
    if args.driver not in drivers:
        print(f"driver {args.driver} unavailable: {reasons.get(args.driver)}", file=sys.stderr)
        return 2
    drv = drivers[args.driver]
    rootfs: Callable[[Path], str | None] = lambda wd: None  # noqa: E731
    if drv.capabilities.needs_rootfs:
        from corral.agent.busybox import build_busybox_rootfs, clone_rootfs

        template = build_busybox_rootfs(root / "rootfs-template")
        rootfs = lambda wd: str(clone_rootfs(template, wd / "rootfs"))  # noqa: E731

    handles: list[Handle] = []
    rows: list[tuple[int, Cost, Cost]] = []
    t0 = time.monotonic()
    try:
        for n in counts:
            print(f"starting {n} {args.driver} instances...", file=sys.stderr, flush=True)
            start_all(drv, n, root, rootfs, handles)
            time.sleep(0.5)
            rows.append((n, corral_cost(drv, handles[:n], args.passes),
                         baseline_cost(drv, handles[:n])))
    except KeyboardInterrupt:
        print("interrupted; cleaning up", file=sys.stderr)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print(f"removing {len(handles)} instances...", file=sys.stderr, flush=True)
        remove_all(drv, handles)
        remove_scope_cgroups(scope)
        shutil.rmtree(root, ignore_errors=True)

    base = "runc events --stats" if args.driver == "runc" else "ps -p PID"
    print(f"\nsampling cost per instance, driver={args.driver}, host cores={os.cpu_count()}, "
          f"corral averaged over {args.passes} passes, baseline = one `{base}` per instance")
    print(f"{'N':>5}  {'corral CPU µs/inst':>18}  {'baseline CPU µs/inst':>20}  {'ratio':>7}  "
          f"{'corral wall µs/inst':>19}  {'baseline wall µs/inst':>21}")
    for n, c, b in rows:
        ratio = b.cpu_s / c.cpu_s if c.cpu_s > 0 else float("inf")
        print(f"{n:>5}  {c.cpu_s / n * 1e6:>18.1f}  {b.cpu_s / n * 1e6:>20.1f}  {ratio:>6.0f}x  "
              f"{c.wall_s / n * 1e6:>19.1f}  {b.wall_s / n * 1e6:>21.1f}")
    print(f"(total run {time.monotonic() - t0:.0f} s)")
    return 0 if len(rows) == len(counts) else 1


if __name__ == "__main__":
    raise SystemExit(main())
