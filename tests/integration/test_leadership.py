"""Several servers on one PostgreSQL database (issue 11): one leads, its writes fenced by the
lease's generation; followers answer reads and forward writes with the leader's answer unchanged;
a leader killed with -9 is replaced within about a lease, and the new one resumes the operation
it left unfinished.

The lease and its fence are tested with two :class:`Leadership` objects on two engines (a
deposed leader that keeps running cannot commit); the API with servers in this process; the kill
with ``corral server`` processes, agents faked on the bus as in test_api.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import ssl
import statistics
import threading
import time
from collections.abc import AsyncIterator, Generator, Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import sqlalchemy as sa
from nats.aio.msg import Msg
from serverproc import ServerProc
from sqlalchemy.engine import make_url
from sqlalchemy.orm import sessionmaker
from test_api import FakeAgent, wait_for
from test_postgres import pg_url  # noqa: F401  (the module's PostgreSQL server)

from corral.bus import codec, identity, subjects
from corral.bus.connect import connect, request
from corral.bus.embedded import stable_port
from corral.bus.messages import Capacity, Command, JoinReply, JoinRequest, Reply, WireSpec
from corral.config import Settings
from corral.control.db import Host, open_db
from corral.control.leader import Leadership
from corral.control.pki import Authority
from corral.control.server import ControlPlane
from corral.errors import CorralError, NotFound, NotLeader
from corral.ops.store import OperationStore, OpRecord

pytestmark = pytest.mark.postgres

TOKEN = "leadership-test-token"
GiB = 1024**3


def fresh_db(pg_url: str, name: str) -> str:  # noqa: F811
    """A new, empty database on the test's PostgreSQL server; its URL."""
    url = make_url(pg_url)
    with psycopg.connect(host=url.host, port=url.port, user=url.username, dbname="postgres",
                         autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    return url.set(database=name).render_as_string(hide_password=False)


def _share_secrets(dirs: list[Path], tls: bool) -> None:
    """What the servers of one fleet share (docs/configuration.md, "Several servers"): the
    servers' bus key and, with TLS, the CA (each server makes its own certificate with it)."""
    seed = identity.new_seed()
    if tls:
        Authority(dirs[0] / "pki").ensure(["127.0.0.1"])
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
        _private(d / "server.nk", seed + "\n")
        if tls and d != dirs[0]:
            (d / "pki").mkdir(mode=0o700, exist_ok=True)
            for name in ("ca.crt", "ca.key"):
                _private(d / "pki" / name, (dirs[0] / "pki" / name).read_text())


def _private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)


def ca_of(plane_or_dir: ControlPlane | Path) -> str:
    """The fleet's CA certificate ("": no TLS)."""
    d = Path(plane_or_dir.settings.data_dir) if isinstance(plane_or_dir, ControlPlane) \
        else plane_or_dir
    ca = d / "pki" / "ca.crt"
    return str(ca) if ca.exists() else ""


def verify(ca: str) -> ssl.SSLContext | bool:
    """What httpx checks a server's certificate with."""
    return ssl.create_default_context(cafile=ca) if ca else False


def cluster_settings(tmp: Path, db_url: str, n: int, **kw: Any) -> list[Settings]:
    """Settings of ``n`` servers on ``db_url``, each with a node of one NATS cluster."""
    routes = [stable_port("127.0.0.1") for _ in range(n)]
    dirs = [tmp / f"s{i}" for i in range(1, n + 1)]
    _share_secrets(dirs, kw.get("tls") == "on")
    out = []
    for i, d in enumerate(dirs):
        base: dict[str, Any] = dict(
            data_dir=d, token=TOKEN, api_port=0, db_url=db_url,
            nats_port=stable_port("127.0.0.1"), nats_cluster_port=routes[i],
            nats_routes=",".join(f"nats-route://127.0.0.1:{p}" for j, p in enumerate(routes)
                                 if j != i),
            server_name=f"s{i + 1}", lease_seconds=30.0, heartbeat_seconds=1.0,
            leader_lease_seconds=1.5)
        base.update(kw)
        out.append(Settings(**base))
    return out


async def start_servers(tmp: Path, db_url: str, n: int, **kw: Any) -> list[ControlPlane]:
    """``n`` servers in this process, started together (a cluster's JetStream needs its
    nodes together)."""
    planes = [ControlPlane(s) for s in cluster_settings(tmp, db_url, n, **kw)]
    results = await asyncio.gather(*(p.start() for p in planes), return_exceptions=True)
    failed = [r for r in results if isinstance(r, BaseException)]
    if failed:
        await stop_servers(planes)
        raise failed[0]
    await wait_for(_one_leader(planes), timeout=15)
    return planes


