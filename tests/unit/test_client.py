"""The HTTP client against a tiny real HTTP server: typed replies and error mapping."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from corral import errors
from corral.api.client import UNREACHABLE_HINT, Client
from corral.api.models import CreateInstance

INSTANCE = {
    "name": "web", "host": "host1", "driver": "process", "command": ["sleep", "9"],
    "cpus": 0.5, "memory_bytes": 1024, "desired_state": "running", "state": "running",
    "created_at": 1.0, "updated_at": 2.0, "usage": {"cpu_core_pct": 99.5, "cpu_host_pct": 49.75},
    "allowed": ["stop", "kill", "restart", "freeze"],
}
HOST = {
    "name": "host1", "address": "127.0.0.1", "state": "up", "cores": 2, "memory_bytes": 10,
    "disk_bytes": 10, "drivers": {"process": {"can_freeze": False}},
    "reserved": {"cpus": 0.5, "memory_bytes": 1}, "free": {"cpus": 1.5, "memory_bytes": 9},
    "instances": 1,
}
STATUS = {"version": "0.1.0", "hosts_up": 1, "hosts_down": 0, "instances": {"running": 1},
          "nats_url": "nats://127.0.0.1:4222", "db": "sqlite"}


class Recorder:
    def __init__(self) -> None:
        self.requests: list[tuple[str, str, dict[str, str], Any]] = []


def _routes(method: str, path: str) -> tuple[int, Any, str]:
    """(status, body, content type) the fake server answers."""
    json_ct = "application/json"
    table: dict[tuple[str, str], tuple[int, Any, str]] = {
        ("GET", "/v1/status"): (200, STATUS, json_ct),
        ("GET", "/v1/hosts"): (200, [HOST], json_ct),
        ("GET", "/v1/hosts/host1"): (200, HOST, json_ct),
        ("GET", "/v1/instances"): (200, [INSTANCE], json_ct),
        ("GET", "/v1/instances/web"): (200, INSTANCE, json_ct),
        ("POST", "/v1/instances"): (201, INSTANCE, json_ct),
        ("POST", "/v1/instances/web/stop"): (200, {**INSTANCE, "state": "stopped"}, json_ct),
        ("POST", "/v1/instances/web/thaw"): (409, {"error": {
            "code": "invalid_transition", "message": "cannot thaw instance 'web': it is running",
            "hint": "from running you can: stop", "retryable": False,
            "details": {"state": "running"}}}, json_ct),
        ("DELETE", "/v1/instances/web"): (204, None, json_ct),
        ("DELETE", "/v1/instances/gone"): (404, {"error": {
            "code": "not_found", "message": "no instance 'gone'", "hint": "see corral ls"}},
            json_ct),
        ("GET", "/metrics"): (200, "corral_up 1\n", "text/plain"),
        ("GET", "/v1/instances/bad"): (422, {"detail": [
            {"loc": ["body", "cpus"], "msg": "must be > 0", "type": "x"}]}, json_ct),
        ("GET", "/v1/instances/plain"): (401, "nope", "text/plain"),
        ("GET", "/v1/instances/boom"): (500, "<html>oops</html>", "text/html"),
    }
    return table.get((method, path), (404, {"error": {"code": "not_found",
                                                      "message": "no route"}}, json_ct))


@pytest.fixture
def server() -> Iterator[tuple[str, Recorder]]:
    rec = Recorder()

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length)) if length else None
            path, _, _query = self.path.partition("?")
            rec.requests.append((self.command, self.path, dict(self.headers), body))
            status, payload, ctype = _routes(self.command, path)
            data = b"" if payload is None else (
                payload.encode() if isinstance(payload, str) else json.dumps(payload).encode())
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_DELETE = _answer

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", rec
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_typed_methods_and_auth_header(server: tuple[str, Recorder]) -> None:
    url, rec = server
    with Client(url + "/", "sekrit") as c:
        assert c.status().hosts_up == 1
        assert c.hosts()[0].free.cpus == 1.5
        assert c.host("host1").cores == 2
        assert c.instances()[0].usage.cpu_host_pct == 49.75
        assert c.instance("web").allowed[0] == "stop"
        view = c.create(CreateInstance(name="web", command=["sleep", "9"], cpus=0.5))
        assert view.name == "web"
        assert c.action("web", "stop", timeout=3).state == "stopped"
        c.delete("web", force=True)
        assert c.metrics_text() == "corral_up 1\n"
    assert all(h["Authorization"] == "Bearer sekrit" for _, _, h, _ in rec.requests)
    posts = {p: b for m, p, _, b in rec.requests if m == "POST"}
    assert posts["/v1/instances"]["cpus"] == 0.5
    assert posts["/v1/instances/web/stop"] == {"timeout": 3}
    assert ("DELETE", "/v1/instances/web?force=true") in [(m, p) for m, p, _, _ in rec.requests]


def test_json_errors_become_corral_errors(server: tuple[str, Recorder]) -> None:
    url, _ = server
    with Client(url, "t") as c:
        with pytest.raises(errors.InvalidTransition) as info:
            c.action("web", "thaw")
        assert info.value.hint == "from running you can: stop"
        assert info.value.details == {"state": "running"}
        assert info.value.exit_code == 5
        with pytest.raises(errors.NotFound, match="no instance 'gone'"):
            c.delete("gone")
        with pytest.raises(errors.InvalidRequest, match=r"cpus: must be > 0"):
            c.instance("bad")
        with pytest.raises(errors.Unauthorized) as unauth:
            c.instance("plain")
        assert unauth.value.exit_code == 3
        with pytest.raises(errors.CorralError, match="HTTP 500"):
            c.instance("boom")


def test_connection_refused_says_what_to_do() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with Client(f"http://127.0.0.1:{port}", "t", timeout=2) as c, \
            pytest.raises(errors.CorralError) as info:
        c.hosts()
    assert info.value.hint == UNREACHABLE_HINT
    assert info.value.retryable
    assert f"127.0.0.1:{port}" in info.value.message
