"""A follower's writes go to the leader: the request as it came, the leader's answer as it is.

Every server answers reads from the shared database, but only the leader writes (its writes
are fenced by the lease's generation, see :mod:`corral.control.leader`). So on a follower,
this ASGI middleware sends each call that may write (any method but GET and HEAD) to the
leader's API, with the same method, path, query, headers and body, and hands back the leader's
status, headers and body unchanged, streamed as they arrive: a client cannot tell which server
it talked to. Reads of the image store go too, since that store lives with the leader.
Streams of events and logs are read from the bus, which every server reaches, so any server
serves them.

It sits inside the guard (:mod:`corral.control.http.guard`): a request is authenticated,
authorized and its body bounded on the follower before a byte goes on; the leader checks it
again. While no server leads (the seconds of a takeover), the answer is 503 ``not_leader``,
retryable. A request forwarded once is never forwarded again (a header marks it), so two
servers that each think the other leads answer 503 rather than pass it back and forth.

HTTP/1.1 is spoken with ``h11`` (uvicorn's own parser) over asyncio streams: one connection per
forwarded call, the leader's TLS certificate checked against the fleet's CA.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable
from typing import Protocol
from urllib.parse import urlsplit

import h11
from starlette.types import ASGIApp, Receive, Scope, Send

from corral.control.http.access import READ_METHODS
from corral.control.http.guard import error_body
from corral.errors import CorralError, NotLeader

log = logging.getLogger(__name__)

#: marks a request a follower forwarded (its value: that follower's id)
FORWARDED_BY = b"x-corral-forwarded-by"
CONNECT_TIMEOUT = 5.0
#: how long a call waits for the leader's own late lease renewal before a 503
SETTLE_TIMEOUT = 5.0
#: reads that go to the leader too: the image store is the leader's
LEADER_READS = ("/v1/images", "/v1/chunks")
#: headers that belong to one connection, not to the request or the answer
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-authenticate",
                        b"proxy-authorization", b"te", b"trailer", b"transfer-encoding",
                        b"upgrade", b"host", b"content-length", b"expect"})


class LeaderLike(Protocol):
    @property
    def id(self) -> str: ...

    @property
    def api_url(self) -> str: ...


class Leading(Protocol):
    """What the middleware needs to know of :class:`corral.control.leader.Leadership`."""

    server_id: str

    @property
    def is_leader(self) -> bool: ...

    @property
    def leader(self) -> LeaderLike | None: ...

    async def settle(self, timeout: float) -> None: ...


def forwarded(method: str, path: str) -> bool:
    """Whether a follower sends this call to the leader."""
    return method not in READ_METHODS or path.startswith(LEADER_READS)


class Forward:
    def __init__(self, app: ASGIApp, *, leadership: Leading,
                 ssl_context: Callable[[], ssl.SSLContext | None] = lambda: None) -> None:
        self.app = app
        self.leadership = leadership
        self.ssl_context = ssl_context

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not forwarded(str(scope["method"]).upper(),
                                                    str(scope["path"])):
            await self.app(scope, receive, send)
            return
        if not self.leadership.is_leader:  # a leader's late renewal is waited for, bounded
            await self.leadership.settle(SETTLE_TIMEOUT)
        if self.leadership.is_leader:
            await self.app(scope, receive, send)
            return
        leader = self.leadership.leader
        headers = list(scope.get("headers", []))
        if any(k.lower() == FORWARDED_BY for k, _ in headers):
            await _answer(send, NotLeader(
                "this server was sent a request to lead, but it does not lead the fleet",
                hint="the leadership is changing hands; try again in a moment"))
            return
        if leader is None or not leader.api_url or leader.id == self.leadership.server_id:
            await _answer(send, NotLeader(
                "no server leads the fleet right now",
                hint="another server takes the lead within a few seconds "
                     "(leader_lease_seconds); try again"))
            return
        body = await _read_body(receive)
        if body is None:
            return  # the client went away
        await self._forward(scope, headers, body, leader, send)

    async def _forward(self, scope: Scope, headers: list[tuple[bytes, bytes]], body: bytes,
                       leader: LeaderLike, send: Send) -> None:
        url = urlsplit(leader.api_url)
        host = url.hostname or ""
        tls = url.scheme == "https"
        port = url.port or (443 if tls else 80)
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(
                host, port, ssl=self.ssl_context() if tls else None,
                server_hostname=host if tls else None), CONNECT_TIMEOUT)
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            await _answer(send, NotLeader(
                f"the leader ({leader.id}, {leader.api_url}) cannot be reached: "
                f"{exc or type(exc).__name__}",
                hint="it may be going away; another server takes the lead within a few "
                     "seconds; try again"))
            return
        started = False
        try:
            conn = h11.Connection(h11.CLIENT)
            target = scope.get("raw_path") or str(scope["path"]).encode()
            if scope.get("query_string"):
                target += b"?" + scope["query_string"]
            out = [(k, v) for k, v in headers if k.lower() not in HOP_BY_HOP]
            out += [(b"host", url.netloc.encode()), (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                    (FORWARDED_BY, self.leadership.server_id.encode())]
            writer.write(conn.send(h11.Request(method=str(scope["method"]), target=target,
                                               headers=out)) or b"")
            if body:
                writer.write(conn.send(h11.Data(data=body)) or b"")
            writer.write(conn.send(h11.EndOfMessage()) or b"")
            await writer.drain()
            started = await _relay(conn, reader, send)
        except (OSError, h11.ProtocolError, asyncio.IncompleteReadError, ssl.SSLError) as exc:
            log.warning("forwarding %s %s to the leader %s failed: %s", scope["method"],
                        scope["path"], leader.api_url, exc)
            if not started:
                await _answer(send, NotLeader(
                    f"the leader ({leader.id}) went away while answering: the call may or may "
                    "not have taken effect", hint="look (GET) before trying it again",
                    retryable=False, details={"sent": True}))
            else:
                raise
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


async def _relay(conn: h11.Connection, reader: asyncio.StreamReader, send: Send) -> bool:
    """Copy the leader's answer to the client as it arrives; True once the status went out.
    An answer cut short raises (the client's connection is then closed, not completed)."""
    started = False
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await reader.read(65536))
            continue
        if isinstance(event, h11.InformationalResponse):
            continue
        if isinstance(event, h11.Response):
            headers = [(k, v) for k, v in event.headers
                       if k not in HOP_BY_HOP or k == b"content-length"]
            await send({"type": "http.response.start", "status": event.status_code,
                        "headers": headers})
            started = True
        elif isinstance(event, h11.Data):
            await send({"type": "http.response.body", "body": bytes(event.data),
                        "more_body": True})
        elif isinstance(event, h11.EndOfMessage):
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return started
        elif isinstance(event, h11.ConnectionClosed):
            raise h11.RemoteProtocolError("the leader closed the connection mid-answer")


async def _read_body(receive: Receive) -> bytes | None:
    """The request's whole body (the guard bounded it already); None: the client left."""
    parts: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        if message["type"] != "http.request":
            continue
        parts.append(bytes(message.get("body", b"")))
        if not message.get("more_body", False):
            return b"".join(parts)


async def _answer(send: Send, err: CorralError) -> None:
    body = error_body(err)
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode())]
    if err.retryable:
        headers.append((b"retry-after", b"1"))
    await send({"type": "http.response.start", "status": err.http_status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
