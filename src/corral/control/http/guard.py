"""The API's door: authenticate, authorize and bound the body, before a route sees anything.

A pure ASGI middleware in front of every route, because the framework's own way (a
dependency) runs after FastAPI has read and parsed a JSON body: a stranger could make the
server read, keep and parse 100 MB before being told 401, holding up the one event loop that
also answers heartbeats. Here, in order, and without reading a byte of the body until the
last step:

1. the route is found (the same matching the router does), and with it its rule
   (:mod:`corral.control.http.access`);
2. unless the route is public, the bearer token must name a principal (401), or, without
   one, the dashboard's session cookie (reads, and the dashboard's own writes with the
   session's CSRF header: 403 otherwise); a dashboard page without either is sent to the
   login page;
3. a path that exists for other methods only answers 405 with ``Allow`` (every method of
   the routes that name that path most exactly: the framework's own 405 listed only the
   first route's);
4. the principal's role must allow the call (403);
5. a body that says it is larger than the route's cap is refused (413) before it is read; one
   that does not say (chunked) is counted as it arrives and refused as soon as it passes.

A refusal sent before the body was read closes the connection: the rest of an upload is never
read, and the next request does not start in the middle of it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlencode

from starlette.convertors import Convertor
from starlette.datastructures import Headers
from starlette.routing import BaseRoute, compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from corral.api.models import ErrorBody, ErrorResponse
from corral.control.http import access
from corral.control.tokens import Principal
from corral.errors import CorralError, Forbidden, HTTPError, PayloadTooLarge, Unauthorized

log = logging.getLogger(__name__)

#: the header a dashboard write carries its session's CSRF token in
CSRF_HEADER = "x-csrf-token"
SESSION_HINT = "reload the dashboard page (or log in again) and retry from the page"
TOKEN_HINT = ("send 'Authorization: Bearer <token>' (the fleet token in DATA/token, or "
              "CORRAL_TOKEN, or one made with 'corral token create')")


def error_body(err: CorralError) -> bytes:
    """The one error shape, as the exception handlers of the app write it."""
    return ErrorResponse(error=ErrorBody(**err.to_dict())).model_dump_json().encode()


def bearer(headers: Headers) -> str | None:
    scheme, _, token = headers.get("authorization", "").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


@dataclass(frozen=True)
class Known:
    """One route as the guard matches it: its declared path, methods and compiled path."""

    path: str
    methods: frozenset[str]
    regex: re.Pattern[str]
    convertors: dict[str, Convertor[Any]]

    def params(self, path: str) -> dict[str, Any] | None:
        """The path parameters when ``path`` is this route's, else None."""
        m = self.regex.match(path)
        if m is None:
            return None
        return {k: self.convertors[k].convert(v) for k, v in m.groupdict().items()}


def flatten(routes: Sequence[BaseRoute]) -> list[Known]:
    """Every route with a path and methods, in the order the router tries them (routers
    included into the app are expanded: newer FastAPI keeps them as one route each)."""
    try:
        from fastapi.routing import iter_route_contexts  # FastAPI >= 0.16x
        items: Iterable[Any] = iter_route_contexts(routes)
    except ImportError:  # older FastAPI copies included routes into the app's list
        items = routes
    out = []
    for r in items:
        path, methods = getattr(r, "path", None), getattr(r, "methods", None)
        if isinstance(path, str) and methods:
            regex, _, convertors = compile_path(path)
            out.append(Known(path, frozenset(m.upper() for m in methods), regex, convertors))
    return out


class Guard:
    """See the module doc. ``routes()`` are the app's routes (read when the first request
    comes, so every route added while building the app counts); ``authenticate(token)`` is
    the principal a bearer token stands for, or None."""

    def __init__(self, app: ASGIApp, *, routes: Callable[[], Sequence[BaseRoute]],
                 authenticate: Callable[[str], Principal | None]) -> None:
        self.app = app
        self.routes = routes
        self.authenticate = authenticate
        self._known: list[Known] | None = None
        self._count = -1

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method = str(scope["method"]).upper()
        headers = Headers(scope=scope)
        unread = _may_have_body(headers)
        full, others = self._match(scope)
        path = full[0] if full is not None else None
        rule = access.rule_for(method, path)
        public = rule.public if full is not None else any(
            r.path in access.PUBLIC_PATHS for r in others)
        principal: Principal | None = None
        if not public:
            token = bearer(headers)
            principal = self.authenticate(token) if token is not None else None
            if token is None:
                principal, why = _by_session(scope, headers, method, rule, full is not None)
                if why is not None:
                    await _refuse(send, Forbidden(why, hint=SESSION_HINT), unread)
                    return
            if principal is None and token is None and rule.page and full is not None:
                await _to_login(send, scope, unread)
                return
            if principal is None:
                who = Unauthorized("missing bearer token", hint=TOKEN_HINT) if token is None \
                    else Unauthorized("wrong token", hint="use the token of this fleet "
                                      "(DATA/token on the server) or one that "
                                      "'corral token ls' lists")
                await _refuse(send, who, unread, {"www-authenticate": "Bearer"})
                return
            scope.setdefault("state", {})["principal"] = principal
        if full is None and others:
            # the routes that name this path most exactly (``/v1/images/gc`` before
            # ``/v1/images/{name}``): the resource the document describes at this path
            exact = min(r.path.count("{") for r in others)
            allowed = sorted({m for r in others if r.path.count("{") == exact
                              for m in r.methods})
            err = HTTPError(f"{method} is not allowed on {_shown(scope)}",
                            hint=f"this path takes {', '.join(allowed)}")
            err.http_status = 405  # type: ignore[misc]
            await _refuse(send, err, unread, {"allow": ", ".join(allowed)})
            return
        if full is not None and principal is not None:
            query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
            why = access.refusal(principal.role, method, rule, full[1], query)
            if why is not None:
                log.info("refused %s %s to token %s (%s): %s", method, _shown(scope),
                         principal.name, principal.role, why)
                await _refuse(send, Forbidden(
                    f"token '{principal.name}' ({principal.role}) may not {method} "
                    f"{_shown(scope)}: {why}",
                    hint="use a token with a role that allows it (see 'corral token ls')"),
                    unread)
                return
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > rule.body:
            await _refuse(send, _too_large(rule.body), unread)
            return
        if not unread:
            await self.app(scope, receive, send)
            return
        body = await _read(receive, rule.body)
        if body is None:  # the client went away
            return
        if isinstance(body, PayloadTooLarge):
            await _refuse(send, body, True)
            return
        await self.app(scope, _replay(body, receive), send)

    def _match(self, scope: Scope) -> tuple[tuple[str, dict[str, Any]] | None, list[Known]]:
        """(path and params of the route this request is for, or None; the routes at this
        path for other methods)."""
        routes = self.routes()
        if self._known is None or len(routes) != self._count:
            self._known, self._count = flatten(routes), len(routes)
        path, root = str(scope["path"]), str(scope.get("root_path", ""))
        if root and path.startswith(root):
            path = path[len(root):]
        method = str(scope["method"]).upper()
        others: list[Known] = []
        for route in self._known:
            params = route.params(path)
            if params is None:
                continue
            if method in route.methods:
                return (route.path, params), others
            others.append(route)
        return None, others


