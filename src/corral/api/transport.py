"""HTTP/1.1 for the API client, on the standard library: connections kept alive between
requests, TLS with the system's trust store (or a given CA file), NDJSON read line by line as it
arrives, proxies from the environment as httpx honoured them.

Why not httpx: importing it (with httpcore, anyio, certifi, idna) costs about 90 ms, more than
``corral ls`` may take in all, for features the client does not use (async, HTTP/2).
``http.client`` does what a synchronous caller needs.

Failures come in two kinds. The server's own refusals (any status >= 400) become the
:mod:`corral.errors` exception the server raised, through :func:`error_from_response`, the one
translator of the server's JSON error shape. No usable answer at all (refused, reset, cut short,
timed out) is a :class:`TransportError`, so a caller with better words for it (an agent that
cannot fetch an image) catches exactly that.

A ``Transport`` may be shared by threads (``corral down`` stops instances eight at a time
through one client): each request takes an idle kept-alive connection or opens one, and gives
it back when its answer has been read.
"""

from __future__ import annotations

import _thread
import contextlib
import http.client
import json
import os
import socket
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote, urlencode, urlsplit

from corral import __version__, errors

if TYPE_CHECKING:
    import ssl

UNREACHABLE_HINT = "is the fleet up? run 'corral up' or set CORRAL_URL"
#: seconds to set up a connection (TCP and TLS); the per-request timeout covers the answer
CONNECT_TIMEOUT = 10.0
#: methods a request may be sent again for, when a kept-alive connection turns out closed
IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})
#: seconds a request answered "no leader right now" (503 ``not_leader``, retryable) is tried
#: again for: a takeover takes about one leader lease (10 s by default), and until the
#: followers see the old leader's lease run out they answer that its address is dead
LEADER_WAIT = 30.0

Params = Mapping[str, str] | Sequence[tuple[str, str]] | None


class TransportError(errors.CorralError):
    """No usable HTTP answer: the server could not be reached or the exchange broke off.
    ``reason`` is the bare cause ("[Errno 111] Connection refused", "timed out"), for callers
    that word the failure themselves."""

    def __init__(self, message: str, *, reason: str = "", **kw: Any) -> None:
        super().__init__(message, **kw)
        self.reason = reason or message


class TransportTimeout(errors.HostUnavailable, TransportError):
    """The server took the request but did not answer within the timeout."""


class Response:
    """A whole answer: status, headers and body (streams use :meth:`Transport.lines`)."""

    __slots__ = ("body", "headers", "path", "reason", "status")

    def __init__(self, status: int, reason: str, headers: http.client.HTTPMessage, body: bytes,
                 path: str) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.body = body
        self.path = path

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


