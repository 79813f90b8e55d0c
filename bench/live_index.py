#!/usr/bin/env python3
"""Who's-online index: a stream of hits with queries between them, corral beside SQLite.

USERS.md §5: a "who's online" service MySQL could not serve (200 replaces/s, 150 queries/s); a
C skiplist did ~80,000 inserts/s. The stream here is longer than the online window, so expiry
runs during every timed phase, as in the real service: ``--hits`` hits (default 2,000,000) by
clients drawn from ``--clients`` (1,000,000), one every ``--dt`` simulated seconds, a window of
``--window`` (300 s: about 600,000 hits are online at a time). The stream is cut into phases;
in each, every ``--every`` hits both sides answer "how many are online" and "the 30 latest on a
URL" (the hot page, then one drawn from the stream), and after each phase every answer is
compared: count, and the top 30 of the hot page and of 20 other pages.

SQLite gets its best design for this job: an in-memory database, ``WITHOUT ROWID`` table keyed
by client, an index on (url, ts) and on ts, UPSERT, inserts batched in transactions of
``--every`` (a query commits first, so it sees them), the count kept by triggers in a one-row
table (no COUNT(*) scan), expiry of what left the window before each query (a range delete on
the ts index).

The product-ingest figure goes through what ``corral traffic`` runs: raw Combined Log Format
lines in :class:`~corral.bus.messages.LogBatch` batches through the per-instance de-dup
(``InstanceTraffic.feed``), the access-log parser and into the index and the rate windows;
the answer is checked against a brute-force count of the same lines.

Each figure is the median (min/max) of ``--rounds`` rounds.

    python bench/live_index.py                  # ~2 minutes
    python bench/live_index.py --hits 200000 --clients 100000 --rounds 1
"""

from __future__ import annotations

import argparse
import random
import sqlite3
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime

from corral.bus.messages import LogBatch
from corral.telemetry.live_index import OnlineIndex
from corral.telemetry.traffic import InstanceTraffic

Hit = tuple[str, str, float]


def stream(hits: int, clients: int, urls: int, dt: float, seed: int) -> list[Hit]:
    """Hits by clients drawn from a population, URLs with a heavy head (a few hot pages);
    every timestamp distinct, so "latest first" has one answer."""
    rnd = random.Random(seed)
    weights = [1.0 / (i + 1) for i in range(urls)]
    pages = [f"/page/{i}" for i in range(urls)]
    chosen = rnd.choices(pages, weights=weights, k=hits)
    who = [f"c{rnd.randrange(clients)}" for _ in range(hits)]
    return [(who[i], chosen[i], (i + 1) * dt) for i in range(hits)]


class SqliteOnline:
    def __init__(self, window: float) -> None:
        self.window = window
        self.db = sqlite3.connect(":memory:", isolation_level=None)
        self.db.executescript(
            "PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF; PRAGMA temp_store=MEMORY;"
            "CREATE TABLE online(client TEXT PRIMARY KEY, url TEXT NOT NULL, ts REAL NOT NULL)"
            " WITHOUT ROWID;"
            "CREATE INDEX by_url ON online(url, ts); CREATE INDEX by_ts ON online(ts);"
            "CREATE TABLE n(k INTEGER PRIMARY KEY, v INTEGER NOT NULL);"
            "INSERT INTO n VALUES (1, 0);"
            "CREATE TRIGGER n_ins AFTER INSERT ON online BEGIN"
            " UPDATE n SET v = v + 1 WHERE k = 1; END;"
            "CREATE TRIGGER n_del AFTER DELETE ON online BEGIN"
            " UPDATE n SET v = v - 1 WHERE k = 1; END;"
        )
        self.pending: list[Hit] = []

    def hit(self, client: str, url: str, ts: float) -> None:
        self.pending.append((client, url, ts))

    def _flush(self, now: float) -> None:
        db = self.db
        db.execute("BEGIN")
        if self.pending:
            db.executemany(
                "INSERT INTO online VALUES (?,?,?) ON CONFLICT(client) DO UPDATE SET "
                "url = excluded.url, ts = excluded.ts", self.pending)
            self.pending.clear()
        db.execute("DELETE FROM online WHERE ts <= ?", (now - self.window,))
        db.execute("COMMIT")

    def count(self, now: float) -> int:
        self._flush(now)
        return int(self.db.execute("SELECT v FROM n WHERE k = 1").fetchone()[0])

    def on_url(self, url: str, limit: int, now: float) -> list[tuple[str, float]]:
        self._flush(now)
        cur = self.db.execute(
            "SELECT client, ts FROM online WHERE url = ? AND ts > ? ORDER BY ts DESC LIMIT ?",
            (url, now - self.window, limit))
        return [(str(c), float(t)) for c, t in cur.fetchall()]


