"""``corral server``: the API, the bus handlers and the lease checker in one asyncio loop.

One loop (no threads touching state) keeps the ordering simple: a heartbeat, a metrics sample
and an API request are handled one after the other, and every database write happens there.
When everything listens, ``DATA/server.json`` is written atomically with the URLs, so ``corral
up`` and the CLI find the fleet without flags; it is removed on a clean exit.

Several servers may share one database (PostgreSQL), each with a node of one NATS cluster. One
leads (:mod:`corral.control.leader`): only it answers the agents' joins and heartbeats, expires
leases, runs operations, the HA manager and the refresh and offload loops, and only its writes
commit. The others serve the API, reading the shared database and forwarding what writes to the
leader (:mod:`corral.control.http.forward`), and take over when its lease runs out:
:meth:`ControlPlane._lead` is what taking over does, :meth:`ControlPlane._follow` what stepping
down undoes. A lone server on SQLite is the same code with one server: it leads from its start.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ipaddress
import json
import logging
import os
import signal
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import uvicorn
from nats.aio.client import Client
from nats.aio.msg import Msg
from pydantic import BaseModel, ValidationError
from sqlalchemy.engine import Engine

import corral
from corral.bus import codec, identity, streams, subjects
from corral.bus.connect import connect
from corral.bus.embedded import Cluster, EmbeddedNats
from corral.bus.identity import Credentials
from corral.bus.messages import Heartbeat, JoinRequest, MetricsSample, Reply
from corral.config import Settings, ensure_token
from corral.control import dashboard
from corral.control.agents import AgentCaller
from corral.control.db import db_url, open_db, safe_url
from corral.control.enroll import Enrollment
from corral.control.fleet import Fleet, queue_lag
from corral.control.history import MetricHistory
from corral.control.http import drain as drain_http
from corral.control.http import hosts as hosts_http
from corral.control.http import logs as logs_http
from corral.control.http import metrics as metrics_http
from corral.control.http import ops as ops_http
from corral.control.http import shelves as shelves_http
from corral.control.http import standbys as standbys_http
from corral.control.http.app import build_app
from corral.control.instances import InstanceService
from corral.control.leader import Leadership, server_id
from corral.control.live import Live
from corral.control.operations.runner import Operations
from corral.control.pki import Authority
from corral.control.shelves import Shelves
from corral.control.standbys import Standbys
from corral.control.tokens import TokenStore
from corral.disks import tickets
from corral.errors import ConfigError, CorralError, NotLeader, Unauthorized
from corral.ha.manager import HaManager
from corral.images import http as image_http
from corral.images.store import ImageStore

log = logging.getLogger(__name__)

READY_TIMEOUT = 30.0
#: servers tell each other that hosts were enrolled or removed: each reloads its bus node
IDENTITIES = f"{subjects.PREFIX}.identities"
#: how often a server compares its bus node's identities with the database (a missed
#: broadcast is caught up within this)
IDENTITIES_EVERY = 5.0
#: how often the leader fits the heartbeat pace to the fleet's size (control/pace.py)
REPACE_SECONDS = 5.0


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


def route_certificate(pki: Authority, host: str) -> tuple[Path, Path]:
    """This node's certificate for the NATS cluster's routes (``DATA/pki/route.crt`` and
    ``.key``), made afresh at every start with the fleet's CA for ``host`` (the node's
    address): nats-server checks both ends of a route, so it is good as a client too, which
    the API's certificate is not."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
           .sign(key, hashes.SHA256()))
    cert = pki.sign_host(csr.public_bytes(serialization.Encoding.PEM).decode(), host,
                         "127.0.0.1")
    cert_file, key_file = pki.dir / "route.crt", pki.dir / "route.key"
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key.private_bytes(serialization.Encoding.PEM,
                                   serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))
    cert_file.write_bytes(cert)
    return cert_file, key_file


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
        #: this server's id (``DATA/server-id``) and its part in the lease
        self.server_id = ""
        self.leadership: Leadership | None = None
        self.nc: Client | None = None
        self.fleet: Fleet | None = None
        self._http: _Uvicorn | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        #: what runs only while this server leads (see :meth:`_lead`)
        self._leading: list[asyncio.Task[Any]] = []
        self._agent_subs: list[Any] = []
        #: heartbeats taken off the queue (the lease check's measure of how far behind it is)
        self._beats_done = 0
        self._hb_sub: Any = None
        self.info_path = self.data_dir / "server.json"
        self._engine: Engine | None = None
        self.live = Live(settings)
        #: the operation engine (recreate now; migrations, standbys, shelving later)
        self.ops: Operations | None = None
        #: failover of dead hosts' instances and cleanup of stale copies (ha/manager.py); one
        #: per term as leader
        self.ha: HaManager | None = None
        self.images: ImageStore | None = None
        self.standbys: Standbys | None = None
        self.shelves: Shelves | None = None
        self._agents: AgentCaller | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        #: the host keys the bus node's config was last written with
        self._bus_keys: frozenset[tuple[str, str]] = frozenset()
        self._ssl: ssl.SSLContext | None = None
        #: metric history (control/history.py): gathered and written by the leader
        self.history: MetricHistory | None = None

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
        self._loop = asyncio.get_running_loop()
        self.server_id = server_id(self.data_dir)
        self.pki = Authority(self.data_dir / "pki") if tls else None
        if self.pki is not None:
            await asyncio.to_thread(self.pki.ensure, [s.api_host, s.nats_host])
        # the server's own bus identity: an nkey like every host's, with every permission
        # (the servers of one fleet share it: DATA/server.nk is copied, like the CA)
        seed = ensure_seed(self.data_dir / "server.nk")
        ticket_key = await asyncio.to_thread(tickets.signing_key, self.data_dir / "ticket.key")
        token_store = TokenStore(sessions)
        enrollment = self.enrollment = Enrollment(sessions, self.pki, self._bus_urls,
                                                  self._identities_changed,
                                                  tickets.public_hex(ticket_key), token_store)
        creds = Credentials(token=self.token)
        if not self.nats_url:
            server_key = identity.public_key(seed)

            def auth() -> str:
                keys = enrollment.keys()
                self._bus_keys = frozenset((k.host, k.public_key) for k in keys)
                return identity.authorization(server_key, keys, self.token)

            self.nats = EmbeddedNats(
                self.data_dir, self.token, s.nats_host, s.nats_port, auth=auth,
                tls=(self.pki.cert_file, self.pki.key_file) if self.pki else None,
                cluster=self._cluster(s))
            self.nats.start()  # in this thread: the child's life is tied to it (bounded wait)
            self.nats_url = self.nats.url
            creds = Credentials(seed=seed, ca_file=str(self.pki.ca_file) if self.pki else "")
        self.nc = await connect(self.nats_url, creds, "corral-server")
        fleet = self.fleet = Fleet(sessions, s, ticket_key=ticket_key)
        fleet.sure = lambda: self.leads
        lead = self.leadership = Leadership(engine, self.server_id, s.leader_lease_seconds,
                                            nats_url=self.nats_url, version=corral.__version__)
        lead.install(sessions)  # from here, every write checks that this server leads
        _check_timing(s)
        service = InstanceService(fleet, AgentCaller(self.nc, fleet.liveness), s)
        self._agents = service.agents
        js = self.nc.jetstream()  # the streams with the cluster's copies, before Live sees them
        await streams.ensure(js, streams.events_config(s.events_max_age_seconds,
                                                       s.events_max_msgs),
                             replicas=s.stream_replicas)
        await streams.ensure(js, streams.logs_config(), replicas=s.stream_replicas)
        await self.live.start(self.nc, fleet, service)  # events from the first join on
        ops = self.ops = Operations(self._engine, fleet, service.agents, s, self._op_changed,
                                    lambda: self.images, fence=lead.fence)
        shelves = self.shelves = Shelves(fleet, service.agents, s, ops, lambda: self.images)
        # every server keeps the latest samples (no writes): any of them shows usage
        await self.nc.subscribe(subjects.METRICS_ALL,
                                cb=self._handler(MetricsSample, self._on_metrics))
        if self.nats is not None:
            await self.nc.subscribe(IDENTITIES, cb=self._on_identities)
            self._tasks.append(asyncio.create_task(self._nats_watch(), name="nats-watch"))
            self._tasks.append(asyncio.create_task(self._identities_watch(),
                                                   name="identities"))

        sock = _listen(s.api_host, s.api_port)
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        self.api_url = f"{'https' if self.pki else 'http'}://{shown}:{port}"
        lead.api_url = self.api_url
        images = self.images = await asyncio.to_thread(ImageStore, self.data_dir / "images")
        service.image_exists = lambda name: images.packs.get_ref("image:" + name) is not None
        service.image_store = images  # an image's config and files, read at create
        routers = [lambda auth: image_http.router(images, auth, on_change=self._image_changed)]
        routers.append(lambda auth: logs_http.router(lambda: self.nc, service.exists, auth))
        routers.extend(self.live.routers(service))
        routers.append(lambda auth: ops_http.router(ops, service, auth))
        routers.append(lambda auth: hosts_http.router(enrollment, auth))
        standbys = self.standbys = Standbys(fleet, service.agents, ops)
        ops.standbys = standbys  # a drain moves the standbys its host keeps
        routers.append(lambda auth: drain_http.router(ops, fleet, auth))
        service.before_delete.append(standbys.discard_for_deleted)
        routers.append(lambda auth: standbys_http.router(ops, service, standbys, auth))
        service.before_delete.append(shelves.discard_for_deleted)
        routers.append(lambda auth: shelves_http.router(ops, service, shelves, auth))
        history = self.history = MetricHistory(sessions, s, fence=lead.fence,
                                               leads=lambda: self.leads)
        service.before_delete.append(history.forget)
        routers.append(lambda auth: metrics_http.router(history, service, fleet, auth))
        app = build_app(fleet, service, self.token, self.nats_url, safe_url(url),
                        routers=routers, collectors=self.live.collectors(),
                        tokens=token_store, cluster=lead, ssl_context=self._ssl_context)
        dashboard.install(app, token=self.token, tokens=token_store)
        # lead (or not) before saying ready: a lone server answers its agents from the start
        lead.on_elected, lead.on_deposed = self._lead, self._follow
        await lead.start()
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
            "server_id": self.server_id,
            "token_file": str(self.data_dir / "token"),
            "ca_file": str(self.pki.ca_file) if self.pki else "",
        })
        log.info("corral server %s ready (%s): api %s, nats %s, db %s", self.server_id,
                 "leader" if lead.is_leader else "follower", self.api_url, self.nats_url,
                 safe_url(url))

    def _cluster(self, s: Settings) -> Cluster | None:
        """This server's node of the NATS cluster (None: a lone node)."""
        if not s.nats_cluster_port:
            if s.nats_routes:
                raise ConfigError("nats_routes is set but nats_cluster_port is not",
                                  hint="give this node a route port (--nats-cluster-port)")
            return None
        pki = self.pki
        return Cluster(port=s.nats_cluster_port, routes=Cluster.parse_routes(s.nats_routes),
                       name=s.nats_cluster_name, server_name=s.server_name or self.server_id,
                       tls=route_certificate(pki, s.nats_host) if pki else None,
                       ca_file=pki.ca_file if pki else None)

    def _ssl_context(self) -> ssl.SSLContext | None:
        """How a follower checks the leader's API (the fleet's CA), made once."""
        if self.pki is None:
            return None
        if self._ssl is None:
            self._ssl = ssl.create_default_context(cafile=str(self.pki.ca_file))
        return self._ssl

    def _bus_urls(self) -> str:
        """Where the bus is, as enrolment hands it to a host: every node, comma-separated."""
        if self.leadership is None:
            return self.nats_url
        return ",".join(self.leadership.read_nats_urls())

    # -- leading and following -------------------------------------------------------------------
    async def _lead(self, generation: int) -> None:
        """This server took the lead. In order: a fresh lease for every host that is up
        (the seconds without a leader never fail a host over), the agents' joins and
        heartbeats, the unfinished operations (resumed once their hosts have heartbeated
        here), lease expiry, the HA manager, the refresh and offload loops, and a reconcile
        of what every host holds."""
        assert self.fleet is not None and self.nc is not None and self.ops is not None
        assert self._agents is not None
        fleet, s = self.fleet, self.settings
        renewed = fleet.fresh_leases()
        log.warning("leading (generation %d): %d host(s) given a fresh lease", generation,
                    renewed)
        ready_at = fleet.clock()
        joins = await self.nc.subscribe(subjects.JOIN_ALL,
                                        cb=self._handler(JoinRequest, self._on_join))
        self._hb_sub = await self.nc.subscribe(subjects.HEARTBEAT_ALL,
                                               cb=self._handler(Heartbeat, self._on_heartbeat))
        self._agent_subs = [joins, self._hb_sub]
        await self.nc.flush()
        self.ops.start(ready_at)  # resumes unfinished operations once the agents heartbeat
        self._leading.append(asyncio.create_task(self._lease_loop(), name="leases"))
        self.ha = HaManager(fleet, self._agents, self.ops, s, emit=self._emit)
        self.ha.start()
        if self.standbys is not None:
            self._leading.append(asyncio.create_task(self.standbys.loop(), name="standbys"))
        if self.shelves is not None:
            self._leading.append(asyncio.create_task(self.shelves.loop(), name="shelves"))
        if self.history is not None:
            self._leading.append(asyncio.create_task(self.history.loop(), name="history"))
        self.ha.reconcile_all()

    async def _follow(self) -> None:
        """This server no longer leads: stop answering agents and stop everything that acts,
        leaving unfinished operations to the next leader (their records say where they are)."""
        subs, self._agent_subs, self._hb_sub = self._agent_subs, [], None
        for sub in subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        tasks, self._leading = self._leading, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(task, 10)
        if self.ha is not None:
            await self.ha.stop()
            self.ha = None
        if self.ops is not None:
            await self.ops.step_down()
        log.warning("following: %s leads", self.leadership.leader.id if self.leadership
                    and self.leadership.leader else "no server")

    @property
    def leads(self) -> bool:
        return self.leadership is not None and self.leadership.is_leader

    # -- identities on every node ------------------------------------------------------------
    def _identities_changed(self) -> None:
        """A host was enrolled or removed (on the leader, maybe in a worker thread): this
        server's bus node reads who may log in again now, and the other servers are told to
        do the same with theirs."""
        if self.nats is not None:
            self.nats.reload()
        if self.nc is None or self._loop is None or self._loop.is_closed():
            return
        payload = json.dumps({"from": self.server_id}).encode()
        with contextlib.suppress(RuntimeError):
            asyncio.run_coroutine_threadsafe(self.nc.publish(IDENTITIES, payload), self._loop)

    async def _on_identities(self, msg: Msg) -> None:
        with contextlib.suppress(ValueError, AttributeError):
            if json.loads(msg.data).get("from") == self.server_id:
                return
        await self._reload_bus()

    async def _reload_bus(self) -> None:
        if self.nats is not None:
            await asyncio.to_thread(self.nats.reload)

    async def _identities_watch(self) -> None:
        """The backstop of the broadcast: every few seconds, reload when the database lists
        other host keys than the node's config was written with."""
        assert self.enrollment is not None
        while True:
            await asyncio.sleep(IDENTITIES_EVERY)
            try:
                keys = await asyncio.to_thread(self.enrollment.keys)
                if frozenset((k.host, k.public_key) for k in keys) != self._bus_keys:
                    log.info("the bus node's identities differ from the database: reloading")
                    await self._reload_bus()
            except Exception as exc:
                log.warning("checking the bus node's identities failed: %s", exc)

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
            except NotLeader as exc:  # deposed meanwhile: the new leader answers it
                log.info("not answering %s on %s: %s", model.__name__, msg.subject, exc)
            except Exception:
                log.exception("handling %s on %s failed", model.__name__, msg.subject)

        return cb

    async def _on_join(self, req: JoinRequest, msg: Msg) -> None:
        assert self.fleet is not None
        if not self.leads:
            return
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
        """The common heartbeat (nothing changed) takes the cheap pass
        (:meth:`Fleet.quiet_heartbeat`: plain reads, no ORM objects, no commit), and hands
        what it read to the HA manager; one that changes something takes the ORM pass. At a
        thousand hosts (500 a second) the ORM pass plus the HA manager's second read held
        the loop most of the time. Not in a thread: while the loop is busy, a thread waits
        for the GIL after each of its database calls (up to 5 ms each), and heartbeats
        answered one at a time that way fell to a few a second."""
        assert self.fleet is not None
        if not self.leads:
            return
        self._beats_done += 1
        host = subjects.host_from_subject(msg.subject)
        quiet = self.fleet.quiet_heartbeat(host, hb)
        if quiet is not None:
            reply, records = quiet.reply, quiet.records
        else:
            reply, records = self.fleet.heartbeat(host, hb), None
        reply.api_url = self.api_url  # agents that joined before the API listened learn it
        if msg.reply:
            await msg.respond(codec.encode(reply))
        if reply.known and self.ha is not None:
            self.ha.on_report(host, hb.instances, records)

    async def _on_metrics(self, sample: MetricsSample, msg: Msg) -> None:
        assert self.fleet is not None
        if sample.host == subjects.host_from_subject(msg.subject):
            self.fleet.record_metrics(sample)
            if self.history is not None:
                self.history.record(sample)

    async def _lease_loop(self) -> None:
        assert self.fleet is not None
        every = max(0.1, min(1.0, self.settings.lease_seconds / 4))
        loop = asyncio.get_running_loop()
        seen, at = self._beats_done, loop.time()
        paced = loop.time()
        while True:
            await asyncio.sleep(every)
            done, now = self._beats_done, loop.time()
            rate = (done - seen) / max(now - at, 1e-3)
            seen, at = done, now
            if not self.fleet.sure():
                # not sure of its lease (its database may be away): no read that could sit
                # in a connect on the loop the API and the step-down share
                continue
            if now - paced >= REPACE_SECONDS:
                paced = now
                try:
                    self.fleet.repace()  # the fleet's size sets how often its hosts beat
                except NotLeader as exc:
                    log.info("pace not checked: %s", exc)
                except Exception:
                    log.exception("pace check failed; trying again")
            sub = self._hb_sub
            pending = int(sub.pending_msgs) if sub is not None else 0
            slack = queue_lag(pending, rate, self.fleet.pace.lease_seconds)
            if slack >= 1.0:
                log.warning("%d heartbeats wait to be answered here (%.1f s behind): leases "
                            "run that much longer before a host is marked down", pending,
                            slack)
            try:
                self.fleet.expire_leases(slack)  # (with the quiet heartbeats' row renewals)
            except NotLeader as exc:
                log.info("lease check not made: %s", exc)
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
        """Stop everything that was started, in reverse order; safe to call twice. A leader
        gives its lease back first, so another server takes over at once."""
        with contextlib.suppress(FileNotFoundError):
            if self.info_path.exists() and json.loads(self.info_path.read_text()).get(
                    "pid") == os.getpid():
                self.info_path.unlink()
        if self._http is not None:
            self._http.should_exit = True
        if self.history is not None and self.leads:  # what was gathered since the last flush
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.history.flush(), 5)
        if self.leadership is not None:
            await self.leadership.stop()  # steps down (see _follow) and gives the lease back
        for task in reversed(self._tasks):
            if task.get_name() != "http":
                task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(task, 10)
        self._tasks.clear()
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


