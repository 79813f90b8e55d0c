"""The leader cut off from the database (issue 11): it steps down on its own before its lease
would run out by its own clock, another server takes over and finishes (or rolls back) the
operation it left, and nothing the old leader writes after the cut commits.

Two servers in this process; the first reaches PostgreSQL through a proxy (tests/integration/
dbproxy.py) that the test cuts: every connection closed, new ones refused, or accepted and never
answered (a blackhole: no error, only silence, the case a timeout has to catch).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from dbproxy import DbProxy
from sqlalchemy.engine import make_url
from sqlalchemy.orm import sessionmaker
from test_api import FakeAgent, wait_for
from test_leadership import (
    TOKEN,
    Heartbeats,
    ca_of,
    cluster_settings,
    fresh_db,
    stop_servers,
    verify,
)
from test_postgres import pg_url  # noqa: F401  (the module's PostgreSQL server)

from corral.bus import identity
from corral.bus.connect import connect
from corral.config import Settings
from corral.control.db import Host, open_db
from corral.control.leader import Leadership
from corral.control.server import ControlPlane
from corral.errors import NotLeader
from corral.ops.store import OperationStore, OpRecord

pytestmark = pytest.mark.postgres

GiB = 1024**3
RECREATE_STEPS = ["plan", "stop", "delete", "create", "start"]


def _client(plane: ControlPlane) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=plane.api_url, timeout=30, verify=verify(ca_of(plane)),
                             headers={"Authorization": f"Bearer {TOKEN}"})


@pytest.mark.parametrize("cut", ["refuse", "blackhole"])
async def test_a_leader_cut_off_from_the_database_steps_down_and_cannot_commit(
        cut: str, pg_url: str, tmp_path: Path) -> None:  # noqa: F811
    url = fresh_db(pg_url, "partition")
    engine, _ = open_db(Settings(data_dir=tmp_path / "migrate", db_url=url))
    u = make_url(url)
    proxy = DbProxy(str(u.host or "127.0.0.1"), int(u.port or 5432))
    plain = cluster_settings(tmp_path, url, 2)
    proxied = u.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    settings = [dataclasses.replace(plain[0], db_url=proxied), plain[1]]
    # the proxied server leads from the start: its id holds the lease row already (it takes
    # a lease it holds at once; the other waits for it to run out)
    for s, sid in zip(settings, ("cut-off", "other"), strict=True):
        Path(s.data_dir).mkdir(parents=True, exist_ok=True)
        (Path(s.data_dir) / "server-id").write_text(sid + "\n")
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE leadership SET holder = 'cut-off', "
                             "expires_at = extract(epoch from clock_timestamp()) + 60 "
                             "WHERE id = 1"))
    planes = [ControlPlane(s) for s in settings]
    nc: Any = None
    beats: Heartbeats | None = None
    # until the cut, the lease row stays the proxied server's: both servers share this test's
    # one loop, and a stall of it past the 1.5 s lease (a busy machine) handed the lead to the
    # other before the cut came, so the test had nothing to cut (seen under load)
    unpin = threading.Event()

    def pin() -> None:
        while not unpin.wait(0.3):
            with contextlib.suppress(sa.exc.SQLAlchemyError), engine.begin() as conn:
                conn.execute(sa.text(
                    "UPDATE leadership SET expires_at = extract(epoch from clock_timestamp())"
                    " + 60 WHERE id = 1 AND holder = 'cut-off'"))

    pinning = threading.Thread(target=pin, daemon=True)
    pinning.start()
    try:
        results = await asyncio.gather(*(p.start() for p in planes), return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            raise failed[0]
        old, new = planes
        assert old.leads and not new.leads
        assert old.leadership is not None and new.leadership is not None
        nc = await connect([p.nats_url for p in planes], identity.admin(TOKEN, ca_of(old)),
                           "fake-agents", reconnect_time_wait=0.1)
        agents = [FakeAgent(nc, f"h{i}", cores=4, memory=8 * GiB) for i in (1, 2)]
        for a in agents:
            await a.start()
        beats = Heartbeats(agents, 1.0)
        async with _client(old) as oc, _client(new) as nc_http:
            # setup, not what is tested: both servers share this test's one loop, and a stall
            # of it past the 1.5 s lease makes the leader unsure for a moment (a retryable
            # 503, which a client tries again, as here)
            for _ in range(50):
                r = await oc.post("/v1/instances", json={
                    "name": "web", "command": ["sleep", "9"], "cpus": 0.5, "host": "h1"})
                if r.status_code != 503 or not r.json()["error"]["retryable"]:
                    break
                await asyncio.sleep(0.2)
            assert r.status_code == 201, r.text
            await wait_for(lambda: _leads(old), timeout=15)  # (sure of its lease again)
            # an operation held mid-way on the leader (a fire drill) when the cut comes
            drill = Path(old.settings.data_dir) / "drills" / "recreate.create.before"
            drill.parent.mkdir(exist_ok=True)
            drill.write_text("")
            r = await oc.post("/v1/instances/web/recreate", json={"to": "h2"})
            assert r.status_code in (200, 201, 202), r.text
            op_id = r.json()["id"]
            await wait_for(_exists(drill.with_name(drill.name + ".reached")), timeout=15)
            old_gen = old.leadership.generation
            assert old_gen is not None

            # watched from a thread: with the database silent, the server's loop may sit in
            # a (bounded) connect, and so would this test's, which is the same loop
            watch = _Watch(old)
            unpin.set()
            pinning.join(10)
            with engine.begin() as conn:  # the lease as the leader last renewed it
                conn.execute(sa.text(
                    "UPDATE leadership SET expires_at = extract(epoch from clock_timestamp())"
                    " + :lease WHERE id = 1 AND holder = 'cut-off'"),
                    {"lease": old.settings.leader_lease_seconds})
            assert old.leads and not new.leads, "the proxied server must lead when the cut comes"
            proxy.cut(cut)  # type: ignore[arg-type]
            # it stops leading on its own, by its own clock: no later than its lease was sure
            stepped_down, valid_until = await asyncio.to_thread(watch.wait, 60)
            lease = old.settings.leader_lease_seconds
            assert stepped_down < valid_until + lease / 6, (stepped_down, valid_until)
            assert not old.leads

            await wait_for(lambda: _leads(new), timeout=30)  # the other one takes over
            assert new.leadership.generation is not None
            assert new.leadership.generation > old_gen
            drill.unlink()  # (the old leader's operation task is gone; nothing holds it now)

            async def finished() -> bool:
                r = await nc_http.get(f"/v1/ops/{op_id}")
                return bool(r.status_code == 200 and r.json()["finished"])

            await wait_for(finished, timeout=60)

            proxy.heal()
            # the old leader, back in touch, follows: the lease row names the new one
            await wait_for(lambda: _follows(old, "other"), timeout=30)
            assert not old.leads and new.leads

            # (a) what the old leader would still write with its generation is refused, through
            # its own engine: the ORM's flush and an operation's step alike
            assert old._engine is not None
            stale = Leadership(old._engine, old.server_id, lease)
            stale.generation = old_gen  # as if its clock said the lease were still sure
            stale.valid_until = stale.clock() + 3600
            sessions = sessionmaker(old._engine)
            stale.install(sessions)
            with pytest.raises(NotLeader, match="taken over by other"), \
                    sessions.begin() as s:
                s.add(Host(name="late", address="x", cores=1, memory_bytes=1, disk_bytes=1))
            store = OperationStore(old._engine, fence=stale.fence)
            with pytest.raises(NotLeader, match="taken over by other"):
                store.save(OpRecord(kind="recreate", target="web", params={}))

            # (b) one consistent history: each step once, in order, ended one way
            op = (await nc_http.get(f"/v1/ops/{op_id}")).json()
            assert op["state"] in ("succeeded", "rolled_back"), op
            names = [st["name"] for st in op["steps"]]
            assert names == RECREATE_STEPS, op
            with engine.connect() as conn:
                ops = conn.execute(sa.text(
                    "SELECT id FROM operations WHERE target = 'web'")).scalars().all()
                hosts = set(conn.execute(sa.text("SELECT name FROM hosts")).scalars())
            assert ops == [op_id] and "late" not in hosts
            # exactly one copy of the instance, where the record says it runs
            web = (await nc_http.get("/v1/instances/web")).json()
            holders = [a.name for a in agents if "web" in a.instances]
            assert holders == [web["host"]], (holders, web)
            assert web["state"] == "running", web
            where = next(a for a in agents if a.name == web["host"])
            assert where.instances["web"].state == "running"
    finally:
        unpin.set()
        pinning.join(10)
        if beats is not None:
            await beats.stop()
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.close()
        proxy.heal()
        await stop_servers(planes)
        proxy.close()
        engine.dispose()


class _Watch:
    """When ``plane`` stops leading (its own clock), and until when its lease was sure."""

    def __init__(self, plane: ControlPlane) -> None:
        assert plane.leadership is not None
        self.lead = plane.leadership
        self.plane = plane

    def wait(self, timeout: float) -> tuple[float, float]:
        valid_until = self.lead.valid_until
        deadline = time.monotonic() + timeout
        while self.plane.leads:
            valid_until = max(valid_until, self.lead.valid_until)
            assert time.monotonic() < deadline, "the cut-off leader never stepped down"
            time.sleep(0.002)
        return self.lead.clock(), valid_until


def _exists(path: Path) -> Any:
    async def check() -> bool:
        return path.exists()
    return check


async def _leads(p: ControlPlane) -> bool:
    return p.leads


async def _follows(p: ControlPlane, leader: str) -> bool:
    lead = p.leadership
    return bool(lead is not None and not lead.is_leader and lead.leader is not None
                and lead.leader.id == leader)