class CorralOnline:
    def __init__(self, window: float) -> None:
        self.idx = OnlineIndex(window_s=window, max_clients=10**9)

    def hit(self, client: str, url: str, ts: float) -> None:
        self.idx.hit(client, url, ts)

    def count(self, now: float) -> int:
        return self.idx.count(now)

    def on_url(self, url: str, limit: int, now: float) -> list[tuple[str, float]]:
        return self.idx.on_url(url, limit, now)


Side = CorralOnline | SqliteOnline


def phase(side: Side, hits: list[Hit], every: int, hot: str) -> float:
    """Hits with queries between them; operations (hits + queries) per second."""
    ops = 0
    t0 = time.perf_counter()
    for i, (client, url, ts) in enumerate(hits, 1):
        side.hit(client, url, ts)
        if i % every == 0:
            side.count(ts)
            side.on_url(hot, 30, ts)
            side.on_url(hits[i - every][1], 30, ts)
            ops += 3
    return (len(hits) + ops) / (time.perf_counter() - t0)


def query_rate(fn: Callable[[int], object], seconds: float) -> float:
    done = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(64):
            fn(done)
            done += 1
    return done / (time.perf_counter() - t0)


def check(a: Side, b: Side, now: float, pages: list[str]) -> None:
    ca, cb = a.count(now), b.count(now)
    assert ca == cb, f"online counts differ: corral {ca}, sqlite {cb}"
    for url in pages:
        assert a.on_url(url, 30, now) == b.on_url(url, 30, now), f"answers differ on {url}"


def lines_of(hits: list[Hit], t0: float) -> list[str]:
    """The hits as Combined Log Format lines (whole seconds, as servers write them)."""
    out = []
    for client, url, ts in hits:
        when = datetime.fromtimestamp(t0 + ts, UTC).strftime("%d/%b/%Y:%H:%M:%S +0000")
        ip = f"10.{int(client[1:]) >> 16 & 255}.{int(client[1:]) >> 8 & 255}." \
             f"{int(client[1:]) & 255}"
        out.append(f'{ip} - - [{when}] "GET {url} HTTP/1.1" 200 512 "-" "bench/1.0"')
    return out


