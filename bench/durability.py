#!/usr/bin/env python3
"""Figure: what corral's two power-loss durability settings cost, side by side in one run.

Issue "Power-loss durability ... put the cost in a bench". corral chose:

1. **SQLite with** ``PRAGMA synchronous=FULL`` (``control/db.py``, ``make_engine``): in WAL
   mode every commit fsyncs the WAL before it returns, because agents act on committed state.
   Beside it, the previous setting, ``synchronous=NORMAL`` (the WAL is synced only at
   checkpoints: a power loss may take the last commits).
2. **JetStream with** ``sync_interval: always`` (``bus/embedded.py``, ``_write_config``): the
   embedded nats-server fsyncs a message before it acknowledges it, because log capture and
   sinks advance their offsets on acks. Beside it, nats-server's default (a sync every 2 min).

Everything goes through the product's code, only the one setting differs:

* **SQLite**: ``open_db`` (the product's engine, its connect hook, its migrations) and the
  server's :class:`~corral.control.fleet.Fleet`. The NORMAL database is opened by the same
  ``open_db``; then a second ``connect`` listener is added to the engine, which SQLAlchemy runs
  after the product's own (so ``synchronous=NORMAL`` overrides its ``FULL`` on every new
  connection), and the pool is disposed, so the connection the migration left behind (opened
  FULL) is not reused. ``PRAGMA synchronous`` is read back on a pooled connection to check
  which setting is measured. The writes are those of ``corral run``, each its own transaction
  as the server makes them: the create's insert of the instance row (``pending``), then
  ``Fleet.move(name, CREATED, report=...)`` and ``Fleet.move(name, RUNNING, report=...)``
  with the agent's report (pid, epoch). The latency of a write is the wall time of its whole
  transaction (the ORM work, the commit and its fsync): what the server's event loop waits.
  Afterwards every row is read back and compared with what was written.
* **JetStream**: ``EmbeddedNats`` as the server starts it (token auth, JetStream in the data
  dir; the server's per-host nkey users change who may log in, not how a message is stored),
  the CORRAL_LOGS stream from ``streams.logs_config()`` made by ``streams.ensure``, and
  ``LogBatch`` batches published the way ``LogCapture.pump`` publishes them (its subject, its
  JSON, ``Nats-Msg-Id``), each ack awaited before the next. The default-sync server is a
  subclass whose ``_write_config`` calls the product's and strips ``, sync_interval: always``
  from the file it wrote (the bench stops if that text is not there). Batches are 500 lines
  of ~70 bytes: a loaded capture's batch (``max_batch=500``; 256 KiB is far away). They are
  built before the clock starts, so the figures are the bus's. One publisher is one agent
  (an agent pumps its instances one ack at a time); the concurrent case is several agents,
  each on its own connection and subject, publishing into the one stream at once. Afterwards
  the stream must hold exactly the batches published; then each publisher's last batch is sent
  again (an agent killed before it saved its offsets does that) and must be acknowledged as a
  duplicate and stored once, and the last message of each subject must be that batch.

Each round first times 4 KiB write+fsync on the data dir's device (what one flush costs there),
then runs the four configurations, in alternating order from round to round, on fresh data dirs;
the figures are the medians over rounds (min and max shown). The ``_over_`` figures divide the
durable setting's rate by the other's: the share of throughput corral keeps (1.0 = free).

Everything lives in a temp dir on the filesystem a fleet's data dir would be on (``--dir``,
default /var/tmp: fsync cost is the device's), which is printed; nats-server processes and the
temp dir are removed at the end, also on failure or Ctrl-C. Only loopback is used.

    .venv/bin/python bench/durability.py              # 5 rounds, about two minutes
    .venv/bin/python bench/durability.py --long       # 9 rounds, 3x the writes, 2x the batches
    .venv/bin/python bench/durability.py --dir /srv/corral --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import event, select

from corral.bus import streams, subjects
from corral.bus.connect import connect
from corral.bus.embedded import EmbeddedNats
from corral.bus.messages import Capacity, InstanceReport, JoinRequest, LogBatch
from corral.config import Settings
from corral.control.db import Instance, open_db
from corral.control.fleet import Fleet
from corral.lifecycle import State

HOST = "bench-host"
PAD = "x" * 48  # lines of ~70 bytes, like bench/logs.py
SYNC_ALWAYS = ", sync_interval: always"
SYNC_LEVELS = {"full": 2, "normal": 1}  # what PRAGMA synchronous reads back


def line(i: int) -> str:
    return f"gen line {i} {PAD}"


def pct(values: list[float], q: float) -> float:
    """The q-quantile (0..1) of ``values``, nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


