"""Refused operations over HTTP (issue 15, item 7): the request itself answers with the error
(4xx, its code, message and hint), no operation is recorded, no agent is called, and the
instance and its standby read exactly as before. A real control plane with fake agents."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from test_api import Harness, settings_for, start_harness

from corral.control.db import Standby


@pytest.fixture
async def h(tmp_path: Path) -> AsyncIterator[Harness]:
    async for harness in start_harness(settings_for(tmp_path)):
        yield harness


async def record(h: Harness, name: str) -> dict[str, Any]:
    inst = (await h.http.get(f"/v1/instances/{name}")).json()
    standbys = [s for s in (await h.http.get("/v1/standbys")).json() if s["instance"] == name]
    return {"instance": inst, "standby": standbys}


async def refused(h: Harness, path: str, body: dict[str, Any], status: int, code: str,
                  says: str) -> None:
    name = path.split("/")[3]
    before = await record(h, name)
    calls = {n: len(a.calls) for n, a in h.agents.items()}
    r = await h.http.post(path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and says in err["message"] and err["hint"], err
    assert await record(h, name) == before
    assert (await h.http.get("/v1/ops", params={"target": name})).json() == []
    assert {n: len(a.calls) for n, a in h.agents.items()} == calls


async def test_refused_operations_answer_the_error_and_leave_no_trace(h: Harness) -> None:
    await h.agent("h1")
    await h.agent("h2")
    assert (await h.create("w", host="h1")).status_code == 201
    assert h.plane.fleet is not None
    # a standby, never synced (fake agents move no disks, so it is written directly), and not
    # due a refresh for an hour (the refresh loop keeps off it)
    with h.plane.fleet.sessions.begin() as s:
        s.add(Standby(instance="w", host="h2", every_seconds=3600.0, state="new",
                      last_sync_at=time.time(), total_bytes=0, syncs=0, last_error=""))
    # the scenario: unshelve of a running instance with a standby
    await refused(h, "/v1/instances/w/unshelve", {}, 409, "invalid_transition",
                  "cannot unshelve instance 'w': it is running")
    await refused(h, "/v1/instances/w/recreate", {"to": "h9"}, 404, "not_found",
                  "no host named 'h9'")
    await refused(h, "/v1/instances/w/migrate", {"to": "h1"}, 422, "invalid_request",
                  "already runs on h1")
    await refused(h, "/v1/instances/w/shelve", {}, 409, "conflict", "has a warm standby")
    await refused(h, "/v1/instances/w/standby/promote", {}, 409, "conflict", "never synced")
    assert (await h.http.post("/v1/instances/w/freeze", json={})).status_code == 200
    await refused(h, "/v1/instances/w/standby/sync", {}, 409, "conflict",
                  "cannot sync instance 'w': it is frozen")
    await refused(h, "/v1/instances/w/recreate", {}, 409, "conflict",
                  "cannot recreate instance 'w': it is frozen")
    # and nothing holds it: the next verb works
    assert (await h.http.post("/v1/instances/w/thaw", json={})).status_code == 200