def _one_leader(planes: list[ControlPlane]) -> Any:
    async def check() -> bool:
        return sum(p.leads for p in planes) == 1
    return check


async def stop_servers(planes: list[ControlPlane]) -> None:
    await asyncio.gather(*(p.stop() for p in planes), return_exceptions=True)


def _client(plane: ControlPlane) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=plane.api_url, timeout=30, verify=verify(ca_of(plane)),
                             headers={"Authorization": f"Bearer {TOKEN}"})


# --- the lease and its fence ---------------------------------------------------------------------


@pytest.fixture
def db(pg_url: str, tmp_path: Path) -> Iterator[str]:  # noqa: F811
    url = fresh_db(pg_url, "fence")
    engine, _ = open_db(Settings(data_dir=tmp_path, db_url=url))
    engine.dispose()
    yield url


async def test_one_server_takes_the_lease_and_a_deposed_one_cannot_commit(db: str) -> None:
    ea, eb = sa.create_engine(db), sa.create_engine(db)
    # a's clock stands still (a paused process, a clock off): by its own count its lease is
    # always sure, so only the database's fence can stop it
    a, b = Leadership(ea, "a", 1.5, clock=lambda: 0.0), Leadership(eb, "b", 1.5)
    sessions_a = sessionmaker(ea)
    a.install(sessions_a)
    try:
        await a._step()
        await b._step()
        assert a.is_leader and not b.is_leader and a.generation == 1
        assert b.leader is not None and b.leader.id == "a"
        with sessions_a.begin() as s:  # the leader writes
            s.add(Host(name="h1", address="x", cores=1, memory_bytes=1, disk_bytes=1))

        # a write of the leader in flight holds the row FOR SHARE: a takeover waits for it
        s = sessions_a()
        s.begin()
        s.add(Host(name="h2", address="x", cores=1, memory_bytes=1, disk_bytes=1))
        s.flush()
        time.sleep(1.6)  # the lease runs out (a stopped renewing: partitioned, paused...)
        took = threading.Thread(target=lambda: setattr(b, "found", b.poll()))
        took.start()
        took.join(0.3)
        assert took.is_alive(), "the takeover did not wait for the leader's transaction"
        s.commit()  # in flight before the takeover: it commits
        took.join(5)
        found = b.found  # type: ignore[attr-defined]
        assert found.held and found.generation == 2

        # a still believes it leads (nothing told it), keeps running, and cannot commit
        assert a.is_leader
        with pytest.raises(NotLeader, match="taken over by b"), sessions_a.begin() as s2:
            s2.add(Host(name="h3", address="x", cores=1, memory_bytes=1, disk_bytes=1))
        store = OperationStore(ea, fence=a.fence)  # nor can its operations record a step
        with pytest.raises(NotLeader):
            store.save(OpRecord(kind="recreate", target="x", params={}))
        with ea.connect() as conn:
            names = set(conn.execute(sa.text("SELECT name FROM hosts")).scalars())
            assert names == {"h1", "h2"}
            assert conn.execute(sa.text("SELECT count(*) FROM operations")).scalar() == 0
        await a._step()  # its next renewal finds out
        assert not a.is_leader
    finally:
        ea.dispose()
        eb.dispose()


async def test_a_clean_stop_gives_the_lease_back_at_once(db: str) -> None:
    ea, eb = sa.create_engine(db), sa.create_engine(db)
    a, b = Leadership(ea, "a", 30.0), Leadership(eb, "b", 30.0)
    try:
        await a.start()
        await b.start()
        assert a.is_leader and not b.is_leader
        await a.stop()  # a 30 s lease, yet b need not wait for it
        await b._step()
        assert b.is_leader and b.generation == 2
        assert b.leader is not None and b.leader.id == "b"
        assert {s.id for s in b.servers} == {"a", "b"}
    finally:
        await b.stop()
        ea.dispose()
        eb.dispose()


