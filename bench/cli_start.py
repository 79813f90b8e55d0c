#!/usr/bin/env python3
"""Figure: wall time of ``corral ls --json`` against a running fleet, beside ``python -c pass``.

Issue 9, item 7: operators type ``corral ls`` all day, and incus or nomad answer in tens of
milliseconds. A CLI command is an interpreter start, its imports, one HTTP request and the
printing; the baseline is the same interpreter starting and doing nothing, so the difference is
what corral itself costs (imports above all).

The run: ``corral up`` a one-host local fleet in a temp dir (its own ``CORRAL_CONTEXT``, so no
default fleet is touched), ``corral run`` a few ``sleep`` instances, then ``--rounds`` rounds of
``python -c pass``, ``corral ls --json`` and ``corral ls`` (the table), interleaved so that each
sees the same machine. Every ``ls --json`` answer must parse and list exactly the instances the
bench created. The fleet is torn down at the end, also on failure or Ctrl-C. The load average
before and after is printed: other work on the machine shows in every figure.

An installed corral starts from compiled bytecode (pip writes it). A checkout run with
``PYTHONDONTWRITEBYTECODE`` set compiles corral's own modules at every start instead; the bench
then gives the commands a bytecode cache of their own (``PYTHONPYCACHEPREFIX`` in its temp dir,
filled by the first run), unless ``--compile-each-run`` asks to measure that case.

    .venv/bin/python bench/cli_start.py               # 20 rounds, under a minute
    .venv/bin/python bench/cli_start.py --rounds 50
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path


def corral_cmd() -> list[str]:
    """The ``corral`` an operator types (the console script next to this interpreter)."""
    script = Path(sys.executable).parent / "corral"
    if script.exists():
        return [str(script)]
    found = shutil.which("corral")
    return [found] if found else [sys.executable, "-m", "corral.cli"]


class Fleet:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
        self.env["CORRAL_CONTEXT"] = str(root / "context.json")
        self.corral = corral_cmd()

    def cli(self, *args: str, timeout: float = 180) -> str:
        proc = subprocess.run([*self.corral, *args], env=self.env, capture_output=True,
                              text=True, timeout=timeout)
        if proc.returncode != 0:
            raise SystemExit(f"corral {' '.join(args)} exited {proc.returncode}: "
                             f"{proc.stderr.strip()}")
        return proc.stdout


@contextlib.contextmanager
def fleet(root: Path) -> Iterator[Fleet]:
    f = Fleet(root)
    try:
        f.cli("up", "--data", str(root / "data"), "--hosts", "1")
        yield f
    finally:
        with contextlib.suppress(Exception):
            f.cli("down", "--timeout", "5")


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """(wall seconds, CPU seconds of the child, stdout) of one run, which must succeed."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()}")
    return wall, cpu, proc.stdout


def check_listing(out: str, names: set[str]) -> None:
    rows = json.loads(out)
    listed = {r["name"] for r in rows}
    if listed != names:
        raise SystemExit(f"corral ls --json listed {sorted(listed)}, expected {sorted(names)}")
    if any(r["state"] != "running" or not r["host"] for r in rows):
        raise SystemExit(f"an instance is not running on a host: {out}")


def summary(values: list[float]) -> str:
    return (f"median {statistics.median(values):.3f} s  min {min(values):.3f} s  "
            f"max {max(values):.3f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=20, help="runs of each command")
    ap.add_argument("--instances", type=int, default=3, help="instances ls lists")
    ap.add_argument("--compile-each-run", action="store_true",
                    help="keep PYTHONDONTWRITEBYTECODE if set: corral compiled at every start")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    load_before = os.getloadavg()

    with tempfile.TemporaryDirectory(prefix="corral-bench-cli-") as tmp, \
            fleet(Path(tmp)) as f:
        compiled = "bytecode as written by its first run"
        if os.environ.get("PYTHONDONTWRITEBYTECODE"):
            if args.compile_each_run:
                compiled = "compiled at every start (PYTHONDONTWRITEBYTECODE)"
            else:
                f.env.pop("PYTHONDONTWRITEBYTECODE")
                f.env["PYTHONPYCACHEPREFIX"] = str(Path(tmp) / "pycache")
        names = {f"bench-{i}" for i in range(args.instances)}
        for name in sorted(names):
            f.cli("run", name, "--cpus", "0.01", "--memory", "8M", "--", "sleep", "3600")
        cases = {
            "python -c pass (baseline)": [sys.executable, "-c", "pass"],
            "corral ls --json": [*f.corral, "ls", "--json"],
            "corral ls (table)": [*f.corral, "ls"],
        }
        wall: dict[str, list[float]] = {k: [] for k in cases}
        cpu: dict[str, list[float]] = {k: [] for k in cases}
        for cmd in cases.values():  # warm the page cache and the bytecode cache
            timed(cmd, f.env)
        for _ in range(args.rounds):
            for key, cmd in cases.items():
                w, c, out = timed(cmd, f.env)
                wall[key].append(w)
                cpu[key].append(c)
                if key == "corral ls --json":
                    check_listing(out, names)

    load_after = os.getloadavg()
    print(f"{args.rounds} rounds, {args.instances} instances listed, one-host local fleet, "
          f"{os.cpu_count()} cores, load average {load_before[0]:.2f} before, "
          f"{load_after[0]:.2f} after; corral {compiled}:")
    for key in cases:
        print(f"  {key:26} wall {summary(wall[key])}   "
              f"cpu median {statistics.median(cpu[key]):.3f} s")
    ls = statistics.median(wall["corral ls --json"])
    base = statistics.median(wall["python -c pass (baseline)"])
    print(f"  corral ls --json costs {ls - base:.3f} s above a bare interpreter "
          f"({ls / base:.1f}x)")
    print(f"figure: cli.ls_wall_median {ls:.3f} s")
    print(f"figure: cli.ls_wall_median.baseline {base:.3f} s")
    print(f"figure: cli.ls_table_wall_median {statistics.median(wall['corral ls (table)']):.3f} s")


if __name__ == "__main__":
    main()
