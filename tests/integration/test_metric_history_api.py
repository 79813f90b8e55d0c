"""Metric history through a real server (ControlPlane: uvicorn, SQLite, embedded nats-server)
and a real agent in this process running a real CPU burner (the ``process`` driver): points
appear in ``GET /v1/instances/{name}/metrics`` and the host's series, ``since`` and ``until``
filter them, a read-only token may read them, a restarted server still answers them (the agent
rejoins it and new points follow), and deleting the instance drops its rows. The same writes,
reads and prunes run against PostgreSQL too.

No timing assertions: every wait is bounded and only checks what ends up stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from test_agent import kill_marked, remove_scope_cgroups
from test_api import TOKEN, settings_for
from test_postgres import pg_url  # noqa: F401  (the fixture)

from corral.agent.daemon import Agent
from corral.bus.embedded import stable_port
from corral.bus.messages import InstanceSample, MetricsSample
from corral.config import Settings
from corral.control.db import Host, Instance, MetricBucket, open_db
from corral.control.history import HOST, INSTANCE, MetricHistory
from corral.control.leader import Leadership
from corral.control.server import ControlPlane

WAIT = 60.0
BURN = ["sh", "-c", "while :; do :; done"]


async def until(pred: Callable[[], Awaitable[bool]], timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await pred():
            return
        await asyncio.sleep(0.1)
    raise AssertionError("condition not met in time")


class Fleet:
    """One server (started, stopped and started again on the same data and bus port) and one
    agent, of a host named for the test, that lives across the server's restart."""

    def __init__(self, tmp: Path) -> None:
        self.host = f"hist-{uuid.uuid4().hex[:6]}"
        #: in the burner's environment: what the test kills if all else fails
        self.mark = uuid.uuid4().hex[:12]
        self.settings = settings_for(tmp / "server", heartbeat_seconds=0.5, sample_seconds=0.2,
                                     nats_port=stable_port("127.0.0.1"),
                                     history_fine_seconds=1.0, history_flush_seconds=0.5)
        self.agent_dir = tmp / "agent"
        self.plane: ControlPlane | None = None
        self.http: httpx.AsyncClient | None = None
        self.stop_agent = asyncio.Event()
        self.agent: asyncio.Task[None] | None = None

    async def start_server(self) -> httpx.AsyncClient:
        self.plane = ControlPlane(self.settings)
        await self.plane.start()
        self.http = httpx.AsyncClient(base_url=self.plane.api_url, timeout=30,
                                      headers={"Authorization": f"Bearer {TOKEN}"})
        return self.http

    async def stop_server(self) -> None:
        if self.http is not None:
            await self.http.aclose()
            self.http = None
        if self.plane is not None:
            await self.plane.stop()
            self.plane = None

    async def start_agent(self) -> None:
        assert self.plane is not None
        agent = Agent(Settings(data_dir=self.agent_dir, server_url=self.plane.api_url,
                               token=TOKEN, host_name=self.host, drivers="process",
                               heartbeat_seconds=0.5, lease_seconds=30.0, stop_timeout=2.0))
        self.agent = asyncio.create_task(agent.run(self.stop_agent))
        await self.host_up()

    async def host_up(self) -> None:
        async def up() -> bool:
            if self.agent is not None and self.agent.done():
                self.agent.result()  # the agent's own error, at once
            assert self.http is not None
            hosts = (await self.http.get("/v1/hosts")).json()
            return any(h["name"] == self.host and h["state"] == "up" for h in hosts)

        await until(up)


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[Fleet]:
    f = Fleet(tmp_path)
    try:
        await f.start_server()
        await f.start_agent()
        yield f
    finally:
        with contextlib.suppress(Exception):  # the burner must not outlive the test
            if f.http is None:
                await f.start_server()
            assert f.http is not None
            for inst in (await f.http.get("/v1/instances")).json():
                await f.http.delete(f"/v1/instances/{inst['name']}", params={"force": "true"})
        f.stop_agent.set()
        if f.agent is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(f.agent, WAIT)
        await f.stop_server()
        kill_marked(f.mark)
        remove_scope_cgroups(f.host)


