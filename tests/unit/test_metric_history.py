"""Metric history (control/history.py): samples summed into the buckets of two tiers, exact
averages however buckets are merged, answers bounded in points, and the stored rows bounded:
old, future and orphaned buckets pruned, a deleted instance's dropped, a follower's never
written. The database is a real SQLite file migrated to head."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session, sessionmaker

from corral.bus.messages import InstanceSample, MetricsSample
from corral.config import Settings
from corral.control import history as hist
from corral.control.db import Host, Instance, MetricBucket, open_db
from corral.control.history import (
    HOST,
    INSTANCE,
    Acc,
    MetricHistory,
    Tier,
    accumulate,
    coarsen,
    pick_tier,
    tiers_of,
)
from corral.errors import NotLeader

MiB = 1024**2
T0 = 1_699_999_800.0  # a multiple of 10 and of 300
TIERS = (Tier(0, 10, 86400.0), Tier(1, 300, 30 * 86400.0))


def sample(usage: dict[str, tuple[float | None, int]], host: str = "h1", cores: int = 2,
           busy: float | None = None) -> MetricsSample:
    return MetricsSample(
        host=host, wall_ns=0, host_cores=cores, interval_s=1.0, host_cpu_pct=busy,
        instances=[InstanceSample(name=n, cpu_ns=1, memory_bytes=mem, generation="g",
                                  cpu_core_pct=core,
                                  cpu_host_pct=None if core is None else core / cores)
                   for n, (core, mem) in usage.items()])


def point(pending: dict[hist.Key, Acc], kind: str, name: str, tier: int, t: float
          ) -> dict[str, object]:
    return pending[(kind, name, tier, int(t))].point(t).model_dump()


# --- pure logic ------------------------------------------------------------------------------


def test_samples_of_one_bucket_average_cpu_and_keep_the_most_memory() -> None:
    pending: dict[hist.Key, Acc] = {}
    accumulate(pending, sample({"a": (100.0, 50 * MiB), "b": (2.0, 10 * MiB)}, busy=60.0),
               T0 + 1, TIERS)
    accumulate(pending, sample({"a": (50.0, 80 * MiB), "b": (None, 20 * MiB)}, busy=40.0),
               T0 + 9, TIERS)
    assert point(pending, INSTANCE, "a", 0, T0) == {
        "t": T0, "cpu_core_pct": 75.0, "cpu_host_pct": 37.5, "memory_bytes": 80 * MiB,
        "host_busy_pct": None}
    # b's second sample had no CPU figure yet: its average is of the one that had
    assert point(pending, INSTANCE, "b", 0, T0)["cpu_core_pct"] == 2.0
    host = point(pending, HOST, "h1", 0, T0)
    assert host["cpu_core_pct"] == (102.0 + 50.0) / 2
    assert host["cpu_host_pct"] == (51.0 + 25.0) / 2
    assert host["memory_bytes"] == 100 * MiB  # the larger of the two sums (60, 100)
    assert host["host_busy_pct"] == 50.0
    # the coarse tier got the same samples
    assert point(pending, INSTANCE, "a", 1, T0)["cpu_core_pct"] == 75.0
    # a sample of the next bucket goes there
    accumulate(pending, sample({"a": (10.0, MiB)}), T0 + 10, TIERS)
    assert point(pending, INSTANCE, "a", 0, T0 + 10)["cpu_core_pct"] == 10.0
    assert point(pending, INSTANCE, "a", 0, T0)["cpu_core_pct"] == 75.0
    assert point(pending, INSTANCE, "a", 1, T0)["cpu_core_pct"] == pytest.approx(160 / 3, abs=1e-3)


def test_a_first_sample_has_memory_but_no_cpu_and_an_empty_host_uses_none() -> None:
    pending: dict[hist.Key, Acc] = {}
    accumulate(pending, sample({"a": (None, 5)}), T0, TIERS)
    assert point(pending, INSTANCE, "a", 0, T0)["cpu_core_pct"] is None
    assert point(pending, INSTANCE, "a", 0, T0)["memory_bytes"] == 5
    assert point(pending, HOST, "h1", 0, T0)["cpu_core_pct"] is None
    accumulate(pending, sample({}, host="h2", busy=3.0), T0, TIERS)
    assert point(pending, HOST, "h2", 0, T0) == {
        "t": T0, "cpu_core_pct": 0.0, "cpu_host_pct": 0.0, "memory_bytes": 0,
        "host_busy_pct": 3.0}


def test_the_fine_tier_answers_while_it_holds_since() -> None:
    now = T0
    assert pick_tier(TIERS, now - 3600, now).index == 0
    assert pick_tier(TIERS, now - 86400, now).index == 0
    assert pick_tier(TIERS, now - 86401, now).index == 1
    assert pick_tier(TIERS, 0, now).index == 1


def test_settings_make_the_tiers_whole_seconds() -> None:
    fine, coarse = tiers_of(Settings(history_fine_seconds=0.4, history_coarse_seconds=61.6))
    assert (fine.step, coarse.step) == (1, 62)
    d_fine, d_coarse = tiers_of(Settings())
    assert (d_fine.step, d_fine.keep, d_coarse.step, d_coarse.keep) == (
        10, 86400.0, 300, 30 * 86400.0)
    assert d_fine.cap == 8643


def test_coarsening_bounds_the_points_and_keeps_averages_exact() -> None:
    # a day of 10 s buckets: 8640, more than 5000 -> buckets of 20 s
    rows = [(int(T0) + 10 * i, Acc(samples=1 + i % 3, cpu_n=1 + i % 3,
                                   cpu_core_sum=float(i) * (1 + i % 3),
                                   cpu_host_sum=0.0, memory_max=i))
            for i in range(8640)]
    width, points = coarsen(rows, 10, T0, T0 + 86400, max_points=5000)
    assert width == 20 and len(points) <= 5000
    # bucket i=0 (1 sample, value 0) and i=1 (2 samples, value 1): (0 + 2) / 3
    assert points[0].t == T0 and points[0].cpu_core_pct == pytest.approx(2 / 3, abs=1e-3)
    assert points[0].memory_bytes == 1
    assert [p.t for p in points] == sorted(p.t for p in points)
    # a range short enough: as stored
    width, points = coarsen(rows[:360], 10, T0, T0 + 3600)
    assert width == 10 and len(points) == 360
    # any range, any bound: never more than asked
    for bound in (1, 7, 100):
        width, points = coarsen(rows, 10, T0, T0 + 86400, max_points=bound)
        assert len(points) <= bound and width % 10 == 0


# --- with the database -----------------------------------------------------------------------


@pytest.fixture
def db(tmp_path: Path) -> Iterator[tuple[Engine, sessionmaker[Session]]]:
    engine, sessions = open_db(Settings(data_dir=tmp_path))
    with sessions.begin() as s:
        for h in ("h1", "h2"):
            s.add(Host(name=h, address="127.0.0.1", cores=2, memory_bytes=8 << 30,
                       disk_bytes=1 << 30, drivers={"process": {}}))
        for n in ("a", "b"):
            s.add(Instance(name=n, host="h1", driver="process", command=["x"], cpus=0.5,
                           memory_bytes=MiB, desired_state="running", state="running",
                           created_at=T0 - 100))
    try:
        yield engine, sessions
    finally:
        engine.dispose()


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def rows(sessions: sessionmaker[Session], **where: object) -> int:
    with sessions() as s:
        q = select(func.count()).select_from(MetricBucket)
        for k, v in where.items():
            q = q.where(getattr(MetricBucket, k) == v)
        return int(s.scalar(q) or 0)


def history(sessions: sessionmaker[Session], clock: Clock, **kw: object) -> MetricHistory:
    return MetricHistory(sessions, Settings(), clock=clock, **kw)  # type: ignore[arg-type]


async def test_flushes_add_to_stored_buckets_and_reads_filter_by_time(
        db: tuple[Engine, sessionmaker[Session]]) -> None:
    _, sessions = db
    clock = Clock(T0 + 1)
    h = history(sessions, clock)
    h.record(sample({"a": (100.0, 10 * MiB)}))
    assert await h.flush() == 4  # a and h1, two tiers each
    clock.t = T0 + 5  # the same bucket, in another flush: summed, not replaced
    h.record(sample({"a": (50.0, 30 * MiB)}))
    await h.flush()
    for t in range(1, 30):  # the next 29 s: three more fine buckets
        clock.t = T0 + 10 + t
        h.record(sample({"a": (float(t), MiB), "b": (1.0, MiB)}, busy=20.0))
    await h.flush()
    s = h.series(INSTANCE, "a", T0 - 60, now=T0 + 60)
    assert s.step_seconds == 10
    assert [p.t for p in s.points] == [T0, T0 + 10, T0 + 20, T0 + 30]
    assert s.points[0].cpu_core_pct == 75.0 and s.points[0].memory_bytes == 30 * MiB
    assert s.points[1].cpu_core_pct == pytest.approx(sum(range(1, 10)) / 9, abs=1e-3)
    later = h.series(INSTANCE, "a", T0 + 20, now=T0 + 60)
    assert [p.t for p in later.points] == [T0 + 20, T0 + 30]
    assert h.series(INSTANCE, "a", T0 + 20, T0 + 25, now=T0 + 60).points[-1].t == T0 + 20
    assert h.series(INSTANCE, "a", T0 + 100, now=T0 + 200).points == []
    host = h.series(HOST, "h1", T0 - 60, now=T0 + 60)
    assert host.points[1].cpu_core_pct == pytest.approx(sum(range(1, 10)) / 9 + 1.0, abs=1e-3)
    assert host.points[1].host_busy_pct == 20.0
    # ten days back: the coarse tier, one 5 min bucket with every sample
    days = h.series(INSTANCE, "a", T0 - 10 * 86400, now=T0 + 60)
    assert days.step_seconds == 300 and len(days.points) == 1
    assert days.points[0].cpu_core_pct == pytest.approx((150 + sum(range(1, 30))) / 31, abs=1e-3)
    assert days.points[0].memory_bytes == 30 * MiB
    # a month of 5 min buckets is more than 5000 points: 10 min ones, the same average
    month = h.series(INSTANCE, "a", T0 - 30 * 86400, now=T0 + 60)
    assert month.step_seconds == 600 and len(month.points) == 1
    assert month.points[0].cpu_core_pct == days.points[0].cpu_core_pct


async def test_unknown_instances_and_hosts_are_never_written(
        db: tuple[Engine, sessionmaker[Session]]) -> None:
    _, sessions = db
    h = history(sessions, Clock(T0))
    h.record(sample({"a": (1.0, 1), "ghost": (1.0, 1)}, host="h1"))
    h.record(sample({"b": (1.0, 1)}, host="nohost"))
    await h.flush()
    assert rows(sessions, name="ghost") == 0 and rows(sessions, name="nohost") == 0
    assert rows(sessions, name="a") == 2 and rows(sessions, name="b") == 2


async def test_prune_bounds_every_series_and_sweeps_the_gone(
        db: tuple[Engine, sessionmaker[Session]]) -> None:
    _, sessions = db
    clock = Clock(T0)
    h = MetricHistory(sessions, Settings(history_fine_keep_seconds=3600,
                                         history_coarse_keep_seconds=6 * 3600), clock=clock)
    # twelve hours of samples every 10 s, then a clock that went back six hours: everything
    # stored, more than either tier keeps
    for i in range(0, 12 * 3600, 10):
        clock.t = T0 + i
        h.record(sample({"a": (1.0, 1), "b": (1.0, 1)}))
    await h.flush()
    fine, coarse = h.tiers
    assert rows(sessions, name="a", tier=0) == 12 * 3600 // 10 > fine.cap
    assert rows(sessions, name="a", tier=1) == 12 * 3600 // 300 > coarse.cap
    now = T0 + 6 * 3600  # the clock went back: the last six hours are "the future"
    h.prune(now=now)
    for name in ("a", "b"):
        assert 0 < rows(sessions, name=name, tier=0) <= fine.cap
        assert 0 < rows(sessions, name=name, tier=1) <= coarse.cap
    with sessions() as s:
        oldest = s.scalar(select(func.min(MetricBucket.t)).where(MetricBucket.tier == 0))
        newest = s.scalar(select(func.max(MetricBucket.t)).where(MetricBucket.tier == 0))
    assert oldest is not None and oldest >= now - fine.keep - fine.step
    assert newest is not None and newest <= now + fine.step
    # an instance and a host gone behind history's back (no hook ran): swept
    with sessions.begin() as s:
        s.delete(s.get(Instance, "b"))
        s.add(Host(name="h9", address="127.0.0.1", cores=1, memory_bytes=1, disk_bytes=1,
                   drivers={}))
    h.record(sample({}, host="h9"))
    await h.flush()
    with sessions.begin() as s:
        s.delete(s.get(Host, "h9"))
    assert rows(sessions, name="h9") > 0
    assert h.sweep() > 0
    assert rows(sessions, name="b") == 0 and rows(sessions, name="h9") == 0
    assert rows(sessions, name="a") > 0 and rows(sessions, kind=HOST, name="h1") > 0
    assert h.sweep() == 0


async def test_forget_drops_the_stored_the_gathered_and_what_comes_until_the_row_goes(
        db: tuple[Engine, sessionmaker[Session]]) -> None:
    _, sessions = db
    clock = Clock(T0)
    h = history(sessions, clock)
    h.record(sample({"a": (1.0, 1), "b": (1.0, 1)}))
    await h.flush()
    h.record(sample({"a": (1.0, 1), "b": (1.0, 1)}))
    await h.forget("a")
    # its agent still reports it while it stops; the host's sum still counts it
    clock.t += 1
    h.record(sample({"a": (7.0, 1), "b": (1.0, 1)}))
    await h.flush()
    assert rows(sessions, name="a") == 0 and rows(sessions, name="b") == 2
    assert h.series(HOST, "h1", T0 - 10, now=T0 + 5).points[0].cpu_core_pct == pytest.approx(
        (2 + 2 + 8) / 3, abs=1e-3)
    # a flush in flight wrote it after the delete: gone once the row is
    h.write({(INSTANCE, "a", 0, int(T0)): Acc(samples=1, memory_max=1)})
    assert rows(sessions, name="a") == 1
    with sessions.begin() as s:
        s.delete(s.get(Instance, "a"))
    await h.flush()
    assert rows(sessions, name="a") == 0
    # a new instance of that name has a history again
    with sessions.begin() as s:
        s.add(Instance(name="a", host="h1", driver="process", command=["x"], cpus=0.5,
                       memory_bytes=MiB, desired_state="running", state="running",
                       created_at=clock.t + 1))
    clock.t += 2
    h.record(sample({"a": (3.0, 1)}))
    await h.flush()
    assert rows(sessions, name="a") == 2


async def test_a_delete_that_failed_lets_history_go_on(
        db: tuple[Engine, sessionmaker[Session]], monkeypatch: pytest.MonkeyPatch) -> None:
    _, sessions = db
    clock = Clock(T0)
    h = history(sessions, clock)
    await h.forget("a")  # the instance stays (its agent refused, say)
    h.record(sample({"a": (1.0, 1)}))
    await h.flush()
    assert rows(sessions, name="a") == 0
    clock.t += hist.FORGET_SECONDS + 1
    await h.flush()
    h.record(sample({"a": (1.0, 1)}))
    await h.flush()
    assert rows(sessions, name="a") == 2


async def test_a_follower_gathers_and_writes_nothing(
        db: tuple[Engine, sessionmaker[Session]]) -> None:
    _, sessions = db
    leads = [False]
    h = history(sessions, Clock(T0), leads=lambda: leads[0])
    h.record(sample({"a": (1.0, 1)}))
    assert h.take() == {}
    # deposed between gathering and writing: the fence refuses, the batch is dropped
    leads[0] = True

    def fence(_conn: Connection) -> None:
        raise NotLeader("taken over", hint="")

    h.fence = fence
    h.record(sample({"a": (1.0, 1)}))
    assert await h.flush() == 0
    assert h.take() == {} and rows(sessions) == 0


async def test_a_failed_write_is_kept_for_the_next_flush(
        db: tuple[Engine, sessionmaker[Session]]) -> None:
    _, sessions = db
    h = history(sessions, Clock(T0))
    failures = [1]

    def fence(_conn: Connection) -> None:
        if failures[0]:
            failures[0] -= 1
            raise OSError("database away")

    h.fence = fence
    h.record(sample({"a": (10.0, 1)}))
    with pytest.raises(OSError):
        await h.flush()
    h.record(sample({"a": (20.0, 1)}))
    assert await h.flush() == 4
    assert h.series(INSTANCE, "a", T0 - 10, now=T0 + 5).points[0].cpu_core_pct == 15.0


def test_gathering_is_bounded(db: tuple[Engine, sessionmaker[Session]],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    _, sessions = db
    monkeypatch.setattr(hist, "MAX_PENDING", 4)
    clock = Clock(T0)
    h = history(sessions, clock)
    for i in range(10):
        clock.t = T0 + 10 * i
        h.record(sample({"a": (1.0, 1)}))
    assert len(h.take()) <= 4 + 4  # the bound, plus one sample's buckets
    assert h.dropped > 0


def test_the_cli_draws_a_bounded_line_with_gaps() -> None:
    from corral.cli.metrics_cmd import BLOCKS, sparkline

    assert sparkline([0.0, 50.0, 100.0], 10) == BLOCKS[0] + BLOCKS[4] + BLOCKS[-1]
    assert sparkline([None, 10.0], 10, top=100.0) == " " + BLOCKS[0]
    line = sparkline([float(i % 7) for i in range(5000)], 60)
    assert len(line) == 60 and set(line) <= set(BLOCKS)
    assert sparkline([], 10) == "" and sparkline([1.0], 0) == ""


def test_the_routes_range_refuses_what_is_no_time_and_clamps_the_rest() -> None:
    from corral.control.http.metrics import LATEST, time_range
    from corral.errors import InvalidRequest

    assert time_range(None, None, T0) == (T0 - 3600, T0)
    assert time_range("2h", None, T0) == (T0 - 7200, T0)
    assert time_range(str(T0 - 60), str(T0 - 30), T0) == (T0 - 60, T0 - 30)
    assert time_range("-1e30", "2e11", T0) == (0.0, LATEST)
    assert time_range("-inf", None, T0) == (0.0, T0)  # before 1970 is 1970 (parse_since)
    bad: list[tuple[str | None, str | None]] = [
        ("nan", None), (None, "1e300"), (None, "inf"), ("soon", None), ("1m", "2m")]
    for since, until in bad:
        with pytest.raises(InvalidRequest):
            time_range(since, until, T0)


async def test_a_range_far_past_what_is_kept_keeps_the_buckets_as_stored(
        db: tuple[Engine, sessionmaker[Session]]) -> None:
    _, sessions = db
    h = history(sessions, Clock(T0))
    h.record(sample({"a": (1.0, 1)}))
    await h.flush()
    wide = h.series(INSTANCE, "a", 0.0, 1e11, now=T0 + 5)
    assert wide.step_seconds == 600 and len(wide.points) == 1  # the coarse month, widened
    ahead = h.series(INSTANCE, "a", T0 - 60, 1e11, now=T0 + 5)
    assert ahead.step_seconds == 10 and len(ahead.points) == 1


@pytest.mark.parametrize(("fine", "coarse"), [(10.0, 300.0), (7.0, 30.0)])
def test_coarse_buckets_made_from_the_fine_ones_equal_adding_each_sample_to_both(
        db: tuple[Engine, sessionmaker[Session]], fine: float, coarse: float) -> None:
    """The leader adds a sample to the fine tier only and sums the coarse buckets from the
    fine ones when it takes a batch (when each fine bucket lies in one coarse bucket: 10 and
    300; 7 and 30 do not, and add every sample to both): either way the batch is what adding
    every sample to both tiers gives, across coarse buckets, hosts and unknown CPU."""
    import random

    _, sessions = db
    rnd = random.Random(7)
    settings = Settings(history_fine_seconds=fine, history_coarse_seconds=coarse)
    clock = Clock(T0)
    h = MetricHistory(sessions, settings, clock=clock)
    expected: dict[hist.Key, Acc] = {}
    for _ in range(400):
        clock.t += rnd.uniform(0.0, 4.0)
        usage = {f"i{k}": (rnd.choice([None, rnd.uniform(0, 200)]), rnd.randrange(1, 1 << 30))
                 for k in range(rnd.randrange(0, 4))}
        s = sample(usage, host=rnd.choice(["h1", "h2"]), busy=rnd.uniform(0, 100))
        h.record(s)
        accumulate(expected, s, clock.t, h.tiers)
    got = h.take()
    assert got.keys() == expected.keys()
    for key, acc in expected.items():
        other = got[key]
        assert (other.samples, other.cpu_n, other.memory_max, other.busy_n) == (
            acc.samples, acc.cpu_n, acc.memory_max, acc.busy_n), key
        for a, b in ((other.cpu_core_sum, acc.cpu_core_sum),
                     (other.cpu_host_sum, acc.cpu_host_sum), (other.busy_sum, acc.busy_sum)):
            assert a == pytest.approx(b)
    assert h.take() == {}


def test_accumulate_adds_each_instance_as_one_bucket_merged_would() -> None:
    """accumulate adds an instance into its buckets in place (the loop's hot path): the same
    as merging a bucket of that one sample, for known and unknown CPU, an agent's own host
    share or none, a name said twice in one sample, and instances being deleted."""
    import random

    rnd = random.Random(11)
    tiers = hist.tiers_of(Settings())
    got: dict[hist.Key, Acc] = {}
    want: dict[hist.Key, Acc] = {}
    t = T0
    for _ in range(300):
        t += rnd.uniform(0.0, 6.0)
        cores = rnd.choice([1, 4])
        names = [f"i{rnd.randrange(5)}" for _ in range(rnd.randrange(0, 5))]
        insts = [InstanceSample(name=n, cpu_ns=1, memory_bytes=rnd.randrange(-5, 1 << 20),
                                generation="g", cpu_core_pct=rnd.choice([None, 37.5]),
                                cpu_host_pct=rnd.choice([None, 9.0])) for n in names]
        s = MetricsSample(host="h1", wall_ns=0, host_cores=cores, interval_s=1.0,
                          instances=insts, host_cpu_pct=rnd.choice([None, 50.0]))
        skip = {"i3"}
        accumulate(got, s, t, tiers, skip)
        host, seen = Acc(samples=1, cpu_n=0 if insts else 1), set()
        for i in insts:
            if i.name in seen:
                continue
            seen.add(i.name)
            one = Acc(samples=1, memory_max=max(0, i.memory_bytes))
            if i.cpu_core_pct is not None:
                share = i.cpu_host_pct if i.cpu_host_pct is not None else i.cpu_core_pct / cores
                one.cpu_n, one.cpu_core_sum, one.cpu_host_sum = 1, i.cpu_core_pct, share
                host.cpu_n, host.cpu_core_sum = 1, host.cpu_core_sum + i.cpu_core_pct
                host.cpu_host_sum += share
            host.memory_max += one.memory_max
            if i.name not in skip:
                for tier in tiers:
                    want.setdefault((INSTANCE, i.name, tier.index, tier.bucket(t)),
                                    Acc()).merge(one)
        if s.host_cpu_pct is not None:
            host.busy_n, host.busy_sum = 1, s.host_cpu_pct
        for tier in tiers:
            want.setdefault((hist.HOST, "h1", tier.index, tier.bucket(t)), Acc()).merge(host)
    assert got.keys() == want.keys() and not any(k[1] == "i3" for k in got)
    for key, acc in want.items():
        assert vars(got[key]) == pytest.approx(vars(acc)), key
