"""The HTTP client against tiny real HTTP servers: typed replies and error mapping, keep-alive,
streamed NDJSON, timeouts, TLS verification and proxies, all on the standard library."""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from corral import errors
from corral.api.client import UNREACHABLE_HINT, Client, TransportError, TransportTimeout
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
        #: client ports seen: one per TCP connection
        self.ports: list[int] = []
        #: how many more calls a takeover answers "no leader" to
        self.leaderless = 0


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
        protocol_version = "HTTP/1.1"  # keep-alive, as uvicorn does

        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length)) if length else None
            path, _, _query = self.path.partition("?")
            rec.requests.append((self.command, self.path, dict(self.headers), body))
            rec.ports.append(self.client_address[1])
            status, payload, ctype = _routes(self.command, path)
            if rec.leaderless > 0 or path == "/v1/instances/web/kill":
                rec.leaderless -= 1
                status, payload = 503, {"error": {
                    "code": "not_leader", "message": "the leader cannot be reached",
                    "hint": "try again", "retryable": path != "/v1/instances/web/kill"}}
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


def test_a_server_that_cannot_be_reached_is_passed_over(server: tuple[str, Recorder]) -> None:
    """Several servers of one fleet, the first down: every call (a POST too: nothing was
    sent) goes to the next; with all of them down the error names the last one tried."""
    url, rec = server
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    with Client(f"{dead},{url}", "t", timeout=2) as c:
        assert c.hosts()[0].name == "host1"
        assert c.create(CreateInstance(name="web", command=["sleep", "9"], cpus=0.5)).name
    assert [m for m, *_ in rec.requests] == ["GET", "POST"]
    with Client(f"{dead},{dead}", "t", timeout=2) as c, \
            pytest.raises(errors.CorralError) as info:
        c.hosts()
    assert info.value.retryable and dead.split("//")[1] in info.value.message


