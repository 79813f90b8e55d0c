"""The dashboard reads and acts through the API itself, in-process.

Why not call the services directly: the API is the one place where each action is checked,
recorded and answered (its refusals, hints and 202s), the guard applies its rules to it, and
on a follower the forwarding middleware sends writes to the leader. A request made here goes
through the whole app, as if a client had sent it with the fleet token: the page then shows
exactly what the CLI would, and the dashboard has no second way to change the fleet. Who may
ask for what was decided before (the guard checked the session's role on the dashboard route).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote, urlencode

from starlette.types import ASGIApp, Message

#: an in-process call that takes longer than this is abandoned (its answer is an error)
CALL_TIMEOUT = 60.0
#: how long a stream may stay silent before the relay sends a keep-alive
KEEPALIVE = 15.0


def path_of(*parts: str) -> str:
    """A path from a template and quoted names: ``path_of("/v1/instances", name)``."""
    return "/".join([parts[0].rstrip("/"), *(quote(p, safe="") for p in parts[1:])])


def _scope(method: str, path: str, query: dict[str, Any] | None, token: str,
           body: bytes) -> dict[str, Any]:
    headers = [(b"authorization", f"Bearer {token}".encode()), (b"host", b"dashboard")]
    if body:
        headers += [(b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode())]
    pairs = [(k, str(v).lower() if isinstance(v, bool) else str(v))
             for k, v in (query or {}).items() if v is not None]
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1", "method": method, "scheme": "http", "path": path,
            "raw_path": path.encode(), "root_path": "", "query_string": urlencode(pairs).encode(),
            "headers": headers, "client": ("127.0.0.1", 0), "server": ("dashboard", 0),
            "state": {}}


async def call(app: ASGIApp, token: str, method: str, path: str, *,
               query: dict[str, Any] | None = None, body: Any = None) -> tuple[int, Any]:
    """(status, decoded JSON answer or None) of one API call."""
    status, data = await call_raw(app, token, method, path, query=query, body=body)
    try:
        return status, json.loads(data) if data else None
    except ValueError:
        return status, None


async def call_raw(app: ASGIApp, token: str, method: str, path: str, *,
                   query: dict[str, Any] | None = None, body: Any = None) -> tuple[int, bytes]:
    """(status, body) of one API call."""
    raw = b"" if body is None else json.dumps(body).encode()
    sent = False
    status = 500
    parts: list[bytes] = []

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": raw, "more_body": False}
        await asyncio.Event().wait()  # never: a disconnect is not ours to report
        raise AssertionError

    async def send(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = int(message["status"])
        elif message["type"] == "http.response.body":
            parts.append(bytes(message.get("body", b"")))

    await asyncio.wait_for(app(_scope(method, path, query, token, raw), receive, send),
                           CALL_TIMEOUT)
    return status, b"".join(parts)


async def lines(app: ASGIApp, token: str, path: str,
                query: dict[str, Any] | None = None) -> AsyncIterator[bytes | None]:
    """The lines of a streamed (NDJSON) GET as they come; None when nothing came for
    :data:`KEEPALIVE` seconds (the relay's cue to show the browser it is alive). Leaving the
    iteration ends the inner request."""
    queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=256)
    gone = asyncio.Event()
    status: list[int] = []
    first = True

    async def receive() -> Message:
        nonlocal first
        if first:
            first = False
            return {"type": "http.request", "body": b"", "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            status.append(int(message["status"]))
        elif message["type"] == "http.response.body":
            chunk = bytes(message.get("body", b""))
            if chunk:
                await queue.put(chunk)
            if not message.get("more_body", False):
                await queue.put(None)

    async def run() -> None:
        try:
            await app(_scope("GET", path, query, token, b""), receive, send)
        finally:
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(None)

    task = asyncio.create_task(run())
    buf = b""
    try:
        while True:
            try:
                chunk = await asyncio.wait_for(queue.get(), KEEPALIVE)
            except TimeoutError:
                yield None
                continue
            if chunk is None:
                if buf.strip() and status and status[0] == 200:
                    yield buf
                return
            if status and status[0] != 200:
                continue  # an error answer is not a stream of lines
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if line.strip():
                    yield line
    finally:
        gone.set()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
