"""``corral server``: the API, the bus handlers and the lease checker in one asyncio loop.

One loop (no threads touching state) keeps the ordering simple: a heartbeat, a metrics sample
and an API request are handled one after the other, and every database write happens there.
When everything listens, ``DATA/server.json`` is written atomically with the URLs, so ``corral
up`` and the CLI find the fleet without flags; it is removed on a clean exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import signal
import socket
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import uvicorn
from nats.aio.client import Client
from nats.aio.msg import Msg
from pydantic import BaseModel, ValidationError
from sqlalchemy.engine import Engine

from corral.bus import codec, identity, subjects
from corral.bus.connect import connect
from corral.bus.embedded import EmbeddedNats
from corral.bus.identity import Credentials
from corral.bus.messages import Heartbeat, JoinRequest, MetricsSample, Reply
from corral.config import Settings, ensure_token
from corral.control.agents import AgentCaller
from corral.control.db import db_url, open_db, safe_url
from corral.control.enroll import Enrollment
from corral.control.fleet import Fleet
from corral.control.http import hosts as hosts_http
from corral.control.http import logs as logs_http
from corral.control.http import ops as ops_http
from corral.control.http import shelves as shelves_http
from corral.control.http import standbys as standbys_http
from corral.control.http.app import build_app
from corral.control.instances import InstanceService
from corral.control.live import Live
from corral.control.operations.runner import Operations
from corral.control.pki import Authority
from corral.control.shelves import Shelves
from corral.control.standbys import Standbys
from corral.control.tokens import TokenStore
from corral.disks import tickets
from corral.errors import ConfigError, CorralError, Unauthorized
from corral.ha.manager import HaManager
from corral.images import http as image_http
from corral.images.store import ImageStore

log = logging.getLogger(__name__)

READY_TIMEOUT = 30.0


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: the control plane owns SIGTERM/SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _listen(host: str, port: int) -> socket.socket:
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on the connections it accepts only when the
    # listening socket says it is TCP; without it every answer on a kept-alive connection
    # waited ~40 ms for a delayed ACK (Nagle)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM,
                         socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise CorralError(f"cannot listen on {host}:{port}: {exc.strerror}",
                          hint="pick another api_port (0 picks a free one) or stop what uses it"
                          ) from exc
    sock.listen(128)
    sock.set_inheritable(False)
    return sock


def _write_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _tls_setting(s: Settings) -> bool:
    """TLS on or off; off only where nothing beyond this machine can listen in."""
    if s.tls not in ("on", "off"):
        raise ConfigError(f"setting 'tls' is {s.tls!r}", hint="tls takes 'on' or 'off'")
    if s.tls == "off":
        for name, addr in (("api_host", s.api_host), ("nats_host", s.nats_host)):
            if not _loopback(addr):
                raise ConfigError(f"{name} {addr} listens beyond this machine with TLS off",
                                  hint="set tls = on (the server makes its own CA), or "
                                       "listen on 127.0.0.1")
    return s.tls == "on"


def _loopback(addr: str) -> bool:
    try:
        return ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return addr == "localhost"


def ensure_seed(path: Path) -> str:
    """The nkey seed kept at ``path`` (0600), made on first use."""
    seed = identity.read_seed(path)
    if not seed:
        seed = identity.new_seed()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(seed + "\n")
    return seed


class ControlPlane:
    """Start with :meth:`start`, stop with :meth:`stop`; :func:`serve` wraps both."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.data_dir = Path(settings.data_dir)
        self.token = ""
        self.nats: EmbeddedNats | None = None
        #: the fleet's CA (tls = on), and who may log in to the bus
        self.pki: Authority | None = None
        self.enrollment: Enrollment | None = None
        self.nats_url = settings.nats_url
        self.api_url = ""
        self.nc: Client | None = None
        self.fleet: Fleet | None = None
        self._http: _Uvicorn | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self.info_path = self.data_dir / "server.json"
        self._engine: Engine | None = None
        self.live = Live(settings)
        #: the operation engine (recreate now; migrations, standbys, shelving later)
        self.ops: Operations | None = None
        #: failover of dead hosts' instances and cleanup of stale copies (control/ha.py)
        self.ha: HaManager | None = None
        self.images: ImageStore | None = None
        self.standbys: Standbys | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        s = self.settings
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.token = ensure_token(s)
        try:
            await self._start(s)
        except BaseException:
            await self.stop()
            raise

    async def _start(self, s: Settings) -> None:
        url = db_url(s)
        tls = _tls_setting(s)
        engine, sessions = await asyncio.to_thread(open_db, s)
        self._engine = engine
        self.pki = Authority(self.data_dir / "pki") if tls else None
        if self.pki is not None:
            await asyncio.to_thread(self.pki.ensure, [s.api_host, s.nats_host])
        # the server's own bus identity: an nkey like every host's, with every permission
        seed = ensure_seed(self.data_dir / "server.nk")
        ticket_key = await asyncio.to_thread(tickets.signing_key, self.data_dir / "ticket.key")
        token_store = TokenStore(sessions)
        enrollment = self.enrollment = Enrollment(sessions, self.pki, lambda: self.nats_url,
                                                  self._identities_changed,
                                                  tickets.public_hex(ticket_key), token_store)
        creds = Credentials(token=self.token)
        if not self.nats_url:
            server_key = identity.public_key(seed)
            self.nats = EmbeddedNats(
                self.data_dir, self.token, s.nats_host, s.nats_port,
                auth=lambda: identity.authorization(server_key, enrollment.keys(), self.token),
                tls=(self.pki.cert_file, self.pki.key_file) if self.pki else None)
            self.nats.start()  # in this thread: the child's life is tied to it (bounded wait)
            self.nats_url = self.nats.url
            creds = Credentials(seed=seed, ca_file=str(self.pki.ca_file) if self.pki else "")
        self.nc = await connect(self.nats_url, creds, "corral-server")
        fleet = self.fleet = Fleet(sessions, s, ticket_key=ticket_key)
        service = InstanceService(fleet, AgentCaller(self.nc, fleet.liveness), s)
        await self.live.start(self.nc, fleet, service)  # events from the first join on
        ops = self.ops = Operations(self._engine, fleet, service.agents, s, self._op_changed,
                                    lambda: self.images)
        shelves = Shelves(fleet, service.agents, s, ops, lambda: self.images)
        bus_ready_at = fleet.clock()
        await self.nc.subscribe(subjects.JOIN_ALL,
                                cb=self._handler(JoinRequest, self._on_join))
        await self.nc.subscribe(subjects.HEARTBEAT_ALL,
                                cb=self._handler(Heartbeat, self._on_heartbeat))
        await self.nc.subscribe(subjects.METRICS_ALL,
                                cb=self._handler(MetricsSample, self._on_metrics))
        await self.nc.flush()
        ops.start(bus_ready_at)  # resumes unfinished operations once the agents heartbeat
        self._tasks.append(asyncio.create_task(self._lease_loop(), name="leases"))
        self.ha = HaManager(fleet, service.agents, ops, s, emit=self._emit)
        self._tasks.append(asyncio.create_task(self.ha.run(), name="ha"))
        if self.nats is not None:
            self._tasks.append(asyncio.create_task(self._nats_watch(), name="nats-watch"))

        sock = _listen(s.api_host, s.api_port)
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        self.api_url = f"{'https' if self.pki else 'http'}://{shown}:{port}"
        self._loop = asyncio.get_running_loop()
        images = self.images = await asyncio.to_thread(ImageStore, self.data_dir / "images")
        service.image_exists = lambda name: images.packs.get_ref("image:" + name) is not None
        routers = [lambda auth: image_http.router(images, auth, on_change=self._image_changed)]
        routers.append(lambda auth: logs_http.router(lambda: self.nc, service.exists, auth))
        routers.extend(self.live.routers(service))
        routers.append(lambda auth: ops_http.router(ops, service, auth))
        routers.append(lambda auth: hosts_http.router(enrollment, auth))
        standbys = self.standbys = Standbys(fleet, service.agents, ops)
        service.before_delete.append(standbys.discard_for_deleted)
        routers.append(lambda auth: standbys_http.router(ops, service, standbys, auth))
        self._tasks.append(asyncio.create_task(standbys.loop(), name="standbys"))
        service.before_delete.append(shelves.discard_for_deleted)
        routers.append(lambda auth: shelves_http.router(ops, service, shelves, auth))
        self._tasks.append(asyncio.create_task(shelves.loop(), name="shelves"))
        app = build_app(fleet, service, self.token, self.nats_url, safe_url(url),
                        routers=routers, collectors=self.live.collectors(),
                        tokens=token_store)
        tls_files: dict[str, Any] = {} if self.pki is None else {
            "ssl_certfile": str(self.pki.cert_file), "ssl_keyfile": str(self.pki.key_file)}
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                **tls_files)
        self._http = _Uvicorn(config)
        self._tasks.append(asyncio.create_task(self._http.serve(sockets=[sock]), name="http"))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + READY_TIMEOUT
        while not self._http.started:
            if self._tasks[-1].done():
                self._tasks[-1].result()
                raise CorralError("the HTTP server stopped while starting")
            if loop.time() > deadline:
                raise CorralError(f"the HTTP server did not start within {READY_TIMEOUT:.0f}s")
            await asyncio.sleep(0.02)
        _write_atomic(self.info_path, {
            "api_url": self.api_url, "nats_url": self.nats_url, "pid": os.getpid(),
            "token_file": str(self.data_dir / "token"),
            "ca_file": str(self.pki.ca_file) if self.pki else "",
        })
        log.info("corral server ready: api %s, nats %s, db %s", self.api_url, self.nats_url,
                 safe_url(url))

    def _identities_changed(self) -> None:
        """A host was enrolled or removed: the bus reads who may log in again."""
        if self.nats is not None:
            self.nats.reload()

    def _op_changed(self, rec: Any) -> None:
        """Operation progress goes out as ``operation.changed`` events."""
        if self.live.publisher is not None:
            self.live.publisher.on_op_change(rec)

    def _emit(self, type_: str, **fields: Any) -> None:
        """An event that is not a row change (the HA manager's decisions)."""
        if self.live.publisher is not None:
            self.live.publisher.emit(type_, **fields)

    def _image_changed(self, name: str) -> None:
        """An image was removed or replaced: tell every agent (called from a worker thread)."""
        if self.nc is None or self._loop is None:
            return
        payload = json.dumps({"image": name}).encode()
        asyncio.run_coroutine_threadsafe(self.nc.publish(subjects.INVALIDATE, payload),
                                         self._loop)

    def _handler(self, model: type[BaseModel], fn: Callable[[Any, Msg], Awaitable[None]]
                 ) -> Callable[[Msg], Awaitable[None]]:
        """Decode, call, and never let one bad message kill the subscription."""

        async def cb(msg: Msg) -> None:
            try:
                payload = codec.decode(msg.data, model)
            except ValidationError as exc:
                log.warning("bad %s on %s: %s", model.__name__, msg.subject,
                            exc.errors()[0].get("msg"))
                return
            try:
                await fn(payload, msg)
            except Exception:
                log.exception("handling %s on %s failed", model.__name__, msg.subject)

        return cb

    async def _on_join(self, req: JoinRequest, msg: Msg) -> None:
        assert self.fleet is not None
        host = subjects.host_from_subject(msg.subject)  # the bus let only that host publish it
        if req.host != host:
            log.warning("a join on %s claims to be host %s: refused", msg.subject, req.host)
            if msg.reply:
                refusal = Unauthorized(f"a join from {host} cannot register {req.host}",
                                       hint="a host joins under its own name")
                await msg.respond(codec.encode(Reply(ok=False, error=refusal.to_dict())))
            return
        reply = self.fleet.join(req)
        reply.api_url = self.api_url  # read now: "" until the HTTP socket is bound
        if msg.reply:
            await msg.respond(codec.encode(reply))
        if self.ha is not None:
            self.ha.on_report(req.host, req.instances)  # stale copies of a returning host

    async def _on_heartbeat(self, hb: Heartbeat, msg: Msg) -> None:
        assert self.fleet is not None
        reply = self.fleet.heartbeat(subjects.host_from_subject(msg.subject), hb)
        reply.api_url = self.api_url  # agents that joined before the API listened learn it
        if msg.reply:
            await msg.respond(codec.encode(reply))
        if reply.known and self.ha is not None:
            self.ha.on_report(subjects.host_from_subject(msg.subject), hb.instances)

    async def _on_metrics(self, sample: MetricsSample, msg: Msg) -> None:
        assert self.fleet is not None
        if sample.host == subjects.host_from_subject(msg.subject):
            self.fleet.record_metrics(sample)

    async def _lease_loop(self) -> None:
        assert self.fleet is not None
        every = max(0.1, min(1.0, self.settings.lease_seconds / 4))
        while True:
            await asyncio.sleep(every)
            try:
                self.fleet.expire_leases()
            except Exception:
                log.exception("lease check failed; trying again")

    async def _nats_watch(self) -> None:
        """Start the embedded nats-server again if it died (kill -9, OOM): same port, same
        JetStream directory, so every client's reconnect finds it and no stored message is lost.
        Spawned from this (the main) thread, as at start, so it still dies with the server."""
        while True:
            await asyncio.sleep(0.5)
            nats = self.nats
            if nats is None or nats.running:
                continue
            log.warning("the embedded nats-server died; starting it again on port %d", nats.port)
            nats.requested_port = nats.port
            try:
                nats.start()
            except CorralError as exc:
                log.error("could not restart nats-server: %s; trying again", exc)

    async def stop(self) -> None:
        """Stop everything that was started, in reverse order; safe to call twice."""
        with contextlib.suppress(FileNotFoundError):
            if self.info_path.exists() and json.loads(self.info_path.read_text()).get(
                    "pid") == os.getpid():
                self.info_path.unlink()
        if self._http is not None:
            self._http.should_exit = True
        for task in reversed(self._tasks):
            if task.get_name() != "http":
                task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(task, 10)
        self._tasks.clear()
        if self.ha is not None:
            await self.ha.stop()
            self.ha = None
        if self.ops is not None:
            await self.ops.stop()
            self.ops = None
        await self.live.stop()
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.nc.close(), 5)
            self.nc = None
        if self.nats is not None:
            await asyncio.to_thread(self.nats.stop)
            self.nats = None
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None
        if self.images is not None:
            self.images.close()
            self.images = None


async def run(settings: Settings, stop: asyncio.Event | None = None) -> None:
    """Run until SIGTERM/SIGINT (or ``stop`` is set)."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    plane = ControlPlane(settings)
    try:
        await plane.start()
        await stop.wait()
        log.info("shutting down")
    finally:
        await plane.stop()


def serve(settings: Settings) -> None:
    """Blocking entry point of ``corral server``."""
    asyncio.run(run(settings))
