#!/usr/bin/env python3
"""Figures: a thousand hosts (five thousand with --long) against one real server: heartbeat
round trips, the server's CPU and memory per host, placement rate, and ``ls`` at that size.

One real ``corral server`` (a subprocess, TLS on, SQLite, its embedded nats-server, default
timings: heartbeat 2 s, lease 10 s, samples 1 s, stretched past ``max_heartbeats_per_second``
hosts a second (500; ``--max-heartbeats``): 4 s, 20 s and 2 s at 2000 hosts, and the bench
prints the pace the server chose) and N simulated hosts
(``bench/simagent.py``), several hundred per process, each with its own NATS connection and
its own identity: every host is enrolled through the product's path (``POST /v1/hosts`` for
a join token, then ``POST /v1/hosts/NAME/join`` with the host's nkey and a certificate
request, which reloads the bus's config), joins, heartbeats with its instances' states,
publishes a metrics sample every second and answers the server's calls as the fake driver.

Phases, in one server's life:

* **enrol** the first ``--enroll-api`` hosts (200) through the API (hosts/s); the middle of a
  larger fleet has its keys written into the server's database, which the server's own
  identity watch loads in one bus reload (each reload rewrites the whole bus config: O(hosts)
  a reload); then ``ENROLL_BURST`` (50) through the API all at once, 16 at a time (the bus
  reloads they cause: concurrent joins share one, see ``EmbeddedNats.reload``); the last 10
  through the API again, one at a time (seconds a host at full size). Then connect and
  join them all; the server's memory before and after (per host);
* **heartbeats**, empty hosts: rounds of ``--seconds`` each; per round the round trips of
  every heartbeat (send -> the server's answer, measured in the simulated agent, so they
  include the bus and the simulator's own loop, whose worst lag is printed beside), the
  server's CPU (% of one core) and the nats-server's;
* **placement** of ``--instances`` through ``POST /v1/instances`` (8 clients at once; sizes
  vary), in ``--rounds`` slices: the rate of each slice, so a fall as the fleet fills shows;
  then checks: every instance is running in the server's view, on a host that is up, every
  host's reservations fit its capacity (``GET /v1/hosts``), and every simulated host holds
  exactly the instances the server placed there;
* **batch placement** of ``--batch`` more (default 10x ``--instances``) through ``POST
  /v1/instances/batch``, 500 a call, 2 calls at once: how a job of many instances is placed
  (one snapshot and one transaction place a call's instances, the agents are asked 64 at a
  time); the same checks cover them;
* **heartbeats** again, with every host reporting its instances;
* **ls**: ``GET /v1/instances`` ``--ls`` times in one answer (latency, size), and as many
  times a page at a time as the client and ``corral ls`` read it (time to the first page,
  time to the whole list), with
  the heartbeats' worst round trip while it ran (the server answers both on one loop).

Each window also reads how long the server's main thread was runnable but waiting for a CPU
(``/proc/PID/schedstat``): when other load takes the machine, late answers are that, not the
server's own work; CPU per heartbeat (above the idle server's) is the steadier figure.
Every window also counts what must stay 0: unanswered heartbeats, hosts that went a whole
lease without an answer (a real agent would fence), hosts the server marked down.

Baseline: there is no other scheduler on this machine, so no other product is measured
(the issue's anchor, quoted: Nomad placed 1 M containers on 5,000 hosts at 3,750/s with 5
servers). What is measured is the **floor under corral's own writes**: the same heartbeat
and placement writes straight into SQLite (WAL, ``synchronous=FULL``, one transaction per
heartbeat and per placement, like the server's), without bus, API or ORM, in this process.

    .venv/bin/python bench/fleet_scale.py                  # 1000 hosts, 10k instances
    .venv/bin/python bench/fleet_scale.py --long           # 5000 hosts, 100k instances
    .venv/bin/python bench/fleet_scale.py --hosts 5 --instances 20 --rounds 1   # smoke
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from waiting import wait

from corral.api.client import PAGE_SIZE, Client
from corral.api.models import MAX_BATCH_CREATE, CreateInstance
from corral.bus import identity as bus_identity
from corral.errors import CorralError

HERE = Path(__file__).resolve().parent
#: as simagent.JOIN_WAIT
JOIN_WAIT = 180.0
TICK = os.sysconf("SC_CLK_TCK")
#: instance sizes, cycled: (cores, MiB)
SIZES = [(0.1, 64), (0.25, 256), (0.5, 512), (1.0, 1024), (0.2, 128)]
#: simulated hosts' sizes, cycled: (cores, GiB)
HOST_SIZES = [(8, 32), (16, 64), (4, 16), (32, 128)]
#: every simulated host this many times larger (--host-scale): a dense fleet
HOST_SCALE = [1]


def host_size(i: int) -> tuple[int, int]:
    """The ``i``-th simulated host's (cores, GiB)."""
    cores, gib = HOST_SIZES[i % len(HOST_SIZES)]
    return cores * HOST_SCALE[0], gib * HOST_SCALE[0]
CLIENTS = 8
#: batches in flight at once (each MAX_BATCH_CREATE instances)
BATCH_CLIENTS = 2
#: the server's default heartbeat interval (the bench runs the defaults)
HEARTBEAT_S = 2.0
#: how long GET /v1/hosts took after placement (seconds)
HOSTS_LS = [0.0]
#: the idle server's CPU (seconds per second), measured before any host joins
IDLE = [0.0]
#: hosts enrolled through the API after the bulk, one at a time (the cost at full size)
ENROLL_LAST = 10
#: hosts enrolled through the API at once near full size: how many bus reloads they cost
ENROLL_BURST = 50
#: what nats-server logs once it has read its config again
RELOADED = b"Reloaded server configuration"




