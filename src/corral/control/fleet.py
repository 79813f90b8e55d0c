"""What the server knows of its hosts: joins, heartbeats, leases, and the latest metric samples.

Agents report observed instance states; this module turns each report into a lifecycle move with
:func:`corral.lifecycle.transition`, so a confused or stale report can never put an instance in a
state the table does not allow. Two guards keep old news from overwriting new facts:

* the **epoch**: every start gets a new one; a report carrying an older epoch is about a previous
  run and is ignored;
* the **locks**: while a verb or an operation holds an instance (``Fleet.locks``), heartbeats
  about it are ignored; the verb's own reply is the authority.

All methods are synchronous and short (one transaction each); they run on the server's event
loop, which therefore serialises every write to the database.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import (
    Float,
    String,
    bindparam,
    case,
    cast,
    event,
    func,
    inspect,
    select,
    type_coerce,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session, load_only, sessionmaker

from corral.bus.messages import (
    Heartbeat,
    HeartbeatReply,
    InstanceReport,
    InstanceSample,
    JoinReply,
    JoinRequest,
    MetricsSample,
)
from corral.config import Settings
from corral.control.db import Host, Instance, LeaderLease, Standby
from corral.control.pace import Pace, pace_for, repace
from corral.disks import tickets
from corral.errors import InvalidTransition
from corral.lifecycle import ALIVE, ENDED, TRANSITIONS, State, transition
from corral.ops.locks import LockManager
from corral.scheduling.placement import EPSILON, HostSnapshot, Request, place

log = logging.getLogger(__name__)


def queue_lag(pending: int, rate: float, cap: float) -> float:
    """How many seconds of heartbeats wait, unanswered, in this server's queue: ``pending``
    of them at the ``rate`` (a second) it has been answering them, at most ``cap``. A server
    that falls behind (a burst of placements, a slow disk) must not take its own delay for
    its hosts': at 2000 hosts it marked every one down for heartbeats it had not read yet,
    and the slow pass each then took kept it behind for good (bench/fleet_scale.py)."""
    if pending <= 0:
        return 0.0
    if rate <= 0:
        return cap
    return min(cap, pending / rate)

#: how many hosts a plain placement asks the database for (see :meth:`Fleet.place`)
SHORTLIST = 32


#: how long an operator's request waits for an operation on its instance to end
BUSY_WAIT = 15.0
#: what :meth:`Fleet.move` may set besides the state (the spec is fixed at create)
MOVABLE_FIELDS = frozenset({"host", "desired_state", "epoch", "pid", "exit_code", "disk_host",
                            "shelf", "shelved_from", "shelved_at", "offload_at"})


#: what a heartbeat compares its reports with (an :class:`Instance` has the same attributes)
_REPORTED = (Instance.name, Instance.host, Instance.epoch, Instance.state,
             Instance.desired_state, Instance.pid, Instance.exit_code, Instance.restarts,
             Instance.health)
#: the two reads of a quiet heartbeat, built once (building a statement cost as much as
#: running it)
_HOST_LEASE = select(Host.state, Host.lease_expires_at).where(Host.name == bindparam("host"))
#: every instance the host holds, by the indexed host column: one statement compiled once (an
#: expanding IN of the reported names was compiled again for each heartbeat, half its cost)
_HOST_ROWS = select(*_REPORTED).where(Instance.host == bindparam("host"))


@dataclass(frozen=True)
class QuietBeat:
    """A heartbeat answered without a change: the reply, and what the database says of each
    reported instance (name -> (host, epoch)), read in the same pass, for the HA manager's
    rejoin check (no second read of the same rows)."""

    reply: HeartbeatReply
    records: dict[str, tuple[str | None, int]]


#: where a session keeps the hosts its flushes wrote, until its commit (Fleet._on_commit)
_TOUCHED = "corral.fleet.touched"


#: the leases a session wrote into hosts' rows, known as the rows' once it commits
_LEASES = "corral.fleet.leases"


def _leased(s: Session, host: str, until: float | None) -> None:
    s.info.setdefault(_LEASES, {})[host] = float(until or 0.0)


@dataclass(frozen=True)
class Agreed:
    """What a host's last heartbeat said that its rows said too (see
    :meth:`Fleet.quiet_heartbeat`): its reports, as :func:`report_key` has them, and the
    rows' (host, epoch) of each reported instance, for the HA manager."""

    key: tuple[tuple[Any, ...], ...]
    records: dict[str, tuple[str | None, int]]


