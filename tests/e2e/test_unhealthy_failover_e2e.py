"""``--failover-on-unhealthy`` in a real local fleet (server, NATS, two agents, the process
driver): a workload whose host "goes bad" (a file in its disk names the disk's path on that
host, so the fault stays with the host, as a failing disk or NIC would) stops answering its
``tcp::PORT`` check; its agent restarts it until the policy gives up, then the leader promotes
its standby: it runs, healthy, on the standby's host, exactly one copy, with the reason in the
operation and the event. The same workload without the flag stays failed where it was; one
with the flag and no standby gets an event saying why it was not moved; and a copy that falls
sick on its new host too is not bounced back (once an hour)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fleetkit import Fleet, fleet_for

pytestmark = pytest.mark.timeout(600)

#: every wait is bounded by this (seconds)
WAIT = 90.0
#: the check: a copy just started gets five tries (1.5 s) to listen, so a slow start on a
#: loaded machine is not an unhealthy one
CHECK = ("--check-interval", "0.3", "--check-timeout", "0.5", "--check-threshold", "5")

#: listens on PORT while ``break`` in its working directory (its disk) does not name that
#: directory; closes the listener while it does
WORKLOAD = """
import os, socket, sys, time
port, s = int(sys.argv[1]), None
def broken():
    try:
        with open("break") as f:
            return f.read().strip() == os.getcwd()
    except OSError:
        return False
for _ in range(10_000_000):
    if broken():
        if s is not None:
            s.close()
            s = None
    elif s is None:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen(16)
        s.setblocking(False)
    if s is not None:
        try:
            s.accept()[0].close()
        except BlockingIOError:
            pass
    time.sleep(0.05)
"""


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    with fleet_for(tmp_path_factory.mktemp("unhealthy"), "--hosts", "2") as f:
        yield f


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(f: Fleet, name: str, port: int, marker: str, *extra: str) -> None:
    f.ok("run", name, "--host", "host1", "--cpus", "0.1", "--memory", "32M",
         "--restart", "on-failure", "--restart-attempts", "2", "--restart-delay", "0.2",
         "--check", f"tcp::{port}", *CHECK, *extra, "--",
         sys.executable, "-S", "-c", WORKLOAD, str(port), marker)


def until(f: Fleet, what: str, pred: Any) -> Any:
    deadline = time.monotonic() + WAIT
    while True:
        got = pred()
        if got:
            return got
        assert time.monotonic() < deadline, f"not in {WAIT:g}s: {what}\n{f.logs(40)}"
        time.sleep(0.3)


def healthy_on(f: Fleet, name: str, host: str) -> dict[str, Any] | None:
    v = f.instance(name)
    ok = v["host"] == host and v["state"] == "running" and v["health"] == "healthy"
    return v if ok else None


def gave_up(f: Fleet, name: str) -> dict[str, Any] | None:
    v = f.instance(name)
    return v if v["state"] == "failed" and v["restarts"] == 2 else None


def break_host(f: Fleet, name: str) -> None:
    """Make the current copy's host "bad": its disk names itself in ``break``."""
    pid = f.instance(name)["pid"]
    disk = os.readlink(f"/proc/{pid}/cwd")
    Path(disk, "break").write_text(disk + "\n")


