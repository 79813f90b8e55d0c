"""Agent calls of a live migration (thin: the mechanism is the driver's, e.g. drivers/qemu.py).

The server drives it as separate calls so each is one step of the ``migrate`` operation with
its undo beside it: the destination starts the created instance waiting for the stream
(``live_incoming``), the source sends it (``live_send``), and the source's undo cancels and
lets the instance run on (``live_abort``). The stream goes host to host on the address of the
host's data channel, encrypted and authenticated with the same host certificate the data
channel uses (from enrolment); the server only learns where the destination listens.

``live_send`` does not hold the instance's lock while the stream runs (minutes, for a big
guest): heartbeats and status calls go on meanwhile, and the server's operation lock keeps the
operator's verbs away from the instance.

A virtual IP is held by one end at a time (:mod:`corral.agent.vips`): the destination's copy is
``vip_away`` from ``live_incoming`` until the server's switch-over (``live_claim``), and the
source lets the address go as soon as QEMU says the guest runs on the destination; an undo
(``live_abort``) takes it back.
"""

from __future__ import annotations

from dataclasses import asdict

from corral.agent.state import AgentState, Handler
from corral.agent.store import InstanceRecord, check_name
from corral.agent.vips import AWAY
from corral.bus import rpc
from corral.bus.messages import InstanceReport
from corral.drivers.base import LiveMigration, MigrationTls
from corral.errors import Conflict, InvalidRequest, NotSupported


def _live(st: AgentState, rec: InstanceRecord) -> LiveMigration:
    drv = st.driver(rec.driver)
    if not drv.capabilities.can_live_migrate or not isinstance(drv, LiveMigration):
        raise NotSupported(f"the {rec.driver} driver cannot migrate a running instance",
                           hint="migrate it without --live (a frozen pass, then a restart)")
    return drv


def _tls(st: AgentState) -> MigrationTls | None:
    """The host's identity from enrolment; None on a fleet without TLS (loopback only)."""
    tls = st.disks.tls if st.disks is not None else None
    return None if tls is None else MigrationTls(tls.ca_file, tls.cert_file, tls.key_file)


async def live_incoming(st: AgentState, args: rpc.IncomingArgs) -> rpc.IncomingTarget:
    name = check_name(args.name)
    if st.disks is None:
        raise InvalidRequest("this agent has no data channel, so no address to listen on",
                             hint="this is an agent bug")
    address = st.disks.channel.host
    async with st.lock(name):
        rec = st.record(name)
        if args.epoch is not None:  # as a start's: never an epoch older than one seen here
            newest = st.epochs.get(name, 0)
            if args.epoch < newest:
                raise Conflict(f"stale epoch {args.epoch} for instance '{name}': this host "
                               f"has seen epoch {newest}", hint="a newer owner took it over")
            st.epochs[name] = rec.epoch = args.epoch
        drv = _live(st, rec)
        rec.stop_requested = False
        rec.extra[AWAY] = True  # the source holds the address until the switch-over
        st.save(rec)
        rec.handle, port = await st.call(drv.incoming, rec.handle, address, _tls(st),
                                         args.peer)
        st.save(rec)
        await st.refresh(rec)
    return rpc.IncomingTarget(address=address, port=port)


async def live_send(st: AgentState, args: rpc.LiveSendArgs) -> rpc.LiveStats:
    name = check_name(args.name)
    async with st.lock(name):
        rec = st.record(name)
        drv = _live(st, rec)
        handle = rec.handle
    stats = await st.call(drv.migrate_out, handle, args.address, args.port, _tls(st),
                          args.target, args.downtime_ms, args.timeout)
    async with st.lock(name):
        if st.records.get(name) is rec:
            rec.extra[AWAY] = True  # the guest runs there now: let its address go
            st.save(rec)
            if st.vips is not None:
                await st.vips.down(rec, st.records)
            await st.refresh(rec)
    return rpc.LiveStats.model_validate(asdict(stats))


async def live_abort(st: AgentState, args: rpc.NameArgs) -> InstanceReport:
    name = check_name(args.name)
    async with st.lock(name):
        rec = st.record(name)
        await st.call(_live(st, rec).migration_abort, rec.handle)
        report = await st.refresh(rec)
        if rec.extra.pop(AWAY, None):
            st.save(rec)
            if st.vips is not None and report.state in ("running", "frozen"):
                await st.vips.up(rec)
        return report


async def live_claim(st: AgentState, args: rpc.NameArgs) -> InstanceReport:
    name = check_name(args.name)
    async with st.lock(name):
        rec = st.record(name)
        report = await st.refresh(rec)
        if report.state != "running":
            raise Conflict(f"the copy of '{name}' here is {report.state}, not running",
                           hint="the migration rolls back; the instance runs on at the "
                                "source", retryable=True)
        rec.extra.pop(AWAY, None)
        st.save(rec)
        if st.vips is not None:
            await st.vips.up(rec)
        return report


HANDLERS: dict[str, Handler] = {
    "live_incoming": live_incoming,
    "live_send": live_send,
    "live_abort": live_abort,
    "live_claim": live_claim,
}