async def test_a_leader_whose_renewal_is_late_settles_before_a_call_is_turned_away(
        db: str) -> None:
    ea, eb = sa.create_engine(db), sa.create_engine(db)
    now = [0.0]
    a, b = Leadership(ea, "a", 1.5, clock=lambda: now[0]), Leadership(eb, "b", 1.5)
    try:
        await a.start()
        assert a.is_leader
        now[0] = 2.0  # by a's clock its renewal is late: not sure, though no one else leads
        assert not a.is_leader and a.generation == 1
        await a.settle(10)
        assert a.is_leader and a.generation == 1  # renewed at once, not a 503

        loop = a._task
        assert loop is not None
        loop.cancel()  # a's renewals stop (paused, cut off), and b takes the lease meanwhile
        with contextlib.suppress(asyncio.CancelledError):
            await loop
        time.sleep(1.6)
        await b._step()
        assert b.is_leader and b.generation == 2
        now[0] = 4.0
        a._task = asyncio.create_task(a._run())  # a comes back, late by its own clock
        await a.settle(10)
        assert a.generation is None and not a.is_leader  # the poll found out: it follows
        await a.settle(10)  # a follower never waits
    finally:
        await a.stop()
        await b.stop()
        ea.dispose()
        eb.dispose()


# --- servers in this process: forwarding and status ----------------------------------------------


@pytest.fixture(params=["off", "on"], ids=["tls-off", "tls-on"])
async def pair(request: pytest.FixtureRequest, pg_url: str,  # noqa: F811
               tmp_path: Path) -> AsyncIterator[list[ControlPlane]]:
    planes = await start_servers(tmp_path, fresh_db(pg_url, "pair"), 2, tls=request.param)
    try:
        yield planes
    finally:
        await stop_servers(planes)


async def test_a_follower_forwards_writes_and_its_answers_are_the_leaders(
        pair: list[ControlPlane]) -> None:
    leader = next(p for p in pair if p.leads)
    follower = next(p for p in pair if not p.leads)
    assert leader.nc is not None
    nc = await connect([p.nats_url for p in pair], identity.admin(TOKEN, ca_of(leader)),
                       "fake-agents")
    agent = FakeAgent(nc, "h1", cores=4, memory=8 * GiB)
    try:
        await agent.start()  # its join went to the leader, whichever node it reached
        async with _client(leader) as lc, _client(follower) as fc:
            r = await fc.post("/v1/instances", json={"name": "web", "command": ["sleep", "9"],
                                                     "cpus": 0.5})
            assert r.status_code == 201, r.text
            assert r.json()["host"] == "h1" and r.json()["state"] == "running"
            assert (await fc.get("/v1/instances/web")).json() == (
                await lc.get("/v1/instances/web")).json()  # reads from the shared database

            def same(a: httpx.Response, b: httpx.Response) -> None:
                assert (a.status_code, a.content) == (b.status_code, b.content)
                keep = ("content-type", "content-length", "www-authenticate", "retry-after")
                assert {k: a.headers.get(k) for k in keep} == {
                    k: b.headers.get(k) for k in keep}

            bad = {"name": "Bad_Name", "command": ["x"]}
            same(await fc.post("/v1/instances", json=bad), await lc.post("/v1/instances",
                                                                         json=bad))
            same(await fc.post("/v1/instances/nope/stop"), await lc.post(
                "/v1/instances/nope/stop"))
            same(await fc.post("/v1/instances/web/start"), await lc.post(
                "/v1/instances/web/start"))  # it runs already: the same refusal
            r = await fc.delete("/v1/instances/web", params={"force": "true"})
            assert r.status_code == 204
            assert (await lc.get("/v1/instances/web")).status_code == 404
            # a follower's own guard still refuses a stranger before anything goes on
            r = await fc.post("/v1/instances", json=bad, headers={"Authorization": "Bearer x"})
            assert r.status_code == 401

            st = (await fc.get("/v1/status")).json()
            assert st["leader"]["id"] == leader.server_id
            assert st["leader"]["api_url"] == leader.api_url and st["leader"]["generation"] >= 1
            assert {s["id"]: s["leader"] for s in st["servers"]} == {
                leader.server_id: True, follower.server_id: False}
            assert st["nats"][0] == follower.nats_url and leader.nats_url in st["nats"]
            info = json.loads((Path(follower.settings.data_dir) / "server.json").read_text())
            assert info["server_id"] == follower.server_id
            assert info["nats_url"] == follower.nats_url
    finally:
        await nc.close()