def _check_timing(s: Settings) -> None:
    """Say so when a takeover may not fit in the agents' lease: an agent fences its
    instances ``lease_seconds - fence_margin_seconds`` after its last answered heartbeat, and
    a leader that dies is replaced within about one leader lease and a poll."""
    gap = s.leader_lease_seconds * 7 / 6 + s.heartbeat_seconds
    window = s.lease_seconds - s.fence_margin_seconds
    if gap >= window:
        log.warning("leader_lease_seconds %.1f is long for lease_seconds %.1f: hosts may "
                    "fence their instances while a new leader takes over (keep "
                    "leader_lease_seconds + heartbeat_seconds well under lease_seconds - "
                    "fence_margin_seconds)", s.leader_lease_seconds, s.lease_seconds)


#: the cyclic collector's thresholds in a server process (Python's: 700, 10, 10)
GC_THRESHOLDS = (50_000, 20, 100)


def tune_gc() -> None:
    """Keep the cyclic garbage collector off the event loop's back in a busy server: what was
    made at start (modules, the ORM's mappers, the app) is frozen out of its scans, and it runs
    far less often. At 1000 hosts and 10,000 instances (bench/fleet_scale.py) Python's own
    thresholds spent 18 % of the server's CPU in collections, each full one 0.3 s of the loop
    (every sample and heartbeat is a few dozen objects that live a second or two, long enough
    to be promoted); with these, 2.4 %, heartbeat p50 95 -> 34 ms and p99 605 -> 271 ms. The
    objects die by their reference counts either way; only cycles wait longer."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


async def run(settings: Settings, stop: asyncio.Event | None = None, *,
              own_process: bool = False) -> None:
    """Run until SIGTERM/SIGINT (or ``stop`` is set). ``own_process``: the process is this
    server's alone (``corral server``), so its garbage collector is tuned for it."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    plane = ControlPlane(settings)
    try:
        await plane.start()
        if own_process:
            tune_gc()
        await stop.wait()
        log.info("shutting down")
    finally:
        await plane.stop()


def serve(settings: Settings) -> None:
    """Blocking entry point of ``corral server``."""
    asyncio.run(run(settings, own_process=True))
