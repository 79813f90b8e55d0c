"""Metric history over HTTP: ``GET /v1/instances/{name}/metrics`` and
``GET /v1/hosts/{name}/metrics`` (:mod:`corral.control.history`).

Reads only, so any server answers from the shared database (a follower too) and a read-only
token may ask. ``since`` and ``until`` take what ``--since`` takes everywhere (unix seconds, a
duration back from now such as ``2h``, or an ISO time); ``since`` defaults to an hour ago. The
answer's ``step_seconds`` says which tier answered, widened when the range holds more buckets
than one answer may carry.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Annotated, Any

from fastapi import APIRouter, Query

from corral.api.models import MetricSeries
from corral.api.timespec import HINT, parse_since
from corral.control.db import Host
from corral.control.fleet import Fleet
from corral.control.history import HOST, INSTANCE, MetricHistory
from corral.control.instances import InstanceService
from corral.errors import InvalidRequest, NotFound

#: ``since`` when none is given: the last hour
DEFAULT_SPAN = 3600.0
#: times are clamped to [0, this] (year 5138): what the database's integers and a bucket's
#: arithmetic take
LATEST = 1e11

SINCE = Query(description="start of the range: unix seconds, a duration back from now (30m, "
                          "2h, 7d) or an ISO time; default an hour ago")
UNTIL = Query(description="end of the range, in the same forms; default now")


def time_range(since: str | None, until: str | None, now: float) -> tuple[float, float]:
    """``(since, until)`` in unix seconds; a range that ends before it starts is refused."""
    start = now - DEFAULT_SPAN if since is None else parse_since(since, now)
    end = now if until is None else parse_since(until, now)
    for given, value in (("since", start), ("until", end)):
        if not math.isfinite(value):
            raise InvalidRequest(f"{given} is not a finite time", hint=HINT)
    start, end = (min(LATEST, max(0.0, v)) for v in (start, end))
    if end < start:
        raise InvalidRequest(f"until ({end:.0f}) is before since ({start:.0f})",
                             hint="give a since earlier than until, or leave until out (now)")
    return start, end


def router(history: MetricHistory, service: InstanceService, fleet: Fleet,
           auth: list[Any]) -> APIRouter:
    r = APIRouter(tags=["metrics"])

    @r.get("/v1/instances/{name}/metrics", dependencies=auth)
    async def instance_metrics(name: str, since: Annotated[str | None, SINCE] = None,
                               until: Annotated[str | None, UNTIL] = None) -> MetricSeries:
        """The instance's CPU (% of a core, % of its host: averages per bucket) and memory
        (the most seen per bucket) over the range, oldest first."""
        service.get(name)  # 404 with a hint for an instance that does not exist
        start, end = time_range(since, until, time.time())
        return await asyncio.to_thread(history.series, INSTANCE, name, start, end)

    @r.get("/v1/hosts/{name}/metrics", dependencies=auth)
    async def host_metrics(name: str, since: Annotated[str | None, SINCE] = None,
                           until: Annotated[str | None, UNTIL] = None) -> MetricSeries:
        """The sum of the host's instances, and how busy the whole host was
        (``host_busy_pct``), over the range, oldest first."""
        with fleet.sessions() as s:
            if s.get(Host, name) is None:
                raise NotFound(f"no host named '{name}'", hint="see 'corral host ls'")
        start, end = time_range(since, until, time.time())
        return await asyncio.to_thread(history.series, HOST, name, start, end)

    return r