@dataclass
class Sample:
    """One round of one configuration."""

    count: int  # commits, or acked batches
    seconds: float
    latencies: list[float]

    @property
    def rate(self) -> float:
        return self.count / self.seconds

    @property
    def p50_ms(self) -> float:
        return pct(self.latencies, 0.50) * 1000

    @property
    def p99_ms(self) -> float:
        return pct(self.latencies, 0.99) * 1000


# --- the device ------------------------------------------------------------------------------


def fsync_round(root: Path, count: int = 200) -> Sample:
    """``count`` overwrites of a 4 KiB block, each followed by fsync: the device's flush cost
    that every FULL commit and every ``always`` ack pays at least once."""
    path = root / "fsync-probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    latencies: list[float] = []
    try:
        block = os.urandom(4096)
        t0 = time.perf_counter()
        for _ in range(count):
            t = time.perf_counter()
            os.pwrite(fd, block, 0)
            os.fsync(fd)
            latencies.append(time.perf_counter() - t)
        seconds = time.perf_counter() - t0
    finally:
        os.close(fd)
        path.unlink()
    return Sample(count, seconds, latencies)


# --- SQLite ------------------------------------------------------------------------------------


def sqlite_round(root: Path, sync: str, instances: int) -> Sample:
    settings = Settings(data_dir=root / f"sqlite-{sync}")
    engine, sessions = open_db(settings)
    try:
        if sync == "normal":
            @event.listens_for(engine, "connect")
            def _normal(dbapi_conn: Any, _record: Any) -> None:
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA synchronous=NORMAL")  # after the product's FULL
                cur.close()

            engine.dispose()  # the migration's pooled connection was opened with FULL
        with sessions() as s:
            level = s.connection().exec_driver_sql("PRAGMA synchronous").scalar()
        if level != SYNC_LEVELS[sync]:
            raise SystemExit(f"sqlite: PRAGMA synchronous is {level}, expected {sync}")

        fleet = Fleet(sessions, settings)
        fleet.join(JoinRequest(host=HOST, address="127.0.0.1",
                               capacity=Capacity(cores=64, memory_bytes=1 << 40,
                                                 disk_bytes=1 << 40),
                               drivers={"process": {}}, agent_version="bench"))
        want: dict[str, tuple[Any, ...]] = {}
        latencies: list[float] = []

        def timed(write: Callable[[], object]) -> None:
            t = time.perf_counter()
            write()
            latencies.append(time.perf_counter() - t)

        t0 = time.perf_counter()
        for k in range(instances):
            name = f"bench-{k}"
            command = ["sleep", str(3600 + k)]
            pid = 100_000 + k

            env = {"K": str(k)}

            def create(name: str = name, command: list[str] = command,
                       env: dict[str, str] = env) -> None:
                now = fleet.clock()
                with sessions.begin() as s:  # the insert of InstanceService.create
                    s.add(Instance(name=name, host=HOST, driver="process", command=command,
                                   rootfs=None, image=None, env=env, tail={},
                                   cpus=0.1, vip=None, memory_bytes=64 << 20, epoch=1,
                                   created_at=now, updated_at=now,
                                   desired_state=State.RUNNING.value,
                                   state=State.PENDING.value))

            def created(name: str = name) -> None:
                report = InstanceReport(name=name, driver="process", state="created", epoch=1)
                if not fleet.move(name, State.CREATED, report=report):
                    raise SystemExit(f"sqlite: {name} vanished")

            def running(name: str = name, pid: int = pid) -> None:
                report = InstanceReport(name=name, driver="process", state="running", pid=pid,
                                        epoch=1)
                if not fleet.move(name, State.RUNNING, report=report):
                    raise SystemExit(f"sqlite: {name} vanished")

            timed(create)
            timed(created)
            timed(running)
            want[name] = (HOST, command, env, "running", "running", pid, 1)
        seconds = time.perf_counter() - t0

        engine.dispose()  # read back on a fresh connection
        with sessions() as s:
            got = {i.name: (i.host, i.command, i.env, i.desired_state, i.state, i.pid, i.epoch)
                   for i in s.scalars(select(Instance))}
        if got != want:
            bad = sorted(n for n in want.keys() | got.keys() if got.get(n) != want.get(n))
            raise SystemExit(f"sqlite ({sync}): {len(bad)} rows differ from what was written, "
                             f"e.g. {bad[0]}: {got.get(bad[0])} != {want.get(bad[0])}")
        return Sample(len(latencies), seconds, latencies)
    finally:
        engine.dispose()


