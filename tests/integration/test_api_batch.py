"""``POST /v1/instances/batch``: many creates placed together, each ending as a single create
would (running, created, failed or not kept) and saying so, in the order asked; one failure
does not stop the others, and a batch that names an instance twice does nothing at all."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from test_api import GiB, Harness, settings_for, start_harness

from corral.api.models import MAX_BATCH_CREATE
from corral.errors import DriverError, HostUnavailable


@pytest.fixture
async def h(tmp_path: Path) -> AsyncIterator[Harness]:
    async for harness in start_harness(settings_for(tmp_path)):
        yield harness


def spec(name: str, **kw: Any) -> dict[str, Any]:
    return {"name": name, "command": ["sleep", "60"], "cpus": 0.5, **kw}


async def test_a_batch_places_together_and_each_ends_on_its_own(h: Harness) -> None:
    for name in ("h1", "h2", "h3"):
        await h.agent(name, cores=2, memory=4 * GiB)
    assert (await h.create("old")).status_code == 201  # on h1
    h.agents["h2"].fail["create:refused"] = DriverError("runc: bundle is broken")
    h.agents["h3"].fail["start:nostart"] = DriverError("exec: no such file")
    h.agents["h1"].fail["create:lost"] = HostUnavailable("no answer from h1")
    batch = [spec("a"), spec("b"), spec("c", start=False), spec("old"),
             spec("huge", cpus=64.0), spec("lost", host="h1"), spec("refused", host="h2"),
             spec("nostart", host="h3"), spec("d"), spec("e")]
    r = await h.http.post("/v1/instances/batch", json={"instances": batch})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["name"] for x in results] == [b["name"] for b in batch]
    got = {x["name"]: x for x in results}
    for name in ("a", "b", "d", "e"):
        assert got[name]["status"] == 201 and got[name]["error"] is None
        assert got[name]["instance"]["state"] == "running", got[name]
    assert got["c"]["instance"]["state"] == "created"
    assert got["old"]["status"] == 409 and got["old"]["error"]["code"] == "conflict"
    assert got["huge"]["status"] == 409 and got["huge"]["error"]["code"] == "no_capacity"
    assert got["huge"]["instance"] is None
    # refused by its agent: nothing kept; no answer: kept as failed; start failed: failed
    assert got["refused"]["instance"] is None and "could not create" in \
        got["refused"]["error"]["message"]
    assert got["lost"]["instance"]["state"] == "failed" and got["lost"]["status"] == 503
    assert got["nostart"]["instance"]["state"] == "failed"
    assert "did not start" in got["nostart"]["error"]["message"]

    listed = {i["name"]: i for i in (await h.http.get("/v1/instances")).json()}
    assert set(listed) == {"old", "a", "b", "c", "d", "e", "lost", "nostart"}
    assert all(listed[n]["state"] == got[n]["instance"]["state"] for n in listed if n != "old")
    # placed together, spread as one create after another would: the unpinned ones go to the
    # emptiest hosts first (h1 held "old" and takes "lost", h2 "refused" left nothing there)
    spread = Counter(listed[n]["host"] for n in ("a", "b", "c", "d", "e"))
    assert sorted(spread.values()) == [1, 2, 2], spread
    assert sum(c.verb == "create" for a in h.agents.values() for c in a.calls) == 9
    # a second batch sees the first's reservations: 1.5 cpus free on h1 ... never over 2
    hosts = {x["name"]: x for x in (await h.http.get("/v1/hosts")).json()}
    assert all(x["reserved"]["cpus"] <= 2.0 for x in hosts.values()), hosts


async def test_a_name_twice_or_too_many_does_nothing(h: Harness) -> None:
    await h.agent("h1")
    r = await h.http.post("/v1/instances/batch",
                          json={"instances": [spec("x"), spec("y"), spec("x")]})
    assert r.status_code == 422 and "names x more than once" in r.json()["error"]["message"]
    many = [spec(f"n{i}") for i in range(MAX_BATCH_CREATE + 1)]
    r = await h.http.post("/v1/instances/batch", json={"instances": many})
    assert r.status_code == 422, r.text
    assert (await h.http.get("/v1/instances")).json() == []
    assert h.agents["h1"].calls == []


async def test_a_batch_that_fills_the_fleet_never_overcommits_a_host(h: Harness) -> None:
    await h.agent("h1", cores=2, memory=4 * GiB)
    await h.agent("h2", cores=1, memory=4 * GiB)
    batch = [spec(f"i{i}", cpus=0.5) for i in range(8)]
    results = (await h.http.post("/v1/instances/batch", json={"instances": batch})).json()
    placed = [x for x in results["results"] if x["status"] == 201]
    full = [x for x in results["results"] if x["status"] == 409]
    assert len(placed) == 6 and len(full) == 2  # 3 cpus of room for 0.5 each
    assert all(x["error"]["code"] == "no_capacity" for x in full)
    hosts = {x["name"]: x["reserved"]["cpus"] for x in (await h.http.get("/v1/hosts")).json()}
    assert hosts == {"h1": 2.0, "h2": 1.0}