class Transport:
    """Requests to one server, over connections kept open between them."""

    def __init__(self, base_url: str, headers: Mapping[str, str], timeout: float = 30.0,
                 ca_file: str | None = None) -> None:
        """``base_url`` may list several servers of one fleet, comma-separated: a server that
        cannot be reached is passed over for the next (any server answers any call)."""
        self.urls = [u.strip().rstrip("/") for u in base_url.split(",") if u.strip()]
        if not self.urls:
            raise TransportError("no server URL given", hint=UNREACHABLE_HINT)
        self.timeout = timeout
        self.ca_file = ca_file
        self.headers = {"User-Agent": f"corral/{__version__}", "Accept": "*/*", **headers}
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = _thread.allocate_lock()
        self._ssl: ssl.SSLContext | None = None
        self._current = 0
        self._use(0)

    def _use(self, index: int) -> None:
        """Talk to the ``index``-th URL from now on (its connections only)."""
        url = self.urls[index]
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https") or not parts.hostname:
            raise TransportError(f"talking to {url} failed: the URL needs http:// or "
                                 "https:// and a host", hint=UNREACHABLE_HINT)
        self._current = index
        self.base_url = url
        self.scheme = scheme
        self.host = parts.hostname
        self.port = parts.port or (443 if scheme == "https" else 80)
        self.prefix = parts.path.rstrip("/")
        self._proxy = _proxy_for(scheme, self.host)
        self.close()

    def _next_server(self, tried: int) -> bool:
        """Move to the next listed server when the ``tried`` ones so far are not all of
        them (a connection that could not be made sent nothing: any method may go again)."""
        if tried >= len(self.urls):
            return False
        self._use((self._current + 1) % len(self.urls))
        return True

    # -- connections -----------------------------------------------------------------------

    def close(self) -> None:
        """Close the idle connections (one still answering closes when given back)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def _connect(self) -> tuple[http.client.HTTPConnection, bool]:
        """An idle open connection (and True: it served a request before), or a new one; a
        connection that cannot be made raises its ``OSError`` (``TimeoutError`` included)."""
        while True:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                break
            if conn.sock is not None and not _closed_by_peer(conn.sock):
                return conn, True
            conn.close()
        conn = self._new_connection()
        try:
            conn.connect()
        except BaseException:
            conn.close()
            raise
        return conn, False

    def _release(self, conn: http.client.HTTPConnection, reusable: bool) -> None:
        """Give back a connection whose answer was read to its end; close any other."""
        if reusable and conn.sock is not None:
            with self._lock:
                self._idle.append(conn)
        else:
            conn.close()

    def _new_connection(self) -> http.client.HTTPConnection:
        timeout = min(CONNECT_TIMEOUT, self.timeout)
        if self._proxy is None:
            if self.scheme == "https":
                return http.client.HTTPSConnection(self.host, self.port, timeout=timeout,
                                                   context=self._tls())
            return http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        host, port, auth = self._proxy
        if self.scheme == "https":  # a CONNECT tunnel through the proxy, TLS end to end
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                host, port, timeout=timeout, context=self._tls())
            conn.set_tunnel(self.host, self.port, headers=auth)
            return conn
        return http.client.HTTPConnection(host, port, timeout=timeout)

    def _tls(self) -> ssl.SSLContext:
        if self._ssl is None:
            import ssl

            self._ssl = ssl.create_default_context(cafile=self.ca_file)
        return self._ssl

    def _target(self, path: str, params: Params) -> str:
        target = quote(self.prefix + path, safe="/:@!$&'()*+,;=~")
        if params:
            target += "?" + urlencode(params)
        if self._proxy is not None and self.scheme == "http":  # absolute form for a proxy
            target = f"http://{self.host}:{self.port}{target}"
        return target

    def _headers(self, extra: Mapping[str, str] | None) -> dict[str, str]:
        headers = dict(self.headers)
        if self._proxy is not None and self.scheme == "http":
            headers.update(self._proxy[2])
        if extra:
            headers.update(extra)
        return headers

    # -- requests --------------------------------------------------------------------------

    def request(self, method: str, path: str, *, params: Params = None,
                json_body: Any = None, body: bytes | None = None,
                headers: Mapping[str, str] | None = None, read_timeout: float | None = None,
                retry: bool | None = None, check: bool = True) -> Response:
        """One request and its whole answer. ``read_timeout`` (default: the client's) bounds
        each wait for the server; ``retry`` allows sending it again on a kept-alive connection
        the server had closed (default: for idempotent methods); ``check`` raises the
        server's error for a status >= 400."""
        extra = dict(headers or {})
        if json_body is not None:
            body = json.dumps(json_body).encode()
            extra.setdefault("Content-Type", "application/json")
        send_headers = self._headers(extra)
        target = self._target(path, params)
        again = method in IDEMPOTENT if retry is None else retry
        tried = 1
        leader_deadline: float | None = None
        pause = 0.2
        while True:
            try:
                conn, reused = self._connect()
                _settimeout(conn, self.timeout if read_timeout is None else read_timeout)
            except TimeoutError as exc:
                if self._next_server(tried):
                    tried += 1
                    continue
                raise self._timed_out(method, path, exc) from exc
            except OSError as exc:  # refused, unreachable, name unknown, TLS refused
                if self._next_server(tried):
                    tried += 1
                    continue
                raise TransportError(f"cannot reach the corral server at {self.base_url}: "
                                     f"{_describe(exc)}", reason=_describe(exc),
                                     hint=UNREACHABLE_HINT, retryable=True) from exc
            try:
                conn.request(method, target, body=body, headers=send_headers)
                _ack_at_once(conn)
                resp = conn.getresponse()
                data = resp.read()
            except TimeoutError as exc:
                conn.close()
                raise self._timed_out(method, path, exc) from exc
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                if reused and again and isinstance(exc, _STALE):
                    again = False  # the server closed it while idle: once more, on a new one
                    continue
                raise TransportError(f"talking to {self.base_url} failed: {_describe(exc)}",
                                     reason=_describe(exc), hint=UNREACHABLE_HINT) from exc
            except BaseException:
                conn.close()
                raise
            self._release(conn, not resp.will_close)
            answer = Response(resp.status, resp.reason, resp.headers, data, path)
            if check and answer.status >= 400:
                err = error_from_response(answer)
                if isinstance(err, errors.NotLeader) and err.retryable:
                    # nothing was done (a follower had no live leader to hand it to, or a
                    # deposed leader's write was refused): wait for the next leader
                    now = time.monotonic()
                    if leader_deadline is None:
                        leader_deadline = now + LEADER_WAIT
                    if now + pause < leader_deadline:
                        time.sleep(pause)
                        pause = min(pause * 2, 2.0)
                        continue
                raise err
            return answer

    def _timed_out(self, method: str, path: str, exc: BaseException) -> TransportTimeout:
        return TransportTimeout(
            f"the corral server at {self.base_url} did not answer {method} {path} in time",
            reason=_describe(exc), hint="the server may be overloaded or an agent slow; try "
            "again, or check 'corral status'")

    def lines(self, path: str, params: Params, read_timeout: float | None, what: str
              ) -> Iterator[bytes]:
        """The non-empty lines of a streamed (NDJSON) answer, each as soon as it arrives;
        ``read_timeout`` None waits for the next line forever (``-f``). A stream left before
        its end closes the connection (its rest is never read)."""
        finished = False
        conn: http.client.HTTPConnection | None = None
        try:
            tried = 1
            while conn is None:
                try:
                    conn, _ = self._connect()
                except OSError:
                    if not self._next_server(tried):
                        raise
                    tried += 1
            _settimeout(conn, read_timeout)
            conn.request("GET", self._target(path, params), headers=self._headers(None))
            _ack_at_once(conn)
            resp = conn.getresponse()
            if resp.status >= 400:
                raise error_from_response(Response(resp.status, resp.reason, resp.headers,
                                                   resp.read(), path))
            while line := resp.readline():
                if line.strip():
                    yield line
            finished = not resp.will_close
        except errors.CorralError:
            raise
        except (OSError, http.client.HTTPException) as exc:
            raise TransportError(f"reading {what} from {self.base_url} failed: "
                                 f"{_describe(exc)}", reason=_describe(exc),
                                 hint=UNREACHABLE_HINT, retryable=True) from exc
        finally:
            if conn is not None:
                self._release(conn, finished)


_STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError,
          ConnectionAbortedError)


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _settimeout(conn: http.client.HTTPConnection, seconds: float | None) -> None:
    if conn.sock is not None:
        conn.sock.settimeout(seconds)