# --- JetStream ---------------------------------------------------------------------------------


class DefaultSyncNats(EmbeddedNats):
    """The product's embedded nats-server, less ``sync_interval: always`` (nats-server's
    default then applies: a sync every 2 minutes)."""

    def _write_config(self, store: Path) -> Path:
        path = super()._write_config(store)
        text = path.read_text()
        if SYNC_ALWAYS not in text:
            raise SystemExit(f"the product's nats config no longer holds {SYNC_ALWAYS!r}: "
                             f"update bench/durability.py ({text.splitlines()[-1]})")
        path.write_text(text.replace(SYNC_ALWAYS, ""))
        return path


def make_batches(host: str, count: int, lines: int) -> list[LogBatch]:
    out = []
    seq = 1
    for _ in range(count):
        out.append(LogBatch(host=host, instance="gen", source="stdout", first_seq=seq,
                            lines=[line(i) for i in range(seq, seq + lines)], ts=time.time()))
        seq += lines
    return out


async def publish_level(url: str, token: str, admin_js: Any, tag: str, publishers: int,
                        batches: int, lines: int) -> Sample:
    """``batches`` batches in all from ``publishers`` agents at once, each awaiting its acks."""
    per = max(1, batches // publishers)
    hosts = [f"{tag}p{p}" for p in range(publishers)]
    work = {h: make_batches(h, per, lines) for h in hosts}
    payloads = {h: [b.model_dump_json().encode() for b in bs] for h, bs in work.items()}
    conns = []
    try:
        for h in hosts:
            conns.append(await connect(url, token, f"bench-agent-{h}"))
        before = (await admin_js.stream_info(streams.LOGS)).state.messages
        latencies: list[float] = []

        async def agent(nc: Any, host: str) -> None:
            js = nc.jetstream()  # as CaptureManager.run
            subject = subjects.logs(host, "gen")
            for batch, payload in zip(work[host], payloads[host], strict=True):
                t = time.perf_counter()
                ack = await js.publish(subject, payload, headers={"Nats-Msg-Id": batch.msg_id})
                latencies.append(time.perf_counter() - t)
                if ack.duplicate:
                    raise SystemExit(f"jetstream: a fresh batch {batch.msg_id} was a duplicate")

        t0 = time.perf_counter()
        await asyncio.gather(*(agent(nc, h) for nc, h in zip(conns, hosts, strict=True)))
        seconds = time.perf_counter() - t0

        sent = per * publishers
        stored = (await admin_js.stream_info(streams.LOGS)).state.messages - before
        if stored != sent:
            raise SystemExit(f"jetstream ({tag}): {sent} batches acked, {stored} stored")
        for nc, h in zip(conns, hosts, strict=True):  # an agent that lost its offsets re-sends
            last = work[h][-1]
            ack = await nc.jetstream().publish(subjects.logs(h, "gen"), payloads[h][-1],
                                               headers={"Nats-Msg-Id": last.msg_id})
            if not ack.duplicate:
                raise SystemExit(f"jetstream ({tag}): re-sent {last.msg_id} was stored again")
            msg = await admin_js.get_last_msg(streams.LOGS, subjects.logs(h, "gen"))
            if LogBatch.model_validate_json(msg.data) != last:
                raise SystemExit(f"jetstream ({tag}): the last batch of {h} differs")
        stored = (await admin_js.stream_info(streams.LOGS)).state.messages - before
        if stored != sent:
            raise SystemExit(f"jetstream ({tag}): {stored} batches stored after re-sends of "
                             f"{sent} (duplicates kept)")
        return Sample(sent, seconds, latencies)
    finally:
        for nc in conns:
            with contextlib.suppress(Exception):
                await nc.close()


async def jetstream_round(root: Path, mode: str, levels: list[int], batches: int,
                          lines: int) -> dict[int, Sample]:
    data = root / f"nats-{mode}"
    token = secrets.token_hex(16)
    cls = EmbeddedNats if mode == "always" else DefaultSyncNats
    nats = cls(data, token)
    admin = None
    try:
        nats.start()  # in the main thread, as the server does (the child dies with it)
        conf = (data / "nats" / "auth.conf").read_text()
        if (SYNC_ALWAYS in conf) != (mode == "always"):
            raise SystemExit(f"jetstream ({mode}): unexpected config {conf!r}")
        admin = await connect(nats.url, token, "bench-admin")
        admin_js = admin.jetstream()
        await streams.ensure(admin_js, streams.logs_config())
        return {n: await publish_level(nats.url, token, admin_js, f"{mode[0]}{n}", n, batches,
                                       lines) for n in levels}
    finally:
        if admin is not None:
            with contextlib.suppress(Exception):
                await admin.close()
        nats.stop()
        shutil.rmtree(data, ignore_errors=True)


# --- the run -----------------------------------------------------------------------------------


def where(path: Path) -> str:
    out: list[str] = []
    for cmd in (["findmnt", "-T", str(path), "-o", "TARGET,SOURCE,FSTYPE,OPTIONS"],
                ["df", "-hT", str(path)]):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            out.extend("  " + ln for ln in proc.stdout.strip().splitlines())
    return "\n".join(out) or "  (findmnt/df unavailable)"


def stat_line(values: list[float], fmt: str) -> str:
    return (f"{format(statistics.median(values), fmt):>9} "
            f"({format(min(values), fmt)} .. {format(max(values), fmt)})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=None, help="rounds (default 5, --long 9)")
    ap.add_argument("--instances", type=int, default=None,
                    help="instances created per SQLite round, 3 writes each "
                         "(default 2000, --long 6000)")
    ap.add_argument("--batches", type=int, default=None,
                    help="log batches per JetStream configuration and publisher count "
                         "(default 2000, --long 4000)")
    ap.add_argument("--lines", type=int, default=500, help="lines per batch (capture's max)")
    ap.add_argument("--publishers", type=int, nargs="+", default=[1, 8],
                    help="concurrent publishers (agents) measured")
    ap.add_argument("--dir", type=Path, default=Path("/var/tmp"),
                    help="where the data dirs live (the fleet's filesystem)")
    ap.add_argument("--long", action="store_true", help="9 rounds, 3x the writes, 2x the batches")
    args = ap.parse_args()
    rounds = args.rounds or (9 if args.long else 5)
    instances = args.instances or (6000 if args.long else 2000)
    batches = args.batches or (4000 if args.long else 2000)
    if batches > streams.MAX_BATCHES_PER_INSTANCE:
        raise SystemExit(f"--batches above {streams.MAX_BATCHES_PER_INSTANCE}: the stream "
                         "would drop a publisher's oldest batches")
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))

    args.dir.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="corral-bench-durability-", dir=args.dir))
    load_before = os.getloadavg()
    print(f"data in {base}, on:\n{where(base)}")
    print(f"{rounds} rounds; SQLite: {instances} instances x 3 writes per round; JetStream: "
          f"{batches} batches of {args.lines} lines per publisher count {args.publishers}; "
          f"{os.cpu_count()} cores, load average {load_before[0]:.2f}", flush=True)

    probe: list[Sample] = []
    sql: dict[str, list[Sample]] = {"full": [], "normal": []}
    jet: dict[tuple[str, int], list[Sample]] = {
        (m, n): [] for m in ("always", "default") for n in args.publishers}
    t_start = time.monotonic()
    try:
        for r in range(rounds):
            rdir = base / f"r{r}"
            rdir.mkdir()
            probe.append(fsync_round(rdir))
            syncs = ["full", "normal"] if r % 2 == 0 else ["normal", "full"]
            for sync in syncs:
                sql[sync].append(sqlite_round(rdir, sync, instances))
            modes = ["always", "default"] if r % 2 == 0 else ["default", "always"]
            for mode in modes:
                got = asyncio.run(jetstream_round(rdir, mode, args.publishers, batches,
                                                  args.lines))
                for n, sample in got.items():
                    jet[(mode, n)].append(sample)
            shutil.rmtree(rdir, ignore_errors=True)
            parts = [f"sqlite {s} {sql[s][-1].rate:,.0f}/s" for s in ("full", "normal")]
            parts += [f"js {m} x{n} {jet[(m, n)][-1].rate:,.0f}/s"
                      for m in ("always", "default") for n in args.publishers]
            print(f"  round {r + 1}: " + ", ".join(parts), flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)

    load_after = os.getloadavg()
    print(f"\n{time.monotonic() - t_start:.0f} s, load average {load_after[0]:.2f} after; "
          f"median (min .. max) over {rounds} rounds")
    print(f"\ndevice: 4 KiB write + fsync  p50 {stat_line([x.p50_ms for x in probe], '.3f')} ms"
          f"   p99 {stat_line([x.p99_ms for x in probe], '.3f')} ms")
    print("\nSQLite, corral run's writes (insert, created, running), one transaction each:")
    print(f"  {'synchronous':12} {'commits/s':>22} {'p50 ms':>22} {'p99 ms':>22}")
    for s in ("full", "normal"):
        print(f"  {s.upper():12} {stat_line([x.rate for x in sql[s]], ',.0f'):>22} "
              f"{stat_line([x.p50_ms for x in sql[s]], '.2f'):>22} "
              f"{stat_line([x.p99_ms for x in sql[s]], '.2f'):>22}")
    print(f"\nJetStream CORRAL_LOGS, {args.lines}-line batches (~{len(line(10**6)) + 1} B lines), "
          "each ack awaited:")
    print(f"  {'sync':8} {'pubs':>4} {'batches/s':>22} {'lines/s':>28} {'p50 ms':>22} "
          f"{'p99 ms':>22}")
    for m in ("always", "default"):
        for n in args.publishers:
            xs = jet[(m, n)]
            print(f"  {m:8} {n:>4} {stat_line([x.rate for x in xs], ',.0f'):>22} "
                  f"{stat_line([x.rate * args.lines for x in xs], ',.0f'):>28} "
                  f"{stat_line([x.p50_ms for x in xs], '.2f'):>22} "
                  f"{stat_line([x.p99_ms for x in xs], '.2f'):>22}")
    print("\ncorrectness: every SQLite row read back as written; every stream held exactly the "
          "batches acked; every re-sent batch was acked as a duplicate and stored once")

    def med(samples: list[Sample], f: Callable[[Sample], float]) -> float:
        return statistics.median(f(x) for x in samples)

    print()
    print(f"figure: device_fsync_p50_ms {med(probe, lambda x: x.p50_ms):.3f} ms")
    for s in ("full", "normal"):
        print(f"figure: sqlite_{s}_commits_per_s {med(sql[s], lambda x: x.rate):.0f} 1/s")
        print(f"figure: sqlite_{s}_p50_ms {med(sql[s], lambda x: x.p50_ms):.3f} ms")
        print(f"figure: sqlite_{s}_p99_ms {med(sql[s], lambda x: x.p99_ms):.3f} ms")
    full, normal = (med(sql[s], lambda x: x.rate) for s in ("full", "normal"))
    print(f"figure: sqlite_full_over_normal_commits {full / normal:.3f} x")
    for m in ("always", "default"):
        for n in args.publishers:
            key = f"jetstream_{m}" + ("" if n == 1 else f"_{n}pub")
            xs = jet[(m, n)]
            print(f"figure: {key}_batches_per_s {med(xs, lambda x: x.rate):.0f} 1/s")
            print(f"figure: {key}_lines_per_s {med(xs, lambda x: x.rate) * args.lines:.0f} 1/s")
            print(f"figure: {key}_p50_ms {med(xs, lambda x: x.p50_ms):.3f} ms")
            print(f"figure: {key}_p99_ms {med(xs, lambda x: x.p99_ms):.3f} ms")
    for n in args.publishers:
        always, default = (med(jet[(m, n)], lambda x: x.rate) for m in ("always", "default"))
        suffix = "" if n == 1 else f"_{n}pub"
        print(f"figure: jetstream_always_over_default_batches{suffix} {always / default:.3f} x")


if __name__ == "__main__":
    main()
