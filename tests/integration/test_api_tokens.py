"""API tokens with roles (issue 10, item 1), against a real control plane (uvicorn, SQLite,
embedded nats-server): the fleet token is admin; a read-only token reads and every write is
refused with 403 and a hint; a host token reaches only the image-store routes an agent uses;
tokens are kept hashed, listed without secrets, and stop working the moment they are revoked.
The CLI's ``corral token`` commands run in a worker thread against the same server."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from corral.cli.main import run_cli
from corral.config import Settings
from corral.control.db import ApiToken
from corral.control.server import ControlPlane

TOKEN = "fleet-token-for-roles"
EMPTY_MANIFEST = json.dumps({"version": 1, "entries": []}).encode()


class Api:
    def __init__(self, plane: ControlPlane, admin: httpx.AsyncClient) -> None:
        self.plane = plane
        self.admin = admin

    def client(self, token: str | None) -> httpx.AsyncClient:
        headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        return httpx.AsyncClient(base_url=self.plane.api_url, headers=headers, timeout=30)

    async def token(self, role: str, prefix: str = "t") -> str:
        r = await self.admin.post("/v1/tokens", json={"name": unique(prefix), "role": role})
        assert r.status_code == 201, r.text
        return str(r.json()["token"])


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    plane = ControlPlane(Settings(data_dir=tmp_path, token=TOKEN, api_port=0,
                                  lease_seconds=30.0, heartbeat_seconds=1.0))
    await plane.start()
    try:
        async with httpx.AsyncClient(base_url=plane.api_url, timeout=30,
                                     headers={"Authorization": f"Bearer {TOKEN}"}) as admin:
            yield Api(plane, admin)
    finally:
        await plane.stop()


def rows(plane: ControlPlane) -> list[tuple[str, str, str, str]]:
    assert plane.fleet is not None
    with plane.fleet.sessions() as s:
        return [(r.name, r.role, r.key_id, r.secret_sha256)
                for r in s.scalars(select(ApiToken).order_by(ApiToken.name))]


async def test_tokens_are_shown_once_kept_hashed_and_listed_without_secrets(api: Api) -> None:
    name = unique("ci")
    r = await api.admin.post("/v1/tokens", json={"name": name, "role": "read-only"})
    assert r.status_code == 201, r.text
    made = r.json()
    assert made["name"] == name and made["role"] == "read-only"
    token = made["token"]
    stored = rows(api.plane)
    assert [(n, role) for n, role, _, _ in stored] == [(name, "read-only")]
    _, _, key_id, digest = stored[0]
    assert digest == hashlib.sha256(token.encode()).hexdigest()
    assert token not in repr(stored) and key_id in token
    listed = (await api.admin.get("/v1/tokens")).json()
    assert [set(t) for t in listed] == [{"name", "role", "created_at"}]
    assert listed[0]["name"] == name
    again = await api.admin.post("/v1/tokens", json={"name": name, "role": "admin"})
    assert again.status_code == 409 and again.json()["error"]["code"] == "conflict"
    bad = await api.admin.post("/v1/tokens", json={"name": name + "x", "role": "root"})
    assert bad.status_code == 422
    assert [n for n, *_ in rows(api.plane)] == [name]


async def test_read_only_reads_and_every_write_is_refused(api: Api) -> None:
    ro = await api.token("read-only", "ro")
    async with api.client(ro) as c:
        for path in ("/v1/instances", "/v1/hosts", "/v1/status", "/v1/images", "/v1/ops",
                     "/v1/standbys", "/v1/shelves", "/metrics", "/openapi.json"):
            assert (await c.get(path)).status_code == 200, path
        writes = [("POST", "/v1/instances", {"name": "w", "command": ["true"]}),
                  ("POST", "/v1/instances/w/stop", {}),
                  ("DELETE", "/v1/instances/w", None),
                  ("POST", "/v1/instances/w/migrate", {}),
                  ("POST", "/v1/unshelve", {"all": True}),
                  ("DELETE", "/v1/images/base", None),
                  ("POST", "/v1/images/gc", None),
                  ("POST", "/v1/chunks/upload", None),
                  ("POST", "/v1/tokens", {"name": "mine", "role": "admin"}),
                  ("GET", "/v1/tokens", None)]
        for method, path, body in writes:
            r = await c.request(method, path, json=body)
            assert r.status_code == 403, (method, path, r.text)
            err = r.json()["error"]
            assert err["code"] == "forbidden" and err["hint"], err
            assert "read-only" in err["message"], err
    assert next(n for n, *_ in rows(api.plane)).startswith("ro-")
    assert len(rows(api.plane)) == 1  # its POST /v1/tokens made nothing


async def test_a_host_token_reaches_only_the_image_routes_an_agent_uses(api: Api) -> None:
    host = await api.token("host", "host1")
    async with api.client(host) as c:
        r = await c.post("/v1/chunks/missing", json={"ids": ["ab" * 32]})
        assert r.status_code == 200 and r.json() == {"missing": ["ab" * 32]}
        assert (await c.post("/v1/chunks/fetch", json={"ids": []})).status_code == 200
        assert (await c.post("/v1/chunks/upload", content=b"")).status_code == 200
        shelf = f"@shelf-{unique('w')}"
        r = await c.put(f"/v1/images/{shelf}", content=EMPTY_MANIFEST)
        assert r.status_code == 200, r.text
        assert (await c.get(f"/v1/images/{shelf}/manifest")).status_code == 200
        # but not an image, not a replacement, and nothing else of the fleet
        for method, path, kw in [
                ("PUT", "/v1/images/base", {"content": EMPTY_MANIFEST}),
                ("PUT", f"/v1/images/{shelf}?replace=true", {"content": EMPTY_MANIFEST}),
                ("GET", "/v1/instances", {}), ("GET", "/v1/hosts", {}),
                ("GET", "/metrics", {}), ("GET", "/openapi.json", {}),
                ("POST", "/v1/instances", {"json": {"name": "x", "command": ["true"]}}),
                ("DELETE", f"/v1/images/{shelf}", {}), ("POST", "/v1/images/gc", {}),
                ("GET", "/v1/tokens", {})]:
            r = await c.request(method, path, **kw)
            assert r.status_code == 403, (method, path, r.text)
            assert r.json()["error"]["code"] == "forbidden"
    names = [i["name"] for i in (await api.admin.get("/v1/images")).json()]
    assert "base" not in names


async def test_revoked_and_unknown_tokens_are_refused_at_once(api: Api) -> None:
    name = unique("gone")
    token = (await api.admin.post("/v1/tokens", json={"name": name, "role": "admin"})).json()[
        "token"]
    async with api.client(token) as c:
        assert (await c.get("/v1/instances")).status_code == 200
        assert (await api.admin.delete(f"/v1/tokens/{name}")).status_code == 204
        r = await c.get("/v1/instances")
        assert r.status_code == 401 and r.json()["error"]["message"] == "wrong token"
    assert (await api.admin.delete(f"/v1/tokens/{name}")).status_code == 404
    key_id = token.split("_")[1]
    for forged in (token[:-1] + ("A" if token[-1] != "A" else "B"), f"corral_{key_id}_x",
                   "corral_", "corral__", TOKEN + "x"):
        async with api.client(forged) as c:
            assert (await c.get("/v1/status")).status_code == 401, forged


async def test_an_admin_token_does_everything_the_fleet_token_does(api: Api) -> None:
    admin = await api.token("admin", "ops")
    async with api.client(admin) as c:
        made = await c.post("/v1/tokens", json={"name": unique("sub"), "role": "host"})
        assert made.status_code == 201
        assert len((await c.get("/v1/tokens")).json()) == 2
        assert (await c.post("/v1/images/gc")).status_code == 200


def _cli(api: Api, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
         *argv: str) -> tuple[int, str, str]:
    code = run_cli(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


async def test_the_token_commands(api: Api, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    monkeypatch.setenv("CORRAL_URL", api.plane.api_url)
    monkeypatch.setenv("CORRAL_TOKEN", TOKEN)
    monkeypatch.setenv("CORRAL_CONTEXT", str(tmp_path / "no-context.json"))
    name = unique("grafana")

    async def cli(*argv: str) -> tuple[int, str, str]:
        return await asyncio.to_thread(_cli, api, monkeypatch, capsys, *argv)

    code, out, err = await cli("token", "create", name, "--read-only")
    assert code == 0, err
    token = out.strip()
    assert token.startswith("corral_") and "\n" not in token
    assert "shown this once" in err and "read-only" in err
    async with api.client(token) as c:
        assert (await c.get("/v1/instances")).status_code == 200
        assert (await c.post("/v1/images/gc")).status_code == 403
    code, out, _ = await cli("token", "ls", "--json")
    assert code == 0 and [(t["name"], t["role"]) for t in json.loads(out)] == [
        (name, "read-only")]
    code, out, _ = await cli("token", "ls")
    assert code == 0 and name in out and "read-only" in out and token not in out
    code, _, err = await cli("token", "create", unique("x"), "--read-only", "--role", "admin")
    assert code == 2 and "disagree" in err
    code, out, err = await cli("token", "create", unique("h"), "--role", "host", "--json")
    assert code == 0 and json.loads(out)["role"] == "host"
    code, out, _ = await cli("token", "rm", name)
    assert code == 0 and f"{name}: revoked" in out
    async with api.client(token) as c:
        assert (await c.get("/v1/instances")).status_code == 401
    code, _, err = await cli("token", "rm", name)
    assert code == 4 and "no token named" in err
    # the read-only token's own refusal, through the CLI: exit 3 (a token problem) and a hint
    ro = await api.token("read-only")
    monkeypatch.setenv("CORRAL_TOKEN", ro)
    code, _, err = await cli("image", "gc")
    assert code == 3 and "read-only" in err and "hint" in err
    assert os.environ["CORRAL_TOKEN"] == ro
