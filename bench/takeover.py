#!/usr/bin/env python3
"""Figure: the leading server killed with -9 -> a mutating call accepted again, and -> the
migration it was in the middle of finished.

Two fleets built with ``corral up`` on this machine, 2 hosts each (process driver):

* **corral, 3 servers**: ``--servers 3 --postgres`` (three servers with a node each of one
  NATS cluster, the rig's PostgreSQL, a 3 s leader lease). Each round holds the leader at the
  start of a migration's ``create`` step (a fire drill), kills it with -9, and times from the
  kill until a mutating call (``POST /v1/hosts``, through the product's client given every
  server's URL) is accepted, and until the migration is finished (resumed or rolled back by the
  new leader). The killed server is then started again (a follower now) for the next round.
* **baseline, 1 server restarted at once**: what a one-server deployment has at best, a
  supervisor with ``Restart=always`` and no delay: the same drill and kill on a ``corral up``
  fleet with one server on SQLite, the server started again with its own command the moment it
  is dead, and the same two times.

Every round checks the result: the operation ended succeeded or rolled_back, the instance
runs, exactly one copy of it (the process of the copy it left is gone), no host was marked down.

    .venv/bin/python bench/takeover.py             # 5 rounds of each
    .venv/bin/python bench/takeover.py --rounds 10 # the issue's ten
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import waiting

from corral.api.client import Client
from corral.errors import CorralError
from corral.rig import procs
from corral.rig.context import FleetContext, ProcInfo, load_context
from corral.rig.fleet import respawn_server

CLI = [sys.executable, "-m", "corral.cli"]


def wait(pred: Callable[[], Any], what: str, timeout: float, every: float = 0.02) -> Any:
    return waiting.wait(pred, what, timeout, every)


def alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class Rig:
    def __init__(self, top: Path, *up_args: str) -> None:
        self.top = top
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
        self.env["CORRAL_CONTEXT"] = str(top / "context.json")
        self.cli("up", "--hosts", "2", "--data", str(top / "data"), *up_args, timeout=420)

    def cli(self, *args: str, timeout: float = 180) -> str:
        p = subprocess.run([*CLI, *args], env=self.env, capture_output=True, text=True,
                           timeout=timeout)
        if p.returncode != 0:
            raise SystemExit(f"corral {' '.join(args)}: {p.stderr.strip()}")
        return p.stdout

    @property
    def context(self) -> Path:
        return Path(self.env["CORRAL_CONTEXT"])

    @property
    def ctx(self) -> FleetContext:
        ctx = load_context(self.context)
        assert ctx is not None
        return ctx

    def client(self) -> Client:
        ctx = self.ctx
        return Client(ctx.url, ctx.token, timeout=10, ca_file=ctx.ca_file)

    def servers(self) -> list[ProcInfo]:
        ctx = self.ctx
        return [p for p in [ctx.server, *ctx.servers] if p is not None]

    def leader(self) -> ProcInfo:
        def found() -> ProcInfo | None:
            try:
                with self.client() as c:
                    lead = c.status_data().get("leader")
            except CorralError:
                return None
            if not lead:
                return None
            port = str(lead["api_url"]).rsplit(":", 1)[1]
            return next((p for p in self.servers()
                         if p.argv[p.argv.index("--api-port") + 1] == port), None)
        return wait(found, "a leader", 60, every=0.1)  # type: ignore[no-any-return]

    def down(self) -> None:
        subprocess.run([*CLI, "down", "--timeout", "5"], env=self.env, capture_output=True,
                       timeout=180)


def accepted(c: Client, name: str) -> bool:
    try:
        c.host_add(name)
    except CorralError as exc:
        if not exc.retryable and exc.code not in ("not_leader", "unavailable"):
            raise
        return False
    return True


def one_round(rig: Rig, i: int, single: bool) -> tuple[float, float]:
    """(seconds to a write, seconds to the migration finished) for one kill of the leader."""
    with rig.client() as c:
        web = c.instance("web")
    target = "host2" if web.host == "host1" else "host1"
    leader = rig.servers()[0] if single else rig.leader()
    sdir = Path(leader.argv[leader.argv.index("--data") + 1])
    flag = sdir / "drills" / "migrate.create.before"
    flag.parent.mkdir(exist_ok=True)
    reached = flag.with_name(flag.name + ".reached")
    reached.unlink(missing_ok=True)
    flag.write_text("")
    with rig.client() as c:
        op = c.migrate("web", to=target)
    wait(reached.exists, "the drill", 120)
    os.kill(leader.pid, signal.SIGKILL)
    t0 = time.monotonic()
    wait(lambda: not procs.alive(leader), "the kill", 10)
    flag.unlink()
    ctx = rig.ctx
    if single:  # the supervisor starts it again at once
        respawn_server(ctx, leader, context=rig.context)
    with Client(ctx.url, ctx.token, timeout=10, ca_file=ctx.ca_file) as c:
        wait(lambda: accepted(c, f"probe-{'s' if single else 'm'}{i}"), "a write", 120,
             every=0.01)
        write = time.monotonic() - t0

        def finished() -> bool:
            try:
                return c.op(op.id).finished
            except CorralError:
                return False
        wait(finished, "the migration", 300, every=0.02)
        done = time.monotonic() - t0
        rec = c.op(op.id)
        assert rec.state in ("succeeded", "rolled_back"), rec
        now = wait(lambda: (v := c.instance("web")).state == "running" and v, "web running",
                   60)
        if now.host != web.host:  # moved: the copy it left must be gone
            wait(lambda: not alive(web.pid), "the old copy to end", 30)
        assert alive(now.pid), now
        states = {h.name: h.state for h in c.hosts()}
        assert states == {"host1": "up", "host2": "up"}, states
    if not single:  # back as a follower for the next round
        respawn_server(rig.ctx, leader, context=rig.context)
    print(f"  round {i + 1}: write {write:.2f}s, migration {rec.state} {done:.2f}s",
          flush=True)
    return write, done


def run(top: Path, rounds: int, single: bool) -> tuple[list[float], list[float]]:
    args = () if single else ("--servers", "3", "--postgres")
    rig = Rig(top, *args)
    writes: list[float] = []
    dones: list[float] = []
    try:
        rig.cli("run", "web", "--host", "host1", "--", "sleep", "3600")
        for i in range(rounds):
            w, d = one_round(rig, i, single)
            writes.append(w)
            dones.append(d)
    finally:
        rig.down()
    return writes, dones


def summary(xs: list[float]) -> str:
    return f"median {statistics.median(xs):.2f}s (min {min(xs):.2f}, max {max(xs):.2f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    top = Path(tempfile.mkdtemp(prefix="corral-takeover-"))
    os.chmod(top, 0o711)  # the rig's PostgreSQL (not root) must reach its directory
    results: dict[str, tuple[list[float], list[float]]] = {}
    try:
        for label, single in (("corral 3 servers", False), ("1 server restarted", True)):
            print(f"{label}: {args.rounds} rounds", flush=True)
            (top / label.replace(" ", "-")).mkdir()
            results[label] = run(top / label.replace(" ", "-"), args.rounds, single)
    finally:
        shutil.rmtree(top, ignore_errors=True)
    print()
    for label, (w, d) in results.items():
        print(f"{label:>20}: write accepted {summary(w)}; migration finished {summary(d)}")
    mw, md = results["corral 3 servers"]
    sw, sd = results["1 server restarted"]
    print(json.dumps({"rounds": args.rounds}))
    print(f"figure: takeover.write_accepted {statistics.median(mw):.2f} s")
    print(f"figure: takeover.migration_finished {statistics.median(md):.2f} s")
    print(f"figure: takeover.single_restart_write_accepted {statistics.median(sw):.2f} s")
    print(f"figure: takeover.single_restart_migration_finished {statistics.median(sd):.2f} s")


if __name__ == "__main__":
    main()