def test_no_leader_for_a_moment_is_waited_out(server: tuple[str, Recorder],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A takeover's seconds (503 not_leader, retryable: nothing was done) are waited out, a
    POST too; a longer one ends in that error; one that is not retryable (the leader went away
    mid-answer, the call may have taken effect) is never sent again."""
    from corral.api import transport

    url, rec = server
    with Client(url, "t", timeout=2) as c:
        rec.leaderless = 3
        assert c.create(CreateInstance(name="web", command=["sleep", "9"], cpus=0.5)).name
        assert [m for m, *_ in rec.requests] == ["POST"] * 4
        rec.requests.clear()
        monkeypatch.setattr(transport, "LEADER_WAIT", 0.5)
        rec.leaderless = 1000
        t0 = time.monotonic()
        with pytest.raises(errors.NotLeader) as info:
            c.hosts()
        assert info.value.retryable and time.monotonic() - t0 < 2
        assert 2 <= len(rec.requests) <= 4
        rec.leaderless = 0
        rec.requests.clear()
        with pytest.raises(errors.NotLeader) as once:
            c.action("web", "kill")
        assert not once.value.retryable and len(rec.requests) == 1


def test_one_connection_serves_every_request(server: tuple[str, Recorder]) -> None:
    url, rec = server
    with Client(url, "t") as c:
        for _ in range(3):
            c.instances_data()
        c.action_data("web", "stop", timeout=1)
    assert len(set(rec.ports)) == 1 and len(rec.ports) == 4


def test_one_client_serves_many_threads(server: tuple[str, Recorder]) -> None:
    """As ``corral down`` uses it: eight stops at a time through one client."""
    from concurrent.futures import ThreadPoolExecutor

    url, rec = server
    with Client(url, "t") as c, ThreadPoolExecutor(8) as pool:
        views = list(pool.map(lambda _: c.action_data("web", "stop", timeout=1), range(40)))
    assert [v["state"] for v in views] == ["stopped"] * 40
    assert len(set(rec.ports)) <= 8  # connections are given back and used again


def test_raw_data_is_what_the_server_sent(server: tuple[str, Recorder]) -> None:
    url, _ = server
    with Client(url, "t") as c:
        assert c.instances_data() == [INSTANCE]
        assert c.instance_data("web") == INSTANCE
        assert c.status_data() == STATUS


def test_missing_scheme_is_a_corral_error() -> None:
    with pytest.raises(errors.CorralError, match="needs http"):
        Client("127.0.0.1:8080", "t")


# -- a scripted server: raw HTTP/1.1 written by the test, one connection at a time ----------


class Scripted:
    """Accepts connections and lets the test answer each request with exact bytes."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections = 0

    def accept(self) -> socket.socket:
        conn, _ = self.sock.accept()
        self.connections += 1
        return conn

    @staticmethod
    def read_request(conn: socket.socket) -> bytes:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return data
            data += chunk
        return data

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def scripted() -> Iterator[Scripted]:
    s = Scripted()
    try:
        yield s
    finally:
        s.close()


def _serve(fn: Any) -> threading.Thread:
    thread = threading.Thread(target=fn, daemon=True)
    thread.start()
    return thread


OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n[]"


def test_a_kept_alive_connection_the_server_closed_is_replaced(scripted: Scripted) -> None:
    def serve() -> None:
        first = scripted.accept()
        Scripted.read_request(first)
        first.sendall(OK)
        time.sleep(0.2)
        first.close()  # the server's keep-alive timeout
        second = scripted.accept()
        Scripted.read_request(second)
        second.sendall(OK)
        time.sleep(0.2)
        second.close()

    thread = _serve(serve)
    with Client(scripted.url, "t", timeout=5) as c:
        assert c.instances_data() == []
        time.sleep(0.5)
        assert c.instances_data() == []
    thread.join(5)
    assert scripted.connections == 2


def test_ndjson_lines_arrive_one_by_one(scripted: Scripted) -> None:
    """``logs -f``: a line is delivered while the server still holds the answer open."""
    release = threading.Event()

    def serve() -> None:
        conn = scripted.accept()
        request = Scripted.read_request(conn)
        assert b"follow=true" in request.split(b"\r\n")[0]
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        line = json.dumps({"line": "one", "seq": 1}).encode() + b"\n"
        conn.sendall(b"%x\r\n%s\r\n" % (len(line), line))
        release.wait(5)
        line = json.dumps({"line": "two", "seq": 2}).encode() + b"\n"
        conn.sendall(b"%x\r\n%s\r\n0\r\n\r\n" % (len(line), line))
        time.sleep(0.2)
        conn.close()

    thread = _serve(serve)
    with Client(scripted.url, "t", timeout=5) as c:
        stream = c.logs("web", follow=True)
        assert next(stream)["line"] == "one"  # before the server sent the second
        release.set()
        assert [r["line"] for r in stream] == ["two"]
    thread.join(5)


def test_a_stream_refused_is_the_servers_error(scripted: Scripted) -> None:
    body = json.dumps({"error": {"code": "not_found", "message": "no instance 'x'",
                                 "hint": "see corral ls"}}).encode()

    def serve() -> None:
        conn = scripted.accept()
        Scripted.read_request(conn)
        conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        time.sleep(0.2)
        conn.close()

    thread = _serve(serve)
    with Client(scripted.url, "t") as c, pytest.raises(errors.NotFound, match="no instance"):
        list(c.event_lines(instance="x"))
    thread.join(5)


def test_a_silent_server_times_out_as_host_unavailable(scripted: Scripted) -> None:
    done = threading.Event()

    def serve() -> None:
        conn = scripted.accept()
        Scripted.read_request(conn)
        done.wait(5)
        conn.close()

    thread = _serve(serve)
    try:
        with Client(scripted.url, "t", timeout=0.3) as c, \
                pytest.raises(TransportTimeout) as info:
            c.instances_data()
    finally:
        done.set()
    thread.join(5)
    assert isinstance(info.value, errors.HostUnavailable) and info.value.exit_code == 7
    assert "did not answer GET /v1/instances in time" in info.value.message


def test_an_answer_cut_short_is_a_transport_error(scripted: Scripted) -> None:
    def serve() -> None:
        conn = scripted.accept()
        Scripted.read_request(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n[1, 2")
        conn.close()

    thread = _serve(serve)
    with Client(scripted.url, "t") as c, pytest.raises(TransportError) as info:
        c.instances_data()
    thread.join(5)
    assert info.value.hint == UNREACHABLE_HINT and info.value.exit_code == 1


def test_http_proxy_from_the_environment(scripted: Scripted,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """As httpx did: ``http_proxy`` is used (absolute-form request), ``no_proxy`` skips it."""
    seen: list[bytes] = []

    def serve() -> None:
        conn = scripted.accept()
        seen.append(Scripted.read_request(conn))
        conn.sendall(OK)
        time.sleep(0.2)
        conn.close()

    monkeypatch.setenv("http_proxy", scripted.url)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    thread = _serve(serve)
    with Client("http://fleet.invalid:8080", "t") as c:
        assert c.instances_data() == []
    thread.join(5)
    request_line = seen[0].split(b"\r\n")[0]
    assert request_line == b"GET http://fleet.invalid:8080/v1/instances?limit=1000 HTTP/1.1"

    monkeypatch.setenv("no_proxy", "fleet.invalid")
    with Client("http://fleet.invalid:8080", "t", timeout=2) as c, \
            pytest.raises(TransportError, match="cannot reach"):
        c.instances_data()  # straight to a name that does not resolve


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """An https server with a self-signed certificate for 127.0.0.1 (made by openssl)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            data = json.dumps(STATUS).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{httpd.server_address[1]}", cert
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_tls_is_verified_against_the_given_ca(tls_server: tuple[str, Path]) -> None:
    url, cert = tls_server
    with Client(url, "t", ca_file=str(cert)) as c:
        assert c.status_data() == STATUS
    with Client(url, "t", timeout=5) as c, pytest.raises(TransportError) as info:
        c.status_data()  # not in the system's trust store
    assert "CERTIFICATE_VERIFY_FAILED" in info.value.message


# -- paging: ``GET /v1/instances`` with a cursor in X-Corral-Next ----------------------------


def _page(names: list[str], cursor: str | None) -> bytes:
    body = json.dumps([{**INSTANCE, "name": n} for n in names]).encode()
    head = b"X-Corral-Next: %s\r\n" % cursor.encode() if cursor is not None else b""
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" + head
            + b"Content-Length: %d\r\n\r\n%s" % (len(body), body))


def _serve_pages(scripted: Scripted, answers: list[bytes], seen: list[bytes]) -> threading.Thread:
    """Answers the requests of one kept-alive connection with ``answers``, in order."""
    def serve() -> None:
        conn = scripted.accept()
        for answer in answers:
            seen.append(Scripted.read_request(conn).split(b"\r\n")[0])
            conn.sendall(answer)
        time.sleep(0.2)
        conn.close()

    return _serve(serve)


def test_the_whole_list_comes_page_by_page(scripted: Scripted) -> None:
    """The client follows the cursor until a page comes without one, sending its filters
    with each request; a page asked for with a limit is one request."""
    seen: list[bytes] = []
    thread = _serve_pages(scripted, [_page(["a", "b"], "b"), _page(["c"], None),
                                     _page(["x"], "x")], seen)
    with Client(scripted.url, "t", timeout=5) as c:
        assert [i["name"] for i in c.instances_data(host="h1", state="running")] == [
            "a", "b", "c"]
        page, cursor = c.instances_page(limit=1, after="w")
        assert [i["name"] for i in page] == ["x"] and cursor == "x"
    thread.join(5)
    assert seen == [
        b"GET /v1/instances?limit=1000&host=h1&state=running HTTP/1.1",
        b"GET /v1/instances?limit=1000&after=b&host=h1&state=running HTTP/1.1",
        b"GET /v1/instances?limit=1&after=w HTTP/1.1"]


def test_a_cursor_that_does_not_move_ends_the_listing(scripted: Scripted) -> None:
    """A server that sends the same cursor again would be listed forever: refused."""
    seen: list[bytes] = []
    thread = _serve_pages(scripted, [_page(["a"], "a"), _page(["a"], "a")], seen)
    with Client(scripted.url, "t", timeout=5) as c, \
            pytest.raises(errors.CorralError, match="cursor 'a' again") as info:
        c.instances_data()
    thread.join(5)
    assert len(seen) == 2 and "corral ls --limit" in info.value.hint
