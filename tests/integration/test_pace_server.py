"""A real control plane fits its fleet's heartbeat pace to the fleet's size: past
``max_heartbeats_per_second`` its heartbeat answers ask for a longer period and lease, the
longer lease is in the database before any answer grants it, and ``GET /v1/status`` says it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from test_api import Harness, settings_for, start_harness, wait_for

from corral.control.db import LeaderLease


@pytest.fixture
async def small_budget(tmp_path: Path) -> AsyncIterator[Harness]:
    # three hosts at one heartbeat a second each is three a second: twice the budget of 1.5
    settings = settings_for(tmp_path, max_heartbeats_per_second=1.5, heartbeat_seconds=1.0,
                            lease_seconds=30.0)
    async for harness in start_harness(settings):
        yield harness


async def test_a_fleet_past_the_budget_is_asked_to_beat_less_often(
        small_budget: Harness) -> None:
    h = small_budget
    agents = [await h.agent(f"p{i}") for i in range(3)]
    first = await agents[0].heartbeat()
    assert first.heartbeat_seconds in (0.0, 1.0)  # not yet looked at the fleet's size

    async def stretched() -> bool:
        reply = await agents[1].heartbeat()
        return reply.heartbeat_seconds == pytest.approx(2.0)

    await wait_for(stretched, timeout=20)  # the leader looks every 5 s
    reply = await agents[2].heartbeat()
    assert (reply.heartbeat_seconds, reply.lease_seconds, reply.sample_seconds) == (
        pytest.approx(2.0), pytest.approx(60.0), pytest.approx(2.0))
    assert h.plane.fleet is not None
    with h.plane.fleet.sessions() as s:
        row = s.get(LeaderLease, 1)
        assert row is not None and row.lease_ceiling == pytest.approx(60.0)
    status = (await h.http.get("/v1/status")).json()
    assert (status["heartbeat_seconds"], status["lease_seconds"]) == (
        pytest.approx(2.0), pytest.approx(60.0))
