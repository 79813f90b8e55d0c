"""Each host's own identity on the bus (issue 10): a real server with TLS on, two hosts
enrolled with join tokens, and raw NATS clients holding host1's key trying what only others may.

host1's credential cannot command host2, cannot join as host2, cannot read or answer host2's
heartbeats or replies, cannot purge or delete a stream; a removed host can no longer log in; a
join token is good once; hosts reach the bus only over TLS.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import nats.errors
import pytest

from corral.agent import identity
from corral.bus import subjects
from corral.bus.codec import encode
from corral.bus.identity import Credentials
from corral.bus.messages import Capacity, Command, JoinRequest
from corral.errors import Unauthorized

TOKEN = "identity-test-admin-token"


@dataclass
class Fleet:
    data: Path
    info: dict[str, Any]
    proc: subprocess.Popen[bytes]

    @property
    def ca(self) -> str:
        return str(self.info["ca_file"])

    def enroll(self, host: str) -> identity.Identity:
        from corral.api.client import Client

        with Client(self.info["api_url"], TOKEN, ca_file=self.ca) as c:
            token = str(c.host_add(host)["token"])
        return identity.enroll(self.data / host, host, self.info["api_url"], token,
                               "127.0.0.1", self.ca)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    data = tmp_path_factory.mktemp("idfleet")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    env.update({"CORRAL_DATA_DIR": str(data / "server"), "CORRAL_API_PORT": "0",
                "CORRAL_TLS": "on", "CORRAL_TOKEN": TOKEN})
    (data / "server").mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "corral.control"], env=env,
                            stdout=subprocess.DEVNULL,
                            stderr=(data / "server.err").open("wb"))
    try:
        info_path = data / "server" / "server.json"
        deadline = time.monotonic() + 60
        while not info_path.exists():
            assert proc.poll() is None, (data / "server.err").read_text()[-2000:]
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        yield Fleet(data, json.loads(info_path.read_text()), proc)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


async def _connect(fleet: Fleet, creds: Credentials, errors: list[Exception] | None = None
                   ) -> Any:
    async def on_error(exc: Exception) -> None:
        if errors is not None:
            errors.append(exc)

    return await nats.connect(fleet.info["nats_url"], allow_reconnect=False,
                              error_cb=on_error, **creds.options())


async def _server(fleet: Fleet) -> Any:
    seed = (fleet.data / "server" / "server.nk").read_text().strip()
    return await _connect(fleet, Credentials(seed=seed, ca_file=fleet.ca))


def test_a_join_token_is_good_once_for_one_host(fleet: Fleet) -> None:
    from corral.api.client import Client

    with Client(fleet.info["api_url"], TOKEN, ca_file=fleet.ca) as c:
        token = str(c.host_add("once")["token"])
    ident = identity.enroll(fleet.data / "once", "once", fleet.info["api_url"], token,
                            "127.0.0.1", fleet.ca)
    assert ident.seed.startswith("SU") and Path(ident.cert_file).is_file()
    assert oct((fleet.data / "once" / "identity" / "host.nk").stat().st_mode & 0o777) == "0o600"
    with pytest.raises(Unauthorized):  # again with the same token, as another host
        identity.enroll(fleet.data / "twice", "twice", fleet.info["api_url"], token,
                        "127.0.0.1", fleet.ca)


async def test_host1_cannot_command_join_as_or_listen_for_host2(fleet: Fleet) -> None:
    h1 = fleet.enroll("host1")
    fleet.enroll("host2")
    server = await _server(fleet)
    got: list[str] = []

    async def seen(msg: Any) -> None:
        got.append(msg.subject)

    # the server's own identity hears everything host2 would be told or would tell
    for subject in (subjects.command("host2"), subjects.join("host2"),
                    subjects.heartbeat("host2"), "_INBOX.host2.>"):
        await server.subscribe(subject, cb=seen)
    await server.flush()
    errors: list[Exception] = []
    bad = await _connect(fleet, h1.credentials(), errors)
    cmd = Command(verb="kill", args={"name": "db", "signal": 9})
    await bad.publish(subjects.command("host2"), encode(cmd))
    join = JoinRequest(host="host2", address="127.0.0.1",
                       capacity=Capacity(cores=1, memory_bytes=1, disk_bytes=1), drivers={},
                       agent_version="test")
    await bad.publish(subjects.join("host2"), encode(join))
    await bad.publish(subjects.heartbeat("host2"), b"{}")
    await bad.publish("_INBOX.host2.x.y", b"a forged reply")
    for subject in (subjects.command("host2"), subjects.heartbeat("host2"),
                    "_INBOX.host2.>", subjects.LOGS_ALL):
        await bad.subscribe(subject, cb=seen)
    await bad.flush()
    await asyncio.sleep(0.5)
    assert got == [], f"host1 reached {got}"
    text = " ".join(str(e) for e in errors).lower()
    assert "permissions violation" in text
    # its own join, claiming to be host2, is refused by the server (identity from the subject)
    with pytest.raises(nats.errors.Error) as refused:
        reply = await bad.request(subjects.join("host1"), encode(join), timeout=5)
        raise nats.errors.Error(reply.data.decode())
    assert "cannot register host2" in str(refused.value)
    await bad.close()
    await server.close()


async def test_a_host_cannot_purge_or_delete_a_stream(fleet: Fleet) -> None:
    h1 = fleet.enroll("purger")
    server = await _server(fleet)
    sjs = server.jetstream()
    await sjs.publish(subjects.logs("x", "keep"), b"kept")
    before = (await sjs.stream_info("CORRAL_LOGS")).state.messages
    bad = await _connect(fleet, h1.credentials())
    js = bad.jetstream()
    for attempt in (js.purge_stream("CORRAL_LOGS"), js.delete_stream("CORRAL_EVENTS")):
        with pytest.raises((nats.errors.Error, TimeoutError)):
            await asyncio.wait_for(attempt, 3)
    assert (await sjs.stream_info("CORRAL_LOGS")).state.messages >= before > 0
    assert (await sjs.stream_info("CORRAL_EVENTS")).config.name == "CORRAL_EVENTS"
    await bad.close()
    await server.close()


async def test_a_log_reader_reads_but_cannot_change_a_stream(fleet: Fleet) -> None:
    from corral.telemetry.logsink import reader

    server = await _server(fleet)
    sjs = server.jetstream()
    await sjs.publish(subjects.logs("x", "read-me"), b"line")
    before = (await sjs.stream_info("CORRAL_LOGS")).state.messages
    nc = await _connect(fleet, reader(TOKEN, fleet.ca))
    js = nc.jetstream()
    got = await js.get_last_msg("CORRAL_LOGS", subjects.logs("x", "read-me"))
    assert got.data == b"line"
    for attempt in (js.purge_stream("CORRAL_LOGS"), js.delete_stream("CORRAL_EVENTS")):
        with pytest.raises((nats.errors.Error, TimeoutError)):
            await asyncio.wait_for(attempt, 3)
    with pytest.raises((nats.errors.Error, TimeoutError)):  # nor write a line as a host
        await asyncio.wait_for(js.publish(subjects.logs("x", "forged"), b"no"), 3)
    assert (await sjs.stream_info("CORRAL_LOGS")).state.messages == before
    await nc.close()
    with pytest.raises(nats.errors.Error):  # the reader's password is the fleet token
        await _connect(fleet, reader("not-the-token", fleet.ca))
    await server.close()


def test_an_enrolled_host_gets_an_api_token_of_role_host(fleet: Fleet) -> None:
    from corral.api.client import Client
    from corral.errors import Forbidden

    ident = fleet.enroll("apiuser")
    assert ident.api_token and ident.api_token != TOKEN
    with Client(fleet.info["api_url"], ident.api_token, ca_file=fleet.ca) as c, \
            pytest.raises(Forbidden):  # a host's token cannot run the fleet
        c.host_add("sneaky")
    with Client(fleet.info["api_url"], TOKEN, ca_file=fleet.ca) as c:
        c.host_rm("apiuser")
    with Client(fleet.info["api_url"], ident.api_token, ca_file=fleet.ca) as c, \
            pytest.raises(Unauthorized):  # revoked with the host
        c.hosts()


async def test_a_removed_host_can_no_longer_log_in(fleet: Fleet) -> None:
    from corral.api.client import Client

    gone = fleet.enroll("gone")
    nc = await _connect(fleet, gone.credentials())
    closed = asyncio.Event()

    async def on_closed() -> None:
        closed.set()

    nc._closed_cb = on_closed
    with Client(fleet.info["api_url"], TOKEN, ca_file=fleet.ca) as c:
        c.host_rm("gone")
    await asyncio.wait_for(closed.wait(), 10)  # the reload closed its connection
    with pytest.raises((nats.errors.Error, OSError)):
        again = await _connect(fleet, gone.credentials())
        await again.close()


async def test_hosts_reach_the_bus_over_tls_only(fleet: Fleet) -> None:
    h = fleet.enroll("plain")
    url = fleet.info["nats_url"].replace("tls://", "nats://")
    assert fleet.info["nats_url"].startswith("tls://")
    with pytest.raises((nats.errors.Error, OSError, ssl.SSLError)):
        creds = Credentials(seed=h.seed)  # no CA: no TLS
        nc = await nats.connect(url, allow_reconnect=False, connect_timeout=3,
                                **creds.options())
        await nc.close()