def ingest(lines: list[str], window: float, per: int = 500) -> tuple[float, InstanceTraffic]:
    traffic = InstanceTraffic("web", online_window_s=window)
    batches = [LogBatch(host="h1", instance="web", source="access", first_seq=b + 1,
                        lines=lines[b:b + per], ts=0.0) for b in range(0, len(lines), per)]
    t0 = time.perf_counter()
    for batch in batches:
        traffic.feed(batch)
    for batch in batches[: len(batches) // 10]:  # a tenth sent again (an agent's restart)
        traffic.feed(batch)
    return len(lines) / (time.perf_counter() - t0), traffic


def summary(xs: list[float]) -> str:
    return f"{statistics.median(xs):>12,.0f} ({min(xs):,.0f}/{max(xs):,.0f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hits", type=int, default=2_000_000)
    ap.add_argument("--clients", type=int, default=1_000_000)
    ap.add_argument("--urls", type=int, default=10_000)
    ap.add_argument("--dt", type=float, default=0.0005, help="simulated seconds between hits")
    ap.add_argument("--window", type=float, default=300.0, help="online window, seconds")
    ap.add_argument("--every", type=int, default=1000, help="hits between queries")
    ap.add_argument("--phases", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ingest-lines", type=int, default=300_000)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()

    hits = stream(args.hits, args.clients, args.urls, args.dt, args.seed)
    span = hits[-1][2]
    assert span > 2 * args.window, "the stream must be longer than the window: expiry must run"
    hot = "/page/0"
    cut = len(hits) // args.phases
    per_phase: dict[str, list[list[float]]] = {"corral": [], "sqlite": []}
    queries: dict[str, list[float]] = {k: [] for k in
                                       ("corral.count", "sqlite.count", "corral.url", "sqlite.url")}
    online_at_end = 0
    for r in range(args.rounds):
        rnd = random.Random(r)
        sides: dict[str, Side] = {"corral": CorralOnline(args.window),
                                  "sqlite": SqliteOnline(args.window)}
        rates: dict[str, list[float]] = {"corral": [], "sqlite": []}
        for p in range(args.phases):
            part = hits[p * cut:(p + 1) * cut]
            for name, side in sides.items():
                rates[name].append(phase(side, part, args.every, hot))
            now = part[-1][2]
            pages = [hot, *(rnd.choice(part)[1] for _ in range(20))]
            check(sides["corral"], sides["sqlite"], now, pages)
        for name in rates:
            per_phase[name].append(rates[name])
        now = hits[cut * args.phases - 1][2]
        online_at_end = sides["corral"].count(now)
        urls = [h[1] for h in hits[-4096:]]
        for name, side in sides.items():
            queries[f"{name}.count"].append(
                query_rate(lambda i, s=side, t=now: s.count(t), 1.0))
            queries[f"{name}.url"].append(query_rate(
                lambda i, s=side, t=now, u=urls: s.on_url(u[i % 4096], 30, t), 1.0))
        print(f"  round {r + 1}: corral {[f'{x:,.0f}' for x in rates['corral']]} ops/s, "
              f"sqlite {[f'{x:,.0f}' for x in rates['sqlite']]} ops/s; answers equal after "
              f"every phase", flush=True)

    # the product's ingest: raw lines, parser, de-dup, index
    lines = lines_of(hits[: args.ingest_lines], 1_796_000_000.0)
    ingest_rates = []
    for _ in range(args.rounds):
        rate, traffic = ingest(lines, args.window)
        ingest_rates.append(rate)
    assert traffic.lines == len(lines) and traffic.reader.bad == 0
    assert traffic.duplicates == (len(lines) // 500 // 10) * 500
    last = max(1_796_000_000.0 + h[2] for h in hits[: args.ingest_lines])
    last = float(int(last))
    brute = {f"10.{int(c[1:]) >> 16 & 255}.{int(c[1:]) >> 8 & 255}.{int(c[1:]) & 255}"
             for c, _, ts in hits[: args.ingest_lines]
             if float(int(1_796_000_000.0 + ts)) > last - args.window}
    assert traffic.online.count(last) == len(brute), "ingest: the index's online count is wrong"

    def med(name: str, p: int) -> list[float]:
        return [rs[p] for rs in per_phase[name]]

    print(f"\nhits {args.hits:,} by {args.clients:,} clients over {span:,.0f} s simulated, "
          f"window {args.window:g} s ({online_at_end:,} online at the end), a count and two "
          f"top-30 queries every {args.every} hits; ops/s, median (min/max) of {args.rounds}")
    print(f"{'phase':>6} | {'corral':>28} | {'sqlite (best design)':>28}")
    for p in range(args.phases):
        print(f"{p + 1:>6} | {summary(med('corral', p)):>28} | {summary(med('sqlite', p)):>28}")
    print(f"{'count/s':>16}: corral {summary(queries['corral.count'])}, "
          f"sqlite {summary(queries['sqlite.count'])}")
    print(f"{'top-30 on URL/s':>16}: corral {summary(queries['corral.url'])}, "
          f"sqlite {summary(queries['sqlite.url'])}")
    print(f"{'ingest lines/s':>16}: {summary(ingest_rates)} (raw access-log lines through "
          "the parser, the de-dup and the index)")
    last_c = statistics.median(med("corral", args.phases - 1))
    last_s = statistics.median(med("sqlite", args.phases - 1))
    print(f"figure: live_index.stream_ops {last_c:.0f} ops/s")
    print(f"figure: live_index.stream_ops.baseline {last_s:.0f} ops/s")
    print(f"figure: live_index.count {statistics.median(queries['corral.count']):.0f} queries/s")
    print(f"figure: live_index.count.baseline "
          f"{statistics.median(queries['sqlite.count']):.0f} queries/s")
    print(f"figure: live_index.top30_on_url {statistics.median(queries['corral.url']):.0f} "
          "queries/s")
    print(f"figure: live_index.top30_on_url.baseline "
          f"{statistics.median(queries['sqlite.url']):.0f} queries/s")
    print(f"figure: live_index.ingest {statistics.median(ingest_rates):.0f} lines/s")


if __name__ == "__main__":
    main()
