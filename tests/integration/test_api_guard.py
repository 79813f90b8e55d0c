"""The API's guard (issue 10, items 2 and 3), against a real control plane: a request without a
good token is refused before its body is read, a body larger than its route takes is refused
with 413 before it is read whole (Content-Length or not), and the answers schemathesis found
wrong are right: a non-JSON body is a 422 that echoes no bytes, a bodiless manifest is a 4xx,
a 405 says what is allowed, and the OpenAPI document declares what the routes answer.

Nothing here is timed: "refused before the body was read" is seen as the answer arriving while
most of the body is still unsent, and "the loop was not held up" as other requests answering
meanwhile."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from corral.api.client import Client
from corral.config import Settings
from corral.control.db import Instance
from corral.control.server import ControlPlane
from corral.images.records import MAX_UPLOAD_BYTES, RECORD

TOKEN = "fleet-token-for-the-guard"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MiB = 1024 * 1024


@pytest.fixture
async def plane(tmp_path: Path) -> AsyncIterator[ControlPlane]:
    p = ControlPlane(Settings(data_dir=tmp_path, token=TOKEN, api_port=0, lease_seconds=30.0,
                              heartbeat_seconds=1.0))
    await p.start()
    try:
        yield p
    finally:
        await p.stop()


def instances(plane: ControlPlane) -> int:
    assert plane.fleet is not None
    with plane.fleet.sessions() as s:
        return int(s.scalar(select(func.count()).select_from(Instance)) or 0)


def address(plane: ControlPlane) -> tuple[str, int]:
    host, _, port = plane.api_url.removeprefix("http://").rpartition(":")
    return host.strip("[]"), int(port)


async def _read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in
               (line.partition(":") for line in lines[1:] if line)}
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers, body


async def upload(plane: ControlPlane, path: str, total: int, headers: dict[str, str],
                 chunked: bool = False) -> tuple[int | None, int, dict[str, str], bytes]:
    """Send a POST of ``total`` bytes in 64 KiB pieces, reading the answer as soon as one
    comes: (status or None when the server closed without one, bytes sent by then,
    headers, body)."""
    host, port = address(plane)
    reader, writer = await asyncio.open_connection(host, port)
    piece = b"[" + b"0," * (32 * 1024 - 1) + b"0"  # 64 KiB of what could be JSON
    head = [f"POST {path} HTTP/1.1", f"Host: {host}", "Content-Type: application/json",
            *(f"{k}: {v}" for k, v in headers.items())]
    head.append("Transfer-Encoding: chunked" if chunked else f"Content-Length: {total}")
    answer: asyncio.Task[tuple[int, dict[str, str], bytes]] = asyncio.create_task(
        _read_answer(reader))
    sent = 0
    try:
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode())
        while sent < total and not answer.done():
            data = piece[: min(len(piece), total - sent)]
            writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n" if chunked else data)
            await writer.drain()
            sent += len(data)
        if chunked and not answer.done():
            writer.write(b"0\r\n\r\n")
            await writer.drain()
    except (ConnectionError, OSError):
        pass  # the server closed on us: the answer (if any) is in the reader
    try:
        status, hdrs, body = await asyncio.wait_for(answer, 60)
    except (asyncio.IncompleteReadError, ConnectionError):
        return None, sent, {}, b""
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    return status, sent, hdrs, body


async def test_a_large_unauthenticated_upload_is_refused_before_it_is_read(
        plane: ControlPlane) -> None:
    """100 MB to a JSON route without a token: refused at once, the rest never read, and the
    server keeps answering everyone else meanwhile."""
    total = 100 * MiB
    healthy: list[int] = []

    async def meanwhile(stop: asyncio.Event) -> None:
        async with httpx.AsyncClient(base_url=plane.api_url, timeout=30) as c:
            while not stop.is_set():
                healthy.append((await c.get("/healthz")).status_code)
                healthy.append((await c.get("/v1/status", headers=AUTH)).status_code)
                await asyncio.sleep(0)

    stop = asyncio.Event()
    others = asyncio.create_task(meanwhile(stop))
    try:
        status, sent, headers, body = await upload(plane, "/v1/instances", total, {})
    finally:
        stop.set()
        await others
    assert status == 401, (status, body)
    assert json.loads(body)["error"]["message"] == "missing bearer token"
    assert headers.get("connection") == "close"
    assert sent < total // 2  # answered long before the body was all there
    assert healthy and set(healthy) == {200}
    status, sent, _, _ = await upload(plane, "/v1/chunks/upload", total,
                                      {"Authorization": "Bearer wrong"}, chunked=True)
    assert status == 401 and sent < total // 2
    assert instances(plane) == 0


async def test_a_body_over_its_routes_cap_is_refused_with_413(plane: ControlPlane) -> None:
    # said up front: refused before a byte is read
    status, sent, headers, body = await upload(plane, "/v1/instances", 10 * MiB, AUTH)
    assert status == 413, body
    err = json.loads(body)["error"]
    assert err["code"] == "body_too_large" and "65536 bytes" in err["message"] and err["hint"]
    assert headers.get("connection") == "close" and sent < 5 * MiB
    # not said (chunked): counted as it comes, refused once past the cap
    status, sent, _, body = await upload(plane, "/v1/instances", 10 * MiB, AUTH, chunked=True)
    assert status == 413 and sent < 5 * MiB, body
    # an upload of chunks takes more, but not without end
    status, sent, _, body = await upload(plane, "/v1/chunks/upload", 3 * MAX_UPLOAD_BYTES,
                                         AUTH, chunked=True)
    assert status == 413 and sent < 2 * MAX_UPLOAD_BYTES, body
    assert instances(plane) == 0
    # and under the cap the same routes work
    async with httpx.AsyncClient(base_url=plane.api_url, headers=AUTH, timeout=30) as c:
        r = await c.post("/v1/instances", json={"name": "small", "command": ["true"]})
        assert r.status_code == 409 and r.json()["error"]["code"] == "no_capacity"


async def test_the_client_cuts_chunk_uploads_to_the_cap(plane: ControlPlane) -> None:
    """More than one upload's worth of records: the client sends them in several requests,
    each under the server's cap, and every chunk is stored."""
    from corral.images.packstore import chunk_id

    raw = [os.urandom(200 * 1024) for _ in range(50)]  # 10 MB, incompressible
    records = [(chunk_id(b), len(b), _zstd(b)) for b in raw]
    assert sum(RECORD.size + len(r[2]) for r in records) > MAX_UPLOAD_BYTES

    def push() -> tuple[int, list[bytes]]:
        with Client(plane.api_url, TOKEN) as c:
            sent = c.upload_chunks(records)
            return sent, c.missing_chunks([r[0] for r in records])

    sent, missing = await asyncio.to_thread(push)
    assert missing == [] and sent >= sum(len(r[2]) for r in records)