async def test_while_the_leader_cannot_be_reached_a_follower_answers_503_not_leader(
        pair: list[ControlPlane]) -> None:
    leader = next(p for p in pair if p.leads)
    follower = next(p for p in pair if not p.leads)
    http = leader._http
    assert http is not None
    http.should_exit = True  # the leader's API goes away; its lease does not, yet
    async with _client(follower) as fc:
        async def refused() -> bool:
            r = await fc.post("/v1/hosts", json={"name": "x1"})
            return r.status_code == 503
        await wait_for(refused, timeout=10)
        r = await fc.post("/v1/hosts", json={"name": "x1"})
        err = r.json()["error"]
        assert err["code"] == "not_leader" and err["retryable"] is True
        assert "cannot be reached" in err["message"] and r.headers["retry-after"] == "1"
        assert (await fc.get("/v1/instances")).status_code == 200  # reads go on
        await leader.stop()  # gives its lease back: the follower takes over within a poll
        await wait_for(lambda: _leads(follower), timeout=10)
        assert (await fc.post("/v1/hosts", json={"name": "x1"})).status_code == 201


async def _leads(p: ControlPlane) -> bool:
    return p.leads


# --- servers as processes: kill -9 the leader ----------------------------------------------------


class Proc(ServerProc):
    def __init__(self, settings: Settings) -> None:
        super().__init__(Path(settings.data_dir))
        self.settings = settings

    def env(self) -> dict[str, str]:
        env = {f"CORRAL_{name.upper()}": str(getattr(self.settings, name)) for name in (
            "data_dir", "token", "db_url", "nats_port", "nats_cluster_port", "nats_routes",
            "server_name", "lease_seconds", "heartbeat_seconds", "leader_lease_seconds",
            "stream_replicas", "tls", "failover_grace_seconds")}
        env["CORRAL_API_PORT"] = str(self.settings.api_port)
        return env


@pytest.fixture
def procs(pg_url: str, tmp_path: Path) -> Iterator[list[Proc]]:  # noqa: F811
    yield from _procs(pg_url, tmp_path, lease_seconds=10.0, heartbeat_seconds=2.0,
                      leader_lease_seconds=3.0)


def _procs(pg_url: str, tmp_path: Path, **kw: Any) -> Generator[list[Proc], None, None]:  # noqa: F811
    url = fresh_db(pg_url, "procs")
    out = [Proc(s) for s in cluster_settings(tmp_path, url, 3, stream_replicas=3, tls="on",
                                             **kw)]
    for p in out:
        p.settings.api_port = stable_port("127.0.0.1")
    try:
        for p in out:
            p.start()
        for p in out:
            p.wait_ready()
        yield out
    finally:
        for p in out:
            p.stop()


async def _leader_of(servers: list[Proc]) -> Proc:
    for p in servers:
        if p.proc is None or p.proc.poll() is not None:
            continue
        async with httpx.AsyncClient(timeout=5, verify=verify(ca_of(p.data)), headers={
                "Authorization": f"Bearer {TOKEN}"}) as c:
            with contextlib.suppress(httpx.HTTPError):
                lead = (await c.get(p.api + "/v1/status")).json().get("leader")
                if lead:
                    return next(q for q in servers if q.info and q.info["server_id"] == lead["id"])
    raise AssertionError("no leader")


class Heartbeats:
    """Agents heartbeat every ``every`` seconds, as real ones do, whoever answers; the longest
    stretch without an answered heartbeat is what an agent's self-fencing would count."""

    def __init__(self, agents: list[FakeAgent], every: float) -> None:
        self.agents, self.every = agents, every
        self.last = {a.name: time.monotonic() for a in agents}
        self.longest = 0.0
        self.t0 = time.monotonic()
        self.failures: list[tuple[float, str, str, float]] = []
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while not self._stop.is_set():
            await asyncio.gather(*(self._one(a) for a in self.agents))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.every)

    async def _one(self, a: FakeAgent) -> None:
        sent = time.monotonic()
        try:
            # as long as a real agent waits for an answer (agent/daemon.py): a request
            # that went to a leader killed meanwhile is given up as soon, and sent again
            await a.heartbeat(timeout=max(1.0, 2 * self.every))
        except Exception as exc:
            self.failures.append((round(sent - self.t0, 2), a.name,
                                  f"{type(exc).__name__}: {exc}"[:80],
                                  round(time.monotonic() - sent, 2)))
            return
        self.longest = max(self.longest, sent - self.last[a.name])
        self.last[a.name] = sent

    async def stop(self) -> None:
        self._stop.set()
        await self._task


