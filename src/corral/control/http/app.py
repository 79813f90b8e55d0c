"""The HTTP API: routes, bearer-token auth and the one JSON error shape.

Every route but ``GET /healthz`` needs ``Authorization: Bearer <token>`` (the same fleet token
that guards the bus), compared in constant time. Every error, whether corral's own, a validation
failure or a bug, leaves as ``{"error": {code, message, hint, retryable, details}}`` so a client
needs exactly one parser; validation errors name each bad field in ``details.fields``.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client.registry import Collector
from starlette.exceptions import HTTPException as StarletteHTTPException

import corral
from corral.api.models import (
    ActionRequest,
    CreateInstance,
    ErrorBody,
    ErrorResponse,
    FleetStatus,
    HostView,
    InstanceView,
)
from corral.control import prom, views
from corral.control.fleet import Fleet
from corral.control.instances import InstanceService
from corral.errors import CorralError, HTTPError, InvalidRequest, NotFound, Unauthorized
from corral.lifecycle import Verb

log = logging.getLogger(__name__)

ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (401, 404, 409, 422, 500, 502, 503)
}
VerbName = Literal["start", "stop", "kill", "restart", "freeze", "thaw"]


bearer = HTTPBearer(auto_error=False, description="the fleet token (DATA/token)")


def error_response(err: CorralError, headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorBody(**err.to_dict()))
    return JSONResponse(body.model_dump(), status_code=err.http_status, headers=headers)


def _field(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    return ".".join(parts) or "body"


def validation_error(exc: RequestValidationError) -> InvalidRequest:
    fields = []
    for e in exc.errors():
        msg = str(e.get("msg", "invalid"))
        msg = msg.removeprefix("Value error, ")
        item: dict[str, Any] = {"field": _field(tuple(e.get("loc", ()))), "message": msg}
        if "input" in e and not isinstance(e["input"], dict):  # a dict is the whole body
            item["value"] = e["input"]
        fields.append(item)
    summary = "; ".join(f"{f['field']}: {f['message']}" for f in fields)
    return InvalidRequest(summary or "invalid request",
                          hint="fix the named fields and send the request again",
                          details={"fields": fields})


def build_app(fleet: Fleet, service: InstanceService, token: str, nats_url: str,
              db: str, routers: Sequence[Callable[[list[Any]], APIRouter]] = (),
              collectors: Sequence[Collector] = ()) -> FastAPI:
    """The API over ``fleet`` (reads) and ``service`` (writes). ``routers`` are factories that
    get the auth dependencies and return more routes (images, logs, events...), so each area
    keeps its routes in its own module."""

    async def require_token(
        creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> None:
        if creds is None or creds.scheme.lower() != "bearer":
            raise Unauthorized("missing bearer token",
                               hint="send 'Authorization: Bearer <token>' (the fleet token in "
                                    "DATA/token, or CORRAL_TOKEN)")
        if not hmac.compare_digest(creds.credentials.encode(), token.encode()):
            raise Unauthorized("wrong token",
                               hint="use the token of this fleet (DATA/token on the server)")

    auth = [Depends(require_token)]
    app = FastAPI(title="corral", version=corral.__version__, openapi_url=None, docs_url=None,
                  redoc_url=None, responses=ERRORS)

    @app.exception_handler(CorralError)
    async def _corral_error(_: Request, exc: CorralError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthorized) else None
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
        return error_response(err)

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
        return views.fleet_status(fleet, nats_url, db)

    @app.get("/v1/hosts", dependencies=auth, tags=["fleet"])
    async def hosts() -> list[HostView]:
        return views.host_views(fleet)

    @app.get("/v1/hosts/{name}", dependencies=auth, tags=["fleet"])
    async def host(name: str) -> HostView:
        for h in views.host_views(fleet):
            if h.name == name:
                return h
        raise NotFound(f"no host named '{name}'", hint="see 'corral host ls'")

    @app.get("/v1/instances", dependencies=auth, tags=["instances"])
    async def instances() -> list[InstanceView]:
        return [views.instance_view(fleet, i) for i in service.list()]

    @app.post("/v1/instances", dependencies=auth, tags=["instances"], status_code=201)
    async def create(req: CreateInstance) -> InstanceView:
        return views.instance_view(fleet, await service.create(req))

    @app.get("/v1/instances/{name}", dependencies=auth, tags=["instances"])
    async def instance(name: str) -> InstanceView:
        return views.instance_view(fleet, service.get(name))

    # before the catch-all verb route, so a router's POST /v1/instances/{name}/<word> wins
    for make in routers:
        app.include_router(make(auth))

    @app.post("/v1/instances/{name}/{verb}", dependencies=auth, tags=["instances"])
    async def act(name: str, verb: VerbName, body: ActionRequest | None = None) -> InstanceView:
        return views.instance_view(fleet, await service.act(name, Verb(verb), body))

    @app.delete("/v1/instances/{name}", dependencies=auth, tags=["instances"], status_code=204)
    async def delete(name: str, force: bool = False) -> Response:
        await service.delete(name, force=force)
        return Response(status_code=204)

    return app