def _zstd(data: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor().compress(data)


async def test_a_body_that_is_not_json_is_a_422_that_echoes_no_bytes(
        plane: ControlPlane) -> None:
    async with httpx.AsyncClient(base_url=plane.api_url, headers=AUTH, timeout=30) as c:
        for path in ("/v1/instances", "/v1/chunks/missing", "/v1/unshelve",
                     "/v1/instances/x/migrate", "/v1/tokens"):
            r = await c.post(path, content=b'{"name": "a", "command": ["x"]}\xff\x00',
                             headers={"Content-Type": "text/plain"})
            assert r.status_code == 422, (path, r.text)
            err = r.json()["error"]
            assert err["code"] == "invalid_request"
            assert "JSON" in err["message"], err
        r = await c.post("/v1/instances", content=b"x" * 50_000,
                         headers={"Content-Type": "application/json"})
        assert r.status_code == 422 and len(r.content) < 2000  # no 50 KB echoed back
    assert instances(plane) == 0


async def test_a_manifest_put_without_a_body_is_refused(plane: ControlPlane) -> None:
    async with httpx.AsyncClient(base_url=plane.api_url, headers=AUTH, timeout=30) as c:
        for body in (b"", b"[]", b"{", b'{"version": 1}'):
            r = await c.put("/v1/images/empty", content=body)
            assert 400 <= r.status_code < 500, (body, r.text)
        assert (await c.get("/v1/images")).json() == []


async def test_405_lists_every_method_of_the_path(plane: ControlPlane) -> None:
    async with httpx.AsyncClient(base_url=plane.api_url, headers=AUTH, timeout=30) as c:
        r = await c.request("PATCH", "/v1/instances/web")
        assert r.status_code == 405
        assert r.headers["allow"] == "DELETE, GET"
        assert r.json()["error"]["code"] == "http_error"
        r = await c.request("TRACE", "/v1/tokens")
        assert r.status_code == 405 and r.headers["allow"] == "GET, POST"
        r = await c.request("OPTIONS", "/v1/images/gc")  # not the methods of /v1/images/{name}
        assert r.status_code == 405 and r.headers["allow"] == "POST"
    async with httpx.AsyncClient(base_url=plane.api_url, timeout=30) as anon:
        r = await anon.post("/healthz")  # a public path: no token needed to learn that
        assert r.status_code == 405 and r.headers["allow"] == "GET"
        r = await anon.request("PATCH", "/v1/instances/web")
        assert r.status_code == 401  # the rest of the API says nothing to strangers


async def test_the_openapi_document_declares_what_routes_answer(plane: ControlPlane) -> None:
    async with httpx.AsyncClient(base_url=plane.api_url, headers=AUTH, timeout=30) as c:
        spec: dict[str, Any] = (await c.get("/openapi.json")).json()
    create = spec["paths"]["/v1/instances"]["post"]
    assert {"400", "401", "403", "413", "422"} <= set(create["responses"])
    assert create.get("security"), "the bearer scheme is declared"
    ids = spec["components"]["schemas"]["ChunkIds"]["properties"]["ids"]["items"]
    assert ids.get("pattern") == "^[0-9a-fA-F]{64}$"
    fetch = spec["paths"]["/v1/chunks/fetch"]["post"]["responses"]["200"]["content"]
    assert "application/octet-stream" in fetch
    assert {"/v1/tokens", "/v1/tokens/{name}"} <= set(spec["paths"])
