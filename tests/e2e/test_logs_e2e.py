"""Log capture end to end: 3 instances on 3 hosts -> JetStream -> two ``corral logsink``s.

While the instances print numbered lines, one sink, one agent and the nats-server itself are
killed with -9 and come back (the sink and agent started again by the test, the nats-server by
the control plane, on the same port and JetStream directory). Afterwards both sinks must hold
every line of every source exactly once and in order, with no gap recorded, and ``corral logs``
must show the same lines.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fleetkit import CLI, Fleet, fleet_for, restart_agent

from corral.rig.context import load_context

pytestmark = pytest.mark.timeout(600)

LINES = 2500  # per instance on stdout; every 10th also on stderr; web1 also writes an access log
HOSTS = ("host1", "host2", "host3")


def _script(name: str, access: Path | None) -> str:
    acc = (f'echo "127.0.0.1 - - [23/Nov/2026:12:00:00 +0000] \\"GET /p$i HTTP/1.1\\" 200 5"'
           f' >> {access}; ') if access else ""
    return (f"i=1; while [ $i -le {LINES} ]; do echo \"{name} out $i\"; "
            f"if [ $((i % 10)) -eq 0 ]; then echo \"{name} err $i\" >&2; fi; {acc}"
            f"i=$((i+1)); sleep 0.01; done; sleep 600")


def expected(name: str, with_access: bool) -> dict[str, list[str]]:
    out = {"stdout": [f"{name} out {i}" for i in range(1, LINES + 1)],
           "stderr": [f"{name} err {i}" for i in range(10, LINES + 1, 10)]}
    if with_access:
        out["access"] = [f'127.0.0.1 - - [23/Nov/2026:12:00:00 +0000] "GET /p{i} HTTP/1.1" 200 5'
                         for i in range(1, LINES + 1)]
    return out


class Sinks:
    """``corral logsink`` subprocesses this test started (and kills, whatever happens)."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def dir(self, name: str) -> Path:
        return self.fleet.tmp / f"sink-{name}"

    def start(self, name: str) -> None:
        log = (self.fleet.tmp / f"sink-{name}.log").open("ab")
        self.procs[name] = subprocess.Popen(
            [*CLI, "logsink", "--dir", str(self.dir(name)), "--name", name],
            env=self.fleet.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def kill9(self, name: str) -> None:
        proc = self.procs[name]
        proc.kill()
        proc.wait(10)

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    with fleet_for(tmp_path, "--hosts", "3") as f:
        yield f


@pytest.fixture
def sinks(fleet: Fleet) -> Iterator[Sinks]:
    s = Sinks(fleet)
    try:
        yield s
    finally:
        s.stop_all()


def nats_pids(store: Path) -> list[int]:
    """nats-server processes whose JetStream directory is ``store`` (its config file, which
    names that directory, lives there)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if argv and argv[0].endswith(b"nats-server") and any(
                    a.startswith(str(store).encode() + b"/") for a in argv):
                out.append(int(entry.name))
    return out


def lines_written(fleet: Fleet, host: str, name: str) -> int:
    path = fleet.tmp / "data" / "hosts" / host / "instances" / name / "stdout.log"
    try:
        return len(path.read_bytes().splitlines())
    except FileNotFoundError:
        return 0


def sink_content(d: Path, name: str, source: str) -> list[str]:
    try:
        return (d / name / f"{source}.log").read_text().splitlines()
    except FileNotFoundError:
        return []


def first_diff(got: list[str], want: list[str]) -> int:
    return next((i for i, (x, y) in enumerate(zip(got, want, strict=False)) if x != y),
                min(len(got), len(want)))


def wait_for(what: str, cond: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def test_lines_reach_two_sinks_once_across_kill_9(fleet: Fleet, sinks: Sinks) -> None:
    access = fleet.tmp / "web1-access.log"
    names = {f"web{i}": host for i, host in enumerate(HOSTS, 1)}
    want = {n: expected(n, n == "web1") for n in names}
    sinks.start("a")
    sinks.start("b")
    for name, host in names.items():
        extra = ["--tail", f"access={access}"] if name == "web1" else []
        fleet.ok("run", name, "--host", host, *extra, "--",
                 "sh", "-c", _script(name, access if name == "web1" else None))

    # 1. a sink killed with -9 and started again
    time.sleep(3)
    sinks.kill9("a")
    assert sink_content(sinks.dir("a"), "web1", "stdout"), "sink a wrote nothing before its kill"
    time.sleep(1)
    sinks.start("a")

    # 2. an agent killed with -9 and started again (its instance keeps printing meanwhile)
    time.sleep(2)
    ctx = load_context(fleet.context_file)
    assert ctx is not None
    agent = next(a for a in ctx.agents if a.name == "host2")
    os.kill(agent.pid, signal.SIGKILL)
    time.sleep(2)
    restart_agent(fleet, "host2")

    # 3. the nats-server killed with -9: the control plane starts it again (same port, same dir)
    time.sleep(2)
    store = fleet.tmp / "data" / "server" / "nats"
    old = nats_pids(store)
    assert len(old) == 1, f"expected one nats-server on {store}, found {old}"
    assert min(lines_written(fleet, h, n) for n, h in names.items()) < LINES, \
        "the instances finished before the kills: the test proves nothing"
    os.kill(old[0], signal.SIGKILL)
    wait_for("the server to restart nats-server",
             lambda: bool(nats_pids(store)) and nats_pids(store) != old, 30)

    wait_for("every instance to print all its lines",
             lambda: all(lines_written(fleet, h, n) >= LINES for n, h in names.items()), 180)

    def complete(sink: str) -> bool:
        return all(len(sink_content(sinks.dir(sink), n, src)) >= len(lines)
                   for n, per in want.items() for src, lines in per.items())

    wait_for("both sinks to hold every line", lambda: complete("a") and complete("b"), 120)
    time.sleep(1.5)  # a duplicate, if any were coming, would land now
    for sink in ("a", "b"):
        d = sinks.dir(sink)
        for name, per in want.items():
            for src, lines in per.items():
                got = sink_content(d, name, src)
                assert got == lines, (f"sink {sink}, {name}/{src}: {len(got)} lines, want "
                                      f"{len(lines)}; first difference at {first_diff(got, lines)}")
        assert not (d / "gaps.jsonl").exists(), (d / "gaps.jsonl").read_text()

    # corral logs shows the same lines, each once, numbered in order per source
    for name, per in want.items():
        records = [json.loads(line) for line in fleet.ok("logs", name, "--json").splitlines()]
        for src, lines in per.items():
            mine = [r for r in records if r["source"] == src]
            assert [r["line"] for r in mine] == lines, f"corral logs {name}: {src} differs"
            assert [r["seq"] for r in mine] == list(range(1, len(lines) + 1))
            assert {r["host"] for r in mine} == {names[name]}
    plain = fleet.ok("logs", "web2", "--source", "stderr").splitlines()
    assert plain == want["web2"]["stderr"]
    recent = fleet.ok("logs", "web3", "--since", "1h", "--source", "stdout").splitlines()
    assert recent == want["web3"]["stdout"]
    assert fleet.ok("logs", "web3", "--since", "2099-01-01T00:00:00Z") == ""

    missing = fleet.cli("logs", "no-such")
    assert missing.returncode != 0 and "hint: " in missing.stderr, missing.stderr

    # follow: a line printed after the request started arrives on the open response
    fleet.ok("run", "late", "--host", "host1", "--", "sh", "-c",
             "sleep 2; echo late-line; sleep 600")
    follow = subprocess.Popen([*CLI, "logs", "late", "-f"], env=fleet.env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert follow.stdout is not None
        ready, _, _ = select.select([follow.stdout], [], [], 60)
        assert ready, "corral logs -f printed nothing within 60s"
        line = follow.stdout.readline()
        assert line.strip() == "late-line", follow.stderr.read() if follow.stderr else ""
    finally:
        follow.kill()
        follow.wait(10)

    # deleting an instance stops its capture after a last pump; its logs stay readable
    fleet.ok("rm", "--force", "web3")
    assert fleet.ok("logs", "web3", "--source", "stderr").splitlines() == want["web3"]["stderr"]