async def _first_write_after(c: httpx.AsyncClient, url: str, since: float) -> float:
    """Seconds from ``since`` until a write sent to ``url`` (any server) is accepted."""
    while True:
        with contextlib.suppress(httpx.HTTPError):
            r = await c.post(url + "/v1/hosts", json={"name": "probe"})
            if r.status_code == 201:
                return time.monotonic() - since
            assert r.status_code == 503 and r.json()["error"]["code"] == "not_leader", r.text
        assert time.monotonic() - since < 30, "no server took over"
        await asyncio.sleep(0.05)


async def test_a_killed_leader_is_replaced_and_its_operation_resumed(
        procs: list[Proc]) -> None:
    nodes = [p.settings for p in procs]
    ca = ca_of(procs[0].data)
    nc = await connect([str(p.info["nats_url"]) for p in procs if p.info],
                       identity.admin(TOKEN, ca), "fake-agents", reconnect_time_wait=0.1)
    agents = [FakeAgent(nc, f"h{i}", cores=4, memory=8 * GiB) for i in (1, 2)]
    beats: Heartbeats | None = None
    took: list[float] = []
    try:
        for a in agents:
            await a.start()
        beats = Heartbeats(agents, 1.0)
        async with httpx.AsyncClient(timeout=30, verify=verify(ca), headers={
                "Authorization": f"Bearer {TOKEN}"}) as c:
            leader = await _leader_of(procs)
            r = await c.post(leader.api + "/v1/instances", json={
                "name": "web", "command": ["sleep", "9"], "cpus": 0.5, "host": "h1"})
            assert r.status_code == 201, r.text
            # an operation held mid-way on the leader (a fire drill), then the leader dies
            drill = leader.data / "drills" / "recreate.create.before"
            drill.parent.mkdir(exist_ok=True)
            drill.write_text("")
            follower = next(p for p in procs if p is not leader)
            r = await c.post(follower.api + "/v1/instances/web/recreate", json={"to": "h2"})
            assert r.status_code in (200, 201, 202), r.text
            op_id = r.json()["id"]
            await wait_for(_exists(drill.with_name(drill.name + ".reached")), timeout=15)
            t0 = time.monotonic()
            await asyncio.to_thread(leader.kill)
            took.append(await _first_write_after(c, follower.api, t0))
            new = await _leader_of(procs)
            assert new is not leader

            async def finished() -> bool:
                r = await c.get(new.api + f"/v1/ops/{op_id}")
                return bool(r.status_code == 200 and r.json()["finished"])

            await wait_for(finished, timeout=30)
            op = (await c.get(new.api + f"/v1/ops/{op_id}")).json()
            assert op["state"] in ("rolled_back", "succeeded"), op
            web = (await c.get(new.api + "/v1/instances/web")).json()
            assert web["state"] == "running" and web["host"] in ("h1", "h2"), web
            hosts = (await c.get(new.api + "/v1/hosts")).json()
            assert {h["name"]: h["state"] for h in hosts} == {"h1": "up", "h2": "up"}

            # more kills: each time the leader goes, another takes over (the killed one
            # comes back as a follower)
            for _ in range(4):
                await asyncio.to_thread(leader.start)
                await asyncio.to_thread(leader.wait_ready)
                leader = await _leader_of(procs)
                other = next(p for p in procs if p is not leader)
                t0 = time.monotonic()
                await asyncio.to_thread(leader.kill)
                took.append(await _first_write_after(c, other.api, t0))
            hosts = (await c.get(other.api + "/v1/hosts")).json()
            assert {h["name"]: h["state"] for h in hosts} == {"h1": "up", "h2": "up"}
    finally:
        if beats is not None:
            await beats.stop()
        await nc.close()
    print(f"\ntakeover after kill -9 (s): {[round(t, 2) for t in took]}, "
          f"median {statistics.median(took):.2f}; longest stretch without an answered "
          f"heartbeat {beats.longest if beats else 0:.2f}s")
    s = nodes[0]  # (how fast: bench/takeover.py; here, that no host went without a lease)
    assert beats is not None and beats.longest < s.lease_seconds - s.fence_margin_seconds


def _exists(path: Path) -> Any:
    async def check() -> bool:
        return path.exists()
    return check


