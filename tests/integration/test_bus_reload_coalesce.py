"""Enrolling many hosts at once reloads the bus a handful of times, not once per host, and
every enrolment still logs in the moment its reload returns (a group commit)."""

from __future__ import annotations

import asyncio
import threading
import uuid
from pathlib import Path

from nats import connect as nats_connect

from corral.bus import identity
from corral.bus.embedded import EmbeddedNats
from corral.bus.identity import Credentials

TOKEN = "reload-token"
CALLERS = 40


async def _logs_in(url: str, seed: str) -> bool:
    nc = await nats_connect(url, allow_reconnect=False, connect_timeout=3,
                            max_reconnect_attempts=0, **Credentials(seed=seed).options())
    await nc.close()
    return True


def test_concurrent_reloads_are_coalesced_and_each_change_is_in_effect(tmp_path: Path) -> None:
    seeds: list[str] = []
    lock = threading.Lock()
    all_in = threading.Event()  # every caller added its key
    first_write = threading.Event()

    def auth() -> str:
        with lock:  # what this write lists: the keys added before it began
            users = [f'{{ nkey: "{identity.public_key(s)}" }}' for s in seeds]
        if started.is_set() and not first_write.is_set():
            first_write.set()
            # the first reload's config misses most keys; hold it until every caller is
            # inside reload(), so they must wait for a later one (not this one)
            all_in.wait(20)
        return "authorization { users: [ " + ", ".join(
            [f'{{ user: "tool", password: "{TOKEN}" }}', *users]) + " ] }"

    started = threading.Event()
    (tmp_path / "nats").mkdir()
    server = EmbeddedNats(tmp_path / f"n-{uuid.uuid4().hex[:6]}", TOKEN, auth=auth)
    (server.data_dir / "nats").mkdir(parents=True)
    server.start()
    started.set()
    results: dict[int, tuple[bool, bool]] = {}
    errors: list[BaseException] = []

    def enroll(i: int) -> None:
        seed = identity.new_seed()
        try:
            with lock:
                seeds.append(seed)
                if len(seeds) == CALLERS:
                    all_in.set()
            ok = server.reload(timeout=20)
            # told "enrolled": the key must let it in now, with no waiting
            results[i] = (ok, asyncio.run(_logs_in(server.url, seed)))
        except BaseException as exc:  # the test reports every one
            errors.append(exc)

    threads = [threading.Thread(target=enroll, args=(i,)) for i in range(CALLERS)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        assert errors == [], errors
        assert sorted(results) == list(range(CALLERS))
        assert all(ok and logged_in for ok, logged_in in results.values()), results
        # the first write (held) and the one after it, give or take a straggler or two
        assert 2 <= server.reloads <= CALLERS // 4, server.reloads
        log = server.log_path.read_bytes()
        assert log.count(b"Reloaded server configuration") == server.reloads
    finally:
        all_in.set()
        for t in threads:
            t.join(30)
        server.stop()
