#!/usr/bin/env python3
"""Figure: end-to-end log throughput, capture -> JetStream -> durable sinks, and the loss count.

For each configuration a fresh one-host fleet is started with ``corral up`` (its own data dir,
its own JetStream), ``corral logsink`` processes are started, and one instance prints ``--lines``
numbered lines as fast as awk can (far faster than capture, so capture and sinks are what is
measured). The clock runs from ``corral run`` until every sink's file holds every byte; then
each sink file is compared line by line with what was printed:

* **baseline**: one sink;
* **corral, two places**: two sinks in two directories, consuming the same stream.

Lost lines (printed but missing from a sink) and doubled lines are counted; both must be 0.
Everything started is stopped at the end, also on Ctrl-C.

    .venv/bin/python bench/logs.py                  # 1,000,000 lines, each configuration twice
    .venv/bin/python bench/logs.py --lines 50000 --repeat 1
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

CLI = [sys.executable, "-m", "corral.cli"]
PAD = "x" * 48  # lines of ~70 bytes, like a short access-log line


def line(i: int) -> str:
    return f"gen line {i} {PAD}"


@dataclass
class Result:
    sinks: int
    lines: int
    seconds: float
    lost: int
    doubled: int

    @property
    def rate(self) -> float:
        return self.lines / self.seconds


class Fleet:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
        self.env["CORRAL_CONTEXT"] = str(root / "context.json")
        self.sinks: list[subprocess.Popen[bytes]] = []

    def cli(self, *args: str, timeout: float = 180) -> str:
        proc = subprocess.run([*CLI, *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout)
        if proc.returncode != 0:
            raise SystemExit(f"corral {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc.stdout

    def sink(self, name: str) -> Path:
        d = self.root / f"sink-{name}"
        log = (self.root / f"sink-{name}.log").open("ab")
        self.sinks.append(subprocess.Popen([*CLI, "logsink", "--dir", str(d), "--name", name],
                                           env=self.env, stdout=log, stderr=subprocess.STDOUT))
        return d

    def down(self) -> None:
        for p in self.sinks:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.sinks:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
        with contextlib.suppress(Exception):
            self.cli("down", "--timeout", "5")


@contextlib.contextmanager
def fleet(base: Path, tag: str) -> Iterator[Fleet]:
    f = Fleet(base / tag)
    f.root.mkdir(parents=True)
    try:
        f.cli("up", "--data", str(f.root / "data"), "--hosts", "1")
        yield f
    finally:
        f.down()


def compare(path: Path, n: int) -> tuple[int, int]:
    """(lost, doubled) lines of ``path`` against lines 1..n in order."""
    want = {line(i) for i in range(1, n + 1)}
    seen: set[str] = set()
    doubled = 0
    with contextlib.suppress(FileNotFoundError), path.open() as fh:
        for text in fh:
            text = text.rstrip("\n")
            if text in seen:
                doubled += 1
            seen.add(text)
    return len(want - seen), doubled


def measure(base: Path, sinks: int, n: int, run: int, timeout: float) -> Result:
    tag = f"s{sinks}-r{run}"
    with fleet(base, tag) as f:
        dirs = [f.sink(f"{tag}-{k}") for k in range(sinks)]
        time.sleep(1.0)  # the sinks connect and create their consumers
        want_bytes = sum(len(line(i)) + 1 for i in range(1, n + 1))
        script = (f"awk 'BEGIN {{ for (i = 1; i <= {n}; i++) "
                  f"printf \"gen line %d {PAD}\\n\", i }}'; sleep 3600")
        t0 = time.monotonic()
        f.cli("run", "gen", "--", "sh", "-c", script)
        files = [d / "gen" / "stdout.log" for d in dirs]
        deadline = t0 + timeout
        while True:
            sizes = [p.stat().st_size if p.exists() else 0 for p in files]
            if all(s >= want_bytes for s in sizes):
                break
            if time.monotonic() > deadline:
                print(f"  timed out: sinks hold {sizes} of {want_bytes} bytes", file=sys.stderr)
                break
            time.sleep(0.05)
        seconds = time.monotonic() - t0
        time.sleep(1.0)  # anything doubled would land now
        lost = doubled = 0
        for p in files:
            lo, do = compare(p, n)
            lost, doubled = lost + lo, doubled + do
        f.cli("rm", "--force", "gen")
    return Result(sinks, n, seconds, lost, doubled)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lines", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=2, help="runs per configuration (best kept)")
    ap.add_argument("--timeout", type=float, default=300.0, help="bound on one run, seconds")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    results: dict[int, list[Result]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory(prefix="corral-bench-logs-") as tmp:
        for run in range(args.repeat):
            for sinks in (1, 2):
                r = measure(Path(tmp), sinks, args.lines, run, args.timeout)
                results[sinks].append(r)
                print(f"  run {run + 1}, {sinks} sink(s): {r.rate:,.0f} lines/s "
                      f"({r.seconds:.2f}s), lost {r.lost}, doubled {r.doubled}", flush=True)
    one = max(results[1], key=lambda r: r.rate)
    two = max(results[2], key=lambda r: r.rate)
    lost = sum(r.lost for rs in results.values() for r in rs)
    doubled = sum(r.doubled for rs in results.values() for r in rs)
    print()
    print(f"end-to-end, {args.lines:,} lines of ~{len(line(args.lines)) + 1} bytes, "
          f"capture -> JetStream -> sink file (best of {args.repeat}):")
    print(f"  baseline, one sink     : {one.rate:>10,.0f} lines/s  ({one.seconds:.2f}s)")
    print(f"  corral, two sinks      : {two.rate:>10,.0f} lines/s  ({two.seconds:.2f}s)  "
          f"= {two.rate / one.rate:.2f}x of one sink")
    print(f"  lost lines (all runs, every sink): {lost}")
    print(f"  doubled lines (all runs, every sink): {doubled}")
    if lost or doubled:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
