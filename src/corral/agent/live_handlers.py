"""Agent calls of a live migration (thin: the mechanism is the driver's, e.g. drivers/qemu.py).

The server drives it as separate calls so each is one step of the ``migrate`` operation with
its undo beside it: the destination starts the created instance waiting for the stream
(``live_incoming``), the source sends it (``live_send``), and the source's undo cancels and
lets the instance run on (``live_abort``). The stream goes host to host through the agents'
data channel (:mod:`corral.disks.tunnel`): the hypervisor at each end talks to a unix socket in
the instance's directory, the source's agent connects to the destination's data channel with
its host certificate and the server's ticket for this one stream, and the destination's agent
relays it only into the socket where that instance waits for that source (:func:`tunnels`).

``live_send`` does not hold the instance's lock while the stream runs (minutes, for a big
guest): heartbeats and status calls go on meanwhile, and the server's operation lock keeps the
operator's verbs away from the instance.

A virtual IP follows the guest (:mod:`corral.agent.vips`): the destination's copy is ``vip_away``
from ``live_incoming`` until its guest runs, which the destination's agent watches for
(:data:`WATCH_EVERY`) and announces at once: every moment between the guest resuming there and
peers learning where it is costs its TCP peers a retransmission timeout, and waiting for the
server's switch-over (``live_claim``, which claims it again) added a few hundred ms. The source
lets the address go as soon as QEMU says the stream completed; the destination's repeated
announcements (``vips.ANNOUNCE_AGAIN``) win over a last answer from the source. An undo kills
the destination's copy (its address goes with it) and ``live_abort`` takes it back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import asdict
from pathlib import Path

from corral.agent.state import AgentState, Handler
from corral.agent.store import InstanceRecord, check_name
from corral.agent.vips import AWAY
from corral.bus import rpc
from corral.bus.messages import InstanceReport
from corral.disks import tunnel
from corral.disks.channel import Tunnels
from corral.disks.frames import client_context
from corral.drivers.base import LiveMigration
from corral.errors import Conflict, CorralError, InvalidRequest, NotFound, NotSupported

log = logging.getLogger(__name__)

#: how often a migration's destination asks its QEMU whether the guest runs yet
WATCH_EVERY = 0.05
#: and for how long at most (a live stream's own limit: ``rpc.LIVE_SEND``)
WATCH_FOR = 6 * 3600.0
_watches: set[asyncio.Task[None]] = set()
#: the source's end of the tunnel, in the instance's stream directory
OUT_SOCK = "migrate-out.sock"
#: the record's note of where, and from which host, a destination waits for its stream
INCOMING = "incoming"
#: once the hypervisor is done, the tunnel's last bytes get this long to drain
DRAIN_TIMEOUT = 10.0


def _live(st: AgentState, rec: InstanceRecord) -> LiveMigration:
    drv = st.driver(rec.driver)
    if not drv.capabilities.can_live_migrate or not isinstance(drv, LiveMigration):
        raise NotSupported(f"the {rec.driver} driver cannot migrate a running instance",
                           hint="migrate it without --live (a frozen pass, then a restart)")
    return drv


def tunnels(st: AgentState) -> Tunnels:
    """For the data channel: the socket a live stream of ``instance`` from ``source`` goes
    into, only while this host's copy waits for that very source."""

    def where(instance: str, source: str) -> Path:
        rec = st.records.get(instance)
        waiting = rec.extra.get(INCOMING) if rec is not None else None
        if rec is None or not isinstance(waiting, dict):
            raise NotFound(f"no copy of '{instance}' waits for a live stream here")
        if waiting.get("peer") != source:
            raise Conflict(f"the copy of '{instance}' here waits for a stream from "
                           f"{waiting.get('peer')}, not from {source}")
        drv = _live(st, rec)
        return drv.stream_dir(rec.handle) / str(waiting["sock"])

    return where


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
        rec.handle, sock = await st.call(drv.incoming, rec.handle, args.peer)
        rec.extra[INCOMING] = {"peer": args.peer, "sock": sock}
        st.save(rec)
        await st.refresh(rec)
        if rec.spec.vip and st.vips is not None:
            task = asyncio.get_running_loop().create_task(
                _announce_when_running(st, name, rec.handle.data.get("generation")))
            _watches.add(task)
            task.add_done_callback(_watches.discard)
    return rpc.IncomingTarget(address=address, port=st.disks.channel.port)