def _ack_at_once(conn: http.client.HTTPConnection) -> None:
    """Acknowledge the answer's first segment at once (Linux ``TCP_QUICKACK``, which the
    kernel clears again by itself). A server that writes headers and body separately without
    ``TCP_NODELAY`` holds the body until that ACK, and a kept-alive connection delays it
    ~40 ms: every request after the first would wait that long."""
    quickack = getattr(socket, "TCP_QUICKACK", None)
    if quickack is not None and conn.sock is not None:
        with contextlib.suppress(OSError):
            conn.sock.setsockopt(socket.IPPROTO_TCP, quickack, 1)


def _closed_by_peer(sock: socket.socket) -> bool:
    """Whether an idle kept-alive connection was closed by the server (it is readable: EOF, or
    bytes nobody asked for), so the next request takes a new one instead of failing on it."""
    import select

    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


def _proxy_for(scheme: str, host: str) -> tuple[str, int, dict[str, str]] | None:
    """The proxy the environment names for ``scheme://host`` (``http_proxy``,
    ``https_proxy``, ``all_proxy``, minus ``no_proxy``), as httpx honoured them: (host, port,
    headers for it). urllib's reading of those variables is imported only when one is set."""
    if not any(key.lower().endswith("_proxy") for key in os.environ):
        return None
    import urllib.request

    proxies = urllib.request.getproxies_environment()
    url = proxies.get(scheme) or proxies.get("all")
    if not url or urllib.request.proxy_bypass(host):
        return None
    parts = urlsplit(url if "://" in url else "http://" + url)
    if not parts.hostname:
        return None
    headers: dict[str, str] = {}
    if parts.username is not None:
        import base64

        pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        headers["Proxy-Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
    return parts.hostname, parts.port or 80, headers


def error_from_response(resp: Response) -> errors.CorralError:
    """The exception a failed response stands for: the server's own error when it sent one
    (``{"error": {code, message, hint, retryable, details}}``), else one named by the status."""
    try:
        body = resp.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return errors.from_dict(body["error"])
    if isinstance(body, dict) and "detail" in body:
        return _from_detail(resp.status, body["detail"])
    text = resp.text.strip()[:200] or resp.reason
    if resp.status == 401:
        return errors.Unauthorized(
            f"the server refused the token: {text}",
            hint="check CORRAL_TOKEN or the context file written by 'corral up'",
        )
    if resp.status == 404:
        return errors.NotFound(f"not found: {resp.path}")
    return errors.CorralError(f"HTTP {resp.status} from the server: {text}")


def _from_detail(status: int, detail: Any) -> errors.CorralError:
    """FastAPI's own error shape (``{"detail": ...}``), e.g. a validation error not wrapped."""
    if isinstance(detail, list):
        parts = []
        for item in detail:
            if isinstance(item, dict):
                loc = ".".join(str(p) for p in item.get("loc", []) if p != "body")
                parts.append(f"{loc}: {item.get('msg', '')}" if loc else str(item.get("msg")))
        message = "invalid request: " + "; ".join(parts)
        return errors.InvalidRequest(message, hint="fix the fields named above")
    cls: type[errors.CorralError] = {
        401: errors.Unauthorized,
        404: errors.NotFound,
        409: errors.Conflict,
        422: errors.InvalidRequest,
    }.get(status, errors.CorralError)
    return cls(str(detail))
