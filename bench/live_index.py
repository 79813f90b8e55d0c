"""Who's-online index: inserts/s, counts/s and top-30-on-URL queries/s at N online clients.

Prints corral's in-memory OnlineIndex beside a SQLite baseline (in-memory database, indexed on
(url, ts) and ts, WAL off: its best case) answering the same queries on the same stream, in the
same run. USERS.md §5 figures for scale: MySQL 200 replaces/s and 150 queries/s; a C skiplist
~80,000 inserts/s, ~100,000,000 counts/s, ~500,000 users-for-url queries/s.

    python bench/live_index.py              # 1,000,000 online clients (about a minute)
    python bench/live_index.py --clients 200000 --seconds 1
"""

from __future__ import annotations

import argparse
import random
import sqlite3
import time
from collections.abc import Callable

from corral.telemetry.live_index import OnlineIndex


def stream(n: int, urls: int, seed: int) -> list[tuple[str, str, float]]:
    """n hits by n distinct clients, URLs drawn with a heavy head (a few hot pages)."""
    rnd = random.Random(seed)
    weights = [1.0 / (i + 1) for i in range(urls)]
    pages = [f"/page/{i}" for i in range(urls)]
    chosen = rnd.choices(pages, weights=weights, k=n)
    return [(f"c{i}", chosen[i], i * 0.001) for i in range(n)]


def rate(fn: Callable[[int], None], seconds: float) -> float:
    """Calls per second of fn(i) for about ``seconds``; batches grow while calls are fast, so a
    slow baseline is still bounded by time."""
    done = 0
    batch = 1
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(batch):
            fn(done)
            done += 1
        now = time.perf_counter()
        if now >= deadline:
            break
        if now - start < seconds / 20:
            batch = min(batch * 2, 4096)
    return done / (time.perf_counter() - start)


class SqliteOnline:
    def __init__(self, window: float) -> None:
        self.window = window
        self.db = sqlite3.connect(":memory:", isolation_level=None)
        self.db.executescript(
            "PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF;"
            "CREATE TABLE online(client TEXT PRIMARY KEY, url TEXT, ts REAL);"
            "CREATE INDEX by_url ON online(url, ts); CREATE INDEX by_ts ON online(ts);"
        )

    def load(self, rows: list[tuple[str, str, float]]) -> None:
        self.db.execute("BEGIN")
        self.db.executemany("INSERT OR REPLACE INTO online VALUES (?,?,?)", rows)
        self.db.execute("COMMIT")

    def hit(self, client: str, url: str, ts: float) -> None:
        self.db.execute("INSERT OR REPLACE INTO online VALUES (?,?,?)", (client, url, ts))

    def count(self, now: float) -> int:
        row = self.db.execute("SELECT count(*) FROM online WHERE ts > ?", (now - self.window,))
        return int(row.fetchone()[0])

    def on_url(self, url: str, limit: int, now: float) -> list[tuple[str, float]]:
        cur = self.db.execute(
            "SELECT client, ts FROM online WHERE url = ? AND ts > ? ORDER BY ts DESC LIMIT ?",
            (url, now - self.window, limit),
        )
        return [(str(c), float(t)) for c, t in cur.fetchall()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--clients", type=int, default=1_000_000)
    ap.add_argument("--urls", type=int, default=10_000)
    ap.add_argument("--seconds", type=float, default=2.0, help="time per measured figure")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()

    rows = stream(args.clients, args.urls, args.seed)
    window = rows[-1][2] + 3600.0  # everyone stays online during the measurement
    now = rows[-1][2]
    hot = "/page/0"

    idx = OnlineIndex(window_s=window)
    t0 = time.perf_counter()
    for client, url, ts in rows:
        idx.hit(client, url, ts)
    corral_fill = args.clients / (time.perf_counter() - t0)

    sql = SqliteOnline(window)
    t0 = time.perf_counter()
    sql.load(rows)
    sqlite_fill = args.clients / (time.perf_counter() - t0)

    assert idx.count(now) == sql.count(now) == args.clients
    assert idx.on_url(hot, 30, now) == sql.on_url(hot, 30, now), "answers differ"

    n = args.clients
    pages = [r[1] for r in rows[:4096]]
    results = [
        ("fill (bulk insert)", corral_fill, sqlite_fill),
        (
            "inserts/s (repeat visitor moves page)",
            rate(lambda i: idx.hit(f"c{i % n}", pages[i % 4096], now), args.seconds),
            rate(lambda i: sql.hit(f"c{i % n}", pages[i % 4096], now), args.seconds),
        ),
        (
            "counts/s (online now)",
            rate(lambda i: idx.count(now), args.seconds),
            rate(lambda i: sql.count(now), min(args.seconds, 2.0)),
        ),
        (
            "top-30 on URL queries/s",
            rate(lambda i: idx.on_url(pages[i % 64], 30, now), args.seconds),
            rate(lambda i: sql.on_url(pages[i % 64], 30, now), args.seconds),
        ),
    ]
    print(f"online clients: {args.clients:,}  urls: {args.urls:,}")
    print(f"{'figure':40} {'corral':>14} {'sqlite':>14} {'ratio':>8}")
    for name, ours, base in results:
        print(f"{name:40} {ours:14,.0f} {base:14,.0f} {ours / base:7.1f}x")


if __name__ == "__main__":
    main()
