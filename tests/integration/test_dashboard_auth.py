"""The dashboard's sessions and CSRF, against a real control plane and without a browser: the
one-click URL trades its token for an HttpOnly, SameSite=Strict cookie and a clean address; a
cookie opens pages and the API's reads but never an API write; a dashboard write needs the
session's CSRF header and an admin role; a revoked token's sessions end; forged, tampered and
expired cookies open nothing; bodies stay bounded; an action's error is the API's, word for
word."""

from __future__ import annotations

import contextlib
import html
import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from corral.config import Settings
from corral.control.dashboard.sessions import COOKIE, Sessions, derive_key, set_cookie_header
from corral.control.db import Instance
from corral.control.server import ControlPlane
from corral.control.tokens import Principal

TOKEN = "fleet-token-for-the-dashboard"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
CSRF = re.compile(r'"X-CSRF-Token": "([^"]+)"')


@pytest.fixture
async def plane(tmp_path: Path) -> AsyncIterator[ControlPlane]:
    p = ControlPlane(Settings(data_dir=tmp_path, token=TOKEN, api_port=0, lease_seconds=30.0,
                              heartbeat_seconds=1.0))
    await p.start()
    try:
        yield p
    finally:
        await p.stop()


def browser(plane: ControlPlane) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=plane.api_url, timeout=30)


@contextlib.asynccontextmanager
async def login(plane: ControlPlane, token: str) -> AsyncIterator[tuple[httpx.AsyncClient, str]]:
    """A client holding a session made from ``token``, and its CSRF token."""
    async with browser(plane) as c:
        r = await c.get("/", params={"token": token})
        assert r.status_code == 303, r.text
        page = await c.get("/")
        assert page.status_code == 200
        m = CSRF.search(page.text)
        assert m is not None, page.text[:500]
        yield c, m.group(1)


async def named_token(plane: ControlPlane, role: str) -> tuple[str, str]:
    name = f"dash-{uuid.uuid4().hex[:8]}"
    async with browser(plane) as c:
        r = await c.post("/v1/tokens", json={"name": name, "role": role}, headers=BEARER)
    assert r.status_code == 201, r.text
    return name, str(r.json()["token"])


def instances(plane: ControlPlane) -> int:
    assert plane.fleet is not None
    with plane.fleet.sessions() as s:
        return int(s.scalar(select(func.count()).select_from(Instance)) or 0)


async def test_token_url_sets_a_strict_http_only_cookie_and_a_clean_address(
        plane: ControlPlane) -> None:
    async with browser(plane) as c:
        r = await c.get("/", params={"token": TOKEN})
        assert r.status_code == 303
        assert r.headers["location"] == "/"  # the token is gone from the address
        cookie = r.headers["set-cookie"]
        attrs = {a.strip().split("=")[0].lower() for a in cookie.split(";")}
        assert cookie.startswith(f"{COOKIE}=")
        assert {"httponly", "path", "max-age"} <= attrs
        assert "samesite=strict" in cookie.lower()
        assert "secure" not in attrs  # plain http on loopback; https adds it (below)
        assert TOKEN not in cookie
        page = await c.get("/")
        assert page.status_code == 200 and "Hosts" in page.text
        # no framing (a confirm button under another site's page), scripts only from here
        csp = page.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in csp and "script-src 'self';" in csp
        assert TOKEN not in page.text
    assert "Secure" in set_cookie_header("v", secure=True).split("; ")


async def test_wrong_token_and_no_session(plane: ControlPlane) -> None:
    async with browser(plane) as c:
        r = await c.get("/", params={"token": "not-the-token"})
        assert r.status_code == 401 and "set-cookie" not in r.headers
        r = await c.post("/login", data={"token": "nope", "next": "/ops"})
        assert r.status_code == 401 and "wrong token" in r.text
        for page in ("/ops", "/events", "/instances/x"):
            r = await c.get(page)
            assert r.status_code == 303
            assert r.headers["location"].startswith("/login?next=")
        r = await c.get("/")
        assert r.status_code == 303 and r.headers["location"] == "/login"
        # fragments and streams answer 401 (htmx sends the page to the login form)
        assert (await c.get("/ui/frag/fleet")).status_code == 401
        # the login form goes back where it was asked, never to another site
        r = await c.post("/login", data={"token": TOKEN, "next": "//evil.example/"})
        assert r.status_code == 303 and r.headers["location"] == "/"
        r = await c.post("/login", data={"token": TOKEN, "next": "/ops"},
                         headers={"Origin": "http://evil.example"})
        assert r.status_code == 403 and "set-cookie" not in r.headers


async def test_cookie_reads_the_api_but_never_writes_it(plane: ControlPlane) -> None:
    async with login(plane, TOKEN) as (c, csrf):
        assert (await c.get("/v1/instances")).status_code == 200
        assert (await c.get("/v1/hosts")).status_code == 200
        before = instances(plane)
        body = {"name": "by-cookie", "command": ["sleep", "1"]}
        for headers in ({}, {"X-CSRF-Token": csrf}):
            r = await c.post("/v1/instances", json=body, headers=headers)
            assert r.status_code == 403, r.text
            assert "bearer token" in r.json()["error"]["message"]
        assert instances(plane) == before


