"""The HA manager inside a real control plane (uvicorn, SQLite, embedded nats-server) with fake
agents on the real bus: a dead host's instance is failed over to its standby by the real
``failover`` operation; a host that comes back is made to kill and delete its stale copy; VIPs
travel in every spec the server builds."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from test_api import FakeAgent, Harness, settings_for, start_harness, wait_for

from corral.bus.messages import InstanceReport, WireSpec
from corral.control.db import Instance, Standby


class DiskAgent(FakeAgent):
    """A fake agent that also answers the disk calls a failover makes."""

    def _do(self, verb: str, args: dict[str, Any]) -> Any:
        if verb in ("disk_adopt", "disk_demote"):
            return {"path": f"/disks/{args['name']}"}
        if verb in ("disk_discard", "disk_commit"):
            return None
        return super()._do(verb, args)


@pytest.fixture
async def ha(tmp_path: Path) -> AsyncIterator[Harness]:
    settings = settings_for(tmp_path, lease_seconds=1.5, heartbeat_seconds=0.3,
                            failover_grace_seconds=0.5)
    async for harness in start_harness(settings):
        yield harness


@contextlib.asynccontextmanager
async def heartbeating(*agents: FakeAgent) -> AsyncIterator[None]:
    """Keep ``agents`` alive (their leases renewed) for the block."""

    async def beat() -> None:
        while True:
            for a in agents:
                with contextlib.suppress(Exception):
                    await a.heartbeat()
            await asyncio.sleep(0.2)

    task = asyncio.create_task(beat())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_vip_goes_into_the_spec_and_the_view(ha: Harness) -> None:
    agent = await ha.agent("h1")
    r = await ha.create("web", vip="10.99.0.7/24")
    assert r.status_code == 201, r.text
    assert r.json()["vip"] == "10.99.0.7/24"
    spec = WireSpec.model_validate(agent.calls[0].args["spec"])
    assert spec.vip == "10.99.0.7/24"
    bad = await ha.create("bad", vip="10.99.0.700/24")
    assert bad.status_code == 422 and "bad virtual IP" in bad.text


async def test_dead_host_is_failed_over_to_its_standby(ha: Harness) -> None:
    h1 = await ha.agent("h1")
    h2 = DiskAgent(ha.nc, "h2")
    await h2.start()
    ha.agents["h2"] = h2
    async with heartbeating(h1, h2):
        r = await ha.create("web", host="h1", vip="10.99.0.8/24")
        assert r.status_code == 201, r.text
        before = r.json()["epoch"]
        with ha.plane.fleet.sessions.begin() as s:  # type: ignore[union-attr]
            s.add(Standby(instance="web", host="h2", every_seconds=3600.0, state="ready",
                          last_sync_at=time.time(), data_at=time.time()))
    # h1 dies: no more heartbeats, no answers; h2 lives on
    await h1.leave()
    async with heartbeating(h2):
        async def moved() -> bool:
            view = (await ha.http.get("/v1/instances/web")).json()
            return bool(view["host"] == "h2" and view["state"] == "running")

        await wait_for(moved, timeout=20)
        view = (await ha.http.get("/v1/instances/web")).json()
        assert view["epoch"] > before and view["vip"] == "10.99.0.8/24"
        verbs = [c.verb for c in h2.calls]
        assert verbs[:3] == ["disk_adopt", "create", "start"], verbs
        assert WireSpec.model_validate(h2.calls[1].args["spec"]).vip == "10.99.0.8/24"
        with ha.plane.fleet.sessions() as s:  # type: ignore[union-attr]
            assert s.get(Standby, "web") is None  # the copy is the disk now

        # h1 comes back still holding its old copy (say its workload outlived the agent)
        h1.instances["web"] = h1.instances["web"].model_copy(update={"state": "running"})
        h1.calls.clear()
        await h1.start()  # its join reports the copy

        async def cleaned() -> bool:
            return "web" not in h1.instances

        await wait_for(cleaned, timeout=10)
        assert [c.verb for c in h1.calls] == ["kill", "delete"]
        view = (await ha.http.get("/v1/instances/web")).json()
        assert (view["host"], view["state"]) == ("h2", "running")


async def test_no_standby_means_lost_and_nothing_started(ha: Harness) -> None:
    h1 = await ha.agent("h1")
    h2 = await ha.agent("h2")
    async with heartbeating(h1, h2):
        assert (await ha.create("solo", host="h1")).status_code == 201
    await h1.leave()
    async with heartbeating(h2):
        async def lost() -> bool:
            return bool((await ha.http.get("/v1/instances/solo")).json()["state"] == "lost")

        await wait_for(lost, timeout=10)
        await asyncio.sleep(1.5)  # past the grace: the manager has looked at it
        assert h2.calls == []
        with ha.plane.fleet.sessions() as s:  # type: ignore[union-attr]
            inst = s.scalars(select(Instance).where(Instance.name == "solo")).one()
            assert inst.host == "h1"
    ops = (await ha.http.get("/v1/ops")).json()
    assert [o for o in ops if o["target"] == "solo"] == []


async def test_old_epoch_on_its_own_host_is_killed_not_deleted(ha: Harness) -> None:
    h1 = await ha.agent("h1")
    async with heartbeating(h1):
        assert (await ha.create("web", host="h1")).status_code == 201
        with ha.plane.fleet.sessions.begin() as s:  # type: ignore[union-attr]
            inst = s.get(Instance, "web")
            assert inst is not None
            inst.epoch += 5  # the fleet moved on (a start this host never heard of)
        h1.calls.clear()

        async def killed() -> bool:
            return h1.instances["web"].state == "stopped"

        await wait_for(killed, timeout=10)
        assert [c.verb for c in h1.calls] == ["kill"]
        assert isinstance(h1.instances["web"], InstanceReport)
