"""Which server leads the fleet: a lease row in the shared database, with a fencing generation.

Any number of ``corral server`` processes share one database; one of them leads (runs the
operation engine, the HA manager, lease expiry, the refresh and offload loops, and answers the
agents), the others serve the API and forward what writes to it. The lease is the one row of
table ``leadership`` (migration 0009): who holds it, until when, and a ``generation`` bumped at
every takeover.

Why the database and not a NATS KV lease: the database is where the writes are, so it is where
a deposed leader must be stopped. A lease kept anywhere else still needs the database to refuse
the commit of a leader that lost it (paused, partitioned, its clock off), which means the
database must know the generation anyway; with the lease in the same place, taking it over and
refusing the old holder's writes are one mechanism, ordered by the database's own locks, and
there is no second system whose view of "who leads" could disagree with the data's.

* **Taking it**: ``UPDATE leadership SET generation = generation + 1, holder = me, ...,
  expires_at = now + lease WHERE id = 1 AND (expires_at < now OR holder = me)``. The
  database's clock (``clock_timestamp()`` on PostgreSQL) decides expiry, never a server's.
* **Keeping it**: every third of the lease, ``expires_at = now + lease`` where the holder and
  the generation are still ours. A leader that could not renew for a whole lease (counted from
  the start of its last successful renewal, so never past the database's expiry) steps down on
  its own; a clean stop gives the lease back at once, so a rolling restart hands over in a poll.
* **Fencing**: every write transaction of the server reads the row first (``FOR SHARE`` on
  PostgreSQL: the takeover's UPDATE waits for the leader's transactions in flight, and every
  later one of the old leader sees the new generation) and raises :class:`NotLeader` when the
  generation is not the one this server took. A leader that keeps running after a partition
  can therefore never commit: :meth:`Leadership.install` hooks the ORM's flushes, and
  :meth:`Leadership.fence` is what the operation store calls in its own transactions.

Every poll also refreshes this server's row in table ``servers``, which ``GET /v1/status`` and
enrolment read (every node's bus URL).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session, SessionTransaction, sessionmaker

from corral.errors import NotLeader

log = logging.getLogger(__name__)

#: servers not seen for this long are forgotten (the leader prunes them)
FORGET_AFTER = 86400.0
#: a follower tries to take a lease this long after it should have run out
EXPIRY_SLACK = 0.02
_FENCED = "corral_fenced"

_NOW = {"postgresql": "extract(epoch from clock_timestamp())",
        "sqlite": "((julianday('now') - 2440587.5) * 86400.0)"}


def _retrieved(fut: asyncio.Future[Any]) -> None:
    """A poll no one waits for any more (a stop): its error is not worth a warning."""
    if not fut.cancelled():
        fut.exception()


def server_id(data_dir: Path) -> str:
    """This server's id, kept in ``DATA/server-id`` (made on first start)."""
    path = data_dir / "server-id"
    with contextlib.suppress(FileNotFoundError):
        found = path.read_text().strip()
        if found:
            return found
    new = uuid.uuid4().hex[:12]
    tmp = path.with_name(f".server-id.{os.getpid()}.tmp")
    tmp.write_text(new + "\n")
    os.replace(tmp, path)
    return new


@dataclass(frozen=True)
class LeaderInfo:
    """The lease as last read: who holds it, where its API is, which generation."""

    id: str
    api_url: str
    generation: int
    expires_at: float


@dataclass(frozen=True)
class ServerInfo:
    id: str
    api_url: str
    nats_url: str
    started_at: float
    last_seen: float
    version: str


@dataclass(frozen=True)
class Poll:
    """What one poll of the database found."""

    held: bool
    generation: int
    leader: LeaderInfo | None
    servers: list[ServerInfo]
    #: seconds until the lease runs out, by the database's clock (negative: it has)
    remaining: float = 0.0


Elected = Callable[[int], Awaitable[None]]
Deposed = Callable[[], Awaitable[None]]


