"""The agents' authenticated data channel for host-to-host disk transfers.

Disk bytes never pass through the server. The receiving agent listens on its data port; the
sending side runs the real tool (``rsync``, ``btrfs send``) with :mod:`corral.disks.rsh` as its
remote shell, which connects here. Handshake, one JSON line each way:

1. server -> client: ``{"nonce": <hex>}``
2. client -> server: ``{"argv": [...], "mac": hex(HMAC-SHA256(token, nonce + "\\n" + argv json))}``
3. server -> client: ``{"ok": true}`` or ``{"ok": false, "error": "..."}``; then frames both ways
   (``type(1) | length(4) | payload``): DATA carries the command's stdin/stdout, EOF closes the
   client's side, and at the end the server sends ERR (the command's stderr tail) and EXIT (its
   status), so the sending tool fails when the receiving one did (``btrfs receive`` has no
   protocol of its own to say so).

Only two command shapes are accepted: ``rsync --server ...`` whose destination lies under one of
the agent's allowed roots, and ``btrfs receive [-e] DIR`` under one of them. Nothing is run through
a shell. The nonce makes a captured handshake useless for a second connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import os
import secrets
import socket
import struct
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

HANDSHAKE_LIMIT = 64 * 1024
#: a peer that connects says who it is within this long, or is dropped
HANDSHAKE_TIMEOUT = 10.0
#: connections served at once (each is one pass, or a peer still in its handshake): a flood
#: of idle connections cannot take every task and file of the agent
MAX_CONNECTIONS = 64
FRAME = struct.Struct(">BI")
DATA, EOF, ERR, EXIT = 1, 2, 3, 4
MAX_FRAME = 4 * 1024 * 1024


def frame(kind: int, payload: bytes = b"") -> bytes:
    return FRAME.pack(kind, len(payload)) + payload


def mac(token: str, nonce: str, argv: Sequence[str]) -> str:
    msg = (nonce + "\n" + json.dumps(list(argv))).encode()
    return hmac.new(token.encode(), msg, hashlib.sha256).hexdigest()


def _under(path: str, roots: Sequence[Path]) -> bool:
    real = Path(os.path.realpath(path))
    return any(real == r or r in real.parents for r in roots)


def check_argv(argv: list[str], roots: Sequence[Path]) -> str | None:
    """None when ``argv`` is an allowed transfer command, else why not."""
    if not argv:
        return "empty command"
    if argv[0] == "rsync":
        if len(argv) < 3 or argv[1] != "--server" or "--sender" in argv:
            return "only 'rsync --server' receiving into this host is allowed"
        dest = argv[-1]
        if not _under(dest, roots):
            return f"destination {dest} is outside this agent's disk roots"
        for arg in argv[2:-1]:  # no option may name a path elsewhere (--log-file=/etc/..., -T)
            value = arg.split("=", 1)[-1]
            if "/" in value and not _under(value, roots):
                return f"option {arg!r} names a path outside this agent's disk roots"
        return None
    if argv[:2] == ["btrfs", "receive"]:
        rest = [a for a in argv[2:] if a not in ("-e", "--quiet")]
        if len(rest) != 1 or not _under(rest[0], roots):
            return "btrfs receive must name one directory under this agent's disk roots"
        return None
    return f"command {argv[0]!r} is not a transfer command"


class DataServer:
    def __init__(self, token: str, roots: Sequence[Path], host: str = "127.0.0.1",
                 port: int = 0) -> None:
        self.token = token
        self.roots = [Path(os.path.realpath(r)) for r in roots]
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None
        #: connections being served; past MAX_CONNECTIONS new ones are refused at once
        self.active = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port,
                                                  limit=HANDSHAKE_LIMIT)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.active >= MAX_CONNECTIONS:
            log.warning("data channel: %d connections already; refusing one from %s",
                        self.active, writer.get_extra_info("peername"))
            with contextlib.suppress(Exception):
                await _refuse(writer, "too many connections on the data port; retry")
                writer.close()
                await writer.wait_closed()
            return
        self.active += 1
        try:
            await self._serve(reader, writer)
        finally:
            self.active -= 1

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        sock = writer.get_extra_info("socket")
        if sock is not None:  # see rsh.py: no Nagle on a protocol of small exchanges
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            nonce = secrets.token_hex(16)
            writer.write(json.dumps({"nonce": nonce}).encode() + b"\n")
            await writer.drain()
            line = await asyncio.wait_for(reader.readline(), HANDSHAKE_TIMEOUT)
            try:
                hello = json.loads(line)
                argv = [str(a) for a in hello["argv"]]
                given = str(hello["mac"])
            except (ValueError, KeyError, TypeError):
                await _refuse(writer, "malformed handshake")
                return
            if not hmac.compare_digest(given, mac(self.token, nonce, argv)):
                log.warning("data channel: bad token from %s", peer)
                await _refuse(writer, "authentication failed: wrong fleet token")
                return
            why = check_argv(argv, self.roots)
            if why is not None:
                log.warning("data channel: refused %s from %s: %s", argv[:2], peer, why)
                await _refuse(writer, why)
                return
            if argv[0] == "rsync":
                Path(argv[-1]).mkdir(parents=True, exist_ok=True)
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            writer.write(b'{"ok": true}\n')
            await writer.drain()
            code = await _relay(reader, writer, proc)
            if argv[0] == "btrfs" and code != 0:
                from corral.disks.btrfs import drop_partial_receives

                dropped = await asyncio.to_thread(drop_partial_receives, Path(argv[-1]))
                log.warning("data channel: dropped half-received snapshots %s", dropped)
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError) as exc:
            log.info("data channel from %s ended: %s", peer, exc)
        finally:
            with contextlib.suppress(Exception):
                writer.close()
                await writer.wait_closed()


async def _refuse(writer: asyncio.StreamWriter, why: str) -> None:
    writer.write(json.dumps({"ok": False, "error": why}).encode() + b"\n")
    await writer.drain()


async def _relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 proc: asyncio.subprocess.Process) -> int:
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    stdin, stdout, stderr = proc.stdin, proc.stdout, proc.stderr

    async def inbound() -> None:
        try:
            while True:
                kind, length = FRAME.unpack(await reader.readexactly(FRAME.size))
                if length > MAX_FRAME:
                    raise ConnectionError("oversized frame")
                payload = await reader.readexactly(length)
                if kind != DATA:
                    break
                stdin.write(payload)
                await stdin.drain()
        except (ConnectionError, BrokenPipeError, asyncio.IncompleteReadError):
            pass
        finally:
            with contextlib.suppress(Exception):
                stdin.close()

    async def outbound() -> None:
        while data := await stdout.read(256 * 1024):
            writer.write(frame(DATA, data))
            await writer.drain()

    feed = asyncio.create_task(inbound())
    err = asyncio.create_task(stderr.read())
    try:
        await outbound()
        code = await proc.wait()
        text = (await err).decode(errors="replace").strip()
        if code != 0:
            log.warning("data channel: %s exited %s: %s", proc.pid, code, text[-500:])
        writer.write(frame(ERR, text[-4000:].encode()))
        writer.write(frame(EXIT, struct.pack(">i", code)))
        await writer.drain()
        return code
    finally:
        feed.cancel()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