async def test_dashboard_writes_need_the_sessions_csrf_header(plane: ControlPlane) -> None:
    form = {"action": "stop", "name": "no-such-instance"}
    async with login(plane, TOKEN) as (c, csrf), login(plane, TOKEN) as (_, other_csrf):
        assert csrf != other_csrf  # one per session
        r = await c.post("/ui/act", data=form)
        assert r.status_code == 403 and "CSRF" in r.json()["error"]["message"]
        r = await c.post("/ui/act", data=form, headers={"X-CSRF-Token": other_csrf})
        assert r.status_code == 403
        r = await c.post("/ui/act", data=form, headers={"X-CSRF-Token": csrf})
        # past the guard: the API's own answer, word for word, as the CLI shows it
        async with browser(plane) as api:
            want = (await api.post("/v1/instances/no-such-instance/stop",
                                   headers=BEARER)).json()["error"]
        assert r.status_code == 404
        shown = html.unescape(r.text)
        assert f"error: {want['message']}" in re.sub(r"<[^>]+>", "", shown)
        assert f"hint: {want['hint']}" in re.sub(r"<[^>]+>", "", shown)
        r = await c.post("/ui/act", content=b"action=stop&name=" + b"x" * 10_000,
                         headers={"X-CSRF-Token": csrf,
                                  "Content-Type": "application/x-www-form-urlencoded"})
        assert r.status_code == 413


async def test_read_only_sees_no_buttons_and_its_writes_are_refused(
        plane: ControlPlane) -> None:
    _, ro = await named_token(plane, "read-only")
    async with login(plane, ro) as (c, csrf):
        for page in ("/", "/ops", "/events"):
            r = await c.get(page)
            assert r.status_code == 200
            assert 'hx-post="/ui/act"' not in r.text
            assert "(read-only)" in r.text
        r = await c.post("/ui/act", data={"action": "stop", "name": "x"},
                         headers={"X-CSRF-Token": csrf})
        assert r.status_code == 403 and "read-only" in r.json()["error"]["message"]
    async with login(plane, TOKEN) as (admin, _):
        assert 'hx-post="/logout"' in (await admin.get("/")).text


async def test_revoked_token_ends_its_sessions(plane: ControlPlane) -> None:
    name, admin_token = await named_token(plane, "admin")
    async with login(plane, admin_token) as (c, _):
        assert (await c.get("/ops")).status_code == 200
        async with browser(plane) as api:
            assert (await api.delete(f"/v1/tokens/{name}", headers=BEARER)).status_code == 204
        r = await c.get("/ops")
        assert r.status_code == 303
        assert (await c.get("/v1/instances")).status_code == 401


async def test_tampered_cookie_opens_nothing(plane: ControlPlane) -> None:
    async with login(plane, TOKEN) as (c, _):
        value = str(c.cookies[COOKIE])
    payload, _, mac = value.partition(".")
    async with browser(plane) as forged:
        # a payload changed by one character, with the old signature
        forged.cookies.set(COOKIE, payload[:-1] + ("A" if payload[-1] != "A" else "B") + "." +
                           mac)
        assert (await forged.get("/ops")).status_code == 303
        forged.cookies.set(COOKIE, "garbage")
        assert (await forged.get("/v1/instances")).status_code == 401


def test_sessions_expire_and_follow_their_token() -> None:
    now = [1_000_000.0]
    store: dict[str, tuple[str, str]] = {}
    named_plain = "corral_0123456789abcdef_secret"

    def resolve(token: str) -> Principal | None:
        return Principal("ci", "read-only") if token == named_plain else None

    s = Sessions(derive_key("fleet-secret"), "fleet-secret", resolve, store.get,
                 clock=lambda: now[0])
    made = s.login("fleet-secret")
    assert made is not None
    session, value = made
    assert s.check(value) == session and session.principal.role == "admin"
    assert s.login("wrong") is None and s.login("") is None
    now[0] += 12 * 3600 + 1
    assert s.check(value) is None  # expired
    now[0] = 1_000_000.0
    # another server of the fleet takes it; another key, or a new fleet token, does not
    assert Sessions(derive_key("fleet-secret"), "fleet-secret", resolve, store.get,
                    clock=lambda: now[0]).check(value) == session
    assert Sessions(b"j" * 32, "fleet-secret", resolve, store.get).check(value) is None
    assert Sessions(derive_key("new-fleet-secret"), "new-fleet-secret", resolve, store.get,
                    clock=lambda: now[0]).check(value) is None
    # a named token's session lives while its token does, with the same role
    named = s.login(named_plain)
    assert named is not None
    assert s.check(named[1]) is None  # not stored (yet): refused
    store["ci"] = ("0123456789abcdef", "read-only")
    got = s.check(named[1])
    assert got is not None and got.principal == Principal("ci", "read-only")
    store["ci"] = ("0123456789abcdef", "admin")  # the role changed: log in again
    assert s.check(named[1]) is None
    assert not s.csrf_ok(got, None) and not s.csrf_ok(got, "x") and s.csrf_ok(got, got.csrf)
