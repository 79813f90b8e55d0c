"""The agent process: join, heartbeat, run commands, watch and sample -- on one asyncio loop.

Start-up re-attaches to every persisted instance *before* talking to the server, so the join
already reports what survived an agent restart; nothing is ever killed or restarted here. After
that three things run side by side: the command subscription (one task per request, so a long
stop does not hold up a status), the heartbeat loop (which doubles as the way to re-join a server
that forgot us), and the sampler loop (counters -> CPU figures, plus noticing ended instances and
heartbeating at once). SIGTERM/SIGINT end the loop and leave every workload running.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import shutil
import signal
import socket
import time
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

import corral
from corral.agent import identity
from corral.agent.capture import CaptureManager
from corral.agent.disks import HostDisks
from corral.agent.fence import FenceKeeper, Guarded, LeaseClock, fence_all
from corral.agent.handlers import HANDLERS, restart_ended
from corral.agent.health import HealthMonitor
from corral.agent.identity import Identity
from corral.agent.imagecache import ImageCache
from corral.agent.live_handlers import tunnels
from corral.agent.report import is_alive
from corral.agent.restart import Restarter
from corral.agent.sampler import sample_pass
from corral.agent.scope import driver_scope
from corral.agent.state import AgentState
from corral.agent.store import InstanceRecord
from corral.agent.vips import Vips
from corral.bus import subjects
from corral.bus.codec import decode, encode
from corral.bus.identity import Credentials
from corral.bus.messages import (
    Capacity,
    Command,
    Heartbeat,
    HeartbeatReply,
    JoinReply,
    JoinRequest,
    Reply,
)
from corral.bus.rpc import CALLS
from corral.config import Settings
from corral.drivers import reaping
from corral.errors import (
    ConfigError,
    CorralError,
    DriverError,
    HostUnavailable,
    InvalidRequest,
    Unauthorized,
    from_dict,
)
from corral.telemetry.accounting import CpuAccountant, HostCpu

log = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)
#: commands the agent works on at once (see Agent.on_command)
MAX_INFLIGHT = 256
#: every this many sampling passes, collect stray orphans (see corral.drivers.reaping)
REAP_EVERY = 5

JOIN_TRY_TIMEOUT = 5.0
JOIN_BACKOFF_MAX = 10.0


def host_name(settings: Settings) -> str:
    name = settings.host_name or socket.gethostname().split(".")[0]
    if not name or any(c in name for c in ". *>\t"):
        raise ConfigError(f"host name {name!r} cannot be used in a bus subject",
                          hint="set host_name (CORRAL_HOST_NAME) to letters, digits and '-'")
    return name


def memory_total_bytes() -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return 0


def capacity(data_dir: Path) -> Capacity:
    return Capacity(cores=os.cpu_count() or 1, memory_bytes=memory_total_bytes(),
                    disk_bytes=shutil.disk_usage(data_dir).total)


#: how long after enrolling a refused login is taken for a bus still loading the new key
ENROLL_SETTLE_SECONDS = 15.0

class Agent:
    def __init__(self, settings: Settings) -> None:
        from corral.drivers.registry import make_drivers

        if not (settings.nats_url or settings.server_url
                or (Path(settings.data_dir) / "identity").is_dir()):
            raise ConfigError("the agent needs the bus address, or the server's to enroll with",
                              hint="--server URL --join TOKEN (a new host), or --nats URL")
        if not (settings.token or settings.join_token
                or (settings.data_dir and (Path(settings.data_dir) / "identity").is_dir())):
            raise ConfigError("the agent has no identity, no join token and no token",
                              hint="enroll it: 'corral host add NAME' on the server, then "
                                   "--join TOKEN --server URL here")
        self.settings = settings
        self.host = host_name(settings)
        self.data_dir = Path(settings.data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        reaping.set_subreaper()  # orphans of instances come to us, to be reaped at once
        self.scope = driver_scope(self.data_dir, self.host)
        drivers, reasons = make_drivers(settings.drivers.split(","), self.scope, self.data_dir)
        for name, why in reasons.items():
            log.warning("driver %s is not offered on this host: %s", name, why)
        if not drivers:
            raise ConfigError(f"none of the drivers {settings.drivers!r} can run on this host",
                              hint="; ".join(f"{n}: {w}" for n, w in reasons.items()))
        self.state = AgentState(self.data_dir, drivers, settings.stop_timeout)
        self.accountant = CpuAccountant(os.cpu_count() or 1)
        self.host_cpu = HostCpu()
        self.heartbeat_s = settings.heartbeat_seconds
        self.sample_s = settings.sample_seconds
        self.seq = 0
        #: this host's own identity (None: it logs in with a token, see :meth:`_identity`)
        self.identity: Identity | None = None
        #: when this start enrolled the host (monotonic), None when it found an identity
        self.enrolled_at: float | None = None
        self.passes = 0  # sampling passes so far
        self.hb_sent = 0.0  # monotonic time the last heartbeat was sent
        self.nc: Any = None
        self._inflight: set[asyncio.Task[None]] = set()
        self.capture = CaptureManager(self.state, self.host)
        self.state.before_delete.append(self.capture.before_delete)
        self.images = ImageCache(self.data_dir, self.state.store.root, settings.token)
        self.state.images = self.images
        disk_root = Path(settings.disk_root) if settings.disk_root else self.data_dir / "disks"
        self.disks = HostDisks(disk_root, settings.disk_backend, self.data_dir, self.host,
                               listen=settings.host_address, port=settings.data_port)
        self.state.disks = self.disks
        self.disks.channel.tunnels = tunnels(self.state)  # a live migration's stream
        self.vips = self.state.vips = Vips(settings.vip_interface, settings.host_address,
                                           self.data_dir / "vips.json", routed=self._routed)
        #: when our lease runs out as far as we can know (armed now; see agent/fence.py)
        self.lease = LeaseClock(settings.lease_seconds, settings.fence_margin_seconds)
        #: what the server would fail over, as it last said (see agent/fence.py)
        self.guarded = Guarded(self.data_dir / "guarded.json")
        #: the process that fences this host whether or not the agent lives (agent/keeper.py)
        self.keeper = FenceKeeper(self.data_dir, self.state, self.lease, self.guarded,
                                  self.vips)
        #: restart policies (agent/restart.py): never one the server would fail over once
        #: this host has fenced itself
        self.restarter = Restarter(self._restart, self.state.save, self._may_restart)
        self.state.on_end.append(self.restarter.noticed)
        #: health checks (agent/health.py), run while instances run
        self.health = HealthMonitor(self.state)

    def _routed(self, driver: str) -> bool:
        """Whether ``driver``'s instances hold their VIP themselves (agent/vips.py)."""
        drv = self.state.drivers.get(driver)
        return drv is not None and drv.capabilities.vip_in_guest

    def _may_restart(self, rec: InstanceRecord) -> bool:
        return not (self.lease.fenced and self.guarded.covers(rec.name))

    async def _restart(self, rec: InstanceRecord) -> None:
        await restart_ended(self.state, rec, self.restarter.made)

    # --- bus -----------------------------------------------------------------------------------
    def _identity(self) -> Identity | None:
        """This host's own identity: kept here, or traded for a join token now (or, given
        the admin token and the server's URL, for a join token asked for now); None when
        the agent logs in with the token it was given (a bus of its own: tests, tools)."""
        s = self.settings
        found = identity.load(self.data_dir, self.host)
        if found is None and s.server_url and (s.join_token or s.token):
            found = identity.enroll(self.data_dir, self.host, s.server_url, s.join_token,
                                    s.host_address, s.ca_file, s.token)
            self.enrolled_at = time.monotonic()
        if found is not None:
            self.images.token = found.api_token or s.token
            self.images.ca_file = found.ca_file
            self.disks.ticket_key = found.ticket_key
            if found.cert_file:
                self.disks.use_tls(found.cert_file, found.key_file, found.ca_file)
        return found

    async def connect(self, stop: asyncio.Event) -> None:
        from corral.bus.connect import connect

        delay = 0.2
        ident = self.identity
        creds = ident.credentials() if ident else Credentials(token=self.settings.token)
        url = self.settings.nats_url or (ident.nats_url if ident else "")
        while not stop.is_set():
            try:
                self.nc = await connect(url, creds, f"agent-{self.host}")
                return
            except Unauthorized as exc:
                # the bus learns a new key when the server reloads its config, a moment after
                # the enrolment answered (longer on a cluster); past that, retrying cannot help
                if (self.enrolled_at is None
                        or time.monotonic() - self.enrolled_at > ENROLL_SETTLE_SECONDS):
                    raise
                log.info("the bus does not know our new key yet (%s); retrying", exc.message)
                await _sleep_or_stop(stop, 0.2)
            except Exception as exc:
                log.warning("cannot reach the bus at %s (%s); retrying in %.1fs", url, exc,
                            delay)
                await _sleep_or_stop(stop, delay)
                delay = min(delay * 2, JOIN_BACKOFF_MAX)

    def join_request(self) -> JoinRequest:
        return JoinRequest(
            host=self.host,
            address=self.settings.host_address,
            capacity=capacity(self.data_dir),
            drivers={n: dataclasses.asdict(d.capabilities) for n, d in self.state.drivers.items()},
            agent_version=corral.__version__,
            instances=self.state.reports(),
            data_port=self.disks.port,
            disk_backend=self.disks.kind,
        )

    async def join(self, stop: asyncio.Event) -> None:
        """Ask the server to register this host until it answers (bounded per try, not overall)."""
        delay = 0.2
        while not stop.is_set():
            sent = time.monotonic()
            try:
                msg = await self.nc.request(subjects.join(self.host),
                                            encode(self.join_request()),
                                            timeout=JOIN_TRY_TIMEOUT)
                reply = unwrap(msg.data, JoinReply)
            except CorralError as exc:
                log.error("the server refused our join: %s", exc)
            except Exception as exc:
                log.warning("join not answered (%s); retrying in %.1fs", exc or "timeout", delay)
            else:
                self.heartbeat_s = reply.heartbeat_seconds
                self.sample_s = reply.sample_seconds
                self.images.api_url = reply.api_url or self.images.api_url
                self.lease.acked(reply.lease_seconds, sent_at=sent)
                self.guarded.update(reply.guarded)
                self.disks.ticket_key = reply.ticket_key or self.disks.ticket_key
                log.info("joined as %s (heartbeat %.1fs, lease %.1fs)", self.host,
                         reply.heartbeat_seconds, reply.lease_seconds)
                await self.vips.sync(self.state.records)
                return
            await _sleep_or_stop(stop, delay)
            delay = min(delay * 2, JOIN_BACKOFF_MAX)

    async def heartbeat(self) -> HeartbeatReply | None:
        self.seq += 1
        hb = Heartbeat(host=self.host, seq=self.seq, sent_at=time.time(),
                       instances=self.state.reports())
        self.hb_sent = time.monotonic()
        try:
            # a slow answer still counts (the lease is counted from the send), so wait for it
            wait = max(1.0, min(2 * self.heartbeat_s, self.lease.window / 2))
            msg = await self.nc.request(subjects.heartbeat(self.host), encode(hb), timeout=wait)
            reply = unwrap(msg.data, HeartbeatReply)
            self.images.api_url = reply.api_url or self.images.api_url
            return reply
        except Exception as exc:
            log.warning("heartbeat %d not acknowledged: %s", self.seq, exc or "timeout")
            return None

    def _repace(self, reply: HeartbeatReply) -> None:
        """Take the pace the server asks of this host (control/pace.py: a large fleet
        heartbeats less often); the lease granted with this very reply comes with it."""
        if reply.heartbeat_seconds > 0 and reply.heartbeat_seconds != self.heartbeat_s:
            log.info("the server asks for a heartbeat every %.1fs (lease %.1fs)",
                     reply.heartbeat_seconds, reply.lease_seconds)
            self.heartbeat_s = reply.heartbeat_seconds
        if reply.sample_seconds > 0:
            self.sample_s = reply.sample_seconds

    # --- loops ---------------------------------------------------------------------------------
    async def heartbeat_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await asyncio.wait_for(self.state.changed.wait(), timeout=self.heartbeat_s)
            except TimeoutError:
                await self.sweep()
            self.state.changed.clear()
            reply = await self.heartbeat()
            if reply is not None and not reply.known:
                log.warning("the server does not know this host; joining again")
                await self.join(stop)
            elif reply is not None:
                self._repace(reply)
                self.lease.acked(reply.lease_seconds or None, sent_at=self.hb_sent)
                self.guarded.update(reply.guarded)
                await self.vips.sync(self.state.records)

    async def fence_loop(self, stop: asyncio.Event) -> None:
        """Keep the fence keeper told (deadline, guarded instances) and alive; when the lease
        runs out without an acknowledged heartbeat, fence (see agent/fence.py)."""
        while not stop.is_set():
            wait = 0.25 if self.lease.fenced else min(0.25, max(0.02, self.lease.until_due()))
            await self.keeper.wait(stop, wait)
            if stop.is_set():
                break
            try:
                await self.keeper.tend()
            except Exception as exc:  # the fence below must still happen
                log.error("fence keeper: %s", exc)
            if self.lease.due():
                self.lease.fenced = True
                since = time.monotonic() - self.lease.last_ack
                self.lease.stopped = await fence_all(
                    self.state, self.vips,
                    f"no acknowledged heartbeat for {since:.1f}s (lease "
                    f"{self.lease.lease:.1f}s, margin {self.lease.margin:.1f}s)",
                    self.guarded, self.keeper)

    async def sweep(self, names: set[str] | None = None) -> None:
        """Ask the driver about instances believed alive; skip any a command is busy with."""
        for name, rec in list(self.state.records.items()):
            if not is_alive(rec) or (names is not None and name not in names):
                continue
            lock = self.state.lock(name)
            if lock.locked():
                continue
            async with lock:
                if self.state.records.get(name) is rec:
                    try:
                        await self.state.refresh(rec)
                    except Exception as exc:
                        log.warning("status of %s failed: %s", name, exc)

    async def sample_loop(self, stop: asyncio.Event) -> None:
        last = time.monotonic()
        while not stop.is_set():
            await _sleep_or_stop(stop, max(0.05, self.sample_s - (time.monotonic() - last)))
            now = time.monotonic()
            interval, last = now - last, now
            handles = [r.handle for r in self.state.records.values() if is_alive(r)]
            try:
                res = await asyncio.to_thread(sample_pass, self.state.drivers, handles,
                                              self.accountant, self.host, interval,
                                              host_cpu=self.host_cpu)
                res.sample.log_lag_bytes = self.capture.lag_bytes()
                await self.nc.publish(subjects.metrics(self.host), encode(res.sample))
            except Exception as exc:
                log.warning("sampling failed: %s", exc)
                continue
            if res.missing:
                await self.sweep(set(res.missing))
            self.passes += 1
            if self.passes % REAP_EVERY == 0:
                # orphans an instance left on its way out, that no stop or status waited for
                await asyncio.to_thread(reaping.reap_orphans)

    # --- commands ------------------------------------------------------------------------------
    async def on_command(self, msg: Any) -> None:
        """One task per command (a long stop must not hold up a status), at most
        MAX_INFLIGHT at once: past that the command is answered "busy" at once, retryable,
        instead of piling up tasks without end."""
        if len(self._inflight) >= MAX_INFLIGHT:
            busy = HostUnavailable(f"agent {self.host} is busy with {len(self._inflight)} "
                                   "commands", hint="retry in a moment", retryable=True)
            if msg.reply:
                with contextlib.suppress(Exception):
                    await msg.respond(encode(Reply(ok=False, error=busy.to_dict())))
            return
        task = asyncio.create_task(self.handle(msg))
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    async def handle(self, msg: Any) -> None:
        reply = await dispatch(self.state, msg.data)
        if msg.reply:
            try:
                await msg.respond(encode(reply))
            except Exception as exc:
                log.warning("could not answer a command: %s", exc)

    async def run(self, stop: asyncio.Event) -> None:
        self.identity = await asyncio.to_thread(self._identity)
        await self.state.recover_all()
        for rec in list(self.state.records.values()):
            self.restarter.resume(rec)  # a restart the previous agent had not made yet
        await self.disks.start()
        # from here, a lease we cannot renew ends in a fence; a restart renews nothing, so a
        # deadline the previous agent left stands if it is the earlier one
        self.lease.arm(not_after=self.keeper.inherited_deadline())
        await self.keeper.start()
        fencing = asyncio.create_task(self.fence_loop(stop))
        await self.connect(stop)
        if self.nc is None:
            fencing.cancel()
            await self.keeper.close()
            return
        await self.nc.subscribe(subjects.command(self.host), cb=self.on_command)
        await self.nc.subscribe(subjects.INVALIDATE, cb=self.images.on_invalidate)
        await self.join(stop)
        loops = [fencing,
                 asyncio.create_task(self.heartbeat_loop(stop)),
                 asyncio.create_task(self.sample_loop(stop)),
                 asyncio.create_task(self.capture.run(self.nc, stop)),
                 asyncio.create_task(self.images.sweep_loop(stop)),
                 asyncio.create_task(self.health.run(stop))]
        await stop.wait()
        self.restarter.cancel_all()  # a pending restart is resumed by the next agent
        for t in [*loops, *self._inflight]:
            t.cancel()
        await asyncio.gather(*loops, *self._inflight, return_exceptions=True)
        try:
            await asyncio.wait_for(self.nc.drain(), timeout=5)
        except Exception as exc:
            log.debug("drain: %s", exc)
        self.images.close()
        await self.disks.stop()
        await self.keeper.close()
        log.info("agent %s stopped; instances left running", self.host)


