"""Hostile names and paths over the API (issue 10, item 4): instance, host, image and token
names and host paths that are very long, unicode, ``..``, or carry a NUL, a newline or a '/'
are refused with a clear 4xx (a code, a message, a hint) every time, and nothing is written:
every table of the database and the image store read exactly as before. A real control plane
(uvicorn, SQLite, embedded nats-server) with one host row and one instance row."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from sqlalchemy import MetaData, select

from corral.config import Settings
from corral.control.db import Host, Instance
from corral.control.server import ControlPlane

TOKEN = "fleet-token-for-hostile-names"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

#: names no kind of name may be (each also fails as a host, image and token name)
LOOKALIKE = "w\u0435b"  # "web" with a Cyrillic small ie (U+0435) for the 'e'
HOSTILE = ["a" * 300, "ünïcödé", LOOKALIKE,
           "..", "../etc", "a/../b", "a\x00b", "a\nb", "a\rb", "a b", "-x", ".hidden",
           "a/b", "%2e%2e", "a\tb", ""]
#: host paths (rootfs) no create may take
HOSTILE_PATHS = ["/srv/../etc", "relative/root", "/srv/a\nb", "/srv/a\x00b",
                 "/" + "a" * 5000, "/srv/\x1b[31mred"]
EMPTY_MANIFEST = json.dumps({"version": 1, "entries": []}).encode()


@pytest.fixture
async def plane(tmp_path: Path) -> AsyncIterator[ControlPlane]:
    p = ControlPlane(Settings(data_dir=tmp_path, token=TOKEN, api_port=0, lease_seconds=3600.0,
                              heartbeat_seconds=1.0))
    await p.start()
    assert p.fleet is not None
    now = time.time()
    with p.fleet.sessions.begin() as s:  # a host and an instance the requests could touch
        s.add(Host(name="host1", address="127.0.0.1", cores=2, memory_bytes=1 << 32,
                   disk_bytes=1 << 34, drivers={"process": {}}, state="up",
                   agent_version="test", joined_at=now, last_heartbeat=now,
                   lease_expires_at=now + 3600))
        s.add(Instance(name="web", host="host1", driver="process", command=["sleep", "9"],
                       cpus=0.1, memory_bytes=1 << 26, desired_state="stopped",
                       state="stopped", epoch=1, created_at=now, updated_at=now))
    try:
        yield p
    finally:
        await p.stop()


#: tables a refusal may not touch but time does: the schema's version, and the leader's lease
#: and servers' rows, renewed by every poll (control/leader.py)
SKIPPED = {"alembic_version", "leadership", "servers"}


def snapshot(plane: ControlPlane) -> dict[str, Any]:
    """Every row of every table, the image store's names, and the files of the data dir
    that a request could have made (the database, its journal and the bus's own files
    aside)."""
    assert plane.fleet is not None and plane.images is not None
    engine = plane.fleet.sessions.kw["bind"]
    meta = MetaData()
    meta.reflect(engine)
    with engine.connect() as conn:
        tables = {name: sorted(map(repr, conn.execute(select(t)).all()))
                  for name, t in sorted(meta.tables.items()) if name not in SKIPPED}
    data = Path(plane.settings.data_dir)
    files = sorted(str(p.relative_to(data)) for p in data.rglob("*")
                   if not p.name.startswith("corral.db") and "nats" not in p.parts
                   and p.name != "lock.mdb")
    return {"tables": tables, "images": plane.images.names(shelves=True), "files": files}


def clear(r: httpx.Response, what: str) -> None:
    assert 400 <= r.status_code < 500, (what, r.status_code, r.text)
    err = r.json()["error"]
    assert err["code"] and err["message"] and err["hint"], (what, err)


async def test_hostile_names_and_paths_are_refused_and_nothing_is_written(
        plane: ControlPlane) -> None:
    before = snapshot(plane)
    base = {"command": ["sleep", "9"], "cpus": 0.1, "start": False}
    async with httpx.AsyncClient(base_url=plane.api_url, headers=AUTH, timeout=30) as c:
        for bad in HOSTILE:
            shown = repr(bad[:20])
            clear(await c.post("/v1/instances", json={**base, "name": bad}), f"name {shown}")
            for field in ("host", "image"):
                clear(await c.post("/v1/instances", json={**base, "name": "ok", field: bad}),
                      f"{field} {shown}")
            for verb in ("recreate", "migrate", "unshelve"):
                clear(await c.post(f"/v1/instances/web/{verb}", json={"to": bad}),
                      f"{verb} to {shown}")
            clear(await c.post("/v1/instances/web/standby", json={"host": bad}),
                  f"standby host {shown}")
            clear(await c.post("/v1/unshelve", json={"names": [bad]}), f"unshelve {shown}")
            clear(await c.post("/v1/tokens", json={"name": bad, "role": "admin"}),
                  f"token {shown}")
            if bad not in ("", ".."):  # an empty or '..' segment is another route
                seg = quote(bad, safe="")  # sent as it is: a NUL, a '/', a newline in it
                for method, path in (("GET", f"/v1/instances/{seg}"),
                                     ("POST", f"/v1/instances/{seg}/stop"),
                                     ("POST", f"/v1/instances/{seg}/shelve"),
                                     ("POST", f"/v1/instances/{seg}/standby"),
                                     ("DELETE", f"/v1/instances/{seg}"),
                                     ("DELETE", f"/v1/images/{seg}"),
                                     ("DELETE", f"/v1/tokens/{seg}"),
                                     ("GET", f"/v1/hosts/{seg}")):
                    clear(await c.request(method, path, json={} if method == "POST" else None),
                          f"{method} {path[:40]!r}")
                clear(await c.put(f"/v1/images/{seg}", content=EMPTY_MANIFEST),
                      f"PUT image {shown}")
        for path in HOSTILE_PATHS:
            clear(await c.post("/v1/instances", json={**base, "name": "ok", "rootfs": path,
                                                      "driver": "runc"}), f"rootfs {path[:30]!r}")
        for tail in ("logs/../../etc/shadow", "a\nb", "a\x00b", "x" * 5000):
            clear(await c.post("/v1/instances", json={**base, "name": "ok",
                                                      "tail": {"access": tail}}),
                  f"tail {tail[:20]!r}")
        for env in ({"A=B": "1"}, {"A\x00": "1"}, {"": "1"}, {"A": "x\x00y"}):
            clear(await c.post("/v1/instances", json={**base, "name": "ok", "env": env}),
                  f"env {env!r}")
        clear(await c.post("/v1/instances", json={**base, "name": "ok",
                                                  "command": ["sh", "-c", "a\x00b"]}), "argv")
        # what a create echoes of a refused value stays short
        r = await c.post("/v1/instances", json={**base, "name": "n" * 60_000})
        clear(r, "a 60 kB name")
        assert len(r.content) < 2000
    assert snapshot(plane) == before


async def test_a_good_name_still_works_next_to_the_refusals(plane: ControlPlane) -> None:
    """The patterns refuse only what could never be valid: ordinary names pass."""
    async with httpx.AsyncClient(base_url=plane.api_url, headers=AUTH, timeout=30) as c:
        r = await c.put("/v1/images/base-1.2:latest", content=EMPTY_MANIFEST)
        assert r.status_code == 200, r.text
        r = await c.post("/v1/tokens", json={"name": "Host_1.ci-deploy", "role": "read-only"})
        assert r.status_code == 201, r.text
        assert (await c.get("/v1/instances/web")).status_code == 200


async def test_a_join_with_a_hostile_host_name_writes_nothing(plane: ControlPlane) -> None:
    """Over the bus: a join (and a heartbeat) naming a host no API could have made, sent by a
    client the bus lets publish anything (a tool with the admin token), is dropped: no host
    row, no lease. A subject cannot carry '.', a blank or a newline, so those never arrive."""
    from corral.bus import codec, identity, subjects
    from corral.bus.connect import connect
    from corral.bus.messages import Capacity, Heartbeat, JoinRequest

    before = snapshot(plane)
    nc = await connect(plane.nats_url, identity.admin(TOKEN), "hostile-tool")
    try:
        for bad in ("ünïcödé", "a" * 300, LOOKALIKE, "-x"):
            join = JoinRequest.model_construct(  # as a hostile sender would, unchecked
                host=bad, address="127.0.0.1", agent_version="x", instances=[], data_port=0,
                capacity=Capacity(cores=1, memory_bytes=1, disk_bytes=1), disk_backend="dir",
                drivers={"process": {}})
            hb = Heartbeat.model_construct(host=bad, seq=1, sent_at=time.time(), instances=[])
            for subject, msg in ((subjects.join(bad), join), (subjects.heartbeat(bad), hb)):
                try:
                    reply = await nc.request(subject, codec.encode(msg), timeout=1)
                except Exception:  # no answer: dropped
                    continue
                assert b'"ok":false' in reply.data.replace(b" ", b"") or b"known" in reply.data
    finally:
        await nc.close()
    assert snapshot(plane) == before
