"""A live migration's stream through the data channel (real sockets, real host certificates on
loopback): what the source's hypervisor writes into its unix socket comes out of the one where
the destination's waits, byte for byte and both ways, and only for the server's ticket of that
instance, from the host it names, to a copy that waits for that very source.

Stand-ins for the two QEMUs: a writer connecting to the source agent's socket, and a listener
where the destination's would listen. Each refusal leaves nothing delivered.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from channelkit import Receiver, authority, host_tls, receiver, rsync

from corral.control.pki import Authority
from corral.disks import tunnel
from corral.disks.channel import ChannelTls
from corral.disks.frames import client_context
from corral.errors import Conflict, CorralError, NotFound

MB = 1024 * 1024


class Waiting:
    """The destination's stand-in QEMU: a unix listener that greets its peer, then keeps what
    it reads until the sender is done."""

    def __init__(self, where: Path, reply: bytes = b"hello") -> None:
        self.path = where / "migrate-in.sock"
        self.reply = reply
        self.got = bytearray()
        self.connections = 0
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_unix_server(self._serve,
                                                      sock=tunnel.listen_unix(self.path))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        writer.write(self.reply)
        await writer.drain()
        while data := await reader.read(tunnel.CHUNK):
            self.got += data
        writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


def route(waiting: Waiting, instance: str = "vm", source: str = "h1"
          ) -> Callable[[str, str], Path]:
    """What the agent's ``tunnels`` answers: this one copy, waiting for this one source."""
    def where(name: str, src: str) -> Path:
        if name != instance:
            raise NotFound(f"no copy of '{name}' waits for a live stream here")
        if src != source:
            raise Conflict(f"the copy of '{name}' here waits for a stream from {source}, "
                           f"not from {src}")
        return waiting.path
    return where


async def send(src_dir: Path, rx: Receiver, tls: ChannelTls | None, ticket: str,
               payload: bytes, peer: str = "h2") -> tuple[int, bytes]:
    """The source's side: an Outbound, and a writer into it as QEMU's ``migrate`` would, which
    reads the destination's greeting after its first megabyte; (bytes relayed, greeting)."""
    ctx = None if tls is None else client_context(tls.ca_file, tls.cert_file, tls.key_file)
    out = tunnel.Outbound(src_dir / "migrate-out.sock", lambda: tunnel.open_peer(
        "127.0.0.1", rx.port, ctx, peer, ticket))
    relay = asyncio.create_task(out.serve())
    back = bytearray()
    try:
        r, w = await asyncio.open_unix_connection(sock=tunnel.connect_unix(out.path))
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            for i in range(0, len(payload), MB):
                w.write(payload[i:i + MB])
                await w.drain()
                if i == 0:
                    back += await r.readexactly(5)
        w.close()  # QEMU closes the stream once it sent it all
        return await asyncio.wait_for(relay, 30), bytes(back)
    finally:
        relay.cancel()
        out.close_listener()


@pytest.fixture
def fleet_ca(tmp_path: Path) -> Authority:
    return authority(tmp_path / "pki")


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    src, dst = tmp_path / "src-vm", tmp_path / "dst-vm"
    src.mkdir(mode=0o700)
    dst.mkdir(mode=0o700)
    return src, dst


async def test_the_stream_arrives_whole_both_ways_over_tls(
        tmp_path: Path, fleet_ca: Authority, dirs: tuple[Path, Path]) -> None:
    certs = tmp_path / "certs"
    h1 = host_tls(fleet_ca, certs, "h1")
    payload = os.urandom(24 * MB + 12345)  # ends mid-record
    async with receiver(tmp_path, tls=host_tls(fleet_ca, certs, "h2")) as rx:
        waiting = Waiting(dirs[1])
        await waiting.start()
        rx.disks.channel.tunnels = route(waiting)
        try:
            sent, back = await send(dirs[0], rx, h1, rx.ticket("vm", tunnel.LIVE), payload)
        finally:
            await waiting.stop()
    assert sent == len(payload)
    assert hashlib.sha256(waiting.got).digest() == hashlib.sha256(payload).digest()
    assert back == b"hello"  # the destination's bytes came back mid-stream
    assert waiting.connections == 1
    assert not (dirs[0] / "migrate-out.sock").exists()  # the source's listener is gone


async def test_only_the_ticket_of_that_stream_from_that_host_gets_through(
        tmp_path: Path, fleet_ca: Authority, dirs: tuple[Path, Path]) -> None:
    certs = tmp_path / "certs"
    h1, h3 = host_tls(fleet_ca, certs, "h1"), host_tls(fleet_ca, certs, "h3")
    async with receiver(tmp_path, tls=host_tls(fleet_ca, certs, "h2")) as rx:
        waiting = Waiting(dirs[1])
        await waiting.start()
        rx.disks.channel.tunnels = route(waiting)
        live = rx.ticket("vm", tunnel.LIVE)
        attempts: dict[str, tuple[ChannelTls, str, str]] = {
            "a disk transfer's ticket": (h1, rx.ticket("vm", "standby"),
                                         "opens no live stream"),
            "another host's ticket": (h1, rx.ticket("vm", tunnel.LIVE, target="h9"),
                                      "is for host h9"),
            "h3's certificate": (h3, live, "certificate names h3"),
            "another instance": (h1, rx.ticket("db", tunnel.LIVE), "no copy of 'db'"),
            "another source": (h3, rx.ticket("vm", tunnel.LIVE, source="h3"),
                               "waits for a stream from h1, not from h3"),
        }
        try:
            for what, (tls, ticket, why) in attempts.items():
                with pytest.raises(CorralError) as refused:
                    await send(dirs[0], rx, tls, ticket, b"x" * 1000)
                assert "refused the stream" in str(refused.value) and why in str(refused.value), \
                    (what, str(refused.value))
                assert waiting.connections == 0 and not waiting.got, what
            # a stream's ticket runs no command either
            slot = rx.slot("vm", "standby")
            code, err = await rsync(dirs[0], slot, rx.port, live, tls=h1)
            assert code != 0 and "runs no command" in err, err
            assert not any(slot.iterdir())
        finally:
            await waiting.stop()


async def test_a_copy_that_no_longer_waits_refuses_with_a_reason(
        tmp_path: Path, fleet_ca: Authority, dirs: tuple[Path, Path]) -> None:
    certs = tmp_path / "certs"
    h1 = host_tls(fleet_ca, certs, "h1")
    async with receiver(tmp_path, tls=host_tls(fleet_ca, certs, "h2")) as rx:
        gone = Waiting(dirs[1])  # never started: its QEMU died
        rx.disks.channel.tunnels = route(gone)
        with pytest.raises(CorralError, match="nothing listens for the stream here"):
            await send(dirs[0], rx, h1, rx.ticket("vm", tunnel.LIVE), b"x" * 1000)


async def test_in_clear_on_a_loopback_fleet_the_ticket_still_decides(
        tmp_path: Path, dirs: tuple[Path, Path]) -> None:
    payload = os.urandom(3 * MB)
    async with receiver(tmp_path) as rx:
        waiting = Waiting(dirs[1])
        await waiting.start()
        rx.disks.channel.tunnels = route(waiting)
        try:
            with pytest.raises(CorralError, match="opens no live stream"):
                await send(dirs[0], rx, None, rx.ticket("vm", "standby"), payload)
            sent, _ = await send(dirs[0], rx, None, rx.ticket("vm", tunnel.LIVE), payload)
        finally:
            await waiting.stop()
    assert sent == len(payload) and bytes(waiting.got) == payload
