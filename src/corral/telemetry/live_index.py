"""The live traffic index: who is online, on which URL, and how fast requests come.

This is the product's own data structure (USERS.md §5: a "who's online" service that MySQL could
not serve). Every operation is O(1) amortised, or O(limit) for the per-URL listing:

- ``_seen`` is an ``OrderedDict`` ``client -> (ts, url)`` used as a recency queue: a hit moves
  the client to the end, so expiry only ever pops from the front. (A plain dict would do the same
  in theory, but finding its first live entry after many deletions scans the dead slots: O(n).)
- ``_by_url[url]`` is the same kind of queue for the clients whose *latest* hit was on that URL,
  so "clients on /page by last access" walks it backwards from the end and stops at ``limit``.

The index keeps one clock that never goes back: an event older than the newest one seen is taken
as happening at the newest time (log lines from several sources arrive slightly out of order; a
clock that goes back would make expiry order wrong). The brute-force model in the tests follows
the same rule.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field


@dataclass
class _Bucket:
    second: int
    hits: int = 0
    by_status: dict[int, int] = field(default_factory=dict)


class RateWindow:
    """Hits and status codes per second over a sliding window of whole seconds."""

    def __init__(self, window_s: int = 60) -> None:
        if window_s < 1:
            raise ValueError("window_s must be at least 1 second")
        self.window_s = window_s
        self._buckets: deque[_Bucket] = deque()

    def add(self, ts: float, status: int) -> None:
        sec = int(ts)
        if not self._buckets or self._buckets[-1].second < sec:
            self._buckets.append(_Bucket(sec))
        bucket = self._buckets[-1]
        bucket.hits += 1
        bucket.by_status[status] = bucket.by_status.get(status, 0) + 1
        self._trim(sec)

    def _trim(self, now_sec: int) -> None:
        oldest = now_sec - self.window_s + 1
        while self._buckets and self._buckets[0].second < oldest:
            self._buckets.popleft()

    def snapshot(self, now: float) -> tuple[int, dict[int, int]]:
        """(hits, hits per status) in the ``window_s`` seconds ending at ``now``."""
        self._trim(int(now))
        hits = 0
        statuses: dict[int, int] = {}
        for b in self._buckets:
            if b.second <= int(now):
                hits += b.hits
                for code, n in b.by_status.items():
                    statuses[code] = statuses.get(code, 0) + n
        return hits, statuses


#: clients one index keeps (USERS.md §5's service had a million online): past it, the client
#: seen longest ago is forgotten early, as if its window had ended, and ``evicted`` counts it
MAX_CLIENTS = 2_000_000


class OnlineIndex:
    """Clients seen in the last ``window_s`` seconds, overall and per URL (at most
    ``max_clients`` of them: memory is bounded whatever the traffic)."""

    def __init__(self, window_s: float = 1800.0, max_clients: int = MAX_CLIENTS) -> None:
        if window_s <= 0:
            raise ValueError("window_s must be positive")
        self.window_s = window_s
        self.max_clients = max_clients
        #: clients forgotten before their window ended, to stay within ``max_clients``
        self.evicted = 0
        self.clock = float("-inf")
        self._seen: OrderedDict[str, tuple[float, str]] = OrderedDict()
        self._by_url: dict[str, OrderedDict[str, float]] = {}

    def hit(self, client: str, url: str, ts: float) -> None:
        if ts < self.clock:
            ts = self.clock
        self.clock = ts
        seen = self._seen
        prev = seen.get(client)
        if prev is not None:
            seen.move_to_end(client)
            if prev[1] != url:
                old = self._by_url[prev[1]]
                del old[client]
                if not old:
                    del self._by_url[prev[1]]
        seen[client] = (ts, url)
        per_url = self._by_url.get(url)
        if per_url is None:
            per_url = self._by_url[url] = OrderedDict()
        elif prev is not None and prev[1] == url:
            per_url.move_to_end(client)
        per_url[client] = ts
        self._expire(ts)
        while len(seen) > self.max_clients:
            self._pop_oldest()
            self.evicted += 1

    def _pop_oldest(self) -> None:
        client, (_, url) = self._seen.popitem(last=False)
        per_url = self._by_url[url]
        del per_url[client]
        if not per_url:
            del self._by_url[url]

    def _expire(self, now: float) -> None:
        cutoff = now - self.window_s
        seen = self._seen
        while seen:
            _, (ts, _) = next(iter(seen.items()))
            if ts > cutoff:
                return
            self._pop_oldest()

    def advance(self, now: float) -> None:
        """Move the clock to ``now`` (if later) and expire; queries call this."""
        if now > self.clock:
            self.clock = now
        self._expire(self.clock)

    def count(self, now: float | None = None) -> int:
        if now is not None:
            self.advance(now)
        return len(self._seen)

    def count_on(self, url: str, now: float | None = None) -> int:
        if now is not None:
            self.advance(now)
        return len(self._by_url.get(url, ()))

    def on_url(
        self, url: str, limit: int = 30, now: float | None = None
    ) -> list[tuple[str, float]]:
        """Clients whose latest hit was on ``url``, most recent first, at most ``limit``."""
        if now is not None:
            self.advance(now)
        per_url = self._by_url.get(url)
        if not per_url or limit <= 0:
            return []
        out: list[tuple[str, float]] = []
        for client in reversed(per_url):
            out.append((client, per_url[client]))
            if len(out) >= limit:
                break
        return out

    def top_urls(self, limit: int = 10, now: float | None = None) -> list[tuple[str, int]]:
        """URLs with the most online clients (O(URLs), for dashboards, not hot paths)."""
        if now is not None:
            self.advance(now)
        ranked = sorted(self._by_url.items(), key=lambda kv: (-len(kv[1]), kv[0]))
        return [(url, len(clients)) for url, clients in ranked[:limit]]
