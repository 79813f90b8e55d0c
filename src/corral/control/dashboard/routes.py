"""The dashboard's routes: login, the pages and the fragments htmx refreshes, the actions.

Pages are read from the API in-process (:mod:`.internal`); who may see and do what was decided
by the guard from the session cookie (reads for any session; ``POST /ui/act`` only with the
session's CSRF header and an admin role), so a route here only renders.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape

from corral.control.dashboard import relay
from corral.control.dashboard.actions import ACTIONS, run_action
from corral.control.dashboard.internal import call, call_raw, path_of
from corral.control.dashboard.sessions import (
    COOKIE,
    Session,
    Sessions,
    set_cookie_header,
)
from corral.control.dashboard.views import FILTERS
from corral.control.http.events import type_names
from corral.control.http.forward import FORWARDED_BY
from corral.control.tokens import Principal

HERE = Path(__file__).parent
STATIC_TYPES = {".js": "text/javascript", ".css": "text/css", ".LICENSE": "text/plain"}
#: the files under ``static/``, read once: only these are served
STATIC = {p.name: (p.read_bytes(), STATIC_TYPES.get(p.suffix, "text/plain"))
          for p in (HERE / "static").iterdir() if p.is_file()}
#: scripts only from here (htmx's eval features unused), no framing (a confirm button under
#: someone else's page), forms only to here; inline style attributes are the bars' widths
PAGE_HEADERS = {
    "cache-control": "no-store",
    "content-security-policy": "default-src 'self'; script-src 'self'; style-src 'self' "
    "'unsafe-inline'; img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; "
    "base-uri 'none'; form-action 'self'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}
#: events the events page loads before following live ones
EVENTS_SHOWN = 200

env = Environment(loader=FileSystemLoader(HERE / "templates"),
                  autoescape=select_autoescape(["html"]), trim_blocks=True, lstrip_blocks=True)
env.filters.update(FILTERS)


class ApiError(Exception):
    def __init__(self, status: int, body: Any) -> None:
        err = body.get("error", {}) if isinstance(body, dict) else {}
        self.status = status
        self.code = str(err.get("code", "error"))
        self.message = str(err.get("message", f"HTTP {status}"))
        self.hint = str(err.get("hint", "") or "")
        super().__init__(self.message)


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return None


def _safe_next(target: str | None) -> str:
    """Only a path of this site (never ``//elsewhere`` or a full URL) to go back to."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


def _secure(request: Request) -> bool:
    return request.url.scheme == "https"


def router(sessions: Sessions, token: str) -> APIRouter:
    r = APIRouter(include_in_schema=False)

    async def get(request: Request, path: str, **query: Any) -> Any:
        status, body = await call(request.app, token, "GET", path, query=query)
        if status >= 400:
            raise ApiError(status, body)
        return body

    def who(request: Request) -> tuple[Principal | None, Session | None]:
        state = request.scope.get("state", {})
        session = state.get("session")
        if session is None:
            session = sessions.from_headers(request.headers)
        principal = state.get("principal")
        if principal is None and session is not None:
            principal = session.principal
        return principal, session

    def render(request: Request, name: str, status: int = 200, **ctx: Any) -> HTMLResponse:
        principal, session = who(request)
        html = env.get_template(name).render(
            principal=principal, csrf=session.csrf if session else "",
            admin=principal is not None and principal.role == "admin",
            now=time.time(), path=request.url.path, **ctx)
        return HTMLResponse(html, status_code=status, headers=PAGE_HEADERS)

    # --- login ---------------------------------------------------------------------------------

    def login_page(request: Request, error: str = "", status: int = 200,
                   target: str = "/") -> HTMLResponse:
        # login_form: no live parts (dash.js reads an empty role so), even for someone
        # still logged in: its event stream would outlive the cookie a new login replaces,
        # and its reconnect was refused (401) while the browser logged in again
        return render(request, "login.html", status, error=error, next=target,
                      login_form=True)

    def logged_in(session_value: str, request: Request, target: str) -> Response:
        resp = RedirectResponse(_safe_next(target), status_code=303)
        resp.headers["set-cookie"] = set_cookie_header(session_value, secure=_secure(request))
        resp.headers["cache-control"] = "no-store"
        return resp

    @r.get("/", response_class=HTMLResponse)
    async def home(request: Request, token: str | None = None) -> Response:
        if token is not None:  # the one-click URL: trade it for a cookie, then a clean URL
            made = sessions.login(token)
            if made is None:
                return login_page(request, "that token opens nothing here", 401)
            return logged_in(made[1], request, "/")
        principal, _ = who(request)
        if principal is None:
            return RedirectResponse("/login", status_code=303)
        return await fleet_page(request)

    @r.get("/login", response_class=HTMLResponse)
    async def login_form(request: Request, next: str = "/") -> Response:
        return login_page(request, target=_safe_next(next))

    @r.post("/login", response_class=HTMLResponse)
    async def login(request: Request) -> Response:
        origin = request.headers.get("origin")
        # a follower forwards the login here without its Host: its own check was made there
        if (origin and urlsplit(origin).netloc != request.headers.get("host")
                and FORWARDED_BY.decode() not in request.headers):
            return login_page(request, "a login from another site is refused", 403)
        form = parse_qs((await request.body()).decode("utf-8", "replace"))
        target = _safe_next((form.get("next") or ["/"])[0])
        made = sessions.login((form.get("token") or [""])[0])
        if made is None:
            return login_page(request, "wrong token: use the fleet token (DATA/token) or an "
                              "admin or read-only token from 'corral token create'", 401, target)
        return logged_in(made[1], request, target)

    @r.post("/logout")
    async def logout(request: Request) -> Response:
        resp = Response(status_code=204, headers={"hx-redirect": "/login"})
        resp.headers["set-cookie"] = set_cookie_header("", secure=_secure(request), max_age=0)
        return resp

    @r.get("/ui/static/{file}")
    async def static(file: str) -> Response:
        found = STATIC.get(file)
        if found is None:
            return Response("no such file", status_code=404, media_type="text/plain")
        return Response(found[0], media_type=found[1],
                        headers={"cache-control": "public, max-age=3600"})

    # --- pages and their fragments -----------------------------------------------------------

    async def fleet_data(request: Request) -> dict[str, Any]:
        return {"hosts": await get(request, "/v1/hosts"),
                "instances": await get(request, "/v1/instances")}

    async def fleet_page(request: Request) -> Response:
        return render(request, "fleet.html", **await fleet_data(request))

    @r.get("/ui/frag/fleet", response_class=HTMLResponse)
    async def fleet_frag(request: Request) -> Response:
        return render(request, "_fleet.html", **await fleet_data(request))

    async def instance_data(request: Request, name: str) -> dict[str, Any]:
        inst = await get(request, path_of("/v1/instances", name))
        standbys = [s for s in await get(request, "/v1/standbys") if s["instance"] == name]
        ops = await get(request, "/v1/ops", target=name, limit=50)
        hosts = await get(request, "/v1/hosts")
        syncs = [{"t": o["updated_at"], "bytes": (o.get("result") or {}).get("bytes")}
                 for o in reversed(ops) if o["kind"] == "standby-sync"
                 and o["state"] == "succeeded"]
        return {"i": inst, "standby": standbys[0] if standbys else None, "ops": ops,
                "hosts": hosts, "syncs": syncs}

    @r.get("/instances/{name}", response_class=HTMLResponse)
    async def instance_page(request: Request, name: str) -> Response:
        try:
            data = await instance_data(request, name)
        except ApiError as err:
            return render(request, "error.html", err.status, err=err)
        return render(request, "instance.html", **data)

    @r.get("/ui/frag/instances/{name}", response_class=HTMLResponse)
    async def instance_frag(request: Request, name: str) -> Response:
        try:
            data = await instance_data(request, name)
        except ApiError as err:
            return render(request, "_flash.html", err.status, err=err)
        return render(request, "_instance.html", **data)

    @r.get("/ui/frag/traffic/{name}", response_class=HTMLResponse)
    async def traffic_frag(request: Request, name: str) -> Response:
        t = await get(request, path_of("/v1/instances", name, "traffic"), limit=10)
        return render(request, "_traffic.html", t=t)

    @r.get("/hosts/{name}", response_class=HTMLResponse)
    async def host_page(request: Request, name: str) -> Response:
        try:
            host = await get(request, path_of("/v1/hosts", name))
        except ApiError as err:
            return render(request, "error.html", err.status, err=err)
        instances = await get(request, "/v1/instances", host=name)  # filtered by the database
        return render(request, "host.html", h=host, instances=instances)

    async def ops_data(request: Request) -> dict[str, Any]:
        ops = await get(request, "/v1/ops", limit=100)
        return {"running": [o for o in ops if not o["finished"]],
                "history": [o for o in ops if o["finished"]]}

    @r.get("/ops", response_class=HTMLResponse)
    async def ops_page(request: Request) -> Response:
        return render(request, "ops.html", **await ops_data(request))

    @r.get("/ui/frag/ops", response_class=HTMLResponse)
    async def ops_frag(request: Request) -> Response:
        return render(request, "_ops.html", **await ops_data(request))

    @r.get("/events", response_class=HTMLResponse)
    async def events_page(request: Request, type: str = "", instance: str = "",
                          since: str = "1h") -> Response:
        query = {"since": since or "1h", "type": type or None, "instance": instance or None}
        status, raw = await call_raw(request.app, token, "GET", "/v1/events", query=query)
        events: list[dict[str, Any]] = []
        error = None
        if status >= 400:
            error = ApiError(status, _json(raw))
        else:
            for line in raw.splitlines()[-EVENTS_SHOWN:]:
                with contextlib.suppress(ValueError):
                    events.append(json.loads(line))
            events.reverse()
        return render(request, "events.html", events=events, err=error, type=type,
                      instance=instance, since=since, types=type_names())

    # --- actions -------------------------------------------------------------------------------

    @r.post("/ui/act", response_class=HTMLResponse)
    async def act(request: Request) -> Response:
        form = {k: v[0] for k, v in
                parse_qs((await request.body()).decode("utf-8", "replace")).items()}
        action = form.get("action", "")
        if action not in ACTIONS:
            return render(request, "_flash.html", 400, err=ApiError(400, {"error": {
                "message": f"unknown action {action!r}",
                "hint": f"one of: {', '.join(ACTIONS)}"}}))
        status, body = await run_action(request.app, token, action, form)
        resp = render(request, "_flash.html", 200 if status < 400 else status,
                      err=ApiError(status, body) if status >= 400 else None,
                      action=action, target=form.get("name", ""), answer=body)
        resp.headers["hx-trigger"] = "corral:changed"
        return resp

    r.routes.extend(relay.router(token).routes)
    return r


__all__ = ["COOKIE", "router"]
