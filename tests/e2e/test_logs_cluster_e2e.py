"""Logs through a 3-node NATS cluster: one node killed with -9 in the middle of a 1M-line run.

``corral up --servers 3 --postgres``: each server runs a node of one NATS cluster, the log
stream is kept in three copies. Two instances print 500,000 numbered lines each while two
``corral logsink``s follow; one node (not the leader's) is killed with -9 mid-run and its
server starts it again. Afterwards both sinks hold every line of both instances exactly once
and in order, with no gap recorded.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fleetkit import Fleet, fleet_for
from test_logs_e2e import Sinks, first_diff, nats_pids, wait_for

pytestmark = pytest.mark.timeout(900)

LINES = 500_000
BATCH = 2_000
PAUSE = 0.05  # between batches: 250 batches, ~15 s of printing per instance


def _writer(name: str) -> list[str]:
    code = ("import sys, time\n"
            f"for b in range(0, {LINES}, {BATCH}):\n"
            f"    sys.stdout.write(''.join('{name} out %d\\n' % i "
            f"for i in range(b + 1, min(b + {BATCH}, {LINES}) + 1)))\n"
            "    sys.stdout.flush()\n"
            f"    time.sleep({PAUSE})\n"
            "time.sleep(3600)\n")
    return ["python3", "-c", code]


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[tuple[Fleet, Path]]:
    from corral.rig.postgres import bin_dir

    try:
        bin_dir()
    except Exception as exc:
        pytest.skip(str(exc))
    top = Path(tempfile.mkdtemp(prefix="corral-logs3-"))
    os.chmod(top, 0o711)  # the rig's PostgreSQL (not root) must reach its directory
    try:
        with fleet_for(tmp_path) as f:
            f.ok("up", "--hosts", "2", "--servers", "3", "--postgres", "--data",
                 str(top / "data"), timeout=420)
            yield f, top / "data"
    finally:
        shutil.rmtree(top, ignore_errors=True)


def _count(path: Path) -> int:
    try:
        with path.open("rb") as fh:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: fh.read(1 << 20), b""))
    except FileNotFoundError:
        return 0


def test_a_nats_node_killed_mid_run_loses_and_doubles_nothing(
        fleet: tuple[Fleet, Path]) -> None:
    f, data = fleet
    status = f.json("status")["status"]
    assert len(status["nats"]) == 3, status
    leader_port = status["leader"]["api_url"].rsplit(":", 1)[1]
    sinks = Sinks(f)
    try:
        sinks.start("a")
        sinks.start("b")
        names = {"w1": "host1", "w2": "host2"}
        for name, host in names.items():
            f.ok("run", name, "--host", host, "--", *_writer(name))

        def written(name: str) -> int:
            return _count(data / "hosts" / names[name] / "instances" / name / "stdout.log")

        wait_for("the run to be under way", lambda: min(map(written, names)) > LINES // 10, 120)
        # a node that is not the leader's (its server stays the one answering agents)
        victim = next(i for i in (2, 3, 1)
                      if f"--api-port {leader_port}" not in _argv(f, data, i))
        store = data / ("server" if victim == 1 else f"server{victim}") / "nats"
        old = nats_pids(store)
        assert len(old) == 1, f"expected one nats-server on {store}, found {old}"
        assert min(map(written, names)) < LINES, "the run ended before the kill: proves nothing"
        os.kill(old[0], signal.SIGKILL)
        wait_for("its server to start the node again",
                 lambda: bool(nats_pids(store)) and nats_pids(store) != old, 60)
        wait_for("both instances to print every line",
                 lambda: all(written(n) >= LINES for n in names), 300)

        def held(sink: str, name: str) -> int:
            return _count(sinks.dir(sink) / name / "stdout.log")

        wait_for("both sinks to hold every line",
                 lambda: all(held(s, n) >= LINES for s in "ab" for n in names), 300)
        time.sleep(2)  # a duplicate, if any were coming, would land now
        for sink in "ab":
            d = sinks.dir(sink)
            for name in names:
                got = (d / name / "stdout.log").read_text().splitlines()
                want = [f"{name} out {i}" for i in range(1, LINES + 1)]
                assert got == want, (f"sink {sink}, {name}: {len(got)} lines, want {len(want)}; "
                                     f"first difference at {first_diff(got, want)}")
            assert not (d / "gaps.jsonl").exists(), (d / "gaps.jsonl").read_text()
    finally:
        sinks.stop_all()


def _argv(f: Fleet, data: Path, i: int) -> str:
    """Server ``i``'s command line, as the context records it."""
    from corral.rig.context import load_context

    ctx = load_context(f.context_file)
    assert ctx is not None
    sdir = str(data / ("server" if i == 1 else f"server{i}"))
    proc = next(p for p in [ctx.server, *ctx.servers]
                if p is not None and p.argv[p.argv.index("--data") + 1] == sdir)
    return " ".join(proc.argv)