def report_key(reports: Iterable[InstanceReport]) -> tuple[tuple[Any, ...], ...]:
    """Every field of ``reports`` that :meth:`Fleet._moved` and the epoch check read: two
    heartbeats with the same key make the same moves of the same rows."""
    return tuple((r.name, r.state, r.pid, r.exit_code, r.signal, r.epoch, r.restarts,
                  r.health) for r in reports)


@dataclass(frozen=True)
class HostMetrics:
    sample: MetricsSample
    received_at: float
    by_name: dict[str, InstanceSample]


def observed(report: InstanceReport, desired_state: str) -> State:
    """The lifecycle state a report means (agents send lifecycle names; be lenient otherwise)."""
    try:
        new = State(report.state)
    except ValueError:
        return State.FAILED
    if new == State.EXITED and (report.exit_code not in (0, None) or report.signal is not None):
        new = State.FAILED
    if new in ENDED and desired_state == State.STOPPED:
        new = State.STOPPED  # it ended because we asked it to
    return new


class Fleet:
    def __init__(self, sessions: sessionmaker[Session], settings: Settings,
                 clock: Callable[[], float] = time.time,
                 ticket_key: Ed25519PrivateKey | None = None) -> None:
        self.sessions = sessions
        self.settings = settings
        self.clock = clock
        self.metrics: dict[str, HostMetrics] = {}
        #: what verbs, operations and loops hold (instances, hosts): see ops/locks.py
        self.locks = LockManager()
        #: joins per host since this server started: a new value means a new agent process
        self.joins: dict[str, int] = {}
        #: hosts marked down by :meth:`expire_leases` since (up again with a heartbeat/join)
        self.states: dict[str, str] = {}
        #: the leader's own view of each host's last answered heartbeat and lease end. The
        #: rows get them only every half lease (see :meth:`heartbeat`): a durable commit per
        #: heartbeat held the event loop for an fsync each time, and a fleet of a few hundred
        #: hosts was more than one server could answer (bench/fleet_scale.py).
        self.last_beat: dict[str, float] = {}
        self.lease_until: dict[str, float] = {}
        #: how many of its own instances each host's last join or heartbeat reported (the
        #: pace's count; reports of instances that are not its own do not count)
        self.reported: dict[str, int] = {}
        #: (when read, host -> guarded instances) of every host: see :meth:`guarded_now`
        self._guarded: tuple[float, dict[str, list[str]]] = (float("-inf"), {})
        #: hosts whose row's lease a quiet heartbeat found past its half: :meth:`write_leases`
        #: renews them all in one commit (one fsync a second, not one per host)
        self._renew: set[str] = set()
        #: see :meth:`_driver_names`
        self._drivers_by_text: dict[str, frozenset[str]] = {}
        #: host -> its last heartbeat that agreed with its rows, while no write touched
        #: them since (:meth:`quiet_heartbeat`, dropped by :meth:`_on_flush`)
        self._agreed: dict[str, Agreed] = {}
        #: host -> the lease its row holds, as this server last read or wrote it: a quiet
        #: heartbeat asks :meth:`write_leases` to renew the row once it is past its half
        self._row_lease: dict[str, float] = {}
        event.listen(sessions, "after_flush", self._on_flush)
        event.listen(sessions, "after_commit", self._on_commit)
        event.listen(sessions, "after_rollback", lambda s: s.info.pop(_LEASES, None))
        #: signs transfer tickets (disks/tickets.py); agents learn its public half at join
        self.ticket_key: Ed25519PrivateKey = (ticket_key if ticket_key is not None
                                              else Ed25519PrivateKey.generate())
        #: the heartbeat, lease and sample periods this leader asks of its hosts now, and
        #: the longest lease it knows was ever granted (control/pace.py)
        self.pace: Pace = pace_for(settings, 0)
        self.lease_ceiling = self.pace.lease_seconds
        #: whether this server is sure it leads now (the server sets it from its lease): the
        #: leader's background loops skip a pass when not, rather than sit in a connect to a
        #: database that went silent, on the loop that must also answer, and step down
        self.sure: Callable[[], bool] = lambda: True

    # --- pace -------------------------------------------------------------------------------

    def repace(self, hosts: int | None = None, instances: int | None = None) -> Pace:
        """Fit the pace to the fleet's size (control/pace.py): ``hosts``, or by default the
        hosts this server has granted a lease, and ``instances``, or by default as many as
        their last heartbeats reported (no database read: the lease loop calls this, and a
        leader cut off from its database must not sit in a connect on its event loop).
        A longer lease than any granted before is first written to the database as the new
        ceiling (fenced: only the leader), so a server that takes over gives every host at
        least as long a lease as any it may still hold; only then is it granted."""
        if hosts is None:
            hosts = len(self.lease_until)
        if instances is None:
            instances = sum(self.reported.values())
        new = repace(self.pace, self.settings, hosts, instances)
        if new == self.pace:
            return new
        if new.lease_seconds > self.lease_ceiling:
            with self.sessions.begin() as s:
                row = s.get(LeaderLease, 1)
                if row is not None:
                    row.lease_ceiling = max(row.lease_ceiling or 0.0, new.lease_seconds)
            self.lease_ceiling = new.lease_seconds
        log.warning("%d hosts, %d instances: heartbeat every %.1fs, lease %.1fs, samples "
                    "every %.1fs (max_heartbeats_per_second %g, "
                    "max_instance_samples_per_second %g)", hosts, instances,
                    new.heartbeat_seconds, new.lease_seconds, new.sample_seconds,
                    self.settings.max_heartbeats_per_second,
                    self.settings.max_instance_samples_per_second)
        self.pace = new
        return new

    def _grant(self, host: str, now: float) -> float:
        """Renew ``host``'s lease from ``now`` at the current pace; never shorter than one
        granted before (a shorter pace must not cut a lease an agent holds). Its end."""
        until = max(self.lease_until.get(host, 0.0), now + self.pace.lease_seconds)
        self.lease_until[host] = until
        return until

    def _answer(self, until: float, guarded: list[str]) -> HeartbeatReply:
        """A heartbeat's answer: the lease's end, and the pace the host is to keep."""
        pace = self.pace
        return HeartbeatReply(known=True, lease_expires_at=until, guarded=guarded,
                              heartbeat_seconds=pace.heartbeat_seconds,
                              lease_seconds=pace.lease_seconds,
                              sample_seconds=pace.sample_seconds)

    # --- observed state -------------------------------------------------------------------

    def apply_report(self, inst: Instance, report: InstanceReport, *, from_verb: bool = False
                     ) -> bool:
        """Move ``inst`` to what ``report`` says, if allowed; True when something changed."""
        if report.epoch < inst.epoch:
            log.debug("ignoring stale report on %s (epoch %s < %s)", inst.name, report.epoch,
                      inst.epoch)
            return False
        if inst.name in self.locks.instances and not from_verb:
            return False
        moved = self._moved(inst, report)
        if moved is None:
            return False
        current, new, pid, exit_code = moved
        if new != current:
            try:
                transition(inst.name, current, new)
            except InvalidTransition:
                log.info("ignoring report %s -> %s for %s", current.value, new.value, inst.name)
                return False
            log.info("instance %s: %s -> %s", inst.name, current.value, new.value)
        inst.state = new.value
        inst.pid = pid
        inst.exit_code = exit_code
        inst.restarts = report.restarts  # the agent's count for this copy (agent/restart.py)
        inst.health = report.health  # None without a check (agent/health.py)
        inst.updated_at = self.clock()
        return True

    @staticmethod
    def _moved(inst: Any, report: InstanceReport
               ) -> tuple[State, State, int | None, int | None] | None:
        """(current, new state, pid, exit code) that ``report`` makes of ``inst`` (an
        :class:`Instance` or a row of :data:`_REPORTED`), None when it says what the row
        says: :meth:`apply_report` and :meth:`quiet_heartbeat` must agree on "no change"."""
        current = State(inst.state)
        new = observed(report, inst.desired_state)
        pid = report.pid if new in ALIVE else None
        exit_code = report.exit_code if new in ENDED | {State.STOPPED} else None
        if (new == current and pid == inst.pid and exit_code == inst.exit_code
                and report.restarts == inst.restarts and report.health == inst.health):
            return None
        return current, new, pid, exit_code

    async def wait_free(self, name: str, seconds: float = BUSY_WAIT) -> None:
        """Give a short operation in flight on ``name`` (a standby refresh every minute, say)
        a moment to end, so an operator's request does not fail just because a background
        refresh ran; the caller then takes the lock (and hears who holds it if still busy)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while name in self.locks.instances and loop.time() < deadline:
            await asyncio.sleep(0.1)

    # --- the one writer of an instance's row ---------------------------------------------------

    def move(self, name: str, state: State | None = None, *,
             report: InstanceReport | None = None, **fields: Any) -> bool:
        """Move instance ``name`` (its own transaction); see :meth:`move_in`. False when it
        is gone (removed meanwhile: nothing to record)."""
        with self.sessions.begin() as s:
            inst = s.get(Instance, name)
            if inst is None:
                return False
            self.move_in(inst, state, report=report, **fields)
            return True

    def move_in(self, inst: Instance, state: State | None = None, *,
                report: InstanceReport | None = None, **fields: Any) -> None:
        """Every change the server makes to an instance's row goes through here (verbs,
        operations, shelving): set ``fields`` (host, desired_state, shelving columns...),
        move the observed ``state`` through the lifecycle table (a move it does not list is
        a bug and raises), then apply the agent's ``report`` on top. Heartbeats use
        :meth:`apply_report`, which skips what the table refuses instead (an agent may be
        confused; the server's own moves may not)."""
        for key, value in fields.items():
            if key not in MOVABLE_FIELDS:
                raise ValueError(f"internal: '{key}' is not a field an instance moves")
            setattr(inst, key, value)
        if state is not None:
            new = transition(inst.name, State(inst.state), state, operation=True)
            if new != State(inst.state):
                log.info("instance %s: %s -> %s", inst.name, inst.state, new.value)
            inst.state = new.value
            if new not in ALIVE:
                inst.pid = None
        inst.updated_at = self.clock()
        if report is not None:
            self.apply_report(inst, report, from_verb=True)

    def _apply_all(self, s: Session, host: str, reports: Iterable[InstanceReport]) -> None:
        """Apply ``host``'s reports of its own instances; count those for the pace (never
        what a host merely claims: one reporting made-up instances must not slow every
        host's samples)."""
        reports = list(reports)
        self.reported[host] = 0
        if not reports:
            return
        rows = {i.name: i for i in s.scalars(
            select(Instance).where(Instance.name.in_([r.name for r in reports])))}
        for r in reports:
            inst = rows.get(r.name)
            if inst is None:
                log.warning("host %s reports instance %s, which the server does not know; "
                            "leaving it alone", host, r.name)
            elif inst.host != host:
                log.warning("host %s reports instance %s, which belongs to %s; ignoring",
                            host, r.name, inst.host)
            else:
                self.reported[host] += 1
                self.apply_report(inst, r)

    # --- bus handlers -----------------------------------------------------------------------

    def liveness(self, host: str) -> tuple[int, str]:
        """What changes when ``host``'s agent restarts or the host goes down (cheap: no DB)."""
        return self.joins.get(host, 0), self.states.get(host, "up")

    def join(self, req: JoinRequest) -> JoinReply:
        now = self.clock()
        self.joins[req.host] = self.joins.get(req.host, 0) + 1
        self.states[req.host] = "up"
        self.last_beat[req.host] = now
        until = self._grant(req.host, now)
        with self.sessions.begin() as s:
            host = s.get(Host, req.host)
            if host is None:
                host = Host(name=req.host, joined_at=now)
                s.add(host)
                log.info("host %s joined from %s", req.host, req.address)
            else:
                log.info("host %s re-joined from %s", req.host, req.address)
            host.address = req.address
            host.cores = req.capacity.cores
            host.memory_bytes = req.capacity.memory_bytes
            host.disk_bytes = req.capacity.disk_bytes
            host.drivers = {k: dict(v) for k, v in req.drivers.items()}
            host.agent_version = req.agent_version
            host.data_port = req.data_port
            host.disk_backend = req.disk_backend
            host.state = "up"
            host.last_heartbeat = now
            host.lease_expires_at = until
            _leased(s, req.host, until)
            s.flush()
            self._apply_all(s, req.host, req.instances)
            guarded = self.guarded(s, req.host)
        return JoinReply(lease_seconds=self.pace.lease_seconds,
                         heartbeat_seconds=self.pace.heartbeat_seconds,
                         sample_seconds=self.pace.sample_seconds, guarded=guarded,
                         ticket_key=tickets.public_hex(self.ticket_key))

    def heartbeat(self, host_name: str, hb: Heartbeat) -> HeartbeatReply:
        """Renew ``host_name``'s lease and apply its reports. Nothing is written unless
        something changed (an instance's state, the host coming back) or the row's lease is
        past its half: a heartbeat that only says "still here" is a read, no commit."""
        now = self.clock()
        lease = self.pace.lease_seconds
        with self.sessions.begin() as s:
            host = s.get(Host, host_name)
            if host is None or hb.host != host_name:
                log.info("heartbeat from unknown host %s: asking it to re-join", host_name)
                return HeartbeatReply(known=False)
            if host.state != "up":
                log.info("host %s is back", host_name)
                host.state = "up"
            self.states[host_name] = "up"
            self.last_beat[host_name] = now
            until = self._grant(host_name, now)
            self._apply_all(s, host_name, hb.instances)
            if s.dirty or (host.lease_expires_at or 0.0) < now + lease / 2:
                host.last_heartbeat = now  # a commit there is anyway, or the row's lease is
                host.lease_expires_at = until  # past its half: followers read it
            _leased(s, host_name, host.lease_expires_at)
            return self._answer(until, self.guarded_now(s, host_name))

    def quiet_heartbeat(self, host_name: str, hb: Heartbeat) -> QuietBeat | None:
        """:meth:`heartbeat` for the common case, cheaply: the host is up and every report
        says what its row says (or is stale, or about a locked instance). No ORM objects, no
        commit: the row's lease, when past its half, is left to :meth:`write_leases` (the
        next lease check, within a second). None: something would change (or the host is
        unknown, down, a report odd): call :meth:`heartbeat`.

        A heartbeat that says what the host's last one said, with none of its rows written
        since (:meth:`_on_flush` drops the agreement), is answered without a read: most
        heartbeats of a settled fleet. Else two reads of plain columns compare the reports
        with the rows. At 10 instances a host the two reads were a third of a heartbeat's
        cost on the leader; the ORM pass before them cost 1.2-1.7 ms (loading and tracking
        every instance object), and a commit with an fsync every half lease per host (200 a
        second at a thousand hosts) held the loop besides."""
        if hb.host != host_name or self.states.get(host_name, "up") != "up":
            return None  # marked down (memory ahead of the row): the ORM pass says "back"
        now = self.clock()
        key = report_key(hb.instances)
        agreed = self._agreed.get(host_name)
        if agreed is not None and agreed.key == key:
            records, guarded = agreed.records, self.guarded_now(None, host_name)
        else:
            with self._connect() as conn:  # Core, not the ORM's execute: half its cost
                read = self._compare(conn, host_name, hb.instances)
                if read is None:
                    return None
                records, agrees = read
                if agrees:
                    self._agreed[host_name] = Agreed(key, records)
                guarded = self.guarded_now(conn, host_name)
        self.last_beat[host_name] = now
        self.reported[host_name] = len(records)  # the reports of its own rows (_compare)
        until = self._grant(host_name, now)
        if self._row_lease.get(host_name, 0.0) < now + self.pace.lease_seconds / 2:
            self._renew.add(host_name)  # followers read the row: see write_leases
        return QuietBeat(self._answer(until, guarded), records)

    def _compare(self, conn: Connection, host_name: str, reports: list[InstanceReport]
                 ) -> tuple[dict[str, tuple[str | None, int]], bool] | None:
        """Read ``host_name``'s row and its instances' and compare ``reports`` with them:
        None when a report would move a row (or the host is unknown or not up); else the
        reported rows' (host, epoch), and whether every report agrees with its row outright
        (not only because the instance is locked now)."""
        row = conn.execute(_HOST_LEASE, {"host": host_name}).first()
        if row is None or row.state != "up":
            return None
        self._row_lease[host_name] = float(row.lease_expires_at or 0.0)
        rows: dict[str, Any] = {}
        if reports:
            reported = {r.name for r in reports}
            rows = {r.name: r for r in conn.execute(_HOST_ROWS, {"host": host_name})
                    if r.name in reported}
        locked = self.locks.instances
        agrees = True
        for report in reports:
            cur = rows.get(report.name)
            if cur is None or cur.host != host_name:
                return None  # the loop's pass says so in the log
            if report.epoch >= cur.epoch and self._moved(cur, report) is not None:
                if cur.name not in locked:
                    return None
                agrees = False  # its verb's reply is the authority, for now
        return {name: (r.host, r.epoch) for name, r in rows.items()}, agrees

    @staticmethod
    def guarded(s: Session, host: str) -> list[str]:
        """Instances on ``host`` that a failover would start elsewhere (they have a standby):
        the ones its agent must stop when it cannot renew its lease. Others are never started
        elsewhere without their host, so a cut-off host may keep running them."""
        return sorted(s.scalars(select(Standby.instance).join(
            Instance, Instance.name == Standby.instance).where(Instance.host == host)))

    def _on_flush(self, session: Session, _ctx: Any) -> None:
        """Any write through these sessions (the leader is the only writer) of a standby or an
        instance drops the cached guarded lists: the next heartbeat reads them again. A write
        of an instance (its host before and after) or of a host's state, or a host made or
        removed, drops that host's agreed heartbeat (:meth:`quiet_heartbeat`): its next one
        compares its reports with the rows again. A renewal of the lease columns alone drops
        nothing."""
        now: set[str] = set()
        for group, written in ((session.new, True), (session.dirty, False),
                               (session.deleted, True)):  # each built once: O(identity map)
            for obj in group:
                if isinstance(obj, Standby | Instance):
                    self._guarded = (float("-inf"), {})
                if isinstance(obj, Instance):
                    # committed_state: the loaded value of each attribute set since
                    was = inspect(obj).committed_state.get("host")
                    if was is not None and not isinstance(was, str):
                        self._agreed.clear()  # written before its host was read: any host
                    now.update(h for h in (obj.host, was) if isinstance(h, str) and h)
                elif isinstance(obj, Host) and (
                        written or "state" in inspect(obj).committed_state):
                    now.add(obj.name)
        if now:
            session.info.setdefault(_TOUCHED, set()).update(now)
            for host in now:
                self._agreed.pop(host, None)

    def _on_commit(self, session: Session) -> None:
        """Drop the hosts :meth:`_on_flush` saw written again once the write is visible: a
        heartbeat answered between a flush and its commit (a session held across an
        ``await``) read the rows as they were, and must not be the agreement kept."""
        for host in session.info.pop(_TOUCHED, ()):
            self._agreed.pop(host, None)
        self._row_lease.update(session.info.pop(_LEASES, {}))

    def guarded_now(self, s: Session | Connection | None, host: str) -> list[str]:
        """:meth:`guarded`, read for every host at once and kept until a standby or an
        instance is written (or half a heartbeat passed): a join per heartbeat was a third
        of the server's work for it. ``s`` None: a connection of its own when it reads."""
        read_at, by_host = self._guarded
        now = self.clock()
        if not 0 <= now - read_at < self.pace.heartbeat_seconds / 2:
            by_host = {}
            query = select(Instance.host, Standby.instance).join(
                Instance, Instance.name == Standby.instance).order_by(Standby.instance)
            if s is None:
                with self._connect() as conn:
                    rows = conn.execute(query).all()
            else:
                rows = list(s.execute(query))
            for h, name in rows:
                by_host.setdefault(h or "", []).append(name)
            self._guarded = (now, by_host)
        return list(by_host.get(host, []))

    def record_metrics(self, sample: MetricsSample) -> None:
        self.metrics[sample.host] = HostMetrics(sample, self.clock(),
                                                {i.name: i for i in sample.instances})

    def fresh_leases(self) -> int:
        """A server that just took the lead gives every host that is up a whole lease from
        now, before it expires anything: the seconds no server led (no heartbeat was
        answered) must not count against the hosts. How many hosts it renewed.

        The lease is the longest any leader granted (the ceiling in the database), so an
        agent that heard a longer lease from the last leader than this one would grant is
        never counted out before its own deadline (control/pace.py)."""
        with self.sessions() as s:
            row = s.get(LeaderLease, 1)
            ceiling = float(row.lease_ceiling or 0.0) if row is not None else 0.0
            known = int(s.scalar(select(func.count()).select_from(Host)) or 0)
        self.lease_ceiling = max(self.lease_ceiling, ceiling)
        self.repace(known)
        now = self.clock()
        lease = max(self.lease_ceiling, self.pace.lease_seconds)
        with self.sessions.begin() as s:
            hosts = list(s.scalars(select(Host).where(Host.state == "up")))
            for host in hosts:
                host.lease_expires_at = max(host.lease_expires_at or 0.0, now + lease)
        # another leader wrote rows meanwhile: every heartbeat compares with them again
        self._agreed.clear()
        self._row_lease = {h.name: float(h.lease_expires_at or 0.0) for h in hosts}
        return len(hosts)

    def _connect(self) -> Connection:
        """A plain connection of the sessions' engine (no Session to set up and tear down)."""
        bind = self.sessions.kw.get("bind")
        if not isinstance(bind, Engine):  # pragma: no cover - open_db binds them so
            raise TypeError("internal: the fleet's sessions must be bound to an Engine")
        return bind.connect()

    def write_leases(self) -> int:
        """Give the rows of hosts :meth:`quiet_heartbeat` renewed the lease they have in
        memory, in one transaction (fenced like every write: a deposed leader writes none).
        Only the two lease columns, never below what the row says. How many rows.
        :meth:`expire_leases` does it first, in its own transaction."""
        with self.sessions.begin() as s:
            return self._write_leases(s)

    def _write_leases(self, s: Session) -> int:
        names, self._renew = self._renew, set()
        if not names:
            return 0
        hosts = list(s.scalars(select(Host).where(Host.name.in_(sorted(names))).options(
            load_only(Host.last_heartbeat, Host.lease_expires_at))))  # not the JSON
        for host in hosts:
            host.last_heartbeat = max(host.last_heartbeat or 0.0,
                                      self.last_beat.get(host.name, 0.0))
            host.lease_expires_at = max(host.lease_expires_at or 0.0,
                                        self.lease_until.get(host.name, 0.0))
            _leased(s, host.name, host.lease_expires_at)
        return len(hosts)

    def expire_leases(self, slack: float = 0.0) -> list[str]:
        """Mark hosts whose lease ran out more than ``slack`` seconds ago ``down`` and their
        instances ``lost``; first write the rows' renewals the quiet heartbeats left
        (:meth:`write_leases`), in the same transaction: one talk with the database a check,
        as before (when it is cut off, each talk can hold the loop for its connection's
        timeouts). ``slack``: how far behind this server is with the heartbeats already at
        its door (:func:`queue_lag`): a host whose heartbeat waits in that queue is not late."""
        now = self.clock() - max(0.0, slack)
        downed: list[str] = []
        with self.sessions.begin() as s:
            self._write_leases(s)
            for host in s.scalars(select(Host).where(
                    Host.state == "up", Host.lease_expires_at < now)):
                until = self.lease_until.get(host.name, 0.0)
                if until >= now:
                    continue  # renewed since the row was written (see heartbeat)
                host.lease_expires_at = max(host.lease_expires_at or 0.0, until)
                host.last_heartbeat = max(host.last_heartbeat or 0.0,
                                          self.last_beat.get(host.name, 0.0))
                host.state = "down"
                self.states[host.name] = "down"
                downed.append(host.name)
                log.warning("host %s missed its lease (last heartbeat %.1fs ago): down",
                            host.name, now - (host.last_heartbeat or now))
                for inst in s.scalars(select(Instance).where(Instance.host == host.name)):
                    current = State(inst.state)
                    if State.LOST in TRANSITIONS[current]:
                        inst.state = State.LOST.value
                        inst.pid = None
                        inst.updated_at = now
                self.metrics.pop(host.name, None)
        return downed

    # --- reads ------------------------------------------------------------------------------

    def fresh_metrics(self, host: str) -> HostMetrics | None:
        m = self.metrics.get(host)
        if m is None or self.clock() - m.received_at > self.pace.lease_seconds:
            return None
        return m

    def snapshot(self, s: Session) -> list[HostSnapshot]:
        """Every host with its reservations: all instances count until deleted. Plain
        columns, not Host objects: every placement reads every host, and loading a thousand
        tracked objects took 45 ms of the loop a placement (bench/fleet_scale.py)."""
        s.flush()  # what the ORM's own read would flush first (autoflush)
        conn = s.connection()
        sums = dict(
            (name, (float(c or 0.0), int(m or 0)))
            for name, c, m in conn.execute(
                select(Instance.host, func.sum(Instance.cpus), func.sum(Instance.memory_bytes))
                .where(Instance.host.is_not(None)).group_by(Instance.host)).all()
        )
        return [
            HostSnapshot(name=h.name, up=h.state == "up", cores=h.cores,
                         memory_bytes=h.memory_bytes,
                         reserved_cpus=sums.get(h.name, (0.0, 0))[0],
                         reserved_memory=sums.get(h.name, (0.0, 0))[1],
                         drivers=self._driver_names(h.drivers), draining=bool(h.draining))
            for h in conn.execute(select(Host.name, Host.state, Host.cores, Host.memory_bytes,
                                         type_coerce(Host.drivers, String).label("drivers"),
                                         Host.draining).order_by(Host.name))
        ]

    def place(self, s: Session, req: Request) -> str:
        """Where ``req`` goes, as :func:`corral.scheduling.placement.place` over
        :meth:`snapshot` says. A plain request (no pin, preference or exclusion) asks the
        database for the first :data:`SHORTLIST` hosts in the spread's order that are up, not
        draining and have the room, and places among those: they are a prefix of what the full
        rule orders, so the first of them that offers the driver is the full rule's choice. At
        1000 hosts the snapshot and the rule over it were 31 ms of the loop per placement
        (bench/fleet_scale.py); when no host of the shortlist offers the driver, or none fits,
        the full rule runs (and says what each host lacks)."""
        if req.host is not None or req.avoid or req.prefer:
            return place(req, self.snapshot(s))
        s.flush()
        sums = (select(Instance.host.label("host"), func.sum(Instance.cpus).label("c"),
                       func.sum(Instance.memory_bytes).label("m"))
                .where(Instance.host.is_not(None)).group_by(Instance.host).subquery())
        used_c, used_m = func.coalesce(sums.c.c, 0.0), func.coalesce(sums.c.m, 0)
        free_c, free_m = Host.cores - used_c, Host.memory_bytes - used_m
        share_c = case((Host.cores > 0, cast(free_c, Float) / Host.cores), else_=0.0)
        share_m = case((Host.memory_bytes > 0, cast(free_m, Float) / Host.memory_bytes),
                       else_=0.0)
        rows = s.connection().execute(
            select(Host.name, Host.cores, Host.memory_bytes,
                   type_coerce(Host.drivers, String).label("drivers"), used_c, used_m)
            .outerjoin(sums, sums.c.host == Host.name)
            .where(Host.state == "up", Host.draining.is_not(True),
                   free_c >= req.cpus - EPSILON, free_m >= req.memory_bytes)
            .order_by(share_c.desc(), share_m.desc(), Host.name).limit(SHORTLIST)).all()
        short = [HostSnapshot(name=name, up=True, cores=cores, memory_bytes=memory,
                              reserved_cpus=float(c or 0.0), reserved_memory=int(m or 0),
                              drivers=self._driver_names(drivers))
                 for name, cores, memory, drivers, c, m in rows]
        if any(req.driver in h.drivers for h in short):
            return place(req, short)
        return place(req, self.snapshot(s))

    def _driver_names(self, text: object) -> frozenset[str]:
        """A host's drivers from its column's JSON text, decoded once per distinct text
        (hosts of a fleet mostly report the same): decoding it for every host at every
        placement was most of :meth:`snapshot`'s time. (A driver that decodes JSON itself,
        PostgreSQL's, hands over the dict.)"""
        if not isinstance(text, str | None):
            return frozenset(text if isinstance(text, dict) else ())
        names = self._drivers_by_text.get(text or "")
        if names is None:
            if len(self._drivers_by_text) > 10_000:  # bounded: a fleet has few variants
                self._drivers_by_text.clear()
            names = frozenset(json.loads(text) if text else ())
            self._drivers_by_text[text or ""] = names
        return names
