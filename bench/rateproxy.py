"""A bandwidth cap for a bench: a TCP proxy whose two directions each pass at most ``rate``
bytes a second, summed over all its connections (one link, full duplex, shared by everyone).

``tc qdisc`` is refused on this kernel, so the cap lives in user space. Clients that can be
pointed at an address (the baseline's rsync) connect to :attr:`RateProxy.port`; clients that
take their address from elsewhere (agents learn the server's URL from the server) are sent
here by :func:`redirect`, an iptables REDIRECT of one loopback port that skips the proxy's own
upstream connections (they carry :data:`MARK`).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import threading
import time
from collections.abc import Iterator

#: SO_MARK of the proxy's upstream sockets, so the REDIRECT rule lets them through
MARK = 0x7C0
SO_MARK = 36
CHUNK = 64 * 1024


class Bucket:
    """A token bucket (bytes); one event loop uses it, so no lock."""

    def __init__(self, rate: float, burst: int = 256 * 1024) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = float(burst)
        self.at = time.monotonic()

    async def take(self, n: int) -> None:
        while True:
            now = time.monotonic()
            self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
            self.at = now
            if self.tokens >= n:
                self.tokens -= n
                return
            await asyncio.sleep((n - self.tokens) / self.rate)


class RateProxy:
    """Listens on 127.0.0.1 (a free port) and forwards to ``upstream``, in a thread of its
    own; ``rate_bps`` of 0 forwards without a cap."""

    def __init__(self, upstream: tuple[str, int], rate_bps: float) -> None:
        self.upstream = upstream
        self.rate = rate_bps / 8
        self.port = 0
        self.moved = [0, 0]  # bytes client->server, server->client
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None

    def __enter__(self) -> RateProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *_: object) -> None:
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _start(self) -> None:
        self.up = Bucket(self.rate) if self.rate else None
        self.down = Bucket(self.rate) if self.rate else None
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _serve(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, SO_MARK, MARK)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, self.upstream)
            sr, sw = await asyncio.open_connection(sock=sock)
        except OSError:
            sock.close()
            cw.close()
            return
        try:
            await asyncio.gather(self._pipe(cr, sw, self.up, 0),
                                 self._pipe(sr, cw, self.down, 1), return_exceptions=True)
        finally:
            sw.close()
            cw.close()

    async def _pipe(self, r: asyncio.StreamReader, w: asyncio.StreamWriter,
                    bucket: Bucket | None, way: int) -> None:
        try:
            while data := await r.read(CHUNK):
                if bucket is not None:
                    await bucket.take(len(data))
                w.write(data)
                self.moved[way] += len(data)
                await w.drain()
        finally:
            with contextlib.suppress(Exception):
                w.write_eof()


def _rule(port: int, to: int) -> list[str]:
    return ["OUTPUT", "-p", "tcp", "-d", "127.0.0.1", "--dport", str(port), "-m", "mark", "!",
            "--mark", str(MARK), "-j", "REDIRECT", "--to-ports", str(to),
            "-m", "comment", "--comment", f"corral-bench-rateproxy-{port}"]


@contextlib.contextmanager
def redirect(port: int, proxy: RateProxy) -> Iterator[None]:
    """Every new loopback connection to ``port`` (except the proxy's) goes through ``proxy``
    while the block runs; the rule is removed however the block ends. Needs root."""
    subprocess.run(["iptables", "-t", "nat", "-A", *_rule(port, proxy.port)], check=True,
                   capture_output=True)
    try:
        yield
    finally:
        subprocess.run(["iptables", "-t", "nat", "-D", *_rule(port, proxy.port)],
                       capture_output=True)
