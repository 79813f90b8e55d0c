"""Metric history: every instance's and host's CPU and memory over time, in the database.

Agents publish a :class:`MetricsSample` every ``sample_seconds``; every server keeps only the
newest one per host in memory (:meth:`corral.control.fleet.Fleet.record_metrics`), which is all
``ls`` and ``/metrics`` need. A plot needs the past, and the past must outlive a server restart
and a change of leader, so it goes to the database that every server of the fleet shares.

Why buckets, and why two tiers: a sample a second per instance is 86,400 rows a day, most of
which no one will look at one by one. The leader sums samples into buckets instead: a fine tier
(10 s, kept a day) that draws the last hour or day in detail, and a coarse one (5 min, kept
30 days) that draws a month in as many points as a day. Both tiers are fed from the raw samples
(not the coarse from the fine), so each is exact on its own. A bucket holds sums and counts, not
averages: a bucket written by two flushes, or merged into a wider one when a query asks for
more points than it may return, still averages exactly. Memory is the most seen in the bucket
(a short peak is what an operator looks for).

Writes: only the leader keeps anything (a follower drops what it hears: the leader hears the
same samples), and it writes what it gathered every ``history_flush_seconds`` in one
transaction, in a worker thread, fenced like every write of the leader
(:meth:`corral.control.leader.Leadership.fence`); a transaction refused because the lead moved
is dropped. Samples of instances or hosts the database does not know are never written.

Bounds: the gathering is capped (:data:`MAX_PENDING` buckets); every minute the leader deletes
what is older than each tier's keep and what lies in the future (the server's clock went back),
so a series never holds more than :attr:`Tier.cap` buckets per tier; a deleted instance's
history is deleted with it (``InstanceService.before_delete``: its samples are ignored from
then on, and its rows deleted again once its row is gone), and every tenth prune a sweep drops
the rows of instances and hosts that went otherwise (``host rm``). Prunes and the sweep delete
by index ranges and names: on SQLite a write transaction holds up the server's own writes, so
none of them scans the table while it holds the lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from sqlalchemy import Connection, delete, select
from sqlalchemy.orm import InstrumentedAttribute, Session, sessionmaker

from corral.api.models import MetricPoint, MetricSeries
from corral.bus.messages import MetricsSample
from corral.config import Settings
from corral.control.db import Host, Instance, MetricBucket
from corral.errors import NotLeader

log = logging.getLogger(__name__)

Kind = Literal["instance", "host"]
INSTANCE: Kind = "instance"
HOST: Kind = "host"
#: the most points one answer holds; a longer range is answered with wider buckets
MAX_POINTS = 5000
#: the most buckets gathered between two flushes (a database that does not answer must not
#: make the leader's memory grow): ~300 bytes each; a flush of 10 s holds about four per
#: instance and host
MAX_PENDING = 100_000
#: the most rows one query reads (a tier's cap, with room for a setting changed meanwhile)
MAX_ROWS = 200_000
#: how long a deleted instance's samples are ignored at most, waiting for its row to go (a
#: delete that failed leaves the instance: its history then goes on)
FORGET_SECONDS = 600.0
#: the sweep for rows of instances and hosts gone unnoticed (it reads every series' name)
#: runs once per this many prunes
SWEEP_EVERY_PRUNES = 10

#: (kind, name, tier, bucket start)
Key = tuple[str, str, int, int]


@dataclass(frozen=True)
class Tier:
    """Buckets of ``step`` seconds, kept for ``keep`` seconds."""

    index: int
    step: int
    keep: float

    def bucket(self, ts: float) -> int:
        """The start of the bucket that holds ``ts``."""
        return int(ts // self.step) * self.step

    @property
    def cap(self) -> int:
        """The most buckets one series of this tier holds after a prune: the keep, the bucket
        being filled and the one a flush may still add to."""
        return math.ceil(self.keep / self.step) + 3


def _step(seconds: float) -> int:
    return max(1, round(seconds))


def tiers_of(settings: Settings) -> tuple[Tier, Tier]:
    """The fine and the coarse tier the settings ask for."""
    return (Tier(0, _step(settings.history_fine_seconds), settings.history_fine_keep_seconds),
            Tier(1, _step(settings.history_coarse_seconds),
                 settings.history_coarse_keep_seconds))


@dataclass
class Acc:
    """What a bucket holds (the columns of :class:`MetricBucket` but its key)."""

    samples: int = 0
    cpu_n: int = 0
    cpu_core_sum: float = 0.0
    cpu_host_sum: float = 0.0
    memory_max: int = 0
    busy_n: int = 0
    busy_sum: float = 0.0

    def merge(self, o: Acc) -> None:
        self.samples += o.samples
        self.cpu_n += o.cpu_n
        self.cpu_core_sum += o.cpu_core_sum
        self.cpu_host_sum += o.cpu_host_sum
        self.memory_max = max(self.memory_max, o.memory_max)
        self.busy_n += o.busy_n
        self.busy_sum += o.busy_sum

    def point(self, t: float) -> MetricPoint:
        cpu = self.cpu_n > 0
        return MetricPoint(
            t=float(t),
            cpu_core_pct=round(self.cpu_core_sum / self.cpu_n, 3) if cpu else None,
            cpu_host_pct=round(self.cpu_host_sum / self.cpu_n, 3) if cpu else None,
            memory_bytes=self.memory_max if self.samples > 0 else None,
            host_busy_pct=round(self.busy_sum / self.busy_n, 3) if self.busy_n else None)



def _add(pending: dict[Key, Acc], kind: str, name: str, acc: Acc, at: float,
         tiers: Sequence[Tier]) -> None:
    for tier in tiers:
        key = (kind, name, tier.index, tier.bucket(at))
        got = pending.get(key)
        if got is None:
            pending[key] = Acc(**vars(acc))
        else:
            got.merge(acc)


def accumulate(pending: dict[Key, Acc], sample: MetricsSample, at: float,
               tiers: Sequence[Tier], skip: Collection[str] = ()) -> None:
    """Add one agent sample, received at ``at``, to the buckets of each tier: one per instance
    (but those in ``skip``: being deleted) and one for the host (the sum of every instance it
    runs, and how busy the whole host was). The server's clock places it, not the agent's:
    hosts' clocks may disagree, and pruning goes by the server's.

    Runs on the leader's loop for every sample of every host (a thousand a second at a
    thousand hosts): each instance is added into its buckets in place, without an
    :class:`Acc` of its own to merge (21 against 11 us a sample of 10 instances)."""
    starts = [(tier.index, tier.bucket(at)) for tier in tiers]
    host = Acc(samples=1)
    cpu_known = not sample.instances  # a host without instances uses no CPU for them
    cores = max(1, sample.host_cores)
    seen: set[str] = set()
    for inst in sample.instances:
        name = inst.name
        if name in seen:
            continue
        seen.add(name)
        memory = max(0, inst.memory_bytes)
        core = inst.cpu_core_pct
        host_pct = 0.0
        if core is not None:
            host_pct = inst.cpu_host_pct if inst.cpu_host_pct is not None else core / cores
            host.cpu_core_sum += core
            host.cpu_host_sum += host_pct
            cpu_known = True
        host.memory_max += memory
        if name in skip:
            continue
        for index, start in starts:
            key = (INSTANCE, name, index, start)
            got = pending.get(key)
            if got is None:
                got = pending[key] = Acc()
            got.samples += 1
            if memory > got.memory_max:
                got.memory_max = memory
            if core is not None:
                got.cpu_n += 1
                got.cpu_core_sum += core
                got.cpu_host_sum += host_pct
    host.cpu_n = 1 if cpu_known else 0
    if sample.host_cpu_pct is not None:
        host.busy_n, host.busy_sum = 1, sample.host_cpu_pct
    _add(pending, HOST, sample.host, host, at, tiers)


def pick_tier(tiers: Sequence[Tier], since: float, now: float) -> Tier:
    """The fine tier when it still holds ``since``, else the coarse one."""
    fine, coarse = tiers[0], tiers[-1]
    return fine if since >= now - fine.keep else coarse


def coarsen(rows: Iterable[tuple[int, Acc]], step: int, since: float, until: float,
            max_points: int = MAX_POINTS) -> tuple[int, list[MetricPoint]]:
    """The points of ``rows`` (bucket start, content; ``step`` wide) over ``[since, until]``:
    as they are when at most ``max_points`` buckets of ``step`` span the range, else merged
    into buckets a whole multiple of ``step`` wide, so the answer never holds more. The width
    the points have, and the points, oldest first."""
    span = max(0.0, until - since)
    buckets = math.floor(span / step) + 2  # the range's partial buckets at both ends
    factor = max(1, math.ceil(buckets / max_points))
    width = step * factor
    groups: dict[int, Acc] = {}
    for t, acc in rows:
        g = (t // width) * width
        got = groups.get(g)
        if got is None:
            groups[g] = got = Acc()
        got.merge(acc)
    points = [acc.point(g) for g, acc in sorted(groups.items())]
    return width, points[-max_points:]


class MetricHistory:
    """The leader's gathering and writing of samples, and every server's reads.

    ``record`` and ``forget`` run on the server's event loop; ``write``, ``prune`` and
    ``series`` block (the database) and are run in worker threads."""

    def __init__(self, sessions: sessionmaker[Session], settings: Settings, *,
                 fence: Callable[[Connection], None] | None = None,
                 leads: Callable[[], bool] = lambda: True,
                 clock: Callable[[], float] = time.time) -> None:
        self.sessions = sessions
        self.tiers = tiers_of(settings)
        self.flush_every = settings.history_flush_seconds
        #: prune every minute, or more often with a short flush interval (tests)
        self.prune_every = min(60.0, 6 * self.flush_every)
        self.fence = fence
        self.leads = leads
        self.clock = clock
        self._pending: dict[Key, Acc] = {}
        #: the tiers a sample is added to: the fine one only when every fine bucket lies in
        #: one coarse bucket, the coarse ones then made from the fine ones at each flush
        #: (:meth:`take`): adding every sample to both tiers cost a third more (86 against
        #: 57 us for a sample of 10 instances)
        fine, coarse = self.tiers
        self._rolled = coarse.step % fine.step == 0
        self._gather: tuple[Tier, ...] = (fine,) if self._rolled else self.tiers
        #: samples not kept because :data:`MAX_PENDING` buckets were waiting
        self.dropped = 0
        #: instances being deleted -> when that began (this clock): their samples are
        #: ignored until their row is gone, then what a flush in flight wrote is deleted
        self._forgotten: dict[str, float] = {}

    # -- gathering (the event loop) --------------------------------------------------------------
    def record(self, sample: MetricsSample) -> None:
        if not self.leads():
            self._pending.clear()  # the leader keeps its own; never write a follower's
            return
        if len(self._pending) >= MAX_PENDING:
            if self.dropped % 1000 == 0:
                log.warning("metric history: %d buckets wait for a flush; dropping samples",
                            len(self._pending))
            self.dropped += 1
            return
        accumulate(self._pending, sample, self.clock(), self._gather, self._forgotten)

    def take(self) -> dict[Key, Acc]:
        """What was gathered, in every tier (the coarse buckets summed from the fine ones
        when only those were gathered), and start again."""
        batch, self._pending = self._pending, {}
        if self._rolled and batch:
            fine, coarse = self.tiers
            rolled: dict[Key, Acc] = {}
            for (kind, name, tier, t), acc in batch.items():
                if tier == fine.index:  # a fine bucket lies in the coarse bucket of its start
                    _add(rolled, kind, name, acc, t, (coarse,))
            batch.update(rolled)
        return batch

    def _restore(self, batch: dict[Key, Acc]) -> None:
        """Put back a batch whose write failed, as far as the bound allows (only what was
        gathered: the coarse buckets are made from the fine ones again)."""
        for key, acc in batch.items():
            if self._rolled and key[2] != self.tiers[0].index:
                continue
            got = self._pending.get(key)
            if got is not None:
                got.merge(acc)
            elif len(self._pending) < MAX_PENDING:
                self._pending[key] = acc

    async def flush(self) -> int:
        """Write what was gathered (a worker thread); rows written. Then settle the
        instances being deleted (see :meth:`forget`)."""
        batch = self.take()
        written = 0
        if batch:
            try:
                written = await asyncio.to_thread(self.write, batch)
            except NotLeader:
                return 0  # the new leader writes its own
            except Exception:
                self._restore(batch)
                raise
        if self._forgotten:
            forgotten = dict(self._forgotten)
            with contextlib.suppress(NotLeader):
                for name in await asyncio.to_thread(self.settle, forgotten, self.clock()):
                    if self._forgotten.get(name) == forgotten[name]:
                        del self._forgotten[name]
        return written

    async def forget(self, name: str) -> None:
        """An instance is being deleted (``before_delete``): its history goes now, and its
        samples are ignored from now on. Its agent still reports it while it stops, and a
        flush may be writing it right now: :meth:`settle` deletes it again once its row is
        gone. Best effort: a failure is logged (:meth:`sweep` is the backstop)."""
        if not self.leads():  # deletes are the leader's (a follower forwards them)
            return
        self._forgotten[name] = self.clock()
        for key in [k for k in self._pending if k[0] == INSTANCE and k[1] == name]:
            del self._pending[key]
        try:
            await asyncio.to_thread(self.delete_series, INSTANCE, name)
        except Exception as exc:
            log.warning("metric history of %s not deleted now (%s); a later flush does",
                        name, exc)

    async def loop(self) -> None:
        """The leader's: flush every ``flush_every``, prune every ``prune_every`` (the first
        time at once: the server may have been away), and sweep every
        :data:`SWEEP_EVERY_PRUNES` prunes."""
        last_prune = -math.inf
        prunes = 0
        while True:
            await asyncio.sleep(self.flush_every)
            try:
                await self.flush()
            except Exception as exc:
                log.warning("writing metric history failed (%s); trying again", exc)
            if time.monotonic() - last_prune >= self.prune_every:
                last_prune = time.monotonic()
                try:
                    await asyncio.to_thread(self.prune)
                    if prunes % SWEEP_EVERY_PRUNES == 0:
                        await asyncio.to_thread(self.sweep)
                    prunes += 1
                except NotLeader:
                    pass
                except Exception as exc:
                    log.warning("pruning metric history failed (%s); trying again", exc)

    # -- the database (worker threads) ------------------------------------------------------------
    def _begin(self, s: Session) -> Connection:
        conn = s.connection()
        if self.fence is not None:
            self.fence(conn)
        return conn

    def write(self, batch: dict[Key, Acc]) -> int:
        """Add ``batch`` to the stored buckets, in one transaction; rows written."""
        if not batch:
            return 0
        with self.sessions.begin() as s:
            conn = self._begin(s)
            known: dict[str, set[str]] = {
                INSTANCE: self._known(conn, Instance.name, batch, INSTANCE),
                HOST: self._known(conn, Host.name, batch, HOST)}
            rows = [(kind, name, tier, t, a.samples, a.cpu_n, a.cpu_core_sum, a.cpu_host_sum,
                     a.memory_max, a.busy_n, a.busy_sum)
                    for (kind, name, tier, t), a in batch.items() if name in known[kind]]
            if rows:
                conn.exec_driver_sql(_upsert_sql(conn.dialect.paramstyle), rows)
        return len(rows)

    @staticmethod
    def _known(conn: Connection, column: InstrumentedAttribute[str], batch: dict[Key, Acc],
               kind: str) -> set[str]:
        """Which of the batch's names of ``kind`` the database knows (``column``)."""
        names = sorted({k[1] for k in batch if k[0] == kind})
        if not names:
            return set()
        return set(conn.scalars(select(column).where(column.in_(names))))

    def settle(self, forgotten: dict[str, float], now: float) -> list[str]:
        """Of the instances being deleted (name -> since when), those done with: their row is
        gone (or is a new instance's, made since), so their series is deleted once more
        (what a flush in flight wrote after :meth:`forget`), or they waited
        :data:`FORGET_SECONDS` (the delete failed: the instance lives on)."""
        done: list[str] = []
        with self.sessions.begin() as s:
            conn = self._begin(s)
            made = {r[0]: r[1] for r in conn.execute(select(Instance.name, Instance.created_at)
                                                         .where(Instance.name.in_(
                                                             sorted(forgotten))))}
            for name, since in forgotten.items():
                created = made.get(name)
                if created is None or created > since:
                    conn.execute(delete(MetricBucket).where(MetricBucket.kind == INSTANCE,
                                                            MetricBucket.name == name))
                    done.append(name)
                elif now - since > FORGET_SECONDS:
                    done.append(name)
        return done

    def delete_series(self, kind: str, name: str) -> int:
        with self.sessions.begin() as s:
            conn = self._begin(s)
            return int(conn.execute(delete(MetricBucket).where(
                MetricBucket.kind == kind, MetricBucket.name == name)).rowcount)

    def prune(self, now: float | None = None) -> int:
        """Delete what each tier keeps no longer and what lies in the future (the clock went
        back): ranges of the (tier, t) index, one transaction; rows deleted."""
        now = self.clock() if now is None else now
        mb = MetricBucket
        n = 0
        with self.sessions.begin() as s:
            conn = self._begin(s)
            for tier in self.tiers:
                n += conn.execute(delete(mb).where(
                    mb.tier == tier.index, mb.t < tier.bucket(now - tier.keep))).rowcount
                n += conn.execute(delete(mb).where(
                    mb.tier == tier.index, mb.t > tier.bucket(now) + tier.step)).rowcount
        return n

    def sweep(self) -> int:
        """Delete the series of instances and hosts that are gone however they went (the
        backstop of :meth:`forget`; ``host rm``). The names are read first, outside the write
        transaction (a read holds up no writer), and only orphans are deleted."""
        mb = MetricBucket
        with self.sessions() as s:
            series = {(r[0], r[1]) for r in s.execute(select(mb.kind, mb.name).distinct())}
            known: dict[str, set[str]] = {INSTANCE: set(s.scalars(select(Instance.name))),
                                          HOST: set(s.scalars(select(Host.name)))}
        gone = sorted((k, n) for k, n in series if n not in known.get(k, set()))
        if not gone:
            return 0
        n = 0
        with self.sessions.begin() as s:
            conn = self._begin(s)
            for kind, name in gone:
                n += conn.execute(delete(mb).where(mb.kind == kind, mb.name == name)).rowcount
        return n

    def series(self, kind: Kind, name: str, since: float, until: float | None = None,
               now: float | None = None, max_points: int = MAX_POINTS) -> MetricSeries:
        """The stored points of one series over ``[since, until]`` (until: now)."""
        now = self.clock() if now is None else now
        until = now if until is None else until
        tier = pick_tier(self.tiers, since, now)
        start = max(since, now - tier.keep)  # nothing older is kept: no wider points for it
        mb = MetricBucket
        with self.sessions() as s:
            found = s.execute(select(
                mb.t, mb.samples, mb.cpu_n, mb.cpu_core_sum, mb.cpu_host_sum, mb.memory_max,
                mb.busy_n, mb.busy_sum).where(
                mb.kind == kind, mb.name == name, mb.tier == tier.index,
                mb.t >= tier.bucket(since), mb.t <= until).order_by(mb.t).limit(MAX_ROWS))
            rows = [(int(r[0]), Acc(*r[1:])) for r in found]
        end = min(until, now + tier.step)  # nor is anything newer: no wider points for it
        step, points = coarsen(rows, tier.step, min(start, end), end, max_points)
        return MetricSeries(instance=name, kind=kind,
                            step_seconds=step, since=since, until=until, points=points)


