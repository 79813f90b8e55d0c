"""Live traffic per instance, fed from access-log batches: rates, status codes, who's online.

One :class:`InstanceTraffic` per instance holds an :class:`AccessLogReader` (bad lines are
counted, never fatal), an :class:`OnlineIndex` and a :class:`RateWindow` per window. Batches
arrive from a plain subscription to ``corral.logs.*``, which also sees a batch an agent
re-publishes after a crash (JetStream drops that duplicate from the stream, but not from plain
subscribers), so each (host, source) remembers the next line number it expects and skips lines
it already counted.

Hit times are the request times in the lines; queries use the wall clock, so a service that
stops logging shows its rates fall to zero and its visitors expire.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from corral.api.models import ClientSeen, RateView, TrafficView, UrlOnline
from corral.bus.messages import LogBatch
from corral.telemetry.accesslog import AccessLogReader
from corral.telemetry.live_index import OnlineIndex, RateWindow

ACCESS_SOURCE = "access"
RATE_WINDOWS = (10, 60)
CLASSES = ("2xx", "3xx", "4xx", "5xx")


def status_class(code: int) -> str:
    return f"{code // 100}xx" if 100 <= code < 600 else "other"


class InstanceTraffic:
    """The live view of one instance."""

    def __init__(self, name: str, online_window_s: float = 1800.0,
                 rate_windows: Iterable[int] = RATE_WINDOWS) -> None:
        self.name = name
        self.reader = AccessLogReader()
        self.online = OnlineIndex(online_window_s)
        self.rates = {w: RateWindow(w) for w in sorted(set(rate_windows))}
        self.lines = 0
        self.duplicates = 0
        self._next_seq: dict[str, int] = {}

    def feed(self, batch: LogBatch) -> int:
        """Count a batch's new lines; returns how many were parsed as requests."""
        key = batch.key
        expect = self._next_seq.get(key, 0)
        skip = max(0, min(len(batch.lines), expect - batch.first_seq))
        self.duplicates += skip
        self._next_seq[key] = max(expect, batch.first_seq + len(batch.lines))
        return self.feed_lines(batch.lines[skip:])

    def feed_lines(self, lines: Iterable[str]) -> int:
        hits = 0
        for line in lines:
            self.lines += 1
            hit = self.reader.parse(line)
            if hit is None:
                continue
            hits += 1
            self.online.hit(hit.client, hit.path, hit.ts)
            for w in self.rates.values():
                w.add(hit.ts, hit.status)
        return hits

    def rate_views(self, now: float) -> list[RateView]:
        out = []
        for seconds, window in self.rates.items():
            hits, by_status = window.snapshot(now)
            classes: dict[str, float] = dict.fromkeys(CLASSES, 0.0)
            for code, n in by_status.items():
                cls = status_class(code)
                classes[cls] = classes.get(cls, 0.0) + n / seconds
            out.append(RateView(seconds=seconds, hits=hits, hits_per_s=hits / seconds,
                                status_per_s={str(c): n / seconds
                                              for c, n in sorted(by_status.items())},
                                class_per_s=classes))
        return out

    def view(self, url: str | None = None, limit: int = 30, top: int = 10,
             now: float | None = None) -> TrafficView:
        now = time.time() if now is None else now
        self.online.advance(now)
        at = max(now, self.online.clock)
        v = TrafficView(instance=self.name, at=at, lines=self.lines, hits=self.reader.good,
                        bad_lines=self.reader.bad, online=self.online.count(),
                        online_window_s=self.online.window_s, windows=self.rate_views(now),
                        top_urls=[UrlOnline(url=u, online=n)
                                  for u, n in self.online.top_urls(top)])
        if url is not None:
            v.url = url
            v.url_online = self.online.count_on(url)
            v.clients = [ClientSeen(client=c, last_seen=ts)
                         for c, ts in self.online.on_url(url, limit)]
        return v


class Traffic:
    """Every instance's :class:`InstanceTraffic`, created on its first access batch."""

    def __init__(self, online_window_s: float = 1800.0,
                 rate_windows: Iterable[int] = RATE_WINDOWS,
                 source: str = ACCESS_SOURCE) -> None:
        self.online_window_s = online_window_s
        self.rate_windows = tuple(rate_windows)
        self.source = source
        self.instances: dict[str, InstanceTraffic] = {}
        self.ignored = 0

    def get(self, name: str) -> InstanceTraffic:
        t = self.instances.get(name)
        if t is None:
            t = self.instances[name] = InstanceTraffic(name, self.online_window_s,
                                                       self.rate_windows)
        return t

    def feed(self, batch: LogBatch) -> int:
        if batch.source != self.source:
            self.ignored += 1
            return 0
        return self.get(batch.instance).feed(batch)

    def forget(self, name: str) -> None:
        self.instances.pop(name, None)

    def view(self, name: str, url: str | None = None, limit: int = 30,
             now: float | None = None) -> TrafficView:
        t = self.instances.get(name) or InstanceTraffic(name, self.online_window_s,
                                                        self.rate_windows)
        return t.view(url, limit, now=now)
