"""``corral host drain`` against a real control plane (uvicorn, SQLite, embedded nats-server)
with fake agents on the real bus that move disks as far as the server can tell (test_leadership's
MoveAgent): a host's instances, the standby it keeps and a shelved disk kept there all leave it,
one copy each; nothing new lands on it until it is undrained; bad requests are refused before
anything is recorded; and a ``corral server`` process killed with -9 mid-drain resumes it.

No timing assertions: every wait is bounded and only checks where things end up.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from serverproc import ServerProc
from test_api import Harness, settings_for, start_harness, wait_for
from test_leadership import Heartbeats, MoveAgent

from corral.bus import identity
from corral.bus.connect import connect
from corral.bus.embedded import free_port

TOKEN = "test-token"  # test_api's
GiB = 1024**3


class DrainAgent(MoveAgent):
    """A MoveAgent that also drops kept disks."""

    def _do(self, verb: str, args: dict[str, Any]) -> Any:
        if verb == "disk_drop":
            had = args["name"] in self.disks
            self.disks.discard(args["name"])
            return {"dropped": had}
        return super()._do(verb, args)


@pytest.fixture
async def h(tmp_path: Path) -> AsyncIterator[Harness]:
    async for harness in start_harness(settings_for(tmp_path)):
        yield harness


async def agents(h: Harness, *names: str, cores: int = 4) -> dict[str, DrainAgent]:
    out = {}
    for n in names:
        a = DrainAgent(h.nc, n, cores=cores, memory=8 * GiB)
        await a.start()
        h.agents[n] = a
        out[n] = a
    return out


async def finished(http: httpx.AsyncClient, op_id: str, timeout: float = 60) -> dict[str, Any]:
    out: dict[str, Any] = {}

    async def done() -> bool:
        with contextlib.suppress(httpx.HTTPError, ValueError):
            out.update((await http.get(f"/v1/ops/{op_id}")).json())
        return bool(out.get("finished"))

    await wait_for(done, timeout=timeout)
    return out


async def running(http: httpx.AsyncClient, *names: str) -> None:
    async def ok() -> bool:
        states = [(await http.get(f"/v1/instances/{n}")).json()["state"] for n in names]
        return all(s == "running" for s in states)

    await wait_for(ok, timeout=30)


async def create(http: httpx.AsyncClient, name: str, agents: dict[str, DrainAgent],
                 **kw: Any) -> httpx.Response:
    r = await http.post("/v1/instances", json={"name": name, "command": ["sleep", "60"],
                                               "cpus": 0.5, **kw})
    if r.status_code == 201:
        await running(http, name)
    return r


def one_copy_each(agents: dict[str, DrainAgent], views: dict[str, dict[str, Any]],
                  standbys: dict[str, set[tuple[str, str]]] | None = None) -> None:
    """Each instance runs exactly where the server says, once, with its disk there only; no
    slot is left but the standbys'."""
    for name, v in views.items():
        holders = [a.name for a in agents.values() if name in a.instances]
        assert holders == [v["host"]], (name, holders, v["host"])
        assert agents[v["host"]].instances[name].state == "running"
        assert [a.name for a in agents.values() if name in a.disks] == [v["host"]]
    assert {a.name: a.slots for a in agents.values() if a.slots} == (standbys or {})


