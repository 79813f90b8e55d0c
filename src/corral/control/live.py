"""The server's event stream and live traffic, started and stopped as one part.

Kept out of :mod:`corral.control.server` so the control plane only has to start this, include
its routers and collectors, and stop it before closing the bus.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter
from prometheus_client.registry import Collector

from corral.api.models import Event
from corral.bus import streams
from corral.config import Settings
from corral.control import events
from corral.control.fleet import Fleet
from corral.control.http import events as events_http
from corral.control.http import traffic as traffic_http
from corral.control.instances import InstanceService
from corral.telemetry.traffic import Traffic


class Live:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.publisher: events.EventPublisher | None = None
        self.traffic = Traffic(online_window_s=settings.traffic_online_seconds)
        self.js: Any = None
        self._sub: Any = None

    async def start(self, nc: Any, fleet: Fleet, service: InstanceService) -> None:
        s = self.settings
        self.js = nc.jetstream()
        await streams.ensure(self.js, streams.events_config(s.events_max_age_seconds,
                                                            s.events_max_msgs))
        await streams.ensure(self.js, streams.logs_config())  # hosts may only publish to it
        pub = self.publisher = events.EventPublisher(self.js)
        pub.listeners.append(self._on_event)
        pub.start()
        events.watch(fleet.sessions, pub, fleet.locks.instances)
        service.on_error = pub.verb_error
        self._sub = await traffic_http.subscribe(nc, self.traffic)

    def _on_event(self, ev: Event) -> None:
        if ev.type == "instance.deleted" and ev.instance:
            self.traffic.forget(ev.instance)

    def routers(self, service: InstanceService) -> list[Callable[[list[Any]], APIRouter]]:
        js = self.js
        return [lambda auth: events_http.router(js, auth),
                lambda auth: traffic_http.router(self.traffic, service, auth)]

    def collectors(self) -> list[Collector]:
        return [traffic_http.TrafficCollector(self.traffic)]

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None
        if self.publisher is not None:
            await self.publisher.stop()
            self.publisher = None
