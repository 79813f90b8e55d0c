"""The traffic aggregator against a brute-force count over the same random batches."""

from __future__ import annotations

import time
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from corral.bus.messages import LogBatch
from corral.telemetry.traffic import Traffic, status_class

T0 = 1_700_000_000


def clf(client: str, url: str, status: int, ts: int, combined: bool = True) -> str:
    when = time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(ts))
    line = f'{client} - - [{when}] "GET {url}?q=1 HTTP/1.1" {status} 12'
    return line + ' "-" "curl/8"' if combined else line


@dataclass(frozen=True)
class Req:
    client: str
    url: str
    status: int
    dt: int  # seconds after the previous request
    bad: bool
    combined: bool


reqs = st.lists(st.builds(
    Req, client=st.sampled_from([f"10.0.0.{i}" for i in range(8)]),
    url=st.sampled_from(["/", "/a", "/b", "/c"]),
    status=st.sampled_from([200, 201, 301, 404, 500, 503]),
    dt=st.integers(0, 40), bad=st.integers(0, 9).map(lambda n: n == 0),
    combined=st.booleans()), max_size=120)


@given(reqs=reqs, window=st.integers(30, 300), batch=st.integers(1, 7),
       later=st.integers(0, 400), url=st.sampled_from(["/", "/a", "/b", "/c"]))
@settings(max_examples=150, deadline=None)
def test_aggregator_matches_a_brute_force_count(reqs: list[Req], window: int, batch: int,
                                                later: int, url: str) -> None:
    traffic = Traffic(online_window_s=window, rate_windows=(10, 60))
    lines, ts = [], T0
    model: list[tuple[str, str, int, int, int]] = []  # client, url, status, ts, order
    for i, r in enumerate(reqs):
        ts += r.dt
        if r.bad:
            lines.append(f"not a log line {i}")
        else:
            lines.append(clf(r.client, r.url, r.status, ts, r.combined))
            model.append((r.client, r.url, r.status, ts, i))
    seq = 1
    for k in range(0, len(lines), batch):
        chunk = lines[k:k + batch]
        traffic.feed(LogBatch(host="h1", instance="web", source="access", first_seq=seq,
                              lines=chunk, ts=ts))
        seq += len(chunk)
    now = ts + later
    v = traffic.view("web", url=url, limit=5, now=now)

    assert v.lines == len(lines) and v.hits == len(model)
    assert v.bad_lines == len(lines) - len(model)
    last: dict[str, tuple[str, int, int]] = {}
    for client, u, _, t, order in model:
        last[client] = (u, t, order)
    online = {c: x for c, x in last.items() if x[1] > now - window}
    assert v.online == len(online)
    on_url = sorted(((c, x) for c, x in online.items() if x[0] == url),
                    key=lambda cx: (cx[1][1], cx[1][2]), reverse=True)
    assert v.url_online == len(on_url)
    assert [(c.client, c.last_seen) for c in v.clients] == [(c, float(x[1]))
                                                             for c, x in on_url[:5]]
    per_url: dict[str, int] = {}
    for u, _, _ in online.values():
        per_url[u] = per_url.get(u, 0) + 1
    assert {u.url: u.online for u in v.top_urls} == per_url
    for w in v.windows:
        inside = [m for m in model if now - w.seconds < m[3] <= now]
        assert w.hits == len(inside)
        assert w.hits_per_s == len(inside) / w.seconds
        for code in {m[2] for m in inside}:
            n = sum(1 for m in inside if m[2] == code)
            assert w.status_per_s[str(code)] == n / w.seconds
        for cls in ("2xx", "3xx", "4xx", "5xx"):
            n = sum(1 for m in inside if status_class(m[2]) == cls)
            assert w.class_per_s[cls] == n / w.seconds


def test_repeated_batches_are_counted_once_and_other_sources_ignored() -> None:
    traffic = Traffic()
    lines = [clf(f"10.1.0.{i}", "/x", 200, T0 + i) for i in range(6)]
    traffic.feed(LogBatch(host="h1", instance="web", source="access", first_seq=1,
                          lines=lines[:4], ts=0))
    # an agent restarted and re-sent lines 3-6: 3 and 4 are repeats
    traffic.feed(LogBatch(host="h1", instance="web", source="access", first_seq=3,
                          lines=lines[2:], ts=0))
    traffic.feed(LogBatch(host="h1", instance="web", source="stdout", first_seq=1,
                          lines=lines, ts=0))
    v = traffic.view("web", url="/x", limit=3, now=T0 + 6)
    assert (v.lines, v.hits, v.online, v.url_online) == (6, 6, 6, 6)
    assert [c.client for c in v.clients] == ["10.1.0.5", "10.1.0.4", "10.1.0.3"]
    assert traffic.instances["web"].duplicates == 2 and traffic.ignored == 1
    traffic.forget("web")
    empty = traffic.view("web", now=T0)
    assert (empty.lines, empty.online, empty.windows[0].hits) == (0, 0, 0)