def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def waited_seconds(pid: int) -> float:
    """Seconds the process's main thread was runnable but waiting for a CPU (schedstat):
    when other load takes the machine, the server's answers are late for that reason, not
    its own work."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return 0.0


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int(d.joinpath("stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
            except (OSError, ValueError, IndexError):
                pass
    return out


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, int(q / 100 * len(s)))]


def med(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return (s[n // 2] + s[(n - 1) // 2]) / 2 if s else float("nan")


def mmm(xs: list[float], f: str = ".1f") -> str:
    return f"{med(xs):{f}} ({min(xs):{f}}/{max(xs):{f}})" if xs else "-"


# --- the server --------------------------------------------------------------------------------
class Server:
    """One ``corral server``, its own session, its own data dir; stopped with its group."""

    def __init__(self, top: Path, profile: str = "", budget: float | None = None) -> None:
        self.dir = top / "server"
        prof = ["-m", "cProfile", "-o", profile] if profile else []
        pace = ["--set", f"max_heartbeats_per_second={budget:g}"] if budget is not None else []
        env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
        env["CORRAL_LOG_LEVEL"] = "warning"
        self.log = (top / "server.log").open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, *prof, "-m", "corral.cli", "server", "--data", str(self.dir),
             "--tls", "on", "--api-host", "127.0.0.1", "--api-port", "0",
             "--nats-host", "127.0.0.1", "--nats-port", "0", *pace],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT, env=env,
            start_new_session=True)
        ready = self.dir / "server.json"

        def up() -> dict[str, Any] | None:
            if self.proc.poll() is not None:
                raise SystemExit(f"corral server died at start; see {top / 'server.log'}")
            try:
                got = dict(json.loads(ready.read_text()))
            except (OSError, ValueError):
                return None
            return got if got.get("pid") == self.proc.pid else None
        info = wait(up, "the server", 60)
        self.url = str(info["api_url"])
        self.nats_url = str(info["nats_url"])
        self.ca_file = str(info["ca_file"])
        self.token = Path(info["token_file"]).read_text().strip()
        nats = [p for p in children(self.proc.pid)
                if b"nats-server" in Path(f"/proc/{p}/cmdline").read_bytes()]
        self.nats_pid = nats[0] if nats else 0

    def client(self, timeout: float = 120) -> Client:
        return Client(self.url, self.token, timeout=timeout, ca_file=self.ca_file)

    def cpu(self) -> tuple[float, float, float]:
        """(server CPU s, nats-server CPU s, server's seconds waiting for a CPU)"""
        return (cpu_seconds(self.proc.pid),
                cpu_seconds(self.nats_pid) if self.nats_pid else 0.0,
                waited_seconds(self.proc.pid))

    def lease_misses(self, top: Path) -> int:
        try:
            return (top / "server.log").read_text(errors="replace").count("missed its lease")
        except OSError:
            return 0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:  # too busy to stop: killed with its group
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        # the nats-server child, should it outlive its parent
        if self.nats_pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.nats_pid, signal.SIGKILL)
        self.log.close()


# --- enrolment -----------------------------------------------------------------------------------
def csr_pem(host: str) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def enroll(server: Server, names: list[str], offset: int = 0, parallel: int = 4
           ) -> list[dict[str, Any]]:
    """Each host as ``corral host add`` + an agent's first start would: a join token, then
    the trade of the token for the host's identity (its nkey listed on the bus)."""
    local = threading.local()

    def one(i_name: tuple[int, str]) -> dict[str, Any]:
        i, name = i_name
        c = getattr(local, "c", None)
        if c is None:
            c = local.c = server.client()
        seed = bus_identity.new_seed()
        token = str(c.host_add(name)["token"])
        c.host_join(name, token, bus_identity.public_key(seed), csr_pem(name), "127.0.0.1")
        cores, gib = host_size(i)
        return {"name": name, "seed": seed, "cores": cores, "memory_bytes": gib * 1024**3}

    with ThreadPoolExecutor(parallel) as pool:
        return list(pool.map(one, enumerate(names, start=offset)))


def bulk_enroll(server: Server, names: list[str], offset: int) -> list[dict[str, Any]]:
    """The bench's shortcut for the middle of a large fleet: each join through the API
    reloads the bus's whole config (O(hosts) per host, so O(hosts^2) for a fleet), which
    would take most of an hour at 5000. Here the hosts' keys are written straight into the
    server's ``host_identities`` table, and the server's own watch (``_identities_watch``:
    the database lists other keys than the bus node was written with) reloads the bus once.
    These hosts get no join token, certificate or API token, which a simulated host never
    uses; they log in and are checked by the bus exactly like the others."""
    hosts = []
    rows = []
    now = time.time()
    for i, name in enumerate(names, start=offset):
        seed = bus_identity.new_seed()
        cores, gib = host_size(i)
        hosts.append({"name": name, "seed": seed, "cores": cores,
                      "memory_bytes": gib * 1024**3})
        rows.append((name, bus_identity.public_key(seed), now))
    nlog = server.dir / "nats-server.log"
    reloads = nlog.read_bytes().count(RELOADED)
    db = sqlite3.connect(server.dir / "corral.db", timeout=60)
    with db:
        db.executemany("INSERT INTO host_identities (host, public_key, enrolled_at) "
                       "VALUES (?, ?, ?)", rows)
    db.close()
    conf = server.dir / "nats" / "auth.conf"
    last = rows[-1][1] if rows else ""
    wait(lambda: last in conf.read_text(errors="replace")
         and nlog.read_bytes().count(RELOADED) > reloads, "the bus to reload the new keys",
         120, every=0.5)
    return hosts