#: a bucket's columns, in the order :meth:`MetricHistory.write` gives them
_COLUMNS = ("kind", "name", "tier", "t", "samples", "cpu_n", "cpu_core_sum", "cpu_host_sum",
            "memory_max", "busy_n", "busy_sum")
_SUMMED = ("samples", "cpu_n", "cpu_core_sum", "cpu_host_sum", "busy_n", "busy_sum")


def _upsert_sql(paramstyle: str) -> str:
    """INSERT of buckets that adds to a bucket already stored, as the driver's own SQL
    (SQLite and PostgreSQL spell ``ON CONFLICT`` the same way): a flush writes a row per
    instance and tier, and SQLAlchemy's compiled statement spent more of the GIL building
    each row's parameters than the database spent storing it (py-spy, 10,000 instances)."""
    mark = "?" if paramstyle == "qmark" else "%s"
    table = MetricBucket.__tablename__
    sets = [f"{c} = {table}.{c} + excluded.{c}" for c in _SUMMED]
    sets.append(f"memory_max = CASE WHEN excluded.memory_max > {table}.memory_max "
                f"THEN excluded.memory_max ELSE {table}.memory_max END")
    return (f"INSERT INTO {table} ({', '.join(_COLUMNS)}) "
            f"VALUES ({', '.join([mark] * len(_COLUMNS))}) "
            f"ON CONFLICT (kind, name, tier, t) DO UPDATE SET {', '.join(sets)}")
