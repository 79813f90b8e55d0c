"""The bus plumbing against a real nats-server: launcher, authenticated connect, request/reply."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from nats.aio.msg import Msg

from corral.bus import codec
from corral.bus.connect import connect, request
from corral.bus.embedded import EmbeddedNats, find_binary, free_port
from corral.bus.messages import Command, Reply
from corral.errors import CorralError, DriverError, HostUnavailable, NotFound, Unauthorized

TOKEN = "bus-token"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[EmbeddedNats]:
    n = EmbeddedNats(tmp_path, TOKEN)
    n.start()
    try:
        yield n
    finally:
        n.stop()


def test_binary_is_found() -> None:
    assert os.access(find_binary(), os.X_OK)


def test_embedded_server_uses_data_dir_and_stops(server: EmbeddedNats, tmp_path: Path) -> None:
    assert server.running and server.port > 0
    assert server.url == f"nats://127.0.0.1:{server.port}"
    assert (tmp_path / "nats").is_dir() and (tmp_path / "nats-server.log").exists()
    auth = tmp_path / "nats" / "auth.conf"
    assert oct(auth.stat().st_mode & 0o777) == "0o600"
    proc = server.proc
    assert proc is not None
    cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
    assert TOKEN.encode() not in cmdline
    conf = auth.read_text()  # JetStream on, each write on disk before it is acknowledged
    assert "jetstream" in conf and "sync_interval: always" in conf
    assert "Starting JetStream" in (tmp_path / "nats-server.log").read_text()
    server.stop()
    assert proc.returncode is not None and not server.running
    server.stop()  # twice is fine


def test_start_fails_clearly_on_a_taken_port(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        n = EmbeddedNats(tmp_path, TOKEN, port=port)
        with pytest.raises(CorralError) as info:
            n.start()
    assert "nats-server" in info.value.message
    assert "nats-server.log" in info.value.hint
    assert not n.running


def test_free_port_is_bindable() -> None:
    port = free_port("127.0.0.1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


async def test_connect_with_the_token(server: EmbeddedNats) -> None:
    nc = await connect(server.url, TOKEN, "t")
    try:
        assert nc.is_connected
    finally:
        await nc.close()


async def test_a_wrong_token_is_refused_in_plain_words(server: EmbeddedNats) -> None:
    with pytest.raises(Unauthorized) as info:
        await connect(server.url, "wrong", "t")
    assert "refused our credentials" in info.value.message


async def test_nothing_listening_is_host_unavailable_quickly() -> None:
    port = free_port("127.0.0.1")
    with pytest.raises(HostUnavailable) as info:
        await asyncio.wait_for(connect(f"nats://127.0.0.1:{port}", TOKEN, "t"), 10)
    assert "cannot reach a NATS server" in info.value.message
    assert "corral server" in info.value.hint


async def test_request_turns_failures_into_corral_errors(server: EmbeddedNats) -> None:
    nc = await connect(server.url, TOKEN, "t")
    try:
        with pytest.raises(HostUnavailable, match=r"nothing answers on corral\.cmd\.h9"):
            await request(nc, "corral.cmd.h9", Command(verb="status"), Reply, 2)

        async def silent(msg: Msg) -> None:
            return None

        await nc.subscribe("corral.cmd.slow", cb=silent)
        with pytest.raises(HostUnavailable, match=r"no reply on corral\.cmd\.slow within 0\.3s"):
            await request(nc, "corral.cmd.slow", Command(verb="status"), Reply, 0.3)

        async def failing(msg: Msg) -> None:
            err = DriverError("runc said no", hint="look at runc", details={"rc": 1})
            await msg.respond(codec.encode(Reply(ok=False, error=err.to_dict())))

        await nc.subscribe("corral.cmd.bad", cb=failing)
        with pytest.raises(DriverError) as info:
            await request(nc, "corral.cmd.bad", Command(verb="start"), Reply, 2)
        assert (info.value.message, info.value.hint, info.value.details) == (
            "runc said no", "look at runc", {"rc": 1})

        async def ok(msg: Msg) -> None:
            cmd = codec.decode(msg.data, Command)
            await msg.respond(codec.encode(Reply(ok=True, result={"echo": cmd.args})))

        await nc.subscribe("corral.cmd.ok", cb=ok)
        reply = await request(nc, "corral.cmd.ok", Command(verb="status", args={"name": "a"}),
                              Reply, 2)
        assert reply.result == {"echo": {"name": "a"}}

        async def garbage(msg: Msg) -> None:
            await msg.respond(b"{not json")

        await nc.subscribe("corral.cmd.junk", cb=garbage)
        with pytest.raises(CorralError, match="malformed reply"):
            await request(nc, "corral.cmd.junk", Command(verb="status"), Reply, 2)

        async def unknown_code(msg: Msg) -> None:
            await msg.respond(codec.encode(Reply(ok=False, error={"code": "not_found",
                                                                  "message": "gone"})))

        await nc.subscribe("corral.cmd.nf", cb=unknown_code)
        with pytest.raises(NotFound, match="gone"):
            await request(nc, "corral.cmd.nf", Command(verb="status"), Reply, 2)
    finally:
        await nc.close()


async def test_connection_survives_a_server_restart(tmp_path: Path) -> None:
    n = EmbeddedNats(tmp_path, TOKEN)
    n.start()
    port = n.port
    nc = await connect(n.url, TOKEN, "t")
    try:
        n.stop()
        await asyncio.sleep(0.3)
        n2 = EmbeddedNats(tmp_path, TOKEN, port=port)
        n2.start()
        try:
            for _ in range(100):
                if nc.is_connected:
                    break
                await asyncio.sleep(0.1)
            assert nc.is_connected
            await nc.flush(timeout=5)
        finally:
            n2.stop()
    finally:
        await nc.close()


def test_reloads_from_many_threads_at_once_each_see_their_own(tmp_path: Path) -> None:
    """Hosts enrolled together reload the bus from several worker threads (and the server's
    watch from another): every reload must write a whole config and be seen by nats-server,
    never trip over another's temp file, and the last config must hold every identity."""
    import threading

    from corral.bus import identity
    from corral.bus.identity import Credentials

    seeds: list[str] = []
    lock = threading.Lock()

    def auth() -> str:
        with lock:
            users = [f'{{ nkey: "{identity.public_key(s)}" }}' for s in seeds]
        return "authorization { users: [ " + ", ".join(
            [f'{{ user: "tool", password: "{TOKEN}" }}', *users]) + " ] }"

    (tmp_path / "nats").mkdir()
    server = EmbeddedNats(tmp_path, TOKEN, auth=auth)
    server.start()
    try:
        results: list[bool] = []
        errors: list[BaseException] = []

        def enroll() -> None:
            with lock:
                seeds.append(identity.new_seed())
            try:
                results.append(server.reload())
            except BaseException as exc:  # the test reports every one
                errors.append(exc)

        threads = [threading.Thread(target=enroll) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert errors == [] and results == [True] * 6, (errors, results)
        assert not list((tmp_path / "nats").glob(".auth.conf.*"))

        async def logs_in(seed: str) -> bool:
            from nats import connect as nats_connect

            nc = await nats_connect(server.url, allow_reconnect=False, connect_timeout=2,
                                    **Credentials(seed=seed).options())
            await nc.close()
            return True

        for seed in seeds:  # every host's key is in the config nats-server read last
            assert asyncio.run(logs_in(seed))
    finally:
        server.stop()
