"""``GET /v1/events``: the event stream as NDJSON, one :class:`Event` per line.

Reading is an ordered (ephemeral, flow-controlled) JetStream consumer per request, started at
``after`` (an index) or ``since`` (a time). Without ``follow`` the answer ends at the last event
that existed when the request came in; with ``follow`` it goes on until the client leaves.
``follow`` with neither ``since`` nor ``after`` starts with the next new event.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import ConsumerConfig, DeliverPolicy
from pydantic import Field, ValidationError

from corral.api.models import Event
from corral.api.timespec import parse_since
from corral.bus import streams, subjects
from corral.control.events import TYPES, matches
from corral.errors import InvalidRequest

log = logging.getLogger(__name__)

#: without ``follow``, how long to wait for a first event that may not exist (a ``since`` after
#: the newest event): the stream cannot say "nothing after this time" before delivering.
FIRST_WAIT = 0.5
#: the largest ``after``: the stream's indexes are unsigned 64-bit, and ``after + 1`` must be one
MAX_INDEX = 2**63 - 2


async def read(js: Any, *, since: float | None = None, after: int | None = None,
               follow: bool = False) -> AsyncIterator[Event]:
    """Events in index order from ``after``+1 or from time ``since`` (else all, or new ones
    when following)."""
    state = (await js.stream_info(streams.EVENTS)).state
    last = int(state.last_seq)
    if not follow and (state.messages == 0 or (after is not None and after >= last)):
        return
    if after is not None:
        config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                                opt_start_seq=after + 1)
    elif since is not None:
        config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_TIME,
                                opt_start_time=datetime.fromtimestamp(since, UTC))
    elif follow:
        config = ConsumerConfig(deliver_policy=DeliverPolicy.NEW)
    else:
        config = ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
    sub = await js.subscribe(subjects.EVENTS, stream=streams.EVENTS, ordered_consumer=True,
                             config=config)
    try:
        wait: float | None = None if follow else FIRST_WAIT
        while True:
            try:
                msg = await sub.next_msg(timeout=wait)
            except NatsTimeout:
                if follow:
                    continue
                return
            seq = int(msg.metadata.sequence.stream)
            if not follow and seq > last:
                return
            wait = None if follow else 5.0
            try:
                ev = Event.model_validate_json(msg.data)
            except ValidationError:
                log.warning("skipping malformed event at index %d", seq)
                continue
            ev.index = seq
            yield ev
            if not follow and seq >= last:
                return
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


def type_names() -> list[str]:
    """Every registered type and every prefix of one (``instance``, ``instance.state``): what
    ``type=`` takes, listed in the OpenAPI document so a client knows before it asks."""
    names = {".".join(t.split(".")[:n]) for t in TYPES for n in range(1, t.count(".") + 2)}
    return sorted(names)


EventTypeName = Annotated[str, Field(json_schema_extra={"enum": type_names()})]


def router(js: Any, auth: list[Any]) -> APIRouter:
    r = APIRouter(tags=["events"])

    @r.get("/v1/events", dependencies=auth, response_class=StreamingResponse,
           responses={200: {"content": {"application/x-ndjson": {}},
                            "description": "one Event (JSON) per line, in index order"}})
    async def events(
        since: Annotated[str | None, Query(description="30s, 10m, 2h, 1d, ISO time or unix "
                                                       "seconds")] = None,
        after: Annotated[int | None, Query(ge=0, le=MAX_INDEX,
                                           description="only events with a larger index")
                         ] = None,
        follow: bool = False,
        type: Annotated[list[EventTypeName] | None,
                        Query(description="event type or prefix (repeatable)")] = None,
        instance: str | None = None,
    ) -> StreamingResponse:
        types = list(type or [])
        for t in types:
            if not any(k == t or k.startswith(t + ".") for k in TYPES):
                raise InvalidRequest(f"unknown event type {t!r}",
                                     hint=f"registered types: {', '.join(sorted(TYPES))}")
        start = parse_since(since) if since else None
        stream = read(js, since=start, after=after, follow=follow)

        async def body() -> AsyncIterator[str]:
            async for ev in stream:
                if matches(ev, types, instance):
                    yield ev.model_dump_json() + "\n"

        return StreamingResponse(body(), media_type="application/x-ndjson")

    return r
