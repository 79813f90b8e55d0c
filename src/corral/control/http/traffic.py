"""Live traffic on the server: the ``corral.logs.*`` feed, ``GET /v1/instances/{name}/traffic``
and the traffic series of ``/metrics``.

The server listens with a plain subscription (it sees every batch agents publish to JetStream,
without a consumer to manage): the view is live, so after a server restart it starts empty
rather than replaying the stream.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import APIRouter, Query
from nats.aio.msg import Msg
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic import ValidationError

from corral.api.models import TrafficView
from corral.bus import subjects
from corral.bus.messages import LogBatch
from corral.control.instances import InstanceService
from corral.telemetry.traffic import CLASSES, Traffic

log = logging.getLogger(__name__)


async def subscribe(nc: Any, traffic: Traffic) -> Any:
    """Feed ``traffic`` from every log batch; returns the subscription."""

    async def on_batch(msg: Msg) -> None:
        try:
            batch = LogBatch.model_validate_json(msg.data)
        except ValidationError:
            log.warning("bad log batch on %s", msg.subject)
            return
        try:
            host, instance = subjects.logs_origin(msg.subject)
        except ValueError:
            return
        if (batch.host, batch.instance) != (host, instance):
            return  # a batch must travel under its own host and instance (the bus checks hosts)
        try:
            traffic.feed(batch)
        except Exception:
            log.exception("feeding traffic of %s failed", batch.instance)

    return await nc.subscribe(subjects.LOGS_ALL, cb=on_batch)


def router(traffic: Traffic, service: InstanceService, auth: list[Any]) -> APIRouter:
    r = APIRouter(tags=["instances"])

    @r.get("/v1/instances/{name}/traffic", dependencies=auth)
    async def instance_traffic(
        name: str,
        url: Annotated[str | None, Query(description="also list this URL's clients")] = None,
        limit: Annotated[int, Query(ge=1, le=10_000, description="at most this many "
                                                                 "clients")] = 30,
    ) -> TrafficView:
        service.get(name)  # 404 for an instance that does not exist
        return traffic.view(name, url, limit)

    return r


class TrafficCollector(Collector):
    """Hits/s and status-class rates per window, and online clients, per instance."""

    def __init__(self, traffic: Traffic) -> None:
        self.traffic = traffic

    def collect(self) -> Iterator[Metric]:
        now = time.time()
        hits = GaugeMetricFamily("corral_instance_http_requests_per_second",
                                 "requests per second in the access log over a sliding window",
                                 labels=["instance", "window"])
        codes = GaugeMetricFamily("corral_instance_http_status_per_second",
                                  "responses per second by status class over a sliding window",
                                  labels=["instance", "window", "class"])
        online = GaugeMetricFamily("corral_instance_online_clients",
                                   "clients seen within the online window", labels=["instance"])
        bad = CounterMetricFamily("corral_instance_access_log_bad_lines",
                                  "access-log lines that could not be parsed",
                                  labels=["instance"])
        for name, t in sorted(self.traffic.instances.items()):
            t.online.advance(now)
            online.add_metric([name], float(t.online.count()))
            bad.add_metric([name], float(t.reader.bad))
            for rv in t.rate_views(now):
                window = f"{rv.seconds}s"
                hits.add_metric([name, window], rv.hits_per_s)
                for cls in CLASSES:
                    codes.add_metric([name, window, cls], rv.class_per_s.get(cls, 0.0))
        yield from (hits, codes, online, bad)
