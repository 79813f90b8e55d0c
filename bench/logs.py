#!/usr/bin/env python3
"""Figure: shipping a tailed access log, corral beside rsyslog, on the same lines in the same run.

A writer appends realistic access-log lines (combined format, ~210 bytes, each ending in the
wall-clock time it was written and its sequence number) to a file. Two ways get every line to a
reader on the other side:

* **corral**: a one-host local fleet (``corral up``, process driver); the writer *is* the
  instance (``corral run --tail access=access.log``), the agent captures the file into
  JetStream, and ``corral logs -f NAME --source access`` (the product's CLI, through the API)
  is the subscriber; the bench reads its output as it comes.
* **rsyslog** (Debian's ``rsyslogd``, two daemons the bench starts with their own config, pid
  file and work directory, ``-n -f CONF -i PIDFILE``, killed after): ``imfile`` tails the
  writer's plain file and forwards as rsyslog's docs advise for reliable forwarding, an action
  queue that is disk-assisted (``queue.type=LinkedList`` + ``queue.filename``,
  ``saveOnShutdown``, retry forever), to a second rsyslogd that writes a file the bench tails:
  ``relp`` (omrelp -> imrelp, application-level acks; ``windowSize=1024``: the default 128
  crawls at ~2,900 lines/s here, and 4096 left the last 128-256 lines of 200,000 stuck in the
  sender's queue, twice out of two) and ``tcp`` (omfwd -> imtcp, plain TCP).

Two phases per round and per way, each a fresh instance or a fresh pair of daemons:

* **flood**: ``--lines`` lines as fast as the writer can (far above either shipper): lines/s is
  the whole count over the time from the first line's timestamp to the last line's arrival;
* **paced**: ``--rate`` lines/s for ``--paced-seconds``, below every shipper's capacity: the
  latency of a line (arrival minus its timestamp; one machine, one clock), p50 and p99.

Checked on every run, for both: lines lost (a sequence number not received within
``--timeout``: rsyslog was seen to hold the last 128-256 lines of a flood in its disk-assisted
queue until the timeout), doubled (one received twice), and out of order (a line arriving after
a later one). Lost or doubled lines fail the bench (exit 1, after the figures); order is
required of corral (it promises per-source order) and reported for rsyslog (its disk-assisted
queues do not keep order). Median (min-max) of ``--rounds``.

    .venv/bin/python bench/logs.py                 # 200,000 lines, 3 rounds
    .venv/bin/python bench/logs.py --long          # 1,000,000 lines
    .venv/bin/python bench/logs.py --lines 2000 --rounds 1 --paced-seconds 1 --baselines tcp
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

CLI = [sys.executable, "-m", "corral.cli"]
RSYSLOGD = shutil.which("rsyslogd") or "/usr/sbin/rsyslogd"
BASELINES = ("relp", "tcp")
#: omrelp's window (frames in flight); see the docstring for why not the default
RELP_WINDOW = 1024

#: the writer, run by ``python3`` (the instance's command, or a plain child for rsyslog). It
#: waits for the go file so the reader is listening before the first line; rate 0 is a flood.
WRITER = r'''
import os, sys, time
path, go = sys.argv[1], sys.argv[4]
n, rate, linger = int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[5])
end = time.monotonic() + 120
while not os.path.exists(go):
    if time.monotonic() > end:
        sys.exit("writer: no go file within 120 s")
    time.sleep(0.005)
UA = "Mozilla/5.0 (X11; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0"
stamp_sec, stamp = -1, ""
with open(path, "a", buffering=1 << 16) as f:
    t0 = time.monotonic()
    for i in range(1, n + 1):
        if rate > 0:
            delay = t0 + (i - 1) / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        now = time.time()
        if int(now) != stamp_sec:
            stamp_sec = int(now)
            stamp = time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(now))
        f.write(f'10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255} - - [{stamp}] '
                f'"GET /shop/item/{i % 9973}?ref=mail HTTP/1.1" 200 {512 + i % 4096} '
                f'"https://shop.example.com/" "{UA}" ts={now:.6f} seq={i}\n')
        if rate > 0:
            f.flush()
time.sleep(linger)
'''


@dataclass
class Run:
    """One phase of one way: what arrived, as (seq, written ts, arrival ts)."""

    way: str
    n: int
    got: list[tuple[int, float, float]] = field(default_factory=list)
    #: the distinct sequence numbers so far (the waiting loop reads its size)
    seen: set[int] = field(default_factory=set)
    #: readers started again after one failed, and the line number the new one resumes after
    restarts: int = 0
    skip_to: int = 0

    def check(self) -> tuple[int, int, int]:
        """(lost, doubled, out of order)."""
        seen: set[int] = set()
        doubled = disorder = top = 0
        for seq, _, _ in self.got:
            if seq in seen:
                doubled += 1
            seen.add(seq)
            if seq < top:
                disorder += 1
            top = max(top, seq)
        lost = sum(1 for s in range(1, self.n + 1) if s not in seen)
        return lost, doubled, disorder

    def first_arrivals(self) -> dict[int, tuple[float, float]]:
        out: dict[int, tuple[float, float]] = {}
        for seq, ts, at in self.got:
            out.setdefault(seq, (ts, at))
        return out

    def rate(self) -> float:
        firsts = self.first_arrivals()
        if not firsts:
            return 0.0
        start = min(ts for ts, _ in firsts.values())
        return len(firsts) / max(1e-9, max(at for _, at in firsts.values()) - start)

    def latency_ms(self, q: float) -> float:
        lat = sorted((at - ts) * 1000 for ts, at in self.first_arrivals().values())
        return lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan")


def parse(text: str) -> tuple[int, float] | None:
    """(seq, ts) of one received line: its last two fields, whatever a shipper put before."""
    parts = text.rsplit(None, 2)
    if len(parts) < 2 or not parts[-1].startswith("seq=") or not parts[-2].startswith("ts="):
        return None
    try:
        return int(parts[-1][4:]), float(parts[-2][3:])
    except ValueError:
        return None


def collect(run: Run, lines: Iterator[str], done: threading.Event) -> None:
    """Record each line's arrival until ``lines`` ends (the reader stops it)."""
    for text in lines:
        at = time.time()
        p = parse(text)
        if p is not None and p[0] > run.skip_to:
            run.got.append((p[0], p[1], at))
            run.seen.add(p[0])
        if done.is_set():
            return


