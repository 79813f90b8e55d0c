#!/usr/bin/env python3
"""Figure: per-instance CPU and memory accounting, corral beside what users run instead.

A one-host local fleet (``corral up``; ``--netns`` with runc containers as root, else the
process driver, which as root puts each instance in a cgroup of its own) runs N instances
through the CLI: ``--burners`` busy loops whose CPU reservation (``--cpus``, which is also
their CFS quota) pins them at a known figure (5 % of a core by default), and idlers
(``sleep``). For ``--window`` seconds, per round, three collectors watch the same instances at
the same time:

* **corral**: the agent's own accounting, read the way an operator reads it: the API's
  instance list (what ``corral ls`` prints), polled every second: each burner's ``cpu_core_pct``
  averaged over the distinct samples, and its ``memory_bytes``; its cost is the agent's
  whole-process CPU time over the window (heartbeats, capture and all, so an upper bound);
* **script** (``.baseline``): what people write by hand: one Python loop that every
  ``--interval`` reads ``cpuacct.usage`` and ``memory.usage_in_bytes`` (cgroup v1) or
  ``cpu.stat`` and ``memory.current`` (v2) of every instance's cgroup and appends a line per
  instance; a CPU rate from its first and last reading; its cost is its own CPU time;
* **runc** (``.baseline_runc``, runc driver only): one long-lived ``runc events --interval``
  per container, as runc offers it; a rate from the first and last stats event (stamped as
  the bench reads them); its cost is the CPU time of all those processes.

The truth is the kernel's cumulative counter: each burner's cgroup read by the bench at the
start and at the end of the window. Accuracy is each collector's CPU rate against that (the
median over burners of the relative error, %), and its memory figure against the kernel's at
the end (median relative error over every instance). Cost is collector CPU milliseconds per
instance per minute. Median (min-max) of ``--rounds``. Everything started is removed at the
end (``corral down`` stops every instance), also on Ctrl-C.

    .venv/bin/python bench/accounting.py            # N=50, runc when root
    .venv/bin/python bench/accounting.py --long     # N=500, process driver (see --help)
    .venv/bin/python bench/accounting.py --instances 4 --burners 2 --window 5 --rounds 1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import selectors
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

CLI = [sys.executable, "-m", "corral.cli"]
CGROUP = Path("/sys/fs/cgroup")
TICK = os.sysconf("SC_CLK_TCK")
WORKERS = 4

#: the hand-written collector: argv = list file, out file, interval, seconds
SCRIPT = r'''
import sys, time
listing, out = sys.argv[1], sys.argv[2]
interval, seconds = float(sys.argv[3]), float(sys.argv[4])
cgroups = [line.split() for line in open(listing)]
def cpu_ns(path):
    text = open(path).read()
    if path.endswith("cpu.stat"):
        return int(text.split("usage_usec ", 1)[1].split()[0]) * 1000
    return int(text)
end = time.monotonic() + seconds
with open(out, "w") as fh:
    while time.monotonic() < end:
        t = time.time()
        for name, cpu, mem in cgroups:
            try:
                fh.write(f"{t} {name} {cpu_ns(cpu)} {int(open(mem).read())}\n")
            except (OSError, ValueError):
                pass
        fh.flush()
        time.sleep(max(0.0, interval - (time.time() - t)))
'''


@dataclass
class Cgroup:
    name: str
    cpu: Path
    mem: Path

    def cpu_ns(self) -> int:
        text = self.cpu.read_text()
        if self.cpu.name == "cpu.stat":
            return int(text.split("usage_usec ", 1)[1].split()[0]) * 1000
        return int(text)

    def mem_bytes(self) -> int:
        return int(self.mem.read_text())


def find_cgroup(name: str) -> Cgroup:
    """The instance's cgroup, v1 (cpuacct + memory) or v2, wherever its agent's scope is."""
    v1 = list(CGROUP.glob(f"cpuacct/corral/*/{name}"))
    if v1:
        mem = CGROUP / "memory" / v1[0].relative_to(CGROUP / "cpuacct")
        return Cgroup(name, v1[0] / "cpuacct.usage", mem / "memory.usage_in_bytes")
    v2 = list(CGROUP.glob(f"corral/*/{name}")) + list(CGROUP.glob(f"unified/corral/*/{name}"))
    if v2 and (v2[0] / "cpu.stat").exists():
        return Cgroup(name, v2[0] / "cpu.stat", v2[0] / "memory.current")
    raise SystemExit(f"no cgroup for {name}: the process driver needs root (cgroup v1) or a "
                     "delegated cgroup v2 for this bench")


def keep_logs(root: Path, dest: Path) -> None:
    """A failed run keeps the fleet's logs (the rest of it goes) for a look afterwards."""
    for log in (root / "data").rglob("*.log"):
        if log.stat().st_size < 200 * 1024 * 1024:
            target = dest / log.relative_to(root / "data")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(log, target)
    print(f"the run failed: the fleet's logs are kept in {dest}", file=sys.stderr)


