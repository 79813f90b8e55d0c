"""The control plane's operation engine over HTTP, with fake agents on a real bus: recreate's
steps and agent calls, rollback after a failed step, refusals, and resume after a restart."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from test_api import Harness, settings_for, start_harness, wait_for

from corral.errors import DriverError
from corral.ops.store import OperationStore, OpRecord, OpState, StepRecord, StepState

STEPS = ["plan", "stop", "delete", "create", "start"]


@pytest.fixture
async def h(tmp_path: Path) -> AsyncIterator[Harness]:
    async for harness in start_harness(settings_for(tmp_path)):
        yield harness


async def finished(h: Harness, op_id: str) -> dict[str, Any]:
    out: dict[str, Any] = {}

    async def done() -> bool:
        out.update((await h.http.get(f"/v1/ops/{op_id}")).json())
        return bool(out["finished"])

    await wait_for(done)
    return out


async def running_on_h1(h: Harness) -> None:
    await h.agent("h1")
    await h.agent("h2")
    r = await h.create("web", host="h1")
    assert r.status_code == 201, r.text


async def test_recreate_moves_with_new_epoch_and_records_steps(h: Harness) -> None:
    await running_on_h1(h)
    r = await h.http.post("/v1/instances/web/recreate", json={"to": "h2"})
    assert r.status_code == 202, r.text
    assert [s["name"] for s in r.json()["steps"]] == STEPS
    op = await finished(h, r.json()["id"])
    assert op["state"] == "succeeded", op
    assert [s["state"] for s in op["steps"]] == ["done"] * 5
    h1 = [(c.verb, c.args.get("epoch")) for c in h.agents["h1"].calls]
    h2 = [(c.verb, c.args.get("epoch", c.args.get("spec", {}).get("epoch")))
          for c in h.agents["h2"].calls]
    assert h1[-2:] == [("stop", None), ("delete", None)]
    assert h2 == [("create", 1), ("start", 2)]  # created at the current epoch, started anew
    view = (await h.http.get("/v1/instances/web")).json()
    assert (view["host"], view["state"], view["epoch"]) == ("h2", "running", 2)
    listed = (await h.http.get("/v1/ops", params={"target": "web"})).json()
    assert [o["id"] for o in listed] == [op["id"]]
    assert (await h.http.get("/v1/ops", params={"target": "other"})).json() == []
    # the instance is no longer busy: verbs work again
    assert (await h.http.post("/v1/instances/web/stop", json={})).status_code == 200


async def test_failed_start_on_target_rolls_back_to_the_source(h: Harness) -> None:
    await running_on_h1(h)
    h.agents["h2"].fail["start"] = DriverError("no cgroup for you")
    r = await h.http.post("/v1/instances/web/recreate", json={"to": "h2"})
    op = await finished(h, r.json()["id"])
    assert op["state"] == "rolled_back", op
    assert op["error"]["step"] == "start" and "no cgroup for you" in op["error"]["message"]
    assert [s["state"] for s in op["steps"]] == ["undone"] * 5
    assert "web" not in h.agents["h2"].instances  # undo of create deleted it there
    assert h.agents["h1"].instances["web"].state == "running"
    view = (await h.http.get("/v1/instances/web")).json()
    assert (view["host"], view["state"]) == ("h1", "running")


async def test_refusals(h: Harness) -> None:
    r = await h.http.get("/v1/ops/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = await h.http.post("/v1/instances/nope/recreate", json={})
    assert r.status_code == 404
    await running_on_h1(h)
    r = await h.http.post("/v1/instances/web/recreate", json={"to": "h9"})
    assert r.status_code == 404 and "no host named 'h9'" in r.json()["error"]["message"]
    assert (await h.http.get("/v1/ops", params={"target": "web"})).json() == []  # not recorded
    assert [c.verb for c in h.agents["h1"].calls] == ["create", "start"]  # untouched
    spec = (await h.http.get("/openapi.json")).json()
    assert {"/v1/ops", "/v1/ops/{op_id}", "/v1/instances/{name}/recreate"} <= set(spec["paths"])


async def test_unfinished_operation_is_rolled_back_after_a_restart(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    async for h in start_harness(settings):  # migrates, then stops
        await h.http.get("/v1/ops")
    db = sa.create_engine(f"sqlite:///{tmp_path / 'corral.db'}")
    rec = OpRecord(kind="recreate", target="gone", params={"to": None},
                   data={"source": "h1", "target": "h1", "was_running": False, "spec": {}})
    rec.steps = [StepRecord(n) for n in STEPS]
    rec.steps[0].state, rec.steps[1].state = StepState.DONE, StepState.RUNNING
    OperationStore(db).save(rec)
    db.dispose()
    async for h in start_harness(settings):
        op = await finished(h, rec.id)
        assert op["state"] == OpState.ROLLED_BACK.value
        assert "interrupted" in op["error"]["message"] and op["error"]["step"] == "stop"
        assert h.plane.fleet is not None and "gone" not in h.plane.fleet.locks.instances