# --- the simulated fleet -------------------------------------------------------------------------
class Workers:
    """Processes of bench/simagent.py, a share of the hosts each."""

    def __init__(self, server: Server, hosts: list[dict[str, Any]], per_proc: int,
                 top: Path, metrics: bool = True) -> None:
        self.procs: list[subprocess.Popen[str]] = []
        shares = [hosts[i:i + per_proc] for i in range(0, len(hosts), per_proc)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
        for k, share in enumerate(shares):
            err = (top / f"simagent{k}.log").open("ab")
            p = subprocess.Popen([sys.executable, str(HERE / "simagent.py")],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                 text=True, env=env, start_new_session=True)
            err.close()
            self.procs.append(p)
            self._send(p, {"nats_url": server.nats_url, "ca_file": server.ca_file,
                           "hosts": share, "metrics": metrics})
        self.joined: list[dict[str, Any]] = []

    def wait_joined(self) -> None:
        """Until every process says its hosts joined (or JOIN_WAIT passed: the rest go on
        trying)."""
        self.joined = [self._read(p) for p in self.procs]

    @staticmethod
    def _send(p: subprocess.Popen[str], obj: dict[str, Any]) -> None:
        assert p.stdin is not None
        p.stdin.write(json.dumps(obj) + "\n")
        p.stdin.flush()

    @staticmethod
    def _read(p: subprocess.Popen[str]) -> dict[str, Any]:
        assert p.stdout is not None
        line = p.stdout.readline()
        if not line:
            raise SystemExit(f"a simulated-agent process (pid {p.pid}) ended; see its log")
        return dict(json.loads(line))

    def ask(self, cmd: str) -> list[dict[str, Any]]:
        for p in self.procs:
            self._send(p, {"cmd": cmd})
        return [self._read(p) for p in self.procs]

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(OSError):
                    self._send(p, {"cmd": "stop"})
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)


def window(server: Server, workers: Workers, seconds: float) -> dict[str, Any]:
    """One measuring window of ``seconds``: heartbeats and the server's and bus's CPU."""
    workers.ask("mark")
    c0, t0 = server.cpu(), time.monotonic()
    time.sleep(seconds)
    c1, t1 = server.cpu(), time.monotonic()
    return summarise(workers.ask("stats"), t1 - t0, diff(c0, c1))


def diff(a: tuple[float, ...], b: tuple[float, ...]) -> tuple[float, ...]:
    return tuple(y - x for x, y in zip(a, b, strict=True))


def summarise(stats: list[dict[str, Any]], wall: float, cpu: tuple[float, ...]
              ) -> dict[str, Any]:
    rtts = [x for s in stats for x in s["rtts_ms"]]
    return {"p50": pct(rtts, 50), "p99": pct(rtts, 99), "max": max(rtts, default=0.0),
            "beats": len(rtts), "missed": sum(s["missed"] for s in stats),
            "lapsed": sum(len(s["lapsed"]) for s in stats),
            "max_gap": max(s["max_gap_s"] for s in stats),
            "lag": max(s["max_lag_ms"] for s in stats),
            "server_cpu": 100 * cpu[0] / wall, "nats_cpu": 100 * cpu[1] / wall,
            "server_wait": 100 * cpu[2] / wall,
            # above the idle server's own (lease checks, leadership polls)
            "cpu_per_beat_ms": (1000 * max(0.0, cpu[0] - IDLE[0] * wall) / len(rtts)
                                if rtts else float("nan"))}


def hb_rounds(server: Server, workers: Workers, rounds: int, seconds: float, label: str
              ) -> list[dict[str, Any]]:
    out = []
    for i in range(rounds):
        w = window(server, workers, seconds)
        out.append(w)
        print(f"  {label} round {i + 1}: {w['beats']} heartbeats, p50 {w['p50']:.1f} ms, "
              f"p99 {w['p99']:.1f} ms, max {w['max']:.0f} ms; server CPU "
              f"{w['server_cpu']:.0f} % (waiting for a CPU {w['server_wait']:.0f} %), nats "
              f"{w['nats_cpu']:.0f} %; missed {w['missed']}, "
              f"lapsed {w['lapsed']}, simulator lag max {w['lag']:.0f} ms", flush=True)
    return out


def hosts_up(server: Server, n: int) -> bool:
    try:  # the status counts (GET /v1/hosts costs hosts x instances, see check_placement)
        with server.client() as c:
            up = int(c.status_data()["hosts_up"])
    except CorralError:  # an overloaded server: ask again
        return False
    return up == n


# --- placement -----------------------------------------------------------------------------------
def place(server: Server, names: list[str], start: int, deadline: float
          ) -> tuple[float, list[str], list[str]]:
    """Create ``names`` through the API, CLIENTS at once, none started after ``deadline``:
    (seconds, the names placed, errors)."""
    local = threading.local()
    errors: list[str] = []
    placed: list[str] = []

    def one(i_name: tuple[int, str]) -> None:
        i, name = i_name
        if time.monotonic() > deadline:
            return
        c = getattr(local, "c", None)
        if c is None:
            c = local.c = server.client()
        cpus, mib = SIZES[(start + i) % len(SIZES)]
        spec = CreateInstance(name=name, cpus=cpus, memory_bytes=mib * 1024**2,
                              driver="fake", command=["sleep", "infinity"])
        try:
            c.create(spec)
            placed.append(name)
        except CorralError as exc:
            errors.append(f"{name}: {exc}")

    t0 = time.monotonic()
    with ThreadPoolExecutor(CLIENTS) as pool:
        list(pool.map(one, enumerate(names)))
    return time.monotonic() - t0, placed, errors


