"""A byte stream between two local unix sockets on two hosts, carried by the data channel.

A live migration's stream (QEMU's ``migrate`` to its peer's ``-incoming``) goes through the
agents' data channel (:mod:`corral.disks.channel`) rather than a port of its own: one port per
host to open between hosts, the channel's mutual TLS (each end's certificate names its host)
and the server's ticket for this one instance from this source to this target, checked before a
byte reaches the destination's QEMU. Each QEMU talks to a unix socket in its own directory
(0700): the destination's listens there, the source's connects to one its agent holds.

The tunnel is bytes both ways, unframed. It ends when the local end closes (QEMU is done with
the stream, or died): what it wrote is flushed to the peer first. The peer's end closing is
passed on as an end-of-file to the local one, so a short stream is never cut.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path

from corral.errors import CorralError, HostUnavailable

#: the ticket slot of a live stream (never a disk slot: a stream's ticket writes no file)
LIVE = "live-stream"
#: bytes read per step (the streams' buffers hold twice this)
CHUNK = 256 * 1024
#: the peer answers the tunnel's hello within this long
HELLO_TIMEOUT = 15.0


def unix_path(path: Path) -> tuple[str, int]:
    """A name for ``path`` short enough for a socket address (108 bytes), whatever the length
    of its directory: the directory opened, reached as ``/proc/self/fd/N``. The caller closes
    the returned descriptor once it bound or connected."""
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    return f"/proc/self/fd/{fd}/{path.name}", fd


def _unix(path: Path, act: Callable[[socket.socket, str], None]) -> socket.socket:
    """A unix socket that ``act`` connected or bound at ``path`` (non-blocking); closed when
    ``act`` fails."""
    name, fd = unix_path(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        act(sock, name)
    except OSError:
        sock.close()
        raise
    finally:
        os.close(fd)
    sock.setblocking(False)
    return sock


def connect_unix(path: Path) -> socket.socket:
    return _unix(path, lambda sock, name: sock.connect(name))


def listen_unix(path: Path) -> socket.socket:
    """A listening socket at ``path`` (a stale one from a crash replaced), for one peer."""
    path.unlink(missing_ok=True)

    def bind(sock: socket.socket, name: str) -> None:
        sock.bind(name)
        os.chmod(path, 0o600)
        sock.listen(1)

    return _unix(path, bind)


async def pipe(local: tuple[asyncio.StreamReader, asyncio.StreamWriter],
               peer: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> int:
    """Relay until the local end is done; the bytes sent to the peer."""
    (lr, lw), (pr, pw) = local, peer
    sent = 0

    async def out() -> None:
        nonlocal sent
        while data := await lr.read(CHUNK):
            pw.write(data)
            sent += len(data)
            await pw.drain()

    async def back() -> None:
        while data := await pr.read(CHUNK):
            lw.write(data)
            await lw.drain()
        if lw.can_write_eof():
            lw.write_eof()

    back_task = asyncio.create_task(back())
    try:
        await out()
    finally:
        back_task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await back_task
        for w in (pw, lw):
            with contextlib.suppress(Exception):
                w.close()
                await w.wait_closed()
    return sent


async def open_peer(host: str, port: int, ctx: ssl.SSLContext | None, peer_name: str,
                    ticket: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to ``peer_name``'s data channel at ``host:port`` and ask for the tunnel the
    ticket allows; the connection, once the peer said yes."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(
            host, port, ssl=ctx, server_hostname=peer_name if ctx is not None else None,
            limit=2 * CHUNK), HELLO_TIMEOUT)
    except (OSError, TimeoutError, ssl.SSLError) as exc:
        raise HostUnavailable(f"cannot reach the data channel of {peer_name} at "
                              f"{host}:{port}: {exc or type(exc).__name__}",
                              hint="check that its agent runs and the port is open between "
                                   "the hosts", retryable=True) from exc
    try:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        writer.write(json.dumps({"tunnel": LIVE, "ticket": ticket}).encode() + b"\n")
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), HELLO_TIMEOUT)
        answer = json.loads(line or b"{}")
    except (OSError, TimeoutError, ssl.SSLError, ValueError) as exc:
        writer.close()
        raise HostUnavailable(f"the data channel of {peer_name} did not answer the stream's "
                              f"hello: {exc or type(exc).__name__}", retryable=True) from exc
    if not isinstance(answer, dict) or answer.get("ok") is not True:
        writer.close()
        why = answer.get("error") if isinstance(answer, dict) else None
        raise CorralError(f"{peer_name} refused the stream: {why or 'no reason given'}",
                          hint="the migration rolls back; the instance runs on here")
    return reader, writer


class Outbound:
    """The source's end: a unix socket its QEMU connects to, relayed to the peer's channel.

    ``serve()`` waits for the one connection, then connects to the peer and relays until the
    local end is done. Its error (a refused ticket, a peer that cannot be reached) is what the
    caller reports when QEMU only says its stream broke."""

    def __init__(self, path: Path, connect: Callable[[], Awaitable[
            tuple[asyncio.StreamReader, asyncio.StreamWriter]]]) -> None:
        self.path = path
        self.connect = connect
        self.sock = listen_unix(path)
        self.sent = 0
        #: the hypervisor connected (so a failure of the tunnel is worth waiting for)
        self.accepted = False

    async def serve(self) -> int:
        loop = asyncio.get_running_loop()
        try:
            conn, _ = await loop.sock_accept(self.sock)
        finally:
            self.close_listener()
        self.accepted = True
        local = await asyncio.open_unix_connection(sock=conn, limit=2 * CHUNK)
        try:
            peer = await self.connect()
        except BaseException:
            local[1].close()
            raise
        self.sent = await pipe(local, peer)
        return self.sent

    def close_listener(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
        self.path.unlink(missing_ok=True)