def events(f: Fleet, name: str, type_: str) -> list[dict[str, Any]]:
    out = f.ok("events", "--type", type_, "--instance", name, "--json")
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def copies(marker: str) -> list[int]:
    """Live processes whose argv holds ``marker`` (one per running copy)."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError):
                if marker.encode() in (d / "cmdline").read_bytes().split(b"\0"):
                    found.append(int(d.name))
    return found


def promotions(f: Fleet, name: str) -> list[dict[str, Any]]:
    return [o for o in f.json("ops", "ls", "--target", name) if o["kind"] == "standby-promote"]


def test_an_unhealthy_instance_fails_over_to_its_standby_once(fleet: Fleet) -> None:
    f = fleet
    tag = uuid.uuid4().hex[:8]
    marks = {n: f"{n}-{tag}" for n in ("sick", "plain", "lonely")}
    ports = {n: free_port() for n in marks}
    run(f, "sick", ports["sick"], marks["sick"], "--failover-on-unhealthy")
    run(f, "plain", ports["plain"], marks["plain"])
    run(f, "lonely", ports["lonely"], marks["lonely"], "--failover-on-unhealthy")
    try:
        for n in marks:
            until(f, f"{n} healthy", lambda n=n: healthy_on(f, n, "host1"))
        epoch = f.instance("sick")["epoch"]
        shown = f.instance("sick")
        assert shown["check"]["failover"] is True and f.instance("plain")["check"]["failover"] \
            is False
        assert "fails over to its standby" in f.ok("show", "sick")
        for n in ("sick", "plain"):
            f.ok("standby", "add", n, "--host", "host2", "--every", "1h")

        # without the flag, or without a standby: the agent gives up and nothing moves
        break_host(f, "plain")
        break_host(f, "lonely")
        until(f, "plain gave up", lambda: gave_up(f, "plain"))
        until(f, "lonely gave up", lambda: gave_up(f, "lonely"))
        (skip,) = until(f, "lonely's skip event",
                        lambda: events(f, "lonely", "instance.failover_skipped"))
        assert skip["data"]["reason"] == "it has no standby"
        assert f"check tcp::{ports['lonely']} failed" in skip["data"]["check"]

        # with both: restarts, then the promotion to host2
        break_host(f, "sick")
        (ev,) = until(f, "sick's failover event",
                      lambda: events(f, "sick", "instance.failover"))
        why = ev["data"]["reason"]
        assert why.startswith(f"unhealthy after 2 restarts: check tcp::{ports['sick']} failed: ")
        assert (ev["host"], ev["data"]["from"], ev["data"]["cause"]) == ("host2", "host1",
                                                                         "unhealthy")
        moved = until(f, "sick healthy on host2", lambda: healthy_on(f, "sick", "host2"))
        assert moved["epoch"] > epoch  # a new copy
        assert len(copies(marks["sick"])) == 1, "two copies of sick (or none) run"
        (op,) = promotions(f, "sick")
        assert op["state"] == "succeeded" and op["id"] == ev["data"]["id"]
        assert f.json("ops", "show", op["id"])["params"] == {"reason": why}
        sb = {s["instance"]: s["host"] for s in f.json("standby", "ls")}
        assert sb["sick"] == "host1"  # the old disk is the standby now

        # the one without the flag is where it was, failed, never promoted
        plain = f.instance("plain")
        assert (plain["host"], plain["state"]) == ("host1", "failed")
        assert promotions(f, "plain") == [] and events(f, "plain", "instance.failover") == []
        assert copies(marks["plain"]) == []

        # sick on host2 too: no bounce back to host1 within the hour
        break_host(f, "sick")
        (skip,) = until(f, "sick's skip event",
                        lambda: events(f, "sick", "instance.failover_skipped"))
        assert "already failed over on unhealthy" in skip["data"]["reason"]
        stays = until(f, "sick gave up on host2", lambda: gave_up(f, "sick"))
        assert stays["host"] == "host2"
        assert len(promotions(f, "sick")) == 1
        assert copies(marks["sick"]) == []
    finally:
        for n in marks:
            f.cli("standby", "rm", n)
            f.cli("kill", n)
            f.cli("rm", n)


def test_without_a_restart_policy_the_running_copy_is_killed_then_moved(fleet: Fleet) -> None:
    """``--restart no``: nothing restarts it, so it moves as soon as it is unhealthy, while
    it still runs: the promotion kills and reaps it before the copy starts."""
    f = fleet
    marker, port = f"bare-{uuid.uuid4().hex[:8]}", free_port()
    f.ok("run", "bare", "--host", "host1", "--cpus", "0.1", "--memory", "32M",
         "--check", f"tcp::{port}", *CHECK, "--failover-on-unhealthy", "--",
         sys.executable, "-S", "-c", WORKLOAD, str(port), marker)
    try:
        before = until(f, "bare healthy", lambda: healthy_on(f, "bare", "host1"))
        f.ok("standby", "add", "bare", "--host", "host2", "--every", "1h")
        break_host(f, "bare")
        (ev,) = until(f, "bare's failover event",
                      lambda: events(f, "bare", "instance.failover"))
        assert ev["data"]["reason"].startswith(
            f"unhealthy (restart policy no): check tcp::{port} failed: ")
        after = until(f, "bare healthy on host2", lambda: healthy_on(f, "bare", "host2"))
        assert after["epoch"] > before["epoch"]
        assert copies(marker) == [after["pid"]], "the old copy still runs (or none does)"
        (op,) = promotions(f, "bare")
        assert op["state"] == "succeeded"
        assert [s["state"] for s in op["steps"] if s["name"] == "stop"] == ["done"]
    finally:
        f.cli("standby", "rm", "bare")
        f.cli("kill", "bare")
        f.cli("rm", "bare")
