"""The HTTP API: routes, the guard in front of them and the one JSON error shape.

Every route but ``GET /healthz`` needs ``Authorization: Bearer <token>``: the fleet token
(``DATA/token``, compared in constant time, the admin's) or a named token with a role
(:mod:`corral.control.tokens`). The guard (:mod:`corral.control.http.guard`) checks the token,
the role and the body's size before a route runs or a body is read; the table of who may call
what and how large each body may be is :mod:`corral.control.http.access`. Every error,
whether corral's own, a validation failure or a bug, leaves as ``{"error": {code, message,
hint, retryable, details}}`` so a client needs exactly one parser; validation errors name each
bad field in ``details.fields`` (echoing a refused value only when it is short JSON).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import ssl
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal, Protocol

from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client.registry import Collector
from pydantic import TypeAdapter
from starlette.exceptions import HTTPException as StarletteHTTPException

import corral
from corral.api.client import NEXT_HEADER
from corral.api.models import (
    ActionRequest,
    BatchCreated,
    BatchItem,
    CreateBatch,
    CreateInstance,
    ErrorBody,
    ErrorResponse,
    FleetStatus,
    HostView,
    InstanceView,
    LeaderView,
    ServerView,
)
from corral.api.names import HOST_PATTERN
from corral.control import prom, views
from corral.control.fleet import Fleet
from corral.control.http import tokens as tokens_http
from corral.control.http.forward import Forward, Leading
from corral.control.http.guard import TOKEN_HINT, Guard
from corral.control.instances import InstanceService
from corral.control.leader import LeaderInfo, ServerInfo
from corral.control.tokens import FLEET, PREFIX, Principal, TokenStore
from corral.errors import CorralError, HTTPError, InvalidRequest, NotFound, Unauthorized
from corral.lifecycle import State, Verb

log = logging.getLogger(__name__)

#: what any route may answer besides its own success: a body that is not JSON (400), the
#: guard's refusals (401, 403, 413), and corral's errors
ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse}
    for status in (400, 401, 403, 404, 409, 413, 422, 500, 502, 503)
}
VerbName = Literal["start", "stop", "kill", "restart", "freeze", "thaw"]
#: the longest refused value a validation error echoes back (as JSON)
ECHO_MAX = 200
#: ``GET /v1/instances``: the largest page (~650 bytes of JSON an instance: ~3 MB), the
#: header naming the next page's cursor, and the longest cursor or host filter taken
PAGE_MAX = 5000
AFTER_MAX = 253
#: a cursor may be any text but NUL, which PostgreSQL refuses in a text value (a 500)
NO_NUL = r"^[^\x00]*$"
PAGED: dict[int | str, dict[str, Any]] = {200: {"description": "a page of instances", "headers": {
    NEXT_HEADER: {"description": "pass as 'after' for the next page; absent on the last",
                  "schema": {"type": "string"}}}}}


bearer = HTTPBearer(auto_error=False, description="the fleet token (DATA/token) or a token "
                    "made with 'corral token create'")


#: the two long lists' serialisers (built once)
INSTANCES_JSON: TypeAdapter[list[InstanceView]] = TypeAdapter(list[InstanceView])
HOSTS_JSON: TypeAdapter[list[HostView]] = TypeAdapter(list[HostView])
#: rows a long list reads and shapes in one turn of the event loop (tens of ms), which
#: answers heartbeats between turns. Not a worker thread: under the GIL the loop then got
#: a turn only every switch interval, and heartbeats waited 15 s behind a list of 25,000
#: (bench/fleet_scale.py, 5000 hosts)
LIST_CHUNK = 250


def error_response(err: CorralError, headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorBody(**err.to_dict()))
    return JSONResponse(body.model_dump(), status_code=err.http_status, headers=headers)


def _field(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    return ".".join(parts) or "body"


def _echo(value: Any) -> tuple[bool, Any]:
    """(whether to echo, what) a refused value: JSON only (never raw bytes, which are not
    JSON and made the error itself fail with a 500), and only short (a refused 60 KiB string
    need not come back)."""
    if isinstance(value, bytes | bytearray | dict):  # a dict is the whole body
        return False, None
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        return False, None
    return len(text) <= ECHO_MAX, value


def validation_error(exc: RequestValidationError) -> InvalidRequest:
    fields = []
    for e in exc.errors():
        msg = str(e.get("msg", "invalid"))
        msg = msg.removeprefix("Value error, ")
        loc = tuple(e.get("loc", ()))
        if isinstance(e.get("input"), bytes | bytearray) and loc == ("body",):
            msg = "the body must be JSON, sent with Content-Type: application/json"
        item: dict[str, Any] = {"field": _field(loc), "message": msg}
        echo, value = _echo(e.get("input")) if "input" in e else (False, None)
        if echo:
            item["value"] = value
        fields.append(item)
    summary = "; ".join(f"{f['field']}: {f['message']}" for f in fields)
    return InvalidRequest(summary or "invalid request",
                          hint="fix the named fields and send the request again",
                          details={"fields": fields})


class Cluster(Leading, Protocol):
    """What the API shows of the servers sharing the database
    (:class:`corral.control.leader.Leadership`)."""

    @property
    def leader(self) -> LeaderInfo | None: ...

    @property
    def servers(self) -> list[ServerInfo]: ...

    def nats_urls(self) -> list[str]: ...


def cluster_status(cluster: Cluster) -> dict[str, Any]:
    """The status's ``leader``, ``servers`` and ``nats``, as of the last lease poll."""
    lead = cluster.leader
    return {
        "leader": None if lead is None else LeaderView(id=lead.id, api_url=lead.api_url,
                                                       generation=lead.generation),
        "servers": [ServerView(id=s.id, api_url=s.api_url, nats_url=s.nats_url,
                               last_seen=s.last_seen, leader=lead is not None and s.id == lead.id)
                    for s in cluster.servers],
        "nats": cluster.nats_urls(),
    }


