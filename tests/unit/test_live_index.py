"""The live index against a brute-force model on random streams (incl. window expiry)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from corral.telemetry.live_index import OnlineIndex, RateWindow


class Model:
    """Obviously-correct reference: keeps every hit, answers by scanning."""

    def __init__(self, window: float) -> None:
        self.window = window
        self.clock = float("-inf")
        self.last: dict[str, tuple[float, int, str]] = {}  # client -> (ts, arrival order, url)
        self.n = 0

    def hit(self, client: str, url: str, ts: float) -> None:
        self.clock = max(self.clock, ts)
        self.n += 1
        self.last[client] = (self.clock, self.n, url)

    def online(self, now: float) -> dict[str, tuple[float, int, str]]:
        self.clock = max(self.clock, now)
        return {c: v for c, v in self.last.items() if v[0] > self.clock - self.window}

    def count(self, now: float) -> int:
        return len(self.online(now))

    def on_url(self, url: str, limit: int, now: float) -> list[tuple[str, float]]:
        rows = [(c, v) for c, v in self.online(now).items() if v[2] == url]
        rows.sort(key=lambda cv: cv[1][1], reverse=True)
        return [(c, v[0]) for c, v in rows[:limit]]


clients = st.sampled_from([f"10.0.0.{i}" for i in range(12)])
urls = st.sampled_from(["/", "/a", "/b", "/c"])
events = st.lists(
    st.one_of(
        st.tuples(st.just("hit"), clients, urls, st.floats(-5, 40)),
        st.tuples(st.just("query"), urls, st.integers(0, 8), st.floats(0, 60)),
    ),
    max_size=120,
)


@settings(max_examples=300, deadline=None)
@given(events, st.sampled_from([1.0, 5.0, 30.0]))
def test_matches_bruteforce_model(ops: list[tuple[object, ...]], window: float) -> None:
    index, model = OnlineIndex(window), Model(window)
    t = 0.0
    for op in ops:
        if op[0] == "hit":
            _, client, url, dt = op
            t += float(dt)  # type: ignore[arg-type]
            index.hit(str(client), str(url), t)
            model.hit(str(client), str(url), t)
        else:
            _, url, limit, dt = op
            now = t + float(dt)  # type: ignore[arg-type]
            assert index.count(now) == model.count(now)
            assert index.on_url(str(url), int(limit), now) == model.on_url(  # type: ignore[call-overload]
                str(url), int(limit), now  # type: ignore[call-overload]
            )
            assert index.count_on(str(url), now) == len(model.on_url(str(url), 10**9, now))


def test_client_moves_between_urls_and_expires() -> None:
    index = OnlineIndex(window_s=10)
    index.hit("a", "/x", 0)
    index.hit("b", "/x", 1)
    index.hit("a", "/y", 2)
    assert index.on_url("/x", 10) == [("b", 1)]
    assert index.on_url("/y", 10) == [("a", 2)]
    assert index.count(now=11.5) == 1  # b (ts 1) expired at 11, a (ts 2) still online
    assert index.on_url("/x", 10) == []
    assert index.count(now=12) == 0


def test_out_of_order_event_takes_the_newest_time() -> None:
    index = OnlineIndex(window_s=10)
    index.hit("a", "/", 100)
    index.hit("b", "/", 50)  # late line: counted as seen at 100, not expired at once
    assert index.on_url("/", 5) == [("b", 100), ("a", 100)]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 5), st.sampled_from([200, 301, 404, 500])), max_size=80),
       st.integers(1, 10))
def test_rate_window_matches_model(hits: list[tuple[float, int]], window: int) -> None:
    rw = RateWindow(window)
    t = 0.0
    seen: list[tuple[float, int]] = []
    for dt, status in hits:
        t += dt
        rw.add(t, status)
        seen.append((t, status))
    now = t + 1.5
    total, by_status = rw.snapshot(now)
    inside = [s for ts, s in seen if int(ts) > int(now) - window]
    assert total == len(inside)
    assert sum(by_status.values()) == total
    for code in {200, 301, 404, 500}:
        assert by_status.get(code, 0) == inside.count(code)
