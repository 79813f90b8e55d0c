"""The agents' data channel for host-to-host disk transfers, open only to the server's tickets.

Disk bytes never pass through the server. The receiving agent listens on its data port; the
sending side runs the real tool (``rsync``, ``btrfs send``) with :mod:`corral.disks.rsh` as its
remote shell, which connects here. When the host enrolled with the fleet's CA the connection is
mutual TLS: the receiver requires a client certificate the CA signed, the sender checks that the
receiver's certificate names the host the server sent it to. Then, one JSON line each way:

1. client -> server: ``{"argv": [...], "ticket": "<transfer ticket>"}``
2. server -> client: ``{"ok": true}`` or ``{"ok": false, "error": "..."}``; then frames both ways
   (``type(1) | length(4) | payload``): DATA carries the command's stdin/stdout, EOF closes the
   client's side, and at the end the server sends ERR (the command's stderr tail) and EXIT (its
   status), so the sending tool fails when the receiving one did (``btrfs receive`` has no
   protocol of its own to say so).

What a connection may do is what its ticket (:mod:`corral.disks.tickets`) says, not what the
peer asks: the ticket must carry the server's signature, be unexpired and name this host as its
target; over TLS the peer's certificate must name the ticket's source. The command may then write
only into the ticket's instance's slot (``rsync --server`` into it, its temp dir for options that
name a path; ``btrfs receive`` into it), checked on real paths so no symlink leads elsewhere.
Nothing is run through a shell. A host that holds a valid ticket for one instance still cannot
touch another instance's copy, the live disks, or anything outside the disk root.

A live migration's stream comes the same way (:mod:`corral.disks.tunnel`): the hello is
``{"tunnel": "live-stream", "ticket": ...}``, the ticket's slot is that stream (a disk ticket
opens no tunnel, a stream's ticket runs no command), and the bytes go, unframed, to the unix
socket where the ticket's instance waits for that source (``tunnels``), nowhere else.

There is no nonce any more. It made a captured HMAC of the shared token useless for a second
connection; a ticket is the server's signature over one pass, legitimately used for more than
one connection (a prepared pass that falls back to a full one connects again) until it expires,
and the sender has no key of its own to sign a nonce with but its TLS key. Over TLS that key
already binds the connection to the source host, and the ticket never travels in clear; without
TLS (fleets on loopback only) whoever could read the ticket could answer any nonce as well.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import socket
import ssl
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corral.disks import tickets, tunnel
from corral.disks.frames import DATA, ERR, EXIT, FRAME, MAX_FRAME, frame
from corral.errors import CorralError

log = logging.getLogger(__name__)

HANDSHAKE_LIMIT = 64 * 1024
#: a peer that connects says who it is within this long, or is dropped
HANDSHAKE_TIMEOUT = 10.0
#: connections served at once (each is one pass, or a peer still in its handshake): a flood
#: of idle connections cannot take every task and file of the agent
MAX_CONNECTIONS = 64
NOT_JOINED = "this host has not joined the fleet yet; no transfer can be checked"

#: where a ticket lets a command write: ``(instance, slot)`` -> [the slot, its scratch dirs]
Places = Callable[[str, str], Sequence[Path]]
#: where a live stream for ``(instance, source host)`` goes: the unix socket its copy here
#: listens on (CorralError: none waits for that source)
Tunnels = Callable[[str, str], Path]


def _no_tunnels(instance: str, source: str) -> Path:
    raise CorralError("this host takes no live streams")


# -- TLS ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ChannelTls:
    """This host's certificate and key, and the fleet CA that signed every host's."""

    cert_file: str
    key_file: str
    ca_file: str


def server_context(tls: ChannelTls) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=tls.ca_file)
    ctx.load_cert_chain(tls.cert_file, tls.key_file)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def common_name(cert: Any) -> str | None:
    """The subject commonName of a certificate as ``getpeercert()`` gives it."""
    for rdn in (cert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


# -- what a command may do ---------------------------------------------------------------------
def _under(path: str, places: Sequence[Path]) -> bool:
    real = Path(os.path.realpath(path))
    return any(real == r or r in real.parents for r in places)


#: rsync options whose value is a directory the receiver writes into or reads from
PATH_OPTIONS = {"--temp-dir", "--partial-dir", "--backup-dir", "--compare-dest", "--copy-dest",
                "--link-dest"}
#: receiver options that reach outside the destination whatever their value
DENIED_OPTIONS = {"--keep-dirlinks", "--log-file", "--write-batch", "--only-write-batch",
                  "--read-batch", "--files-from", "--include-from", "--exclude-from",
                  "--password-file"}
#: the short options rsync sends the server in one cluster: letters, then ``e`` and the
#: protocol's capabilities. Not ``K`` (follows symlinked directories in the destination) nor
#: one that takes a value (``T B M f``): a value hidden in a cluster would escape the checks
_CLUSTER = re.compile(r"^-(?!$)[AC-JLN-SU-Zabcdg-z0-9]*(?:e[.A-Za-z]*)?$")
#: ``-@N``: --modify-window
_WINDOW = re.compile(r"^-@-?\d+$")


def _check_rsync(argv: list[str], places: Sequence[Path]) -> str | None:
    if len(argv) < 4 or argv[1] != "--server" or argv[-2] != "." or "--sender" in argv:
        return "only 'rsync --server ... . DEST' receiving into this host is allowed"
    dest = argv[-1]
    if not _under(dest, places[:1]):
        return f"destination {dest} is outside the slot the transfer ticket names"
    opts = iter(argv[2:-2])
    for arg in opts:
        name, eq, value = arg.partition("=")
        if name in DENIED_OPTIONS:
            return f"option {name} is not allowed on the data channel"
        if name in PATH_OPTIONS:
            value = value if eq else next(opts, "")
            if not os.path.isabs(value) or not _under(value, places):
                return f"option {name} {value!r} names a path outside the ticket's slot"
        elif arg.startswith("--"):
            if "/" in value and not _under(value, places):
                return f"option {arg!r} names a path outside the ticket's slot"
        elif not (_CLUSTER.match(arg) or _WINDOW.match(arg)):
            return f"argument {arg!r} is not allowed on the data channel"
    return None


def check_argv(argv: list[str], places: Sequence[Path]) -> str | None:
    """None when ``argv`` may run for a ticket whose slot is ``places[0]`` (the rest: its
    scratch dirs), else why not. ``places`` are real paths (no symlink among them)."""
    if not argv:
        return "empty command"
    if argv[0] == "rsync":
        return _check_rsync(argv, places)
    if argv[:2] == ["btrfs", "receive"]:
        rest = [a for a in argv[2:] if a not in ("-e", "--quiet")]
        if len(rest) != 1 or not _under(rest[0], places[:1]):
            return "btrfs receive must name one directory in the slot the ticket names"
        return None
    return f"command {argv[0]!r} is not a transfer command"


# -- the server --------------------------------------------------------------------------------
class DataServer:
    """The receiving end. ``name`` is this host's name (what tickets and certificates say);
    ``host``/``port`` where it listens. ``ticket_key`` (hex) is set once the host joined."""

    def __init__(self, name: str, places: Places, host: str = "127.0.0.1",
                 port: int = 0, after_failure: Callable[[list[str]], list[str]] | None = None
                 ) -> None:
        """``after_failure(argv)``: what a backend cleans up after its receiver failed (in a
        worker thread), e.g. btrfs's half-received snapshots; the names it dropped."""
        self.name = name
        self.after_failure = after_failure
        self.places = places
        self.host = host
        self.port = port
        self.ticket_key = ""
        #: mutual TLS (set before :meth:`start`); None: in clear, tickets only
        self.tls: ssl.SSLContext | None = None
        self._server: asyncio.Server | None = None
        #: connections being served; past MAX_CONNECTIONS new ones are refused at once
        self.active = 0
        #: where a live stream goes (set by the agent)
        self.tunnels: Tunnels = _no_tunnels

    async def start(self) -> None:
        # a peer still in its TLS handshake is not counted in ``active`` yet (asyncio calls
        # us after it), but is dropped after HANDSHAKE_TIMEOUT all the same
        tls: dict[str, Any] = ({"ssl": self.tls, "ssl_handshake_timeout": HANDSHAKE_TIMEOUT}
                               if self.tls is not None else {})
        self._server = await asyncio.start_server(self._handle, self.host, self.port,
                                                  limit=HANDSHAKE_LIMIT, **tls)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def admit(self, argv: list[str], ticket: str, peer_cert: Any) -> str | None:
        """None when the ticket allows ``argv`` from this peer, else why not."""
        got = self._ticket(ticket, peer_cert)
        if isinstance(got, str):
            return got
        if got.slot == tunnel.LIVE:
            return "a live stream's ticket runs no command"
        try:
            places = self.places(got.instance, got.slot)
        except CorralError as exc:
            return str(exc)
        return check_argv(argv, places)

    def admit_tunnel(self, ticket: str, peer_cert: Any) -> Path | str:
        """Where the live stream this ticket allows from this peer goes, else why not."""
        got = self._ticket(ticket, peer_cert)
        if isinstance(got, str):
            return got
        if got.slot != tunnel.LIVE:
            return "a disk transfer's ticket opens no live stream"
        try:
            return self.tunnels(got.instance, got.source)
        except CorralError as exc:
            return str(exc)

    def _ticket(self, ticket: str, peer_cert: Any) -> tickets.Ticket | str:
        """The ticket, if the server signed it for this host and this peer, else why not."""
        if not self.ticket_key:
            return NOT_JOINED
        if not ticket:
            return "no transfer ticket: transfers are started by the server's operations only"
        try:
            got = tickets.verify(ticket, tickets.public_from_hex(self.ticket_key))
        except ValueError:
            return "this host's ticket key is damaged; let it join the fleet again"
        except CorralError as exc:
            return str(exc)
        if got.target != self.name:
            return f"the transfer ticket is for host {got.target}, not {self.name}"
        if self.tls is not None and common_name(peer_cert) != got.source:
            return (f"the transfer ticket is for a pass from {got.source}, but the peer's "
                    f"certificate names {common_name(peer_cert)}")
        return got

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
            line = await asyncio.wait_for(reader.readline(), HANDSHAKE_TIMEOUT)
            try:
                hello = json.loads(line)
                ticket = str(hello.get("ticket") or "")
                if hello.get("tunnel") == tunnel.LIVE:
                    await self._tunnel(reader, writer, ticket)
                    return
                argv = [str(a) for a in hello["argv"]]
            except (ValueError, KeyError, TypeError, AttributeError):
                await _refuse(writer, "malformed handshake")
                return
            why = self.admit(argv, ticket, writer.get_extra_info("peercert"))
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
            if code != 0 and self.after_failure is not None:
                dropped = await asyncio.to_thread(self.after_failure, argv)
                if dropped:
                    log.warning("data channel: dropped what a failed receive left: %s",
                                dropped)
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError, ssl.SSLError) as exc:
            log.info("data channel from %s ended: %s", peer, exc)
        finally:
            with contextlib.suppress(Exception):
                writer.close()
                await writer.wait_closed()


    async def _tunnel(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      ticket: str) -> None:
        peer = writer.get_extra_info("peername")
        where = self.admit_tunnel(ticket, writer.get_extra_info("peercert"))
        if isinstance(where, str):
            log.warning("data channel: refused a live stream from %s: %s", peer, where)
            await _refuse(writer, where)
            return
        try:
            conn = tunnel.connect_unix(where)
        except OSError as exc:
            await _refuse(writer, f"nothing listens for the stream here ({exc.strerror}); "
                                  "the copy waiting for it is gone")
            return
        local = await asyncio.open_unix_connection(sock=conn, limit=2 * tunnel.CHUNK)
        try:
            writer.write(b'{"ok": true}\n')
            await writer.drain()
            got = await tunnel.pipe(local, (reader, writer))
            log.info("data channel: a live stream from %s ended (%d bytes back)", peer, got)
        finally:
            local[1].close()


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
        except (ConnectionError, BrokenPipeError, asyncio.IncompleteReadError, ssl.SSLError):
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