async def test_a_drained_host_ends_empty_and_takes_nothing_new_until_undrained(
        h: Harness) -> None:
    ag = await agents(h, "h1", "h2", "h3")
    http = h.http
    for n in ("a", "b", "c"):
        assert (await create(http, n, ag, host="h1")).status_code == 201
        ag["h1"].disks.add(n)
    assert (await create(http, "d", ag, host="h2")).status_code == 201
    ag["h2"].disks.add("d")
    r = await http.post("/v1/instances/d/standby", json={"host": "h1", "every_seconds": 3600})
    assert r.status_code in (200, 201, 202), r.text
    assert (await finished(http, r.json()["id"]))["state"] == "succeeded"
    assert ("d", "standby") in ag["h1"].slots
    # a shelved instance whose disk is still kept on h1 (its shelf is in the store)
    assert (await create(http, "x", ag, host="h1")).status_code == 201
    src = h.plane.data_dir / "x-disk"
    src.mkdir()
    (src / "data").write_text("kept")
    assert h.plane.images is not None
    h.plane.images.import_tree("@shelf-x-1", src)
    db = sa.create_engine(h.plane.settings.db_url or f"sqlite:///{h.plane.data_dir}/corral.db")
    with db.begin() as conn:
        conn.execute(sa.text("UPDATE instances SET state = 'shelved', desired_state = "
                             "'shelved', host = NULL, disk_host = 'h1', "
                             "shelf = '@shelf-x-1' WHERE name = 'x'"))
    del ag["h1"].instances["x"]
    ag["h1"].disks.add("x")

    r = await http.post("/v1/hosts/h1/drain", json={"parallel": 2})
    assert r.status_code == 202, r.text
    op = await finished(http, r.json()["id"])
    assert op["state"] == "succeeded", op
    members = {(m["kind"], m["name"]): m for m in op["result"]["members"]}
    assert set(members) == {("instance", "a"), ("instance", "b"), ("instance", "c"),
                            ("standby", "d"), ("disk", "x")}, members
    assert all(m["state"] == "succeeded" for m in members.values()), members

    views = {n: (await http.get(f"/v1/instances/{n}")).json() for n in "abcd"}
    assert {v["host"] for n, v in views.items() if n != "d"} <= {"h2", "h3"}
    assert all(v["state"] == "running" for v in views.values())
    one_copy_each(ag, views, {"h3": {("d", "standby")}})
    assert ag["h1"].instances == {} and ag["h1"].disks == set()
    sbs = (await http.get("/v1/standbys")).json()
    assert [(s["instance"], s["host"]) for s in sbs] == [("d", "h3")]
    with db.connect() as conn:
        kept = conn.execute(sa.text("SELECT disk_host FROM instances WHERE name = 'x'"))
        assert kept.scalar() is None
    host = (await http.get("/v1/hosts/h1")).json()
    assert host["draining"] is True and host["instances"] == 0
    r = await http.delete("/v1/hosts/h1")  # empty, but its agent still runs
    assert r.status_code == 409 and "is up" in r.text and "holds" not in r.text, r.text

    # nothing new on h1: neither the scheduler's pick nor a pin
    for i in range(3):
        r = await create(http, f"new{i}", ag)
        assert r.status_code == 201 and r.json()["host"] != "h1", r.text
    r = await create(http, "pinned", ag, host="h1")
    assert r.status_code == 409, r.text
    assert "draining" in r.text
    r = await http.post("/v1/instances/new0/migrate", json={"to": "h1"})
    assert r.status_code == 409 and "draining" in r.text, r.text
    r = await http.post("/v1/instances/new0/standby", json={"host": "h1"})
    assert r.status_code == 422 and "draining" in r.text, r.text

    r = await http.post("/v1/hosts/h1/undrain")
    assert r.status_code == 200 and r.json()["was_draining"] is True, r.text
    assert (await http.get("/v1/hosts/h1")).json()["draining"] is False
    r = await create(http, "pinned", ag, host="h1")
    assert r.status_code == 201, r.text
    db.dispose()


async def ops_count(http: httpx.AsyncClient) -> int:
    return len((await http.get("/v1/ops")).json())


async def test_bad_drains_are_refused_before_anything_is_recorded(h: Harness) -> None:
    ag = await agents(h, "h1", "h2", cores=2)
    http = h.http
    assert (await create(http, "big", ag, host="h1", cpus=1.5)).status_code == 201
    assert (await create(http, "other", ag, host="h2", cpus=1.0)).status_code == 201
    before = await ops_count(http)

    r = await http.post("/v1/hosts/nosuch/drain", json={})
    assert r.status_code == 404, r.text
    assert "no host named nosuch" in r.json()["error"]["message"]
    assert "corral host ls" in r.json()["error"]["hint"]

    r = await http.post("/v1/hosts/h1/drain", json={})  # 1.5 cpus do not fit in h2's 1
    assert r.status_code == 409 and r.json()["error"]["code"] == "no_capacity", r.text
    err = r.json()["error"]
    assert "cannot drain h1" in err["message"] and "'big'" in err["message"], err
    assert "add a host" in err["hint"]
    assert (await http.get("/v1/hosts/h1")).json()["draining"] is False
    assert await ops_count(http) == before

    # a drain in flight (held by a drill): a second one is refused, naming the first
    await agents(h, "h3", cores=4)
    drill = h.plane.data_dir / "drills" / "drain.run.before"
    drill.parent.mkdir(exist_ok=True)
    drill.write_text("")
    try:
        r = await http.post("/v1/hosts/h1/drain", json={})
        assert r.status_code == 202, r.text
        first = r.json()["id"]
        await wait_for(lambda: _exists(drill.with_name(drill.name + ".reached")), timeout=30)
        r = await http.post("/v1/hosts/h1/drain", json={})
        assert r.status_code == 409, r.text
        assert "already draining" in r.json()["error"]["message"] and first in r.text
        assert await ops_count(http) == before + 1
    finally:
        drill.unlink(missing_ok=True)
    op = await finished(http, first)
    assert op["state"] == "succeeded", op
    assert (await http.get("/v1/instances/big")).json()["host"] == "h3"

    # host rm: refused while up, and while it holds something
    r = await http.delete("/v1/hosts/h2")
    assert r.status_code == 409, r.text
    err = r.json()["error"]
    assert "is up" in err["message"] and "instances: other" in err["message"], err
    assert "corral host drain h2" in err["hint"] and "down" in err["hint"], err
    r = await http.post("/v1/hosts/h2/drain", json={"deadline_seconds": 0.001})
    assert r.status_code == 202, r.text
    op = await finished(http, r.json()["id"])
    assert op["state"] != "succeeded" and "deadline" in op["error"]["message"], op
    assert "other" in op["error"]["message"]
    assert (await http.get("/v1/instances/other")).json()["state"] == "running"