class SessionAuth(Protocol):
    """What the dashboard puts on ``app.state.session_auth``
    (:class:`corral.control.dashboard.sessions.Sessions`): the session a request's cookie
    stands for, and whether the request carries that session's CSRF header."""

    def from_headers(self, headers: Headers) -> Any: ...

    def csrf_ok(self, session: Any, presented: str | None) -> bool: ...


def _by_session(scope: Scope, headers: Headers, method: str, rule: access.Rule,
                known: bool) -> tuple[Principal | None, str | None]:
    """(the principal of the request's dashboard session or None, why it is refused or None).
    A cookie is a credential the browser sends by itself, so it opens reads, and the
    dashboard's own writes only with the session's CSRF header: never an API write."""
    auth: SessionAuth | None = getattr(getattr(scope.get("app"), "state", None),
                                       "session_auth", None)
    if auth is None or "cookie" not in headers:
        return None, None
    session = auth.from_headers(headers)
    if session is None:
        return None, None
    principal: Principal = session.principal
    if method in access.READ_METHODS:
        scope.setdefault("state", {})["session"] = session
        return principal, None
    if not (known and rule.session_write):
        return None, (f"{method} {_shown(scope)} is not taken from a dashboard session: "
                      "the API's writes need a bearer token")
    if not auth.csrf_ok(session, headers.get(CSRF_HEADER)):
        return None, "missing or wrong CSRF token for this dashboard session"
    scope.setdefault("state", {})["session"] = session
    return principal, None


async def _to_login(send: Send, scope: Scope, close: bool) -> None:
    """A page asked for without a session: to the login page, which comes back here."""
    path = str(scope["path"])
    target = "/login?" + urlencode({"next": path}) if path.startswith("/") else "/login"
    headers = [(b"location", target.encode()), (b"content-length", b"0"),
               (b"cache-control", b"no-store")]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": 303, "headers": headers})
    await send({"type": "http.response.body", "body": b""})


def _shown(scope: Scope) -> str:
    """The request's path as a message quotes it: cut when very long."""
    path = str(scope["path"])
    return path if len(path) <= 200 else path[:200] + "..."


def _may_have_body(headers: Headers) -> bool:
    length = headers.get("content-length")
    return "transfer-encoding" in headers or (length is not None and length != "0")


def _too_large(cap: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"the request body is larger than this route takes ({cap} bytes)",
                           hint="send less per request (the client cuts chunk uploads to "
                                "fit); see docs/operations.md for each route's cap")


async def _read(receive: Receive, cap: int) -> bytes | PayloadTooLarge | None:
    """The whole body, counted as it arrives: a PayloadTooLarge as soon as it passes ``cap``
    (whatever Content-Length said), None when the client disconnected."""
    parts: list[bytes] = []
    total = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        if message["type"] != "http.request":
            continue
        chunk = bytes(message.get("body", b""))
        total += len(chunk)
        if total > cap:
            return _too_large(cap)
        parts.append(chunk)
        if not message.get("more_body", False):
            return b"".join(parts)


def _replay(body: bytes, receive: Receive) -> Callable[[], Awaitable[Message]]:
    """A receive that gives the body read ahead once, then the client's own (disconnects)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _refuse(send: Send, err: CorralError, close: bool,
                  extra: dict[str, str] | None = None) -> None:
    """Answer ``err`` in the one error shape; ``close``: the body was not read, so the
    connection ends with this answer."""
    body = error_body(err)
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode())]
    headers += [(k.encode(), v.encode()) for k, v in (extra or {}).items()]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": err.http_status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