def place_batches(server: Server, names: list[str], start: int, deadline: float
                  ) -> tuple[float, list[str], list[str]]:
    """Create ``names`` through ``POST /v1/instances/batch`` (``corral``'s batch route: what
    a job of N instances is), MAX_BATCH_CREATE at a time, BATCH_CLIENTS batches at once,
    none started after ``deadline``: (seconds, the names placed, errors)."""
    local = threading.local()
    errors: list[str] = []
    placed: list[str] = []
    chunks = [names[k:k + MAX_BATCH_CREATE] for k in range(0, len(names), MAX_BATCH_CREATE)]

    def one(k_chunk: tuple[int, list[str]]) -> None:
        k, chunk = k_chunk
        if time.monotonic() > deadline:
            return
        c = getattr(local, "c", None)
        if c is None:
            c = local.c = server.client(timeout=600)
        specs = [CreateInstance(name=name, cpus=SIZES[(start + k * MAX_BATCH_CREATE + i)
                                                      % len(SIZES)][0],
                                memory_bytes=SIZES[(start + k * MAX_BATCH_CREATE + i)
                                                   % len(SIZES)][1] * 1024**2,
                                driver="fake", command=["sleep", "infinity"])
                 for i, name in enumerate(chunk)]
        try:
            for item in c.create_many(specs):
                if item.status == 201:
                    placed.append(item.name)
                else:
                    errors.append(f"{item.name}: {item.error}")
        except CorralError as exc:
            errors.append(f"batch {k}: {exc}")

    t0 = time.monotonic()
    with ThreadPoolExecutor(BATCH_CLIENTS) as pool:
        list(pool.map(one, enumerate(chunks)))
    return time.monotonic() - t0, placed, errors


def check_placement(server: Server, workers: Workers, want: int) -> list[str]:
    """What is wrong with the fleet after placement (empty: nothing)."""
    bad: list[str] = []
    with server.client(timeout=600) as c:
        t = time.monotonic()
        hosts = {h["name"]: h for h in c.hosts_data()}
        HOSTS_LS[0] = time.monotonic() - t
        insts = c.instances_data()
    for h in hosts.values():
        if h["state"] != "up":
            bad.append(f"host {h['name']} is {h['state']}")
        if h["reserved"]["cpus"] > h["cores"] + 1e-6 or \
                h["reserved"]["memory_bytes"] > h["memory_bytes"]:
            bad.append(f"host {h['name']} reserves {h['reserved']} of {h['cores']} cores, "
                       f"{h['memory_bytes']} bytes")
    if len(insts) != want:
        bad.append(f"{len(insts)} instances listed, {want} placed")
    where = {}
    for i in insts:
        where[i["name"]] = i["host"]
        if i["state"] != "running" or i["host"] not in hosts:
            bad.append(f"instance {i['name']} is {i['state']} on {i['host']}")
    held = {}
    for inv in workers.ask("inventory"):
        for host, names in inv["held"].items():
            for name, state in names.items():
                held[name] = host
                if state != "running":
                    bad.append(f"{host} holds {name} {state}")
    if held != where:
        diff = [n for n in set(held) | set(where) if held.get(n) != where.get(n)]
        bad.append(f"{len(diff)} instances where the server and the hosts disagree, "
                   f"e.g. {sorted(diff)[:3]}")
    return bad


