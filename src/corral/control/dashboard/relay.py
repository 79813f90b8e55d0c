"""Server-sent events for the browser, relayed from the API's NDJSON streams.

Why a relay: ``EventSource`` reconnects by itself and says where it stopped
(``Last-Event-ID``), which maps onto the event stream's ``after=`` index, so a page that lost
its connection misses no event; the API's streams stay NDJSON for every other client.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from corral.control.dashboard.internal import lines, path_of

SSE_HEADERS = {"cache-control": "no-store", "x-accel-buffering": "no"}


async def sse(source: AsyncIterator[bytes | None], with_ids: bool) -> AsyncIterator[bytes]:
    yield b"retry: 2000\n\n"
    async for line in source:
        if line is None:
            yield b": keep-alive\n\n"
            continue
        head = b""
        if with_ids:
            try:
                head = b"id: %d\n" % int(json.loads(line).get("index", 0))
            except (ValueError, AttributeError):
                head = b""
        yield head + b"data: " + line.replace(b"\n", b" ") + b"\n\n"


def router(token: str) -> APIRouter:
    r = APIRouter(include_in_schema=False)

    @r.get("/ui/sse/events")
    async def events(request: Request, type: str = "", instance: str = "") -> StreamingResponse:
        query: dict[str, Any] = {"follow": True, "type": type or None,
                                 "instance": instance or None}
        last = request.headers.get("last-event-id", "")
        if last.isdigit():
            query["after"] = int(last)
        return StreamingResponse(sse(lines(request.app, token, "/v1/events", query), True),
                                 media_type="text/event-stream", headers=SSE_HEADERS)

    @r.get("/ui/sse/logs/{name}")
    async def logs(request: Request, name: str, since: str = "10m") -> StreamingResponse:
        query = {"follow": True, "since": since or "10m"}
        source = lines(request.app, token, path_of("/v1/instances", name, "logs"), query)
        return StreamingResponse(sse(source, False), media_type="text/event-stream",
                                 headers=SSE_HEADERS)

    return r