def build_app(fleet: Fleet, service: InstanceService, token: str, nats_url: str,
              db: str, routers: Sequence[Callable[[list[Any]], APIRouter]] = (),
              collectors: Sequence[Collector] = (), tokens: TokenStore | None = None,
              cluster: Cluster | None = None,
              ssl_context: Callable[[], ssl.SSLContext | None] = lambda: None) -> FastAPI:
    """The API over ``fleet`` (reads) and ``service`` (writes). ``routers`` are factories that
    get the auth dependencies and return more routes (images, logs, events...), so each area
    keeps its routes in its own module. ``token`` is the fleet token (admin); ``tokens`` the
    named ones (by default in the fleet's database). With a ``cluster`` (several servers on
    one database), a follower forwards what writes to the leader (:mod:`.forward`, TLS checked
    with ``ssl_context``) and the status names the leader and the servers."""
    store = tokens if tokens is not None else TokenStore(fleet.sessions)

    def authenticate(presented: str) -> Principal | None:
        if hmac.compare_digest(presented.encode(), token.encode()):
            return Principal(FLEET, "admin")
        return store.resolve(presented) if presented.startswith(PREFIX) else None

    async def require_principal(
        request: Request,
        creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> Principal:
        """The guard checked the token and the role already; this declares the bearer scheme
        in the OpenAPI document and refuses a request the guard did not see (an app built
        without it), so a route is never open by mistake."""
        principal = request.scope.get("state", {}).get("principal")
        if not isinstance(principal, Principal):
            raise Unauthorized("missing bearer token", hint=TOKEN_HINT)
        return principal

    auth = [Depends(require_principal)]
    app = FastAPI(title="corral", version=corral.__version__, openapi_url=None, docs_url=None,
                  redoc_url=None, responses=ERRORS)
    if cluster is not None:  # inside the guard: only what it let through goes on
        app.add_middleware(Forward, leadership=cluster, ssl_context=ssl_context)
    app.add_middleware(Guard, routes=lambda: app.router.routes, authenticate=authenticate)

    @app.exception_handler(CorralError)
    async def _corral_error(_: Request, exc: CorralError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.http_status == 401 else None
        return error_response(exc, headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            err: CorralError = NotFound(f"no such route: {exc.detail}",
                                        hint="see /openapi.json for the routes")
        else:
            err = HTTPError(str(exc.detail), hint="see /openapi.json for the routes")
            err.http_status = exc.status_code  # type: ignore[misc]
        return error_response(err, dict(exc.headers or {}) or None)  # 405's Allow

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(CorralError(
            f"internal error: {type(exc).__name__}: {exc}",
            hint="this is a bug in corral; check the server log for the traceback"))

    @app.get("/healthz", tags=["meta"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "version": corral.__version__}

    @app.get("/openapi.json", dependencies=auth, include_in_schema=False)
    async def openapi() -> dict[str, Any]:
        return app.openapi()

    @app.get("/metrics", dependencies=auth, tags=["meta"], response_class=Response)
    async def metrics() -> Response:
        return Response(prom.render(fleet, collectors), media_type=prom.CONTENT_TYPE)

    @app.get("/v1/status", dependencies=auth, tags=["fleet"])
    async def status() -> FleetStatus:
        st = views.fleet_status(fleet, nats_url, db)
        if cluster is None:
            return st.model_copy(update={"nats": [nats_url]})
        return st.model_copy(update=cluster_status(cluster))

    @app.get("/v1/hosts", dependencies=auth, tags=["fleet"], response_model=list[HostView])
    async def hosts() -> Response:
        parts: list[bytes] = []
        after: str | None = None
        while True:  # a chunk of hosts a turn of the loop (see LIST_CHUNK)
            got = views.host_views(fleet, after, LIST_CHUNK)
            if got:
                parts.append(HOSTS_JSON.dump_json(got)[1:-1])
            if len(got) < LIST_CHUNK:
                break
            after = got[-1].name
            await asyncio.sleep(0)
        return Response(b"[" + b",".join(parts) + b"]", media_type="application/json")

    @app.get("/v1/hosts/{name}", dependencies=auth, tags=["fleet"])
    async def host(name: str) -> HostView:
        for h in views.host_views(fleet):
            if h.name == name:
                return h
        raise NotFound(f"no host named '{name}'", hint="see 'corral host ls'")

    @app.get("/v1/instances", dependencies=auth, tags=["instances"], responses=PAGED,
             response_model=list[InstanceView])
    async def instances(
        limit: Annotated[int | None, Query(ge=1, le=PAGE_MAX, description=(
            f"at most this many (1..{PAGE_MAX}); the next page's cursor is in the "
            f"{NEXT_HEADER} header. Default: every instance in one answer"))] = None,
        after: Annotated[str | None, Query(max_length=AFTER_MAX, pattern=NO_NUL, description=(
            f"only instances named after this: the {NEXT_HEADER} of the page before"))
        ] = None,
        host: Annotated[str | None, Query(pattern=HOST_PATTERN,
                                          description="only the instances on this host")
                        ] = None,
        state: Annotated[State | None, Query(description="only instances in this state")
                         ] = None,
    ) -> Response:
        """Instances by name, a page at a time when given a ``limit``.

        The cursor is the last name of the page, in ``X-Corral-Next`` (absent on the last
        page), rather than a ``Link`` header: the body stays the plain list every caller
        already reads, and a bare name needs neither a URL built here (behind a proxy or a
        follower the server does not know the address the client used) nor RFC 8288 parsing
        in the client, which already holds its own filters. Keyset, not offset: a page is a
        range of the primary key (O(page) rows at any depth), and an instance created or
        removed between two pages neither shifts nor repeats the others. One row past the
        limit is read to tell a full last page from one with more after it.

        Read and shaped :data:`LIST_CHUNK` rows a turn of the event loop (keyset pages of
        the same order): the loop also answers every host's heartbeat, and one answer of
        20,000 instances had held it for 6.5 s (bench/fleet_scale.py at 2000 hosts). So
        a long list is not one snapshot: an instance made or removed while it is read may
        be in it or not, as between two pages."""
        need = None if limit is None else limit + 1
        rows: list[Any] = []
        cursor = after
        while need is None or len(rows) < need:
            n = LIST_CHUNK if need is None else min(LIST_CHUNK, need - len(rows))
            got = service.page(n, cursor, host, None if state is None else state.value)
            rows += got
            if len(got) < n:
                break
            cursor = got[-1].name
            await asyncio.sleep(0)
        headers: dict[str, str] = {}
        if limit is not None and len(rows) > limit:
            rows = rows[:limit]
            headers[NEXT_HEADER] = rows[-1].name
        parts: list[bytes] = []
        for k in range(0, len(rows), LIST_CHUNK):
            if k:
                await asyncio.sleep(0)
            parts.append(INSTANCES_JSON.dump_json(
                [views.instance_view(fleet, i) for i in rows[k:k + LIST_CHUNK]])[1:-1])
        return Response(b"[" + b",".join(parts) + b"]", media_type="application/json",
                        headers=headers)

    @app.post("/v1/instances", dependencies=auth, tags=["instances"], status_code=201)
    async def create(req: CreateInstance) -> InstanceView:
        return views.instance_view(fleet, await service.create(req))

    @app.post("/v1/instances/batch", dependencies=auth, tags=["instances"])
    async def create_batch(req: CreateBatch) -> BatchCreated:
        """Create many instances at once (placed together; see ``results`` for each)."""
        out = await service.create_many(req.instances)
        return BatchCreated(results=[BatchItem(
            name=c.name,
            status=(c.error.http_status if c.error is not None else 201),
            instance=None if c.instance is None else views.instance_view(fleet, c.instance),
            error=None if c.error is None else ErrorBody(**c.error.to_dict()))
            for c in out])

    @app.get("/v1/instances/{name}", dependencies=auth, tags=["instances"])
    async def instance(name: str) -> InstanceView:
        return views.instance_view(fleet, service.get(name))

    # before the catch-all verb route, so a router's POST /v1/instances/{name}/<word> wins
    for make in routers:
        app.include_router(make(auth))
    app.include_router(tokens_http.router(store, auth))

    @app.post("/v1/instances/{name}/{verb}", dependencies=auth, tags=["instances"])
    async def act(name: str, verb: VerbName, body: ActionRequest | None = None) -> InstanceView:
        return views.instance_view(fleet, await service.act(name, Verb(verb), body))

    @app.delete("/v1/instances/{name}", dependencies=auth, tags=["instances"], status_code=204)
    async def delete(name: str, force: bool = False) -> Response:
        await service.delete(name, force=force)
        return Response(status_code=204)

    return app