def sweep_cgroups(names: list[str]) -> None:
    """Remove (and name) any cgroup of the bench's instances that ``corral down`` left."""
    left = [d for name in names for d in CGROUP.glob(f"*/corral/*/{name}") if d.is_dir()]
    for d in left:
        with contextlib.suppress(OSError):
            d.rmdir()
            with contextlib.suppress(OSError):
                d.parent.rmdir()  # the agent's scope, once empty
    if left:
        print(f"corral down left {len(left)} cgroup(s) of its instances, e.g. {left[0]}; "
              "removed", file=sys.stderr)


def proc_cpu_s(pid: int, children: bool = False) -> float:
    """CPU seconds of a live process (every thread), with its reaped children if asked."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / TICK


@dataclass
class Collected:
    """One collector's view of one window: CPU rates (% of a core) per burner, the last
    memory figure per instance, and its own CPU seconds."""

    cpu_pct: dict[str, float] = field(default_factory=dict)
    mem: dict[str, int] = field(default_factory=dict)
    cost_s: float = 0.0


def rate_pct(first: tuple[float, int], last: tuple[float, int]) -> float | None:
    dt = last[0] - first[0]
    return None if dt <= 0 else 100.0 * (last[1] - first[1]) / 1e9 / dt


# -- the fleet ---------------------------------------------------------------------------------

class Fleet:
    def __init__(self, root: Path, netns: bool) -> None:
        self.root, self.netns = root, netns
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
        self.env["CORRAL_CONTEXT"] = str(root / "context.json")
        self.ctx: dict[str, Any] = {}

    def cli(self, *args: str, timeout: float = 300) -> str:
        proc = subprocess.run([*CLI, *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout)
        if proc.returncode != 0:
            raise SystemExit(f"corral {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc.stdout

    def up(self) -> None:
        self.cli("up", "--data", str(self.root / "data"), "--hosts", "1",
                 *(["--netns"] if self.netns else []))
        self.ctx = json.loads((self.root / "context.json").read_text())

    def down(self) -> None:
        with contextlib.suppress(BaseException):
            self.cli("down", "--timeout", "5", timeout=900)

    def client(self) -> Any:
        from corral.api.client import Client

        return Client(self.ctx["url"], self.ctx["token"], ca_file=self.ctx.get("ca_file"))

    @property
    def agent_pid(self) -> int:
        return int(self.ctx["agents"][0]["pid"])

    @property
    def runc_root(self) -> Path:
        argv: list[str] = self.ctx["agents"][0]["argv"]
        return Path(argv[argv.index("--data") + 1]) / "runc"


def start_instances(fleet: Fleet, names: list[str], burners: set[str], burn_cpus: float,
                    idle_cpus: float, memory: str, rootfs: Path | None) -> None:
    extra = ["--driver", "runc", "--from", str(rootfs)] if rootfs else ["--driver", "process"]

    def one(name: str) -> None:
        if name in burners:
            fleet.cli("run", name, "--cpus", str(burn_cpus), "--memory", memory, *extra, "--",
                      "sh", "-c", "while :; do :; done")
        else:
            fleet.cli("run", name, "--cpus", str(idle_cpus), "--memory", memory, *extra, "--",
                      "sleep", "36000")

    with ThreadPoolExecutor(WORKERS) as pool:
        for i, fut in enumerate([pool.submit(one, n) for n in names], 1):
            fut.result()
            if i % 50 == 0:
                print(f"  started {i}/{len(names)}", file=sys.stderr, flush=True)


def wait_sampled(fleet: Fleet, names: list[str], timeout: float) -> None:
    """Until every instance runs and the API shows a CPU figure for it."""
    want = set(names)
    deadline = time.monotonic() + timeout
    with fleet.client() as c:
        while time.monotonic() < deadline:
            ready = {i.name for i in c.instances() if i.name in want and i.state == "running"
                     and i.usage.cpu_core_pct is not None}
            if ready == want:
                return
            time.sleep(1.0)
    raise SystemExit(f"{len(want - ready)} instances never showed figures, e.g. "
                     f"{sorted(want - ready)[:3]}")


# -- the collectors ----------------------------------------------------------------------------

def corral_poll(fleet: Fleet, names: set[str], burners: set[str], stop: threading.Event,
                out: Collected) -> None:
    samples: dict[str, dict[float, float]] = {n: {} for n in burners}
    with fleet.client() as c:
        while not stop.is_set():
            t = time.monotonic()
            for i in c.instances():
                if i.name not in names:
                    continue
                u = i.usage
                if i.name in burners and u.cpu_core_pct is not None and u.sampled_at:
                    samples[i.name][u.sampled_at] = u.cpu_core_pct
                if u.memory_bytes is not None:
                    out.mem[i.name] = u.memory_bytes
            stop.wait(max(0.0, 1.0 - (time.monotonic() - t)))
    out.cpu_pct = {n: statistics.fmean(s.values()) for n, s in samples.items() if s}


def script_collect(cgroups: list[Cgroup], workdir: Path, interval: float, seconds: float
                   ) -> tuple[subprocess.Popen[bytes], Path]:
    listing, out, prog = workdir / "cgroups.txt", workdir / "script.out", workdir / "collect.py"
    listing.write_text("".join(f"{g.name} {g.cpu} {g.mem}\n" for g in cgroups))
    prog.write_text(SCRIPT)
    return subprocess.Popen(["python3", str(prog), str(listing), str(out), str(interval),
                             str(seconds)]), out


def script_result(proc: subprocess.Popen[bytes], out: Path, burners: set[str]) -> Collected:
    _, status, ru = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    res = Collected(cost_s=ru.ru_utime + ru.ru_stime)
    first: dict[str, tuple[float, int]] = {}
    last: dict[str, tuple[float, int]] = {}
    for line in out.read_text().splitlines():
        t, name, cpu, mem = line.split()
        first.setdefault(name, (float(t), int(cpu)))
        last[name] = (float(t), int(cpu))
        res.mem[name] = int(mem)
    for name in burners:
        if name in first and (r := rate_pct(first[name], last[name])) is not None:
            res.cpu_pct[name] = r
    return res


class RuncEvents:
    """One ``runc events --interval`` per container; one thread stamps their lines."""

    def __init__(self, root: Path, names: list[str], interval: float) -> None:
        self.procs = {n: subprocess.Popen(
            ["runc", "--root", str(root), "events", "--interval", f"{interval}s", n],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) for n in names}
        self.seen: dict[str, list[tuple[float, int, int]]] = {n: [] for n in names}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        sel = selectors.DefaultSelector()
        bufs: dict[str, bytes] = {}
        for name, p in self.procs.items():
            assert p.stdout is not None
            os.set_blocking(p.stdout.fileno(), False)
            sel.register(p.stdout, selectors.EVENT_READ, name)
            bufs[name] = b""
        while not self.stop.is_set():
            for key, _ in sel.select(0.2):
                name = str(key.data)
                with contextlib.suppress(BlockingIOError):
                    chunk = os.read(key.fd, 1 << 16)
                    if not chunk:
                        sel.unregister(key.fileobj)
                        continue
                    bufs[name] += chunk
                    *whole, bufs[name] = bufs[name].split(b"\n")
                    at = time.time()
                    for raw in whole:
                        with contextlib.suppress(ValueError, KeyError, TypeError):
                            d = json.loads(raw)["data"]
                            self.seen[name].append((at, int(d["cpu"]["usage"]["total"]),
                                                    int(d["memory"]["usage"]["usage"])))

    def finish(self, burners: set[str]) -> Collected:
        cost = 0.0
        for p in self.procs.values():
            with contextlib.suppress(OSError, ValueError, IndexError):
                cost += proc_cpu_s(p.pid)
        self.close()
        res = Collected(cost_s=cost)
        for name, rows in self.seen.items():
            if rows:
                res.mem[name] = rows[-1][2]
            if name in burners and len(rows) >= 2:
                r = rate_pct(rows[0][:2], rows[-1][:2])
                if r is not None:
                    res.cpu_pct[name] = r
        return res

    def close(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        self.stop.set()
        self.thread.join(5)


# -- one round ---------------------------------------------------------------------------------

@dataclass
class Round:
    truth_pct: dict[str, float]
    truth_mem: dict[str, int]
    ways: dict[str, Collected]
    window_s: float


def one_round(fleet: Fleet, names: list[str], burners: set[str], cgroups: list[Cgroup],
              window: float, interval: float, runc: bool, workdir: Path,
              running: list[RuncEvents]) -> Round:
    burn_groups = [g for g in cgroups if g.name in burners]
    events = RuncEvents(fleet.runc_root, names, interval) if runc else None
    if events is not None:
        running.append(events)
    stop = threading.Event()
    corral = Collected()
    poller = threading.Thread(target=corral_poll,
                              args=(fleet, set(names), burners, stop, corral), daemon=True)
    a0 = proc_cpu_s(fleet.agent_pid, children=True)
    k0 = {g.name: (time.time(), g.cpu_ns()) for g in burn_groups}
    t0 = time.monotonic()
    script, script_out = script_collect(cgroups, workdir, interval, window)
    poller.start()
    time.sleep(max(0.0, window - (time.monotonic() - t0)))
    stop.set()
    corral.cost_s = proc_cpu_s(fleet.agent_pid, children=True) - a0
    k1 = {g.name: (time.time(), g.cpu_ns()) for g in burn_groups}
    truth_mem = {g.name: g.mem_bytes() for g in cgroups}
    elapsed = time.monotonic() - t0
    poller.join(10)
    ways = {"corral": corral, "script": script_result(script, script_out, burners)}
    if events is not None:
        ways["runc"] = events.finish(burners)
        running.remove(events)
    truth = {n: r for n in k0 if (r := rate_pct(k0[n], k1[n])) is not None}
    return Round(truth, truth_mem, ways, elapsed)


def rel_err_pct(got: dict[str, float] | dict[str, int], truth: dict[str, float] |
                dict[str, int]) -> tuple[float, int]:
    """(median relative error in %, how many instances the collector had no figure for)."""
    errs = [abs(got[n] - t) / t * 100 for n, t in truth.items() if n in got and t > 0]
    missing = sum(1 for n in truth if n not in got)
    return (statistics.median(errs) if errs else float("nan")), missing


def fmt(values: list[float], spec: str = ".1f") -> str:
    return (f"{statistics.median(values):{spec}} ({min(values):{spec}}-"
            f"{max(values):{spec}})")


def main(argv: list[str] | None = None) -> int:
    root_ok = os.geteuid() == 0 and shutil.which("runc") is not None
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[1])
    p.add_argument("--driver", choices=("runc", "process"),
                   help="runc (default as root at N=50) or process (default with --long: "
                        "500 containers in network-namespace fleets take too long to start "
                        "on 2 cores)")
    p.add_argument("--instances", type=int, default=50)
    p.add_argument("--long", action="store_true", help="500 instances")
    p.add_argument("--burners", type=int, default=10)
    p.add_argument("--burn-cpus", type=float, default=0.05, help="each burner's quota, cores")
    p.add_argument("--window", type=float, default=60.0, help="seconds per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--interval", type=float, default=1.0,
                   help="the baselines' polling interval (the agent samples every second)")
    args = p.parse_args(argv)
    n = 500 if args.long else args.instances
    driver = args.driver or ("runc" if root_ok and not args.long else "process")
    if driver == "runc" and not root_ok:
        raise SystemExit("the runc driver needs root and runc (scripts/bootstrap)")
    if args.burners > n:
        p.error("--burners is more than --instances")

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    base = Path(tempfile.mkdtemp(prefix="corral-bench-acct-"))
    fleet = Fleet(base / "fleet", netns=driver == "runc")
    fleet.root.mkdir()
    tag = f"a{os.getpid()}"
    names = [f"{tag}-{i}" for i in range(n)]
    burners = set(names[:args.burners])
    idle_cpus = max(0.001, min(0.01, 1.0 / n))
    running: list[RuncEvents] = []
    rounds: list[Round] = []
    idle_ms_min = float("nan")
    load0 = os.getloadavg()
    t_start = time.monotonic()
    try:
        rootfs = None
        if driver == "runc":
            from corral.agent.busybox import build_busybox_rootfs

            rootfs = build_busybox_rootfs(base / "rootfs")
        print(f"fleet up ({driver}), starting {n} instances...", file=sys.stderr, flush=True)
        fleet.up()
        a0, t0 = proc_cpu_s(fleet.agent_pid, children=True), time.monotonic()
        time.sleep(10.0)
        idle_ms_min = ((proc_cpu_s(fleet.agent_pid, children=True) - a0) * 1000
                       / ((time.monotonic() - t0) / 60))
        start_instances(fleet, names, burners, args.burn_cpus, idle_cpus,
                        "32M" if driver == "runc" else "16M", rootfs)
        wait_sampled(fleet, names, 300)
        cgroups = [find_cgroup(name) for name in names]
        time.sleep(3.0)
        for r in range(1, args.rounds + 1):
            rd = one_round(fleet, names, burners, cgroups, args.window, args.interval,
                           driver == "runc", base, running)
            rounds.append(rd)
            summary = ", ".join(
                f"{w}: cpu err {rel_err_pct(c.cpu_pct, rd.truth_pct)[0]:.2f}% cost "
                f"{c.cost_s * 1000 / n / (rd.window_s / 60):.1f} ms/inst/min"
                for w, c in rd.ways.items())
            print(f"  round {r}: kernel {statistics.fmean(rd.truth_pct.values()):.2f}% of a "
                  f"core per burner; {summary}", flush=True)
    except KeyboardInterrupt:
        print("interrupted; cleaning up", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for ev in running:
            ev.close()
        if len(rounds) < args.rounds:
            keep_logs(fleet.root, Path(tempfile.gettempdir()) / f"corral-bench-acct-logs-{tag}")
        print("removing the fleet...", file=sys.stderr, flush=True)
        fleet.down()
        sweep_cgroups(names)
        shutil.rmtree(base, ignore_errors=True)

    labels = {"corral": "corral (agent, API)", "script": "cgroup-reading script",
              "runc": "runc events --interval"}
    suffix = {"corral": "", "script": ".baseline", "runc": ".baseline_runc"}
    print(f"\nN={n} ({args.burners} burners at a {args.burn_cpus * 100:.0f}% quota, "
          f"{n - args.burners} idlers), driver={driver}, {args.window:.0f} s windows, "
          f"median (min-max) of {len(rounds)} rounds; load average {load0[0]:.1f} at the "
          f"start, {os.getloadavg()[0]:.1f} at the end ({os.cpu_count()} cores; the three "
          f"collectors run at the same time)")
    print(f"the agent with no instance used {idle_ms_min:.0f} CPU ms per minute (in corral's "
          f"cost below, spread over the {n} instances)")
    truth_means = [statistics.fmean(rd.truth_pct.values()) for rd in rounds]
    print(f"kernel counter: a burner used {fmt(truth_means, '.2f')}% of a core "
          f"(quota {args.burn_cpus * 100:.1f}%)")
    print(f"{'collector':24} {'CPU rate error %':>20} {'vs quota %':>18} "
          f"{'memory error %':>18} {'CPU ms/inst/min':>22} {'no figure':>9}")
    figures: list[str] = []
    for way in rounds[0].ways:
        cpu_err = [rel_err_pct(rd.ways[way].cpu_pct, rd.truth_pct)[0] for rd in rounds]
        quota = {name: args.burn_cpus * 100 for name in burners}
        quota_err = [rel_err_pct(rd.ways[way].cpu_pct, quota)[0] for rd in rounds]
        mem_err = [rel_err_pct(rd.ways[way].mem, rd.truth_mem)[0] for rd in rounds]
        cost = [rd.ways[way].cost_s * 1000 / n / (rd.window_s / 60) for rd in rounds]
        missing = sum(rel_err_pct(rd.ways[way].mem, rd.truth_mem)[1] for rd in rounds)
        print(f"{labels[way]:24} {fmt(cpu_err, '.2f'):>20} {fmt(quota_err, '.2f'):>18} "
              f"{fmt(mem_err, '.2f'):>18} {fmt(cost, '.2f'):>22} {missing:>9}")
        s = suffix[way]
        figures += [f"figure: accounting.cpu_error{s} {statistics.median(cpu_err):.2f} %",
                    f"figure: accounting.memory_error{s} {statistics.median(mem_err):.2f} %",
                    f"figure: accounting.cost_n{n}{s} {statistics.median(cost):.2f} "
                    f"cpu_ms/instance/min"]
    print(f"(total run {time.monotonic() - t_start:.0f} s)\n")
    print("\n".join(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