def wait_for(run: Run, timeout: float) -> None:
    """Until every line arrived (then a second more, for any doubled ones) or ``timeout``."""
    deadline = time.monotonic() + timeout
    while len(run.seen) < run.n and time.monotonic() < deadline:
        time.sleep(0.02)
    if time.monotonic() >= deadline:
        print(f"  {run.way}: timed out with {len(run.got)} of {run.n} lines", file=sys.stderr)
    time.sleep(1.0)


def stop(proc: subprocess.Popen[bytes] | subprocess.Popen[str], grace: float = 15.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def stop_when(done: threading.Event, proc: subprocess.Popen[str]) -> None:
    done.wait()
    stop(proc, 5)


# -- corral ------------------------------------------------------------------------------------

class Corral:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
        self.env["CORRAL_CONTEXT"] = str(root / "context.json")
        self.names: list[str] = []

    def cli(self, *args: str, timeout: float = 180) -> str:
        proc = subprocess.run([*CLI, *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout)
        if proc.returncode != 0:
            raise SystemExit(f"corral {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc.stdout

    def up(self) -> None:
        self.cli("up", "--data", str(self.root / "data"), "--hosts", "1")

    def down(self) -> None:
        for name in self.names:
            with contextlib.suppress(BaseException):
                self.cli("rm", "--force", name, timeout=60)
        with contextlib.suppress(BaseException):
            self.cli("down", "--timeout", "5")

    def follow(self, name: str, run: Run, done: threading.Event) -> None:
        """``corral logs -f`` into ``run``; a reader that fails is started again (at most 5
        times, each failure printed): it reads from the first line again, so the lines it
        had already received are skipped, by number, not counted as doubled."""
        errors = self.root / f"reader-{name}.err"
        for attempt in range(6):
            with errors.open("w") as err:
                reader = subprocess.Popen([*CLI, "logs", "-f", name, "--source", "access"],
                                          env=self.env, stdout=subprocess.PIPE, stderr=err,
                                          text=True, bufsize=1)
            assert reader.stdout is not None
            run.skip_to = max(run.seen, default=0) if attempt else 0
            threading.Thread(target=stop_when, args=(done, reader), daemon=True).start()
            collect(run, reader.stdout, done)
            stop(reader, 5)
            if done.is_set():
                return
            run.restarts += 1
            print(f"  corral: 'corral logs -f' ended ({reader.returncode}) after "
                  f"{len(run.seen)} lines: {errors.read_text().strip()[:300]}", file=sys.stderr)
            time.sleep(1.0)

    def run(self, name: str, writer: Path, n: int, rate: float, timeout: float) -> Run:
        go = self.root / f"go-{name}"
        # a reservation is also the CFS quota: the default 0.1 core would throttle the writer
        self.cli("run", name, "--tail", "access=access.log", "--cpus", "1", "--memory", "256M",
                 "--",
                 "python3", str(writer), "access.log", str(n), str(rate), str(go), "3600")
        self.names.append(name)
        run, done = Run("corral", n), threading.Event()
        t = threading.Thread(target=self.follow, args=(name, run, done), daemon=True)
        t.start()
        try:
            time.sleep(1.0)  # the reader's consumer exists (it reads from the first line anyway)
            go.touch()
            wait_for(run, timeout)
        finally:
            done.set()
            t.join(10)
        self.cli("rm", "--force", name, timeout=60)
        self.names.remove(name)
        return run


# -- rsyslog -----------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rsyslog_confs(d: Path, way: str, port: int) -> tuple[str, str]:
    """(sender, receiver) configs: one main-queue worker each (order as far as rsyslog keeps
    it), the forwarding action on a disk-assisted queue that retries forever."""
    queue = ('queue.type="LinkedList" queue.filename="fwdq" queue.saveOnShutdown="on" '
             'queue.workerThreads="1" action.resumeRetryCount="-1" action.resumeInterval="1"')
    if way == "relp":
        out_mod, action = "omrelp", (f'type="omrelp" target="127.0.0.1" port="{port}" '
                                     f'windowSize="{RELP_WINDOW}" {queue}')
        in_mod, in_type = "imrelp", "imrelp"
    else:
        out_mod, action = "builtin:omfwd", (f'type="omfwd" target="127.0.0.1" port="{port}" '
                                            f'protocol="tcp" {queue}')
        in_mod, in_type = "imtcp", "imtcp"
    sender = f'''global(workDirectory="{d}/send-work")
main_queue(queue.workerThreads="1")
module(load="imfile" mode="inotify")
{'' if out_mod.startswith('builtin') else f'module(load="{out_mod}")'}
ruleset(name="fwd") {{ action({action}) }}
input(type="imfile" file="{d}/access.log" tag="access" ruleset="fwd")
'''
    receiver = f'''global(workDirectory="{d}/recv-work")
main_queue(queue.workerThreads="1")
module(load="{in_mod}")
template(name="line" type="string" string="%msg%\\n")
ruleset(name="out") {{ action(type="omfile" file="{d}/received.log" template="line") }}
input(type="{in_type}" port="{port}" address="127.0.0.1" ruleset="out")
'''
    return sender, receiver


def tail_lines(path: Path, done: threading.Event) -> Iterator[str]:
    """Lines appended to ``path`` as they come (polled every 2 ms), until ``done``."""
    while not path.exists():
        if done.is_set():
            return
        time.sleep(0.002)
    buf = b""
    with path.open("rb") as fh:
        while not done.is_set():
            chunk = fh.read(1 << 20)
            if not chunk:
                time.sleep(0.002)
                continue
            buf += chunk
            *whole, buf = buf.split(b"\n")
            for raw in whole:
                yield raw.decode(errors="replace")


def rsyslogd(conf: Path, d: Path, tag: str) -> subprocess.Popen[bytes]:
    log = (d / f"{tag}.out").open("ab")
    return subprocess.Popen([RSYSLOGD, "-n", "-f", str(conf), "-i", str(d / f"{tag}.pid")],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def listening(port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return True
        time.sleep(0.05)
    return False


def rsyslog_run(base: Path, way: str, writer: Path, n: int, rate: float, timeout: float,
                procs: list[subprocess.Popen[bytes]]) -> Run:
    d = Path(tempfile.mkdtemp(prefix=f"rsyslog-{way}-", dir=base))
    for sub in ("send-work", "recv-work"):
        (d / sub).mkdir()
    (d / "access.log").touch()  # imfile starts at offset 0 of a file it saw from the start
    port = free_port()
    sender_conf, receiver_conf = rsyslog_confs(d, way, port)
    (d / "send.conf").write_text(sender_conf)
    (d / "recv.conf").write_text(receiver_conf)
    run, done = Run(f"rsyslog-{way}", n), threading.Event()
    recv = rsyslogd(d / "recv.conf", d, "recv")
    procs.append(recv)
    send: subprocess.Popen[bytes] | None = None
    writer_proc: subprocess.Popen[bytes] | None = None
    t = threading.Thread(target=collect, args=(run, tail_lines(d / "received.log", done), done),
                         daemon=True)
    try:
        if not listening(port, 10):
            raise SystemExit(f"rsyslogd ({way} receiver) is not listening: see {d}/recv.out")
        send = rsyslogd(d / "send.conf", d, "send")
        procs.append(send)
        t.start()
        time.sleep(1.0)  # imfile has its watch
        go = d / "go"
        writer_proc = subprocess.Popen(["python3", str(writer), str(d / "access.log"), str(n),
                                        str(rate), str(go), "0"])
        go.touch()
        wait_for(run, timeout)
        if send.poll() is not None or recv.poll() is not None:
            print(f"  rsyslog-{way}: a daemon ended early, see {d}/*.out", file=sys.stderr)
    finally:
        done.set()
        for p in (writer_proc, send, recv):
            if p is not None:
                stop(p)
        t.join(5)
    shutil.rmtree(d, ignore_errors=True)
    return run


# -- the report --------------------------------------------------------------------------------

def mid(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def fmt(values: list[float], spec: str = ",.0f") -> str:
    m, lo, hi = mid(values)
    return f"{m:{spec}} ({lo:{spec}}-{hi:{spec}})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--lines", type=int, default=200_000, help="flood lines (default 200k)")
    ap.add_argument("--long", action="store_true", help="1,000,000 flood lines")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rate", type=float, default=2000.0, help="paced phase, lines/s")
    ap.add_argument("--paced-seconds", type=float, default=10.0)
    ap.add_argument("--baselines", default=",".join(BASELINES),
                    help="rsyslog ways: relp, tcp (comma-separated)")
    ap.add_argument("--timeout", type=float,
                    help="bound on one phase, seconds (default 60 + 1 s per 2,000 lines)")
    args = ap.parse_args(argv)
    n = 1_000_000 if args.long else args.lines
    paced_n = max(1, int(args.rate * args.paced_seconds))
    timeout = args.timeout or 60 + max(n, paced_n) / 2000
    ways = [w for w in args.baselines.split(",") if w]
    if any(w not in BASELINES for w in ways):
        ap.error(f"--baselines takes {', '.join(BASELINES)}")
    if ways and not os.path.exists(RSYSLOGD):
        raise SystemExit("rsyslogd not found: apt-get install rsyslog rsyslog-relp "
                         "(scripts/bootstrap does)")

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    flood: dict[str, list[Run]] = {}
    paced: dict[str, list[Run]] = {}
    procs: list[subprocess.Popen[bytes]] = []
    base = Path(tempfile.mkdtemp(prefix="corral-bench-logs-"))
    writer = base / "writer.py"
    writer.write_text(WRITER)
    corral = Corral(base / "fleet")
    corral.root.mkdir()
    tag = f"{os.getpid()}"
    load0 = os.getloadavg()
    try:
        corral.up()
        for r in range(1, args.rounds + 1):
            for phase, count, rate, into in (("flood", n, 0.0, flood),
                                             ("paced", paced_n, args.rate, paced)):
                for way in ["corral", *(f"rsyslog-{w}" for w in ways)]:
                    if way == "corral":
                        res = corral.run(f"logs-{tag}-{phase}-{r}", writer, count, rate,
                                         timeout)
                    else:
                        res = rsyslog_run(base, way.removeprefix("rsyslog-"), writer, count,
                                          rate, timeout, procs)
                    into.setdefault(way, []).append(res)
                    lost, doubled, disorder = res.check()
                    print(f"  round {r} {phase:5} {way:13}: {res.rate():>9,.0f} lines/s, "
                          f"p50 {res.latency_ms(0.5):8.1f} ms, p99 {res.latency_ms(0.99):8.1f} "
                          f"ms, lost {lost}, doubled {doubled}, out of order {disorder}"
                          + (f", reader restarts {res.restarts}" if res.restarts else ""),
                          flush=True)
    except KeyboardInterrupt:
        print("interrupted; cleaning up", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for p in procs:
            stop(p, 5)
        corral.down()
        shutil.rmtree(base, ignore_errors=True)

    bad = 0
    print(f"\nload average {load0[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end "
          f"({os.cpu_count()} cores; other work on the machine slows both ways alike)")
    print(f"{n:,} flood lines and {paced_n:,} paced ({args.rate:,.0f}/s) of "
          f"~210 bytes, median (min-max) of {args.rounds} rounds:")
    print(f"{'way':14} {'flood lines/s':>26} {'flood p99 ms':>24} {'paced p50 ms':>22} "
          f"{'paced p99 ms':>22} {'lost':>5} {'doubled':>7} {'disorder':>8}")
    for way in flood:
        runs = flood[way] + paced[way]
        checks = [x.check() for x in runs]
        lost, doubled, disorder = (sum(c[i] for c in checks) for i in range(3))
        bad += lost + doubled + (disorder if way == "corral" else 0)
        print(f"{way:14} {fmt([x.rate() for x in flood[way]]):>26} "
              f"{fmt([x.latency_ms(0.99) for x in flood[way]], ',.0f'):>24} "
              f"{fmt([x.latency_ms(0.5) for x in paced[way]], '.1f'):>22} "
              f"{fmt([x.latency_ms(0.99) for x in paced[way]], '.1f'):>22} "
              f"{lost:>5} {doubled:>7} {disorder:>8}")
    restarts = sum(x.restarts for x in flood.get("corral", []) + paced.get("corral", []))
    if restarts:
        print(f"('corral logs -f' failed and was started again {restarts} time(s); see above)")
    print()
    for way in flood:
        suffix = {"corral": "", "rsyslog-relp": ".baseline", "rsyslog-tcp": ".baseline_tcp"}[way]
        rate_m = mid([x.rate() for x in flood[way]])[0]
        p99_m = mid([x.latency_ms(0.99) for x in paced[way]])[0]
        lost = sum(x.check()[0] for x in flood[way] + paced[way])
        print(f"figure: logs.lines_per_s{suffix} {rate_m:.0f} lines/s")
        print(f"figure: logs.p99_ms{suffix} {p99_m:.1f} ms")
        print(f"figure: logs.lost{suffix} {lost} lines")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