async def test_a_rolling_restart_keeps_every_host_up(procs: list[Proc]) -> None:
    """Each server in turn stopped (SIGTERM) and started again, the leader included, while
    agents heartbeat every 2 s with a 10 s lease: none goes without an answer long enough to
    fence itself, and no host is ever marked down."""
    ca = ca_of(procs[0].data)
    nc = await connect([str(p.info["nats_url"]) for p in procs if p.info],
                       identity.admin(TOKEN, ca), "fake-agents", reconnect_time_wait=0.1)
    agents = [FakeAgent(nc, f"h{i}", cores=4, memory=8 * GiB) for i in (1, 2, 3)]
    beats: Heartbeats | None = None
    try:
        for a in agents:
            await a.start()
        beats = Heartbeats(agents, procs[0].settings.heartbeat_seconds)
        async with httpx.AsyncClient(timeout=30, verify=verify(ca), headers={
                "Authorization": f"Bearer {TOKEN}"}) as c:
            first = await _leader_of(procs)
            order = [first, *(p for p in procs if p is not first)]  # the leader first
            for p in order:  # (in threads: the agents go on heartbeating meanwhile)
                await asyncio.to_thread(p.stop)
                await asyncio.to_thread(p.start)
                await asyncio.to_thread(p.wait_ready)
            leader = await _leader_of(procs)
            hosts = (await c.get(leader.api + "/v1/hosts")).json()
            assert {h["name"]: h["state"] for h in hosts} == {f"h{i}": "up" for i in (1, 2, 3)}
            r = await c.get(leader.api + "/v1/events", params={"type": "host"})
            kinds = [json.loads(line)["type"] for line in r.text.splitlines()]
            assert kinds.count("host.joined") == 3 and "host.down" not in kinds, kinds
    finally:
        if beats is not None:
            await beats.stop()
        await nc.close()
    s = procs[0].settings
    print(f"\nrolling restart: longest stretch without an answered heartbeat "
          f"{beats.longest if beats else 0:.2f}s; failures {beats.failures if beats else []}")
    assert beats is not None and beats.longest < s.lease_seconds - s.fence_margin_seconds


# --- kill -9 of the leader at every step of a migration and of a failover ------------------------