class Leadership:
    def __init__(self, engine: Engine, server: str, lease_seconds: float, *,
                 api_url: str = "", nats_url: str = "", version: str = "",
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.engine = engine
        self.server_id = server
        self.lease = lease_seconds
        self.api_url = api_url
        self.nats_url = nats_url
        self.version = version
        self.clock = clock
        self.on_elected: Elected | None = None
        self.on_deposed: Deposed | None = None
        #: the generation this server holds, None while it follows
        self.generation: int | None = None
        #: the lease as last read (None: nobody holds one that has not run out)
        self.leader: LeaderInfo | None = None
        self.servers: list[ServerInfo] = []
        #: (monotonic) until when the lease is surely ours: the start of the last renewal
        #: that succeeded, plus the lease
        self.valid_until = 0.0
        #: (monotonic) when the holder's lease runs out at the soonest, as a follower saw it
        self._expires = 0.0
        self._started_at = time.time()
        self._dialect = engine.dialect.name
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        #: set (and replaced) after every poll: what :meth:`settle` waits on
        self._stepped = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        #: the poll in flight (a worker thread), awaited again rather than doubled while the
        #: database does not answer
        self._polling: asyncio.Future[Poll] | None = None
        self._polling_since = 0.0
        #: another server could take over (a shared database): only then does a lease this
        #: server's clock cannot vouch for stop it at once. SQLite is one server's file: a
        #: loop held up on a loaded machine must not make it refuse its own writes
        self._shared = self._dialect != "sqlite"
        if self._dialect == "postgresql":  # a database that never answers a connect: bounded
            event.listen(engine, "do_connect", self._connect_timeout)

    @property
    def is_leader(self) -> bool:
        """This server leads: it took the lease, and by its own clock the lease is still
        sure (a leader whose renewals hang stops leading when it runs out, even before its
        loop gets to step down)."""
        return self.generation is not None and (not self._shared
                                                or self.clock() < self.valid_until)

    async def settle(self, timeout: float) -> None:
        """A leader whose lease is no longer sure only because its renewal is late (a loaded
        machine, a slow database) polls now and waits for the answer, up to ``timeout``: a
        call that arrives in that gap is answered, not turned away with a 503 while no other
        server could lead. Returns at once while this server follows or is sure."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.generation is not None and not self.is_leader and not self._stopping:
            left = deadline - loop.time()
            if left <= 0:
                return
            stepped = self._stepped
            self._wake.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stepped.wait(), left)

    def _connect_timeout(self, _dialect: Any, _rec: Any, _args: Any,
                         params: dict[str, Any]) -> None:
        params.setdefault("connect_timeout", max(2, math.ceil(self.lease / 3)))

    @property
    def every(self) -> float:
        """How often to poll: a leader renews every third of the lease, a follower looks
        twice as often (so a lease given back is taken within a fraction of it) and, besides,
        just as the lease it saw runs out (so a dead leader's is taken at once)."""
        return self.lease / 3 if self.generation is not None else self.lease / 6

    # -- the database side (worker threads) ---------------------------------------------------
    def _now(self) -> str:
        return _NOW.get(self._dialect, _NOW["sqlite"])

    def _limits(self, conn: Connection) -> None:
        """A poll never waits longer than its interval for a lock: a slow one is tried again,
        rather than holding up the step-down that a lease run out calls for."""
        if self._dialect == "postgresql":
            ms = max(100, int(self.lease / 3 * 1000))
            conn.execute(text(f"SET LOCAL lock_timeout = {ms}"))
            conn.execute(text(f"SET LOCAL statement_timeout = {2 * ms}"))

    def poll(self) -> Poll:
        """Renew (leader) or try to take (follower) the lease, refresh this server's row, and
        read the lease and the servers: one transaction."""
        now = self._now()
        me = {"me": self.server_id}
        with self.engine.begin() as conn:
            self._limits(conn)
            if self.generation is not None:
                held = conn.execute(text(
                    f"UPDATE leadership SET expires_at = {now} + :lease, holder_api_url = :url "
                    "WHERE id = 1 AND holder = :me AND generation = :gen"),
                    {**me, "lease": self.lease, "url": self.api_url,
                     "gen": self.generation}).rowcount == 1
            else:
                held = conn.execute(text(
                    "UPDATE leadership SET generation = generation + 1, holder = :me, "
                    f"holder_api_url = :url, expires_at = {now} + :lease "
                    f"WHERE id = 1 AND (expires_at < {now} OR holder = :me)"),
                    {**me, "lease": self.lease, "url": self.api_url}).rowcount == 1
            row = conn.execute(text(
                f"SELECT generation, holder, holder_api_url, expires_at, {now} AS now "
                "FROM leadership WHERE id = 1")).one()
            db_now = float(row.now)
            self._register(conn, db_now)
            if held:
                conn.execute(text("DELETE FROM servers WHERE last_seen < :old"),
                             {"old": db_now - FORGET_AFTER})
            servers = [ServerInfo(r.id, r.api_url, r.nats_url, float(r.started_at),
                                  float(r.last_seen), r.version)
                       for r in conn.execute(text(
                           "SELECT id, api_url, nats_url, started_at, last_seen, version "
                           "FROM servers ORDER BY started_at, id"))]
        leader = None
        if row.holder and float(row.expires_at) >= db_now:
            leader = LeaderInfo(row.holder, row.holder_api_url, int(row.generation),
                                float(row.expires_at))
        return Poll(held, int(row.generation), leader, servers,
                    float(row.expires_at) - db_now)

    def _register(self, conn: Connection, now: float) -> None:
        values = {"id": self.server_id, "api": self.api_url, "nats": self.nats_url,
                  "seen": now, "started": self._started_at, "version": self.version}
        done = conn.execute(text(
            "UPDATE servers SET api_url = :api, nats_url = :nats, last_seen = :seen, "
            "started_at = :started, version = :version WHERE id = :id"), values)
        if done.rowcount == 0:
            conn.execute(text(
                "INSERT INTO servers (id, api_url, nats_url, started_at, last_seen, version) "
                "VALUES (:id, :api, :nats, :started, :seen, :version)"), values)

    # -- fencing -------------------------------------------------------------------------------
    def fence(self, conn: Connection) -> None:
        """In a write transaction, before it writes: raise :class:`NotLeader` unless this
        server still holds the lease with the generation it took. On PostgreSQL the row is
        read ``FOR SHARE``, held until the transaction ends, so a takeover waits for it."""
        gen = self._sure()
        lock = " FOR SHARE" if self._dialect == "postgresql" else ""
        row = conn.execute(text(
            f"SELECT generation, holder FROM leadership WHERE id = 1{lock}")).one_or_none()
        if row is None or int(row.generation) != gen or row.holder != self.server_id:
            self._lost()
            raise NotLeader(
                f"this server's leadership (generation {gen}) was taken over"
                + ("" if row is None else f" by {row.holder} (generation {row.generation})"),
                hint="the new leader answers; try again")

    def _sure(self) -> int:
        """The generation this server holds; :class:`NotLeader` if none, or if the lease is no
        longer sure by this server's clock (its renewals failed or hang)."""
        gen = self.generation
        if gen is None:
            raise NotLeader("this server does not lead the fleet: it writes nothing",
                            hint="send the request to the leader (GET /v1/status names it)")
        if self._shared and self.clock() >= self.valid_until:
            self._lost()
            raise NotLeader(f"this server's lease (generation {gen}) could not be renewed in "
                            "time: it writes nothing", hint="the new leader answers; try again")
        return gen

    def install(self, sessions: sessionmaker[Session]) -> None:
        """Fence every write made with ``sessions``: once per transaction, before its first
        flush (reads never flush, so followers read freely)."""

        def before_flush(session: Session, _ctx: Any, _objs: Any) -> None:
            tx = session.get_transaction()
            if tx is not None and session.info.get(_FENCED) is tx:
                return
            self._sure()  # before a connection: one to a database that hangs can wait long
            self.fence(session.connection())
            session.info[_FENCED] = tx

        def after_end(session: Session, tx: SessionTransaction) -> None:
            if session.info.get(_FENCED) is tx:
                session.info.pop(_FENCED, None)

        event.listen(sessions, "before_flush", before_flush)
        event.listen(sessions, "after_transaction_end", after_end)

    def _lost(self) -> None:
        """The fence saw another generation: wake the loop to step down now (any thread)."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._wake.set)

    # -- the loop ------------------------------------------------------------------------------
    async def start(self) -> None:
        """One poll now (a lone server leads before it says it is ready), then the loop."""
        self._loop = asyncio.get_running_loop()
        await self._step()
        self._task = asyncio.create_task(self._run(), name="leadership")

    async def _run(self) -> None:
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._sleep())
            self._wake.clear()
            await self._step()

    def _sleep(self) -> float:
        wait = self.every
        if self.generation is not None:  # never sleep past the point where it is not sure
            wait = min(wait, max(0.0, self.valid_until - self.clock()))
        elif self._expires > self.clock():  # a follower tries again just as it runs out
            wait = min(wait, self._expires - self.clock() + EXPIRY_SLACK)
        return max(0.01, wait)

    async def _step(self) -> None:
        try:
            await self._poll_step()
        finally:
            stepped, self._stepped = self._stepped, asyncio.Event()
            stepped.set()

    async def _poll_step(self) -> None:
        try:
            found, started = await self._poll_bounded()
        except Exception as exc:
            log.warning("leadership poll failed: %s", exc or type(exc).__name__)
            if self.generation is not None and self._shared \
                    and self.clock() >= self.valid_until:
                log.error("could not renew the leader's lease for %.1fs: stepping down",
                          self.lease)
                await self._depose()
            return
        self.leader, self.servers = found.leader, found.servers
        self._expires = started + found.remaining  # started: never later than it is
        if self._stopping:
            return
        if self.generation is not None and not found.held:
            log.error("the lease (generation %s) is no longer ours: stepping down",
                      self.generation)
            await self._depose()
        elif self.generation is not None:
            self.valid_until = started + self.lease
        elif found.held:
            self.generation, self.valid_until = found.generation, started + self.lease
            log.warning("this server (%s) leads the fleet now (generation %d)",
                        self.server_id, found.generation)
            if self.on_elected is not None:
                try:
                    await self.on_elected(found.generation)
                except Exception:
                    log.exception("taking over as leader failed: giving the lease back")
                    await self._depose()
                    with contextlib.suppress(Exception):
                        await asyncio.to_thread(self._release_gen, found.generation)

    async def _poll_bounded(self) -> tuple[Poll, float]:
        """The poll, with when it started (what a lease it takes or renews counts from). A
        leader waits for it only until its lease is no longer sure (at least a sixth of the
        lease): a database that accepts but never answers must not hold up the step-down. A
        poll still in flight is waited for again, never started twice."""
        if self._polling is None or self._polling.done():
            self._polling_since = self.clock()
            self._polling = asyncio.ensure_future(asyncio.to_thread(self.poll))
            self._polling.add_done_callback(_retrieved)
        fut, since = self._polling, self._polling_since
        if self.generation is None or not self._shared:
            return await asyncio.shield(fut), since
        wait = max(self.lease / 6, self.valid_until - self.clock())
        try:
            return await asyncio.wait_for(asyncio.shield(fut), wait), since
        except TimeoutError:
            raise TimeoutError(f"no answer from the database in {wait:.1f}s") from None

    def _release_gen(self, gen: int) -> None:
        """Give the lease back (a clean stop, a failed takeover): a follower takes it at its
        next poll instead of waiting for it to run out."""
        with self.engine.begin() as conn:
            self._limits(conn)
            conn.execute(text("UPDATE leadership SET expires_at = 0 WHERE id = 1 AND "
                              "holder = :me AND generation = :gen"),
                         {"me": self.server_id, "gen": gen})

    async def _depose(self) -> None:
        if self.generation is None:
            return
        self.generation = None
        self.valid_until = 0.0
        if self.on_deposed is not None:
            try:
                await self.on_deposed()
            except Exception:
                log.exception("stepping down failed")

    async def stop(self) -> None:
        """Stop polling; a leader steps down and gives the lease back."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        gen = self.generation
        await self._depose()
        if gen is not None:
            try:
                await asyncio.to_thread(self._release_gen, gen)
            except Exception as exc:
                log.warning("could not give the lease back (%s); it runs out in %.1fs", exc,
                            self.lease)

    # -- reads -----------------------------------------------------------------------------------
    def read_nats_urls(self) -> list[str]:
        """Every node's bus URL as the database lists it now (a worker thread): what an
        enrolment hands out must name a server that started since the last poll too."""
        try:
            with self.engine.connect() as conn:
                urls = [r.nats_url for r in conn.execute(text(
                    "SELECT nats_url FROM servers ORDER BY started_at, id"))]
        except Exception as exc:
            log.warning("reading the servers' bus URLs failed (%s): using the last poll's", exc)
            return self.nats_urls()
        return self._merge([self.nats_url, *urls])

    def nats_urls(self) -> list[str]:
        """Every node's bus URL this server knows: its own first, then the others'."""
        return self._merge([self.nats_url, *(s.nats_url for s in self.servers)])

    @staticmethod
    def _merge(urls: list[str]) -> list[str]:
        out: list[str] = []
        for url in urls:
            for one in url.split(","):
                one = one.strip()
                if one and one not in out:
                    out.append(one)
        return out