def unwrap(data: bytes, model: type[M]) -> M:
    """Decode a server answer: the model itself, or a :class:`Reply` carrying it or an error."""
    try:
        return decode(data, model)
    except ValidationError as first:
        try:
            wrapped = decode(data, Reply)
        except ValidationError:
            raise CorralError(f"malformed answer from the server: {first}",
                              hint="the server and agent versions may differ") from first
        if not wrapped.ok:
            raise from_dict(wrapped.error or {"message": "refused without a reason"}) from None
        try:
            return model.model_validate(wrapped.result)
        except ValidationError as exc:
            raise CorralError(f"malformed answer from the server: {exc}",
                              hint="the server and agent versions may differ") from exc


async def dispatch(state: AgentState, data: bytes) -> Reply:
    """Decode one command, run its handler, and always produce a Reply."""
    try:
        try:
            cmd = decode(data, Command)
        except ValidationError as exc:
            raise InvalidRequest(f"malformed command: {exc}") from exc
        handler, call = HANDLERS.get(cmd.verb), CALLS.get(cmd.verb)
        if handler is None or call is None:
            raise InvalidRequest(f"unknown verb '{cmd.verb}'",
                                 hint=f"known: {', '.join(sorted(HANDLERS))}")
        try:
            args = call.args.model_validate(cmd.args)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ()))
            raise InvalidRequest(f"bad arguments for '{cmd.verb}': {where}: {first.get('msg')}",
                                 hint="the server and agent versions may differ") from exc
        return Reply(ok=True, result=call.dump(await handler(state, args)))
    except CorralError as exc:
        return Reply(ok=False, error=exc.to_dict())
    except Exception as exc:
        log.exception("command failed")
        return Reply(ok=False, error=DriverError(f"{type(exc).__name__}: {exc}").to_dict())


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)


async def _main(settings: Settings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await Agent(settings).run(stop)


def serve(settings: Settings) -> None:
    """Run the agent until SIGTERM or SIGINT; instances keep running after it returns."""
    asyncio.run(_main(settings))