class MoveAgent(FakeAgent):
    """A fake agent that also moves disks, as far as the server can tell: it keeps its slots
    (incoming, standby) and its adopted disks in sets, so that what an operation leaves behind
    shows, and it answers not_found for an instance it does not hold, as a real one does."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.slots: set[tuple[str, str]] = set()
        self.disks: set[str] = set()

    async def join(self) -> JoinReply:
        req = JoinRequest(host=self.name, address="127.0.0.1",
                          capacity=Capacity(cores=self.cores, memory_bytes=self.memory,
                                            disk_bytes=10 * GiB),
                          drivers={d: {"can_freeze": True} for d in self.drivers},
                          agent_version="fake", instances=list(self.instances.values()),
                          data_port=1)
        return await request(self.nc, subjects.join(self.name), req, JoinReply, 5)

    async def _on_cmd(self, msg: Msg) -> None:
        cmd = codec.decode(msg.data, Command)
        self.calls.append(cmd)
        try:
            result = self._do(cmd.verb, cmd.args)
        except CorralError as err:
            await msg.respond(codec.encode(Reply(ok=False, error=err.to_dict())))
            return
        await msg.respond(codec.encode(Reply(ok=True, result=result)))

    def _do(self, verb: str, args: dict[str, Any]) -> Any:
        name = args.get("name") or ""
        if verb == "disk_recv":
            self.slots.add((name, args["slot"]))
            return {"address": "127.0.0.1", "port": 1, "path": f"/slots/{name}"}
        if verb == "disk_send":
            if name not in self.instances:
                raise NotFound(f"no instance {name} on {self.name}")
            if args["mode"] == "frozen" and args.get("keep_frozen"):
                self.set_state(name, "frozen")
            return {"bytes": 1000, "files": 1, "seconds": 0.01, "full": True, "gen": "g",
                    "freeze_ms": 1.0 if args["mode"] == "frozen" else None,
                    "data_at": time.time()}
        if verb in ("disk_discard", "disk_commit"):
            if verb == "disk_discard":
                self.slots.discard((name, args["slot"]))
            return None
        if verb == "disk_adopt":
            if (name, args["slot"]) not in self.slots:
                raise NotFound(f"no {args['slot']} copy of {name} on {self.name}")
            self.slots.discard((name, args["slot"]))
            self.disks.add(name)
            return {"path": f"/disks/{name}"}
        if verb == "disk_demote":
            self.disks.discard(name)
            self.slots.add((name, "standby"))
            return {"path": f"/slots/{name}"}
        if verb in ("status", "start", "stop", "kill", "freeze", "thaw") and (
                name not in self.instances):
            raise NotFound(f"no instance {name} on {self.name}")
        if verb in ("kill", "delete") and args.get("if_epoch") is not None and (
                name in self.instances and self.instances[name].epoch != args["if_epoch"]):
            return self.instances[name].model_dump() if verb == "kill" else None
        if verb == "delete":
            self.disks.discard(name)
        if verb == "create":
            self.disks.add(WireSpec.model_validate(args["spec"]).name)
        return super()._do(verb, args)


#: the steps of a (warm) migration and of a failover (control/operations/migrate.py,
#: failover.py); each operation's record is checked against them
STEPS = {"migrate": ["plan", "prepare", "copy", "freeze-copy", "stop", "adopt", "create",
                     "start", "cleanup"],
         "failover": ["plan", "adopt", "create", "start", "finish"]}


def _steps(kind: str) -> list[str]:
    return STEPS[kind]


async def test_a_leader_killed_at_every_step_of_a_migration_and_a_failover(
        pg_url: str, tmp_path: Path) -> None:  # noqa: F811
    """One fleet of three server processes and three fake agents. For every step of a
    migration, then of a failover: hold the step on the leader (a drill), kill -9 the leader,
    and check that another server takes over and ends the operation succeeded or rolled back,
    that its record holds each step once, that exactly one copy of the instance runs (where the
    database says), and that no disk slot or copy is left behind."""
    gen = _procs(pg_url, tmp_path, lease_seconds=6.0, heartbeat_seconds=1.0,
                 leader_lease_seconds=2.0, failover_grace_seconds=0.5)
    procs = next(gen)
    try:
        await _kill_at_every_step(procs)
    finally:
        gen.close()


async def _kill_at_every_step(procs: list[Proc]) -> None:
    ca = ca_of(procs[0].data)
    nc = await connect([str(p.info["nats_url"]) for p in procs if p.info],
                       identity.admin(TOKEN, ca), "fake-agents", reconnect_time_wait=0.1)
    agents = {n: MoveAgent(nc, n, cores=4, memory=8 * GiB) for n in ("h1", "h2", "h3")}
    beats: Heartbeats | None = None
    engine = sa.create_engine(procs[0].settings.db_url)
    restarting: asyncio.Task[None] | None = None
    try:
        for a in agents.values():
            await a.start()
        beats = Heartbeats(list(agents.values()), 1.0)
        async with httpx.AsyncClient(timeout=30, verify=verify(ca), headers={
                "Authorization": f"Bearer {TOKEN}"}) as c:
            leader = await _leader_of(procs)
            r = await c.post(leader.api + "/v1/instances", json={
                "name": "web", "command": ["sleep", "9"], "cpus": 0.5, "host": "h1"})
            assert r.status_code == 201, r.text
            seen: dict[str, list[str]] = {}

            async def kill_at(kind: str, step: str, start: Any) -> dict[str, Any]:
                """Hold ``kind`` at ``step`` on the leader, start it, kill the leader; the
                operation's record once another server has ended it."""
                nonlocal restarting
                if restarting is not None:
                    await restarting  # three servers again before the next kill
                leader = await _leader_of(procs)
                drill = leader.data / "drills" / f"{kind}.{step}.before"
                drill.parent.mkdir(exist_ok=True)
                drill.write_text("")
                reached = drill.with_name(drill.name + ".reached")
                try:
                    await start(leader)
                    await wait_for(_exists(reached), timeout=30)
                    op_id = reached.read_text()
                    await asyncio.to_thread(leader.kill)
                finally:
                    drill.unlink(missing_ok=True)
                    reached.unlink(missing_ok=True)
                # another server takes over; then the killed one comes back (as a follower,
                # or it may lead again later: a new term all the same)
                new = await _wait_new_leader([p for p in procs if p is not leader])
                restarting = asyncio.create_task(_restart(leader))
                op = await _wait_finished(c, new, op_id)
                assert op["state"] in ("succeeded", "rolled_back"), (kind, step, op)
                assert [st["name"] for st in op["steps"]] == _steps(kind), op
                seen.setdefault(kind, []).append(f"{step}:{op['state']}")
                return op

            async def one_copy(c: httpx.AsyncClient) -> None:
                """Exactly one copy of web, running where the database says; no residue."""
                api = (await _leader_of(procs)).api

                async def settled() -> bool:
                    web = (await c.get(api + "/v1/instances/web")).json()
                    holders = [a.name for a in agents.values() if "web" in a.instances]
                    return bool(web["state"] == "running" and holders == [web["host"]])

                await wait_for(settled, timeout=60)
                web = (await c.get(api + "/v1/instances/web")).json()
                where = agents[web["host"]]
                assert where.instances["web"].state == "running", where.instances
                assert where.instances["web"].epoch == web["epoch"]
                assert [a.name for a in agents.values() if a.slots] == [], {
                    a.name: a.slots for a in agents.values()}
                assert [a.name for a in agents.values() if "web" in a.disks] == [web["host"]]
                with engine.connect() as conn:
                    busy = conn.execute(sa.text(
                        "SELECT count(*) FROM operations WHERE target = 'web' AND state "
                        "NOT IN ('succeeded', 'rolled_back')")).scalar()
                assert busy == 0

            agents["h1"].disks.add("web")
            for step in _steps("migrate"):
                leader = await _leader_of(procs)
                web = (await c.get(leader.api + "/v1/instances/web")).json()
                to = "h2" if web["host"] != "h2" else "h1"

                async def migrate(leader: Proc, to: str = to) -> None:
                    r = await c.post(leader.api + "/v1/instances/web/migrate",
                                     json={"to": to})
                    assert r.status_code == 202, r.text

                await kill_at("migrate", step, migrate)
                await one_copy(c)

            for step in _steps("failover"):
                leader = await _leader_of(procs)
                web = (await c.get(leader.api + "/v1/instances/web")).json()
                primary = agents[web["host"]]
                spare = agents[next(n for n in agents if n != web["host"])]
                with engine.begin() as conn:  # a complete standby copy on the spare
                    conn.execute(sa.text(
                        "INSERT INTO standbys (instance, host, every_seconds, state, "
                        "last_sync_at, data_at, total_bytes, syncs, last_error, created_at) "
                        "VALUES ('web', :h, 3600, 'ready', :t, :t, 0, 1, '', :t)"),
                        {"h": spare.name, "t": time.time()})
                spare.slots.add(("web", "standby"))

                async def host_dies(leader: Proc, primary: MoveAgent = primary) -> None:
                    assert beats is not None
                    beats.agents.remove(primary)  # no heartbeats, no answers
                    await primary.leave()

                await kill_at("failover", step, host_dies)
                # the instance ends up on the spare (a failover rolled back is tried again by
                # the new leader), and the dead host, back, loses its stale copy
                api = (await _leader_of(procs)).api

                async def on_spare(spare: MoveAgent = spare, api: str = api) -> bool:
                    web = (await c.get(api + "/v1/instances/web")).json()
                    return bool(web["host"] == spare.name and web["state"] == "running")

                await wait_for(on_spare, timeout=30)
                await primary.start()
                assert beats is not None
                beats.agents.append(primary)
                await one_copy(c)
                with engine.connect() as conn:
                    assert conn.execute(sa.text("SELECT count(*) FROM standbys")).scalar() == 0
            print(f"\nkilled the leader at: {seen}")
            assert set(seen) == {"migrate", "failover"}
    finally:
        if restarting is not None:
            with contextlib.suppress(Exception):
                await restarting
        if beats is not None:
            await beats.stop()
        await nc.close()
        engine.dispose()


async def _restart(p: Proc) -> None:
    await asyncio.to_thread(p.start)
    await asyncio.to_thread(p.wait_ready)


async def _wait_new_leader(live: list[Proc]) -> Proc:
    """The one of ``live`` that leads, once one does (they may name a killed one a while)."""
    deadline = time.monotonic() + 30
    while True:
        for p in live:
            async with httpx.AsyncClient(timeout=5, verify=verify(ca_of(p.data)), headers={
                    "Authorization": f"Bearer {TOKEN}"}) as c:
                with contextlib.suppress(httpx.HTTPError, ValueError):
                    lead = (await c.get(p.api + "/v1/status")).json().get("leader")
                    for q in live:
                        if lead and q.info and q.info["server_id"] == lead["id"]:
                            return q
        assert time.monotonic() < deadline, "no server took over"
        await asyncio.sleep(0.1)


async def _wait_finished(c: httpx.AsyncClient, p: Proc, op_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while True:
        with contextlib.suppress(httpx.HTTPError):
            r = await c.get(p.api + f"/v1/ops/{op_id}")
            if r.status_code == 200 and r.json()["finished"]:
                return dict(r.json())
        assert time.monotonic() < deadline, f"operation {op_id} did not end"
        await asyncio.sleep(0.1)