async def _exists(p: Path) -> bool:
    return p.exists()


# -- a server process killed with -9 mid-drain ------------------------------------------------
class Server(ServerProc):
    def __init__(self, data: Path) -> None:
        super().__init__(data)
        self.port = free_port("127.0.0.1")
        self.nats_port = free_port("127.0.0.1")

    def env(self) -> dict[str, str]:
        return {"CORRAL_DATA_DIR": str(self.data), "CORRAL_TOKEN": TOKEN,
                "CORRAL_API_PORT": str(self.port), "CORRAL_NATS_PORT": str(self.nats_port),
                "CORRAL_TLS": "off", "CORRAL_LEASE_SECONDS": "30",
                "CORRAL_HEARTBEAT_SECONDS": "1"}

    def start(self) -> None:
        super().start()
        self.wait_ready()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    s = Server(tmp_path / "server")
    try:
        s.start()
        yield s
    finally:
        s.stop()


async def test_a_server_killed_mid_drain_resumes_it(server: Server) -> None:
    nc = await connect(server.nats, identity.admin(TOKEN), "fake-agents",
                       reconnect_time_wait=0.1, max_reconnect_attempts=-1)
    ag = {n: DrainAgent(nc, n, cores=4, memory=8 * GiB) for n in ("h1", "h2", "h3")}
    beats: Heartbeats | None = None
    try:
        for a in ag.values():
            await a.start()
        beats = Heartbeats(list(ag.values()), 1.0)
        async with httpx.AsyncClient(base_url=server.api, timeout=30, headers={
                "Authorization": f"Bearer {TOKEN}"}) as http:
            for n in ("a", "b", "c"):
                assert (await create(http, n, ag, host="h1")).status_code == 201
                ag["h1"].disks.add(n)
            # hold the members' migrations half-way, kill the server there
            drill = server.data / "drills" / "migrate.freeze-copy.before"
            drill.parent.mkdir(exist_ok=True)
            drill.write_text("")
            reached = drill.with_name(drill.name + ".reached")
            r = await http.post("/v1/hosts/h1/drain", json={"parallel": 2})
            assert r.status_code == 202, r.text
            drain_id = r.json()["id"]
            await wait_for(lambda: _exists(reached), timeout=30)
            await asyncio.to_thread(server.kill)
            drill.unlink()
            reached.unlink()
            await asyncio.to_thread(server.start)
            op = await finished(http, drain_id, timeout=120)
            assert op["state"] == "succeeded", op
            views = {n: (await http.get(f"/v1/instances/{n}")).json() for n in "abc"}
            assert {v["host"] for v in views.values()} <= {"h2", "h3"}, views
            await running(http, *views)
            one_copy_each(ag, views)
            assert (await http.get("/v1/hosts/h1")).json()["draining"] is True
            # every member migration ended, and none is left unfinished
            ops = (await http.get("/v1/ops")).json()
            assert all(o["finished"] for o in ops), [o for o in ops if not o["finished"]]
            rolled = [o for o in ops if o["kind"] == "migrate" and o["state"] == "rolled_back"]
            assert rolled, "the kill interrupted no migration"
    finally:
        if beats is not None:
            await beats.stop()
        await nc.close()


async def test_an_undrain_stops_a_drain_and_leaves_everything_running(h: Harness) -> None:
    ag = await agents(h, "h1", "h2")
    http = h.http
    for n in ("a", "b"):
        assert (await create(http, n, ag, host="h1")).status_code == 201
        ag["h1"].disks.add(n)
    drill = h.plane.data_dir / "drills" / "drain.run.before"
    drill.parent.mkdir(exist_ok=True)
    drill.write_text("")
    try:
        r = await http.post("/v1/hosts/h1/drain", json={})
        assert r.status_code == 202, r.text
        await wait_for(lambda: _exists(drill.with_name(drill.name + ".reached")), timeout=30)
        assert (await http.get("/v1/hosts/h1")).json()["draining"] is True
        r2 = await http.post("/v1/hosts/h1/undrain")
        assert r2.status_code == 200 and r2.json()["was_draining"] is True, r2.text
    finally:
        drill.unlink(missing_ok=True)
    op = await finished(http, r.json()["id"])
    assert op["state"] != "succeeded" and "undrained" in op["error"]["message"], op
    for n in ("a", "b"):
        v = (await http.get(f"/v1/instances/{n}")).json()
        assert (v["host"], v["state"]) == ("h1", "running"), v
    one_copy_each(ag, {n: (await http.get(f"/v1/instances/{n}")).json() for n in "ab"})
    assert (await http.get("/v1/hosts/h1")).json()["draining"] is False