# --- the floor: the same writes straight into SQLite ---------------------------------------------
def sqlite_floor(path: Path, hosts: list[dict[str, Any]], instances: int, beats: int
                 ) -> tuple[float, float]:
    """(ms of CPU per heartbeat, placements per second) writing what the server writes
    straight into SQLite (WAL, synchronous=FULL), one transaction each, in one thread."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE hosts (name TEXT PRIMARY KEY, cores INT, memory INT, "
               "state TEXT, last_heartbeat REAL, lease_expires_at REAL)")
    db.execute("CREATE TABLE instances (name TEXT PRIMARY KEY, host TEXT, cpus REAL, "
               "memory INT, state TEXT, pid INT, epoch INT, updated_at REAL)")
    db.execute("CREATE INDEX ix_host ON instances(host)")
    db.executemany("INSERT INTO hosts VALUES (?, ?, ?, 'up', 0, 0)",
                   [(h["name"], h["cores"], h["memory_bytes"]) for h in hosts])
    # placement: hosts and reservations read, the best host chosen (largest free CPU
    # share), the row inserted, then the agent's two answers written (created, running)
    free: dict[str, list[float]] = {}
    t0 = time.monotonic()
    for i in range(instances):
        cpus, mib = SIZES[i % len(SIZES)]
        db.execute("BEGIN IMMEDIATE")
        rows = db.execute("SELECT h.name, h.cores, h.memory, COALESCE(SUM(i.cpus), 0), "
                          "COALESCE(SUM(i.memory), 0) FROM hosts h LEFT JOIN instances i "
                          "ON i.host = h.name GROUP BY h.name").fetchall()
        free = {n: [(c - rc) / c, m - rm] for n, c, m, rc, rm in rows}
        best = max((n for n, (share, mem) in free.items() if mem >= mib * 1024**2),
                   key=lambda n: free[n][0])
        name = f"i{i:07d}"
        db.execute("INSERT INTO instances VALUES (?, ?, ?, ?, 'pending', NULL, 1, ?)",
                   (name, best, cpus, mib * 1024**2, time.time()))
        db.execute("COMMIT")
        for state in ("created", "running"):
            db.execute("BEGIN IMMEDIATE")
            db.execute("UPDATE instances SET state = ?, updated_at = ? WHERE name = ?",
                       (state, time.time(), name))
            db.execute("COMMIT")
    place_rate = instances / (time.monotonic() - t0)
    # heartbeats: the host's lease renewed and its instances' rows read and compared
    by_host: dict[str, list[str]] = {}
    for n, h in db.execute("SELECT name, host FROM instances"):
        by_host.setdefault(h, []).append(n)
    names = [h["name"] for h in hosts]
    c0 = time.process_time()
    for k in range(beats):
        host = names[k % len(names)]
        now = time.time()
        db.execute("BEGIN IMMEDIATE")
        db.execute("UPDATE hosts SET state = 'up', last_heartbeat = ?, lease_expires_at = ? "
                   "WHERE name = ?", (now, now + 10, host))
        mine = by_host.get(host, [])
        if mine:
            db.execute(f"SELECT name, state, pid, epoch FROM instances WHERE name IN "
                       f"({','.join('?' * len(mine))})", mine).fetchall()
        db.execute("COMMIT")
    per_beat = 1000 * (time.process_time() - c0) / beats
    db.close()
    return per_beat, place_rate


# --- the run -------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--long", action="store_true",
                    help="the issue's size: 5000 hosts, 100k instances, 60 s windows")
    ap.add_argument("--hosts", type=int, help="simulated hosts (default 1000; --long 5000)")
    ap.add_argument("--instances", type=int, help="instances placed (default 10000; --long "
                    "100000)")
    ap.add_argument("--rounds", type=int, default=3, help="heartbeat windows and placement "
                    "slices (default 3)")
    ap.add_argument("--seconds", type=float, help="length of a heartbeat window (default 20; "
                    "--long 60)")
    ap.add_argument("--ls", type=int, default=10, help="GET /v1/instances this many times")
    ap.add_argument("--per-process", type=int, default=500,
                    help="simulated hosts per process (default 500)")
    ap.add_argument("--enroll-api", type=int, default=200, metavar="K",
                    help="enrol the first K hosts through the API (the rest: their keys "
                    "written into the database, then the last few through the API again)")
    ap.add_argument("--place-budget", type=float, default=180.0, metavar="SECONDS",
                    help="stop placing after this long (default 180; the rate and the checks "
                    "are of what was placed)")
    ap.add_argument("--batch", type=int, metavar="N",
                    help="then N more through the batch route (default 10x --instances; below 100 "
                    "hosts, --instances)")
    ap.add_argument("--host-scale", type=int, default=1, metavar="K",
                    help="simulated hosts K times larger (cores and memory): room for 100 "
                    "instances a host with K=4, as --hosts 1000 --instances 100000 needs")
    ap.add_argument("--no-metrics", action="store_true",
                    help="simulated hosts send no metrics samples (to tell their cost apart)")
    ap.add_argument("--profile", metavar="FILE",
                    help="run the server under cProfile, its stats written to FILE at the end")
    ap.add_argument("--max-heartbeats", type=float, metavar="RATE",
                    help="the server's max_heartbeats_per_second (default: the product's, "
                    "500; 0 = no limit: every host at the 2 s heartbeat)")
    ap.add_argument("--keep", action="store_true", help="keep the bench's directory")
    args = ap.parse_args(argv)
    HOST_SCALE[0] = max(1, args.host_scale)
    n = args.hosts or (5000 if args.long else 1000)
    m = args.instances if args.instances is not None else (100_000 if args.long else 10_000)
    seconds = args.seconds or (60.0 if args.long else 20.0)
    if args.hosts is not None and args.hosts < 10 and args.seconds is None:
        seconds = 3.0  # a toy fleet: the smoke test
    rounds = max(1, args.rounds)

    def on_term(*_: object) -> None:
        raise SystemExit("terminated")  # so that the server and simulators are stopped

    signal.signal(signal.SIGTERM, on_term)
    top = Path(tempfile.mkdtemp(prefix="corral-bench-fleet-"))
    server: Server | None = None
    workers: Workers | None = None
    out: list[str] = []
    early: list[str] = []
    t_start = time.monotonic()
    try:
        print(f"fleet_scale: {n} simulated hosts, {m} instances, {rounds} rounds of "
              f"{seconds:g} s, in {top}", flush=True)
        server = Server(top, str(Path(args.profile).resolve()) if args.profile else "",
                        args.max_heartbeats)
        time.sleep(min(2.0, seconds))
        c0, t0 = server.cpu(), time.monotonic()
        time.sleep(min(5.0, 2 * seconds))
        c1 = server.cpu()
        idle_cpu = 100 * (c1[0] - c0[0]) / (time.monotonic() - t0)
        IDLE[0] = idle_cpu / 100
        rss0 = rss_bytes(server.proc.pid)
        nrss0 = rss_bytes(server.nats_pid) if server.nats_pid else 0

        names = [f"sim{i:05d}" for i in range(n)]
        first = min(n, args.enroll_api)
        last = min(ENROLL_LAST, n - first)
        burst = min(ENROLL_BURST, n - first - last)
        burst_s, burst_reloads = float("nan"), 0
        t = time.monotonic()
        hosts = enroll(server, names[:first])
        enroll_s = time.monotonic() - t
        print(f"enrolled {first} hosts through the API in {enroll_s:.1f} s "
              f"({first / enroll_s:.1f} hosts/s)", flush=True)
        last_s = float("nan")
        if n > first:
            t = time.monotonic()
            hosts += bulk_enroll(server, names[first:n - last - burst], first)
            print(f"wrote {n - last - burst - first} more hosts' keys into the database in "
                  f"{time.monotonic() - t:.1f} s (one bus reload)", flush=True)
            nlog = server.dir / "nats-server.log"
            before = nlog.read_bytes().count(RELOADED)
            t = time.monotonic()
            hosts += enroll(server, names[n - last - burst:n - last], n - last - burst,
                            parallel=16)
            burst_s = time.monotonic() - t
            burst_reloads = nlog.read_bytes().count(RELOADED) - before
            print(f"enrolled {burst} through the API at once (16 at a time): "
                  f"{burst_s:.1f} s ({burst / max(burst_s, 1e-9):.1f} hosts/s), "
                  f"{burst_reloads} bus reloads", flush=True)
            t = time.monotonic()
            hosts += enroll(server, names[n - last:], n - last, parallel=1)
            last_s = (time.monotonic() - t) / max(1, last)
            print(f"enrolled the last {last} through the API, one at a time: "
                  f"{last_s:.2f} s per host at {n} hosts", flush=True)

        t = time.monotonic()
        workers = Workers(server, hosts, args.per_process, top, not args.no_metrics)
        workers.wait_joined()
        pending = sum(int(j.get("pending", 0)) for j in workers.joined)
        if pending:
            early.append(f"{pending} hosts had not joined {JOIN_WAIT:g} s after they "
                         "connected (still trying)")
        joined_s = time.monotonic() - t
        try:
            wait(lambda: hosts_up(server, n), f"{n} hosts up", 120, every=1)
        except SystemExit as exc:  # measured anyway: what an overloaded server does
            early.append(str(exc))
        time.sleep(min(6.0, seconds))  # the leader fits its pace to the size every 5 s
        status = server.client().status()
        hb_s = status.heartbeat_seconds or HEARTBEAT_S
        lease_s = status.lease_seconds
        budget = "default" if args.max_heartbeats is None else f"{args.max_heartbeats:g}"
        print(f"the fleet's pace: heartbeat every {hb_s:g} s, lease {lease_s:g} s "
              f"(max_heartbeats_per_second {budget})", flush=True)
        print(f"{len(workers.procs)} simulator process(es): connected in "
              f"{max(j['connect_s'] for j in workers.joined):.1f} s, joined in "
              f"{max(j['join_s'] for j in workers.joined):.1f} s (all up {joined_s:.1f} s "
              f"after start)", flush=True)
        time.sleep(min(5.0, seconds))  # the first heartbeats of every host
        rss1 = rss_bytes(server.proc.pid)
        nrss1 = rss_bytes(server.nats_pid) if server.nats_pid else 0

        empty = hb_rounds(server, workers, rounds, seconds, "heartbeats, empty hosts")

        errors: list[str] = []
        done = 0
        budget = args.place_budget / rounds

        def phase(label: str, prefix: str, count: int, how: Callable[..., Any]
                  ) -> tuple[list[float], dict[str, Any] | None]:
            """``count`` instances named ``prefix``N placed by ``how`` in ``rounds`` slices:
            each slice's rate, and the heartbeats' window over all of them."""
            nonlocal done, errors
            names = [f"{prefix}{i:07d}" for i in range(count)]
            rates: list[float] = []
            workers.ask("mark")
            c0, spent = server.cpu(), 0.0
            for k in range(rounds):
                sl = names[k * count // rounds:(k + 1) * count // rounds]
                if not sl:
                    continue
                secs, placed, errs = how(server, sl, done, time.monotonic() + budget)
                done += len(placed)
                spent += secs
                errors += errs
                rates.append(len(placed) / secs)
                print(f"  {label} slice {k + 1}: {len(placed)} of {len(sl)} in {secs:.1f} s = "
                      f"{rates[-1]:.1f}/s ({done} placed, {len(errs)} errors)", flush=True)
            if not rates:
                return rates, None
            return rates, summarise(workers.ask("stats"), max(spent, 1e-9),
                                    diff(c0, server.cpu()))

        rates, window_single = phase("placement", "i", m, place)
        assert window_single is not None  # m >= 1
        placing = window_single
        place_cpu = placing["server_cpu"]
        # (a toy fleet has no room for ten times its instances)
        nb = args.batch if args.batch is not None else (10 * m if n >= 100 else m)
        brates, batching = phase("batch placement", "b", nb, place_batches)
        if batching is not None:
            print(f"  heartbeats while batch placing: p50 {batching['p50']:.0f} ms, p99 "
                  f"{batching['p99']:.0f} ms, max {batching['max']:.0f} ms; missed "
                  f"{batching['missed']}, lapsed {batching['lapsed']}", flush=True)
        print(f"  heartbeats while placing: p50 {placing['p50']:.0f} ms, p99 "
              f"{placing['p99']:.0f} ms, max {placing['max']:.0f} ms; missed "
              f"{placing['missed']}, lapsed {placing['lapsed']}", flush=True)
        if done < m:
            print(f"  (the placement budget of {args.place_budget:g} s ran out: {done} of {m} "
                  "placed; the checks below are of those)", flush=True)
        bad = [*early, *errors[:5], *check_placement(server, workers, done)]
        rss2 = rss_bytes(server.proc.pid)

        full = hb_rounds(server, workers, rounds, seconds, f"heartbeats, {done} instances")

        ls_times: list[float] = []
        ls_first: list[float] = []  # paged: the first page, and the whole list page by page
        ls_paged: list[float] = []
        ls_size = 0
        workers.ask("mark")
        c0, t0 = server.cpu(), time.monotonic()
        with server.client(timeout=600) as c:
            for _ in range(max(1, args.ls)):
                t = time.monotonic()
                got = c.instances_page()[0]  # no limit: the whole list in one answer
                ls_times.append(time.monotonic() - t)
                t = time.monotonic()
                pages = c.instance_pages()
                paged = next(pages)
                ls_first.append(time.monotonic() - t)
                paged += [i for page in pages for i in page]
                ls_paged.append(time.monotonic() - t)
                if [i["name"] for i in paged] != [i["name"] for i in got]:
                    bad.append(f"ls paged listed {len(paged)} instances, one answer {len(got)}")
                if len(got) != done:
                    bad.append(f"ls listed {len(got)} instances, not {done}")
            ls_size = len(json.dumps(got, separators=(",", ":")))
        during = summarise(workers.ask("stats"), time.monotonic() - t0, diff(c0, server.cpu()))
        print(f"  ls: {len(ls_times)} x GET /v1/instances ({ls_size / 1e6:.1f} MB): p50 "
              f"{pct(ls_times, 50):.2f} s, max {max(ls_times):.2f} s; heartbeats meanwhile "
              f"p99 {during['p99']:.0f} ms, max {during['max']:.0f} ms", flush=True)

        windows = [*empty, placing, *([batching] if batching else []), *full, during]
        lapsed = sum(w["lapsed"] for w in windows)
        missed = sum(w["missed"] for w in windows)
        downs = server.lease_misses(top)
        if not hosts_up(server, n):
            bad.append("not every host is up at the end")

        load = os.getloadavg()[0]
    finally:
        try:
            if workers is not None:
                workers.stop()
        finally:  # the server goes whatever stopping the simulators raised
            if server is not None:
                server.stop()
    try:  # with the server and the simulators stopped: the floor has the machine to itself
        print("the floor: the same writes straight into SQLite...", flush=True)
        floor_beat, floor_place = sqlite_floor(top / "floor.db", hosts, min(m, 3000),
                                               min(5000, max(200, 5 * n)))
    finally:
        if not args.keep:
            shutil.rmtree(top, ignore_errors=True)

    def col(key: str, ws: list[dict[str, Any]], f: str = ".1f") -> str:
        return mmm([w[key] for w in ws], f)

    print(f"\n{n} hosts, {done} instances placed of {m + nb}; median (min/max) of {rounds} rounds "
          f"(total run {time.monotonic() - t_start:.0f} s):")
    print(f"  server idle, no host:          CPU {idle_cpu:.1f} %, RSS {rss0 / 2**20:.0f} MiB "
          f"(nats-server {nrss0 / 2**20:.0f} MiB)")
    print(f"  enrolment (API):               {first / enroll_s:.1f} hosts/s for the first "
          f"{first}; {last_s:.2f} s per host at {n} hosts")
    print(f"  memory per host (joined):      server {(rss1 - rss0) / n / 1024:.0f} KiB, "
          f"nats-server {(nrss1 - nrss0) / n / 1024:.0f} KiB")
    for label, ws in (("empty hosts", empty), (f"{done} instances", full)):
        print(f"  heartbeats, {label + ':':<18} p50 {col('p50', ws)} ms, p99 {col('p99', ws)} "
              f"ms; server CPU {col('server_cpu', ws, '.0f')} % (waiting for a CPU "
              f"{col('server_wait', ws, '.0f')} %), nats {col('nats_cpu', ws, '.0f')} %, "
              f"{col('cpu_per_beat_ms', ws, '.2f')} ms CPU per heartbeat answered")
    print(f"  placement:                     {mmm(rates, '.0f')}/s per slice, server CPU "
          f"{place_cpu:.0f} %; memory after {(rss2 - rss0) / 2**20:.0f} MiB over idle")
    if brates and batching is not None:
        print(f"  batch placement ({MAX_BATCH_CREATE} a call, {BATCH_CLIENTS} at once): "
              f"{mmm(brates, '.0f')}/s per slice, server CPU {batching['server_cpu']:.0f} %")
    print(f"  ls (GET /v1/instances):        p50 {pct(ls_times, 50):.2f} s, p99 "
          f"{pct(ls_times, 99):.2f} s, {ls_size / 1e6:.1f} MB in one answer")
    print(f"  ls paged ({PAGE_SIZE} a page):        first page p50 "
          f"{pct(ls_first, 50) * 1000:.0f} ms, p99 {pct(ls_first, 99) * 1000:.0f} ms; the whole "
          f"list p50 {pct(ls_paged, 50):.2f} s, p99 {pct(ls_paged, 99):.2f} s")
    print(f"  GET /v1/hosts after placement: {HOSTS_LS[0]:.2f} s")
    print(f"  floor (SQLite, same writes):   {floor_beat:.3f} ms CPU per heartbeat, "
          f"{floor_place:.0f} placements/s")
    beat_ms = med([w["cpu_per_beat_ms"] for w in empty])
    if not beat_ms > 0:  # nothing answered (or nothing above idle): no capacity to derive
        beat_ms = float("nan")
    print(f"  one core's worth of server:    {1000 / beat_ms:.0f} heartbeats/s = "
          f"{hb_s * 1000 / beat_ms:.0f} hosts at a {hb_s:g} s heartbeat (with their samples)")
    print(f"  load average at the end {load:.1f} on {os.cpu_count()} cores (other load on "
          "this machine makes round trips and rates noisy; CPU per heartbeat less so)")
    print(f"  must be 0: unanswered heartbeats {missed}, hosts a whole lease without an "
          f"answer {lapsed} (summed over windows), hosts marked down {downs}, wrong "
          f"placements {len(bad)}")
    for b in bad[:10]:
        print(f"    {b}")
    print("  (anchor, quoted not measured: Nomad placed 1 M containers on 5,000 hosts at "
          "3,750/s with 5 servers)")
    out += [f"figure: fleet_scale.hosts {n} hosts",
            f"figure: fleet_scale.heartbeat_period {hb_s:g} s",
            f"figure: fleet_scale.lease {lease_s:g} s",
            f"figure: fleet_scale.enroll_rate_first_{first} {first / enroll_s:.1f} hosts/s",
            *([f"figure: fleet_scale.enroll_seconds_at_full {last_s:.2f} s"] if last else []),
            *([f"figure: fleet_scale.enroll_burst_{burst}_rate "
               f"{burst / max(burst_s, 1e-9):.1f} hosts/s",
               f"figure: fleet_scale.enroll_burst_{burst}_reloads {burst_reloads} count"]
              if burst else []),
            f"figure: fleet_scale.server_rss_per_host {(rss1 - rss0) / n / 1024:.1f} KiB",
            f"figure: fleet_scale.hb_p50 {med([w['p50'] for w in empty]):.2f} ms",
            f"figure: fleet_scale.hb_p99 {med([w['p99'] for w in empty]):.2f} ms",
            f"figure: fleet_scale.hb_server_cpu {med([w['server_cpu'] for w in empty]):.1f} %",
            f"figure: fleet_scale.hb_server_cpu_wait "
            f"{med([w['server_wait'] for w in empty]):.1f} %",
            f"figure: fleet_scale.hb_nats_cpu {med([w['nats_cpu'] for w in empty]):.1f} %",
            f"figure: fleet_scale.hb_cpu_per_beat "
            f"{med([w['cpu_per_beat_ms'] for w in empty]):.3f} ms",
            f"figure: fleet_scale.hb_cpu_per_beat.baseline {floor_beat:.3f} ms",
            f"figure: fleet_scale.hosts_per_server_core {hb_s * 1000 / beat_ms:.0f} hosts",
            f"figure: fleet_scale.hb_full_p50 {med([w['p50'] for w in full]):.2f} ms",
            f"figure: fleet_scale.hb_full_p99 {med([w['p99'] for w in full]):.2f} ms",
            f"figure: fleet_scale.hb_full_server_cpu "
            f"{med([w['server_cpu'] for w in full]):.1f} %",
            f"figure: fleet_scale.hb_full_cpu_per_beat "
            f"{med([w['cpu_per_beat_ms'] for w in full]):.3f} ms",
            f"figure: fleet_scale.placement_rate {med(rates):.1f} instances/s",
            f"figure: fleet_scale.placement_rate_last_slice {rates[-1]:.1f} instances/s",
            f"figure: fleet_scale.placement_rate.baseline {floor_place:.1f} instances/s",
            *([f"figure: fleet_scale.placement_rate_batch {med(brates):.1f} instances/s",
               f"figure: fleet_scale.placement_rate_batch_last_slice {brates[-1]:.1f} "
               "instances/s"] if brates else []),
            f"figure: fleet_scale.instances {done} instances",
            f"figure: fleet_scale.instances_asked {m + nb} instances",
            f"figure: fleet_scale.hb_p99_while_placing {placing['p99']:.0f} ms",
            f"figure: fleet_scale.ls_p50 {pct(ls_times, 50) * 1000:.0f} ms",
            f"figure: fleet_scale.ls_p99 {pct(ls_times, 99) * 1000:.0f} ms",
            f"figure: fleet_scale.ls_bytes {ls_size} bytes",
            f"figure: fleet_scale.ls_first_page_p50 {pct(ls_first, 50) * 1000:.0f} ms",
            f"figure: fleet_scale.ls_first_page_p99 {pct(ls_first, 99) * 1000:.0f} ms",
            f"figure: fleet_scale.ls_paged_p50 {pct(ls_paged, 50) * 1000:.0f} ms",
            f"figure: fleet_scale.ls_paged_p99 {pct(ls_paged, 99) * 1000:.0f} ms",
            f"figure: fleet_scale.hosts_ls_seconds {HOSTS_LS[0]:.2f} s",
            f"figure: fleet_scale.hb_max_during_ls {during['max']:.0f} ms",
            f"figure: fleet_scale.hb_unanswered {missed} count",
            f"figure: fleet_scale.lease_lapses {lapsed} count",
            f"figure: fleet_scale.hosts_marked_down {downs} count",
            f"figure: fleet_scale.wrong_placements {len(bad)} count"]
    print("\n".join(out))
    return 1 if bad or lapsed or downs else 0


if __name__ == "__main__":
    raise SystemExit(main())