async def _announce_when_running(st: AgentState, name: str, generation: object) -> None:
    """Take the VIP over the moment the guest runs here (the stream completed); give up when
    this copy is gone, replaced, claimed already, or no longer waiting."""
    deadline = time.monotonic() + WATCH_FOR
    while time.monotonic() < deadline:
        await asyncio.sleep(WATCH_EVERY)
        rec = st.records.get(name)
        if rec is None or not rec.extra.get(AWAY) or \
                rec.handle.data.get("generation") != generation:
            return
        drv = st.driver(rec.driver)
        if not isinstance(drv, LiveMigration):
            return
        try:
            runs = await st.call(drv.resumed, rec.handle)
        except CorralError:
            continue
        if runs is None:  # the copy is gone
            return
        if not runs:  # waiting for the stream (or in it)
            continue
        async with st.lock(name):
            if st.records.get(name) is not rec or not rec.extra.pop(AWAY, None):
                return
            st.save(rec)
            if st.vips is not None:
                with contextlib.suppress(CorralError, OSError):
                    await st.vips.up(rec)
            log.info("%s runs here now: its virtual IP %s is announced", name, rec.spec.vip)
        return


async def live_send(st: AgentState, args: rpc.LiveSendArgs) -> rpc.LiveStats:
    name = check_name(args.name)
    if st.disks is None:
        raise InvalidRequest("this agent has no data channel to send the stream on",
                             hint="this is an agent bug")
    tls = st.disks.tls
    ctx = None if tls is None else client_context(tls.ca_file, tls.cert_file, tls.key_file)
    async with st.lock(name):
        rec = st.record(name)
        drv = _live(st, rec)
        handle = rec.handle
        out = tunnel.Outbound(drv.stream_dir(handle) / OUT_SOCK, lambda: tunnel.open_peer(
            args.address, args.port, ctx, args.target, args.ticket))
    relay = asyncio.create_task(out.serve(), name=f"live-stream-{name}")
    try:
        stats = await st.call(drv.migrate_out, handle, OUT_SOCK, args.target,
                              args.downtime_ms, args.timeout)
    except CorralError as exc:
        why = await _ended(relay, 2.0 if out.accepted else 0.0)
        if isinstance(why, CorralError):  # what broke the stream, not QEMU's "closed"
            raise CorralError(f"live migration of {name} to {args.target} failed: {why}",
                              hint=why.hint or exc.hint, retryable=exc.retryable) from exc
        raise
    finally:
        out.close_listener()
    why = await _ended(relay, DRAIN_TIMEOUT)
    if why is not None:
        log.info("live stream of %s: the tunnel ended with %s", name, why)
    async with st.lock(name):
        if st.records.get(name) is rec:
            rec.extra[AWAY] = True  # the guest runs there now: let its address go
            st.save(rec)
            if st.vips is not None:
                await st.vips.down(rec, st.records)
            await st.refresh(rec)
    return rpc.LiveStats.model_validate(asdict(stats))


async def _ended(relay: asyncio.Task[int], wait: float) -> BaseException | None:
    """The tunnel, given ``wait`` seconds to end once the hypervisor is done with it (then
    cancelled); why it failed, if it did."""
    if wait > 0:
        await asyncio.wait({relay}, timeout=wait)
    if not relay.done():
        relay.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await relay
        return None
    return None if relay.cancelled() else relay.exception()


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
        rec.extra.pop(INCOMING, None)
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