async def series(http: httpx.AsyncClient, path: str, **params: Any) -> dict[str, Any]:
    r = await http.get(path, params={k: str(v) for k, v in params.items()})
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def busy(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [p for p in points if (p["cpu_core_pct"] or 0) > 10 and (p["memory_bytes"] or 0) > 0]


def stored_rows(db: Path, name: str) -> int:
    engine = sa.create_engine(f"sqlite:///{db}")
    try:
        with engine.connect() as conn:
            return int(conn.scalar(sa.select(sa.func.count()).select_from(MetricBucket)
                                   .where(MetricBucket.name == name)) or 0)
    finally:
        engine.dispose()


async def test_a_burners_history_filters_survives_a_restart_and_goes_with_it(
        fleet: Fleet) -> None:
    assert fleet.http is not None
    http: httpx.AsyncClient = fleet.http
    name = f"burn-{uuid.uuid4().hex[:6]}"
    path = f"/v1/instances/{name}/metrics"
    r = await http.post("/v1/instances", json={"name": name, "command": BURN, "cpus": 1.0,
                                               "host": fleet.host,
                                               "env": {"CORRAL_TEST_MARK": fleet.mark}})
    assert r.status_code == 201, r.text

    got: dict[str, Any] = {}

    async def burning() -> bool:
        assert fleet.http is not None
        got.update(await series(fleet.http, path))
        return len(busy(got["points"])) >= 4

    await until(burning)
    assert got["instance"] == name and got["kind"] == "instance"
    assert got["step_seconds"] == 1  # the fine tier (1 s here)
    ts = [p["t"] for p in got["points"]]
    assert ts == sorted(ts) and len(set(ts)) == len(ts)
    cores = (await http.get(f"/v1/hosts/{fleet.host}")).json()["cores"]
    assert all(p["cpu_host_pct"] == pytest.approx(p["cpu_core_pct"] / cores, abs=0.01)
               for p in busy(got["points"]))

    # the host's series sums its instances and says how busy the whole host was
    host_path = f"/v1/hosts/{fleet.host}/metrics"
    host = await series(http, host_path)
    assert host["kind"] == "host" and busy(host["points"])
    assert any(p["host_busy_pct"] is not None for p in host["points"])

    # since and until filter
    mid = ts[len(ts) // 2]
    later = await series(http, path, since=mid)
    assert later["points"][0]["t"] == mid and all(p["t"] >= mid for p in later["points"])
    window = await series(http, path, since=ts[0], until=ts[1])
    assert [p["t"] for p in window["points"]] == ts[:2]
    future = time.time() + 3600
    assert (await series(http, path, since=future, until=future + 60))["points"] == []
    assert (await series(http, path, since="10m"))["points"]
    bad = await http.get(path, params={"since": str(future)})  # until (now) before since
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_request"
    # a month back: the coarse tier answers
    month = await series(http, path, since="30d")
    assert month["step_seconds"] >= 300 and month["points"]

    # unknown names: 404 with a hint
    for missing in ("/v1/instances/nope/metrics", "/v1/hosts/nohost/metrics"):
        r = await http.get(missing)
        assert r.status_code == 404 and r.json()["error"]["hint"], r.text

    # a read-only token may read it
    made = await http.post("/v1/tokens", json={"name": f"ro-{name}", "role": "read-only"})
    assert made.status_code in (200, 201), made.text
    ro = {"Authorization": f"Bearer {made.json()['token']}"}
    assert (await http.get(path, headers=ro)).status_code == 200

    # a restarted server answers the same points, and the agent's new samples follow
    before = (await series(http, path, since=ts[0]))["points"]
    await fleet.stop_server()
    restarted_at = time.time()
    http = await fleet.start_server()
    await fleet.host_up()
    after: dict[str, Any] = {}

    async def newer() -> bool:
        assert fleet.http is not None
        after.update(await series(fleet.http, path, since=ts[0]))
        return any(p["t"] > restarted_at + 1 for p in busy(after["points"]))

    await until(newer)
    kept = {p["t"]: p for p in after["points"]}
    for p in before[:-2]:  # the last buckets may have taken samples since
        assert kept.get(p["t"]) == p

    # deleting the instance drops its history
    assert stored_rows(fleet.settings.data_dir / "corral.db", name) > 0
    r = await http.delete(f"/v1/instances/{name}", params={"force": "true"})
    assert r.status_code == 204, r.text
    assert (await http.get(path)).status_code == 404

    async def dropped() -> bool:
        return stored_rows(fleet.settings.data_dir / "corral.db", name) == 0

    await until(dropped)
    assert busy((await series(http, host_path))["points"])  # the host's stays


# --- PostgreSQL ------------------------------------------------------------------------------


@pytest.mark.postgres
async def test_history_on_postgresql_upserts_prunes_and_obeys_the_fence(
        pg_url: str, tmp_path: Path) -> None:  # noqa: F811
    engine, sessions = open_db(Settings(data_dir=tmp_path, db_url=pg_url))
    lead = Leadership(engine, "srv-history", 3.0)
    try:
        with sessions.begin() as s:
            s.add(Host(name="ph1", address="127.0.0.1", cores=2, memory_bytes=1 << 30,
                       disk_bytes=1 << 30, drivers={}))
            for n in ("pa", "pb"):
                s.add(Instance(name=n, host="ph1", driver="process", command=["x"], cpus=0.5,
                               memory_bytes=1, desired_state="running", state="running"))
        await lead.start()
        assert lead.is_leader
        now = [1_699_999_800.0]
        h = MetricHistory(sessions, Settings(), fence=lead.fence, leads=lambda: lead.is_leader,
                          clock=lambda: now[0])

        def sample(core: float, mem: int) -> MetricsSample:
            return MetricsSample(host="ph1", wall_ns=0, host_cores=2, interval_s=1.0,
                                 host_cpu_pct=core, instances=[
                                     InstanceSample(name=n, cpu_ns=1, memory_bytes=mem,
                                                    generation="g", cpu_core_pct=core,
                                                    cpu_host_pct=core / 2)
                                     for n in ("pa", "pb", "ghost")])

        h.record(sample(100.0, 10))
        assert await h.flush() == 6  # pa, pb, ph1 in two tiers; never the unknown ghost
        now[0] += 3
        h.record(sample(50.0, 30))
        await h.flush()  # the same buckets: added to
        pts = h.series(INSTANCE, "pa", now[0] - 60).points
        assert [(p.cpu_core_pct, p.memory_bytes) for p in pts] == [(75.0, 30)]
        # the host's sum counts every instance its agent runs, known here or not
        assert h.series(HOST, "ph1", now[0] - 60).points[0].cpu_core_pct == 225.0
        await h.forget("pb")
        assert h.series(INSTANCE, "pb", now[0] - 60).points == []
        later = now[0] + 2 * 86400
        assert h.prune(now=later) > 0  # past the fine tier's day, within the coarse month
        assert h.series(INSTANCE, "pa", later - 3600, now=later).step_seconds == 10
        assert h.series(INSTANCE, "pa", later - 3600, now=later).points == []
        assert len(h.series(INSTANCE, "pa", now[0] - 60, now=later).points) == 1
        # the lease given back: nothing more is written
        await lead.stop()
        h.record(sample(1.0, 1))
        assert await h.flush() == 0
        with sessions() as s:
            assert s.scalar(sa.select(sa.func.count()).select_from(MetricBucket).where(
                MetricBucket.name == "pa", MetricBucket.tier == 1)) == 1
    finally:
        with contextlib.suppress(Exception):
            await lead.stop()
        with contextlib.suppress(Exception), engine.begin() as conn:
            conn.execute(sa.delete(MetricBucket))
            conn.execute(sa.delete(Instance).where(Instance.host == "ph1"))
            conn.execute(sa.delete(Host).where(Host.name == "ph1"))
        engine.dispose()
