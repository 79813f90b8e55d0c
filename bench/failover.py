#!/usr/bin/env python3
"""Figure: host killed -> its service's virtual IP answering again from another host.

As root. Builds a ``corral up --netns`` fleet of 3 hosts with the default timings (lease 10 s,
heartbeat 2 s, grace 1 s), runs a small TCP service with a VIP on host1 and a warm standby on
host2, then kills host1 the way a power cut would (agent kill -9, workload kill -9, eth0 down)
and measures, from the root namespace on the same bridge, how long until the VIP answers again
(from host2's namespace). After each round host1 comes back and the service is removed.

Baselines measured in the same run:

* **lease alone**: from the kill until the server marks host1 down -- the earliest moment a
  person or a script without HA could even learn of the outage (the failover itself is then
  their reaction time, which this cannot measure);
* **keepalived** (Debian's, VRRP advert 1 s) on two namespaces of its own with the service
  already running on both (a hot standby that only moves the address): kill -9 the master's
  keepalived and service and take its link down, time until the VIP answers from the backup.
  It moves an address; corral also fences, picks the copy and starts the service from a disk.

    .venv/bin/python bench/failover.py            # 3 rounds of each
    .venv/bin/python bench/failover.py --rounds 1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from corral.rig import netns, procs
from corral.rig.context import load_context, save_context

SERVE = ("import os, socket; s = socket.socket(); "
         "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('0.0.0.0', {port})); "
         "s.listen(64)\n"
         "while True:\n c, _ = s.accept(); c.sendall(os.readlink('/proc/self/ns/net').encode()); "
         "c.close()  # {marker}")
PORT = 7080


def ask(address: str, port: int, timeout: float = 0.2) -> str | None:
    try:
        with socket.create_connection((address, port), timeout=timeout) as c:
            c.settimeout(timeout)
            return c.recv(128).decode()
    except OSError:
        return None


def wait(pred: Callable[[], Any], what: str, timeout: float, every: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(every)
    raise SystemExit(f"gave up: {what} within {timeout:.0f}s")


def pids_with(marker: str) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if marker.encode() in (d / "cmdline").read_bytes():
                    out.append(int(d.name))
            except OSError:
                pass
    return out


class CorralRun:
    """A --netns fleet driven through the CLI, with its own context file."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
        self.env["CORRAL_CONTEXT"] = str(tmp / "context.json")

    def cli(self, *args: str, check: bool = True) -> str:
        proc = subprocess.run([sys.executable, "-m", "corral.cli", *args], env=self.env,
                              capture_output=True, text=True, timeout=300)
        if check and proc.returncode != 0:
            raise SystemExit(f"corral {' '.join(args)} failed: {proc.stderr or proc.stdout}")
        return proc.stdout

    def ctx(self) -> Any:
        ctx = load_context(Path(self.env["CORRAL_CONTEXT"]))
        assert ctx is not None
        return ctx

    def show(self, name: str) -> dict[str, Any]:
        return dict(json.loads(self.cli("show", name, "--json")))

    def host_state(self, host: str) -> str:
        return str({h["name"]: h["state"] for h in json.loads(self.cli("host", "ls", "--json"))}
                   [host])

    def restart_agent(self, host: str) -> None:
        ctx = self.ctx()
        old = next(a for a in ctx.agents if a.name == host)
        new = procs.spawn(old.name, old.argv, Path(old.log),
                          env={**self.env, "CORRAL_TOKEN": ctx.token}, netns=old.netns,
                          address=old.address)
        ctx.agents = [new if a.name == host else a for a in ctx.agents]
        save_context(ctx, Path(self.env["CORRAL_CONTEXT"]))

    def round(self, i: int) -> tuple[float, float]:
        """One kill of host1: (seconds until the VIP answers from host2, until host1 is down)."""
        ctx = self.ctx()
        agents = {a.name: a for a in ctx.agents}
        vip = f"10.213.{ctx.network['subnet']}.60"
        name, marker = f"svc{i}", f"failover-bench-{secrets.token_hex(4)}"
        self.cli("run", name, "--host", "host1", "--vip", f"{vip}/24", "--cpus", "0.1",
                 "--memory", "32M", "--", sys.executable, "-c",
                 SERVE.format(port=PORT, marker=marker))
        host1_ns = os.readlink(f"/proc/{agents['host1'].pid}/ns/net")
        host2_ns = os.readlink(f"/proc/{agents['host2'].pid}/ns/net")
        wait(lambda: ask(vip, PORT) == host1_ns, "the VIP answering on host1", 30)
        self.cli("standby", "add", name, "--host", "host2", "--every", "1h")
        time.sleep(2.5)  # a heartbeat or so after setup, not right behind one
        t0 = time.monotonic()
        os.kill(agents["host1"].pid, signal.SIGKILL)
        for pid in pids_with(marker):
            os.kill(pid, signal.SIGKILL)
        netns.ip("-n", str(agents["host1"].netns), "link", "set", "eth0", "down")
        down_at: float | None = None
        answered_at: float | None = None
        deadline = t0 + 120
        while answered_at is None and time.monotonic() < deadline:
            if ask(vip, PORT) == host2_ns:
                answered_at = time.monotonic()
            if down_at is None and self.host_state("host1") == "down":
                down_at = time.monotonic()
        if answered_at is None:
            raise SystemExit(f"round {i}: the VIP never answered from host2")
        if down_at is None:
            down_at = answered_at  # marked down between two looks; bounded above by this
        netns.ip("-n", str(agents["host1"].netns), "link", "set", "eth0", "up")
        self.restart_agent("host1")
        wait(lambda: self.host_state("host1") == "up", "host1 back", 60, every=0.3)
        self.cli("rm", "--force", name)
        return answered_at - t0, down_at - t0


def keepalived_round(i: int) -> float:
    """Two namespaces on a bridge of their own, keepalived + the service on both."""
    tag = secrets.token_hex(2)
    br, ns = f"crlk{tag}", [f"crlk-{tag}-a", f"crlk-{tag}-b"]
    net = f"10.214.{200 + i % 50}"
    vip = f"{net}.50"
    tmp = Path(tempfile.mkdtemp(prefix="corral-keepalived-"))
    started: list[subprocess.Popen[bytes]] = []
    try:
        netns.ip("link", "add", br, "type", "bridge")
        netns.ip("addr", "add", f"{net}.1/24", "dev", br)
        netns.ip("link", "set", br, "up")
        for k, space in enumerate(ns):
            netns.ip("netns", "add", space)
            netns.ip("link", "add", f"vk{tag}{k}", "type", "veth", "peer", "name", f"pk{tag}{k}")
            netns.ip("link", "set", f"vk{tag}{k}", "master", br, "up")
            netns.ip("link", "set", f"pk{tag}{k}", "netns", space)
            netns.ip("-n", space, "link", "set", f"pk{tag}{k}", "name", "eth0")
            netns.ip("-n", space, "addr", "add", f"{net}.{11 + k}/24", "dev", "eth0")
            netns.ip("-n", space, "link", "set", "eth0", "up")
            netns.ip("-n", space, "link", "set", "lo", "up")
            conf = tmp / f"k{k}.conf"
            role = "MASTER" if k == 0 else "BACKUP"
            conf.write_text(
                f"vrrp_instance VI {{\n  state {role}\n  interface eth0\n  virtual_router_id 51\n"
                f"  priority {150 - 50 * k}\n  advert_int 1\n"
                f"  virtual_ipaddress {{\n    {vip}/24\n  }}\n}}\n")
            enter = netns.enter_argv(space)
            with (tmp / f"k{k}.log").open("wb") as out:  # its own group: parent + VRRP child
                started.append(subprocess.Popen(
                    [*enter, "keepalived", "--dont-fork", "--log-console", "--vrrp", "-f",
                     str(conf), "-p", str(tmp / f"k{k}.pid"), "-r", str(tmp / f"v{k}.pid")],
                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
            started.append(subprocess.Popen(
                [*enter, sys.executable, "-c", SERVE.format(port=PORT, marker=f"k-{tag}-{k}")]))
        a_ns, b_ns = (f"net:[{os.stat(netns.NETNS_DIR / space).st_ino}]" for space in ns)
        wait(lambda: ask(vip, PORT) == a_ns, "keepalived's master answering", 30)
        time.sleep(2.5)
        t0 = time.monotonic()
        os.killpg(started[0].pid, signal.SIGKILL)
        started[1].send_signal(signal.SIGKILL)
        netns.ip("-n", ns[0], "link", "set", "eth0", "down")
        try:
            wait(lambda: ask(vip, PORT) == b_ns, "keepalived's backup answering", 60, every=0.0)
        except SystemExit:
            print((tmp / "k1.log").read_text()[-2000:], file=sys.stderr)
            raise
        return time.monotonic() - t0
    finally:
        for k, p in enumerate(started):
            with contextlib.suppress(ProcessLookupError):
                if k % 2 == 0:
                    os.killpg(p.pid, signal.SIGKILL)
                else:
                    p.kill()
            p.wait(10)
        for space in ns:
            netns.ip("netns", "del", space, check=False)
        netns.ip("link", "del", br, check=False)
        shutil.rmtree(tmp, ignore_errors=True)


def fmt(xs: list[float]) -> str:
    return f"{statistics.median(xs):6.2f} s (min {min(xs):.2f}, max {max(xs):.2f})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-keepalived", action="store_true")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("bench/failover.py needs root (network namespaces, VIPs)", file=sys.stderr)
        return 2
    use_keepalived = not args.no_keepalived and shutil.which("keepalived") is not None
    tmp = Path(tempfile.mkdtemp(prefix="corral-bench-failover-"))
    run = CorralRun(tmp)
    corral: list[float] = []
    lease: list[float] = []
    kept: list[float] = []
    t_start = time.monotonic()
    try:
        print("starting a 3-host --netns fleet (default lease 10 s)...", file=sys.stderr)
        run.cli("up", "--hosts", "3", "--netns", "--data", str(tmp / "data"))
        for i in range(args.rounds):
            took, down = run.round(i)
            corral.append(took)
            lease.append(down)
            print(f"  corral round {i + 1}: VIP answers again after {took:.2f} s "
                  f"(host marked down after {down:.2f} s)", file=sys.stderr)
        for i in range(args.rounds if use_keepalived else 0):
            kept.append(keepalived_round(i))
            print(f"  keepalived round {i + 1}: {kept[-1]:.2f} s", file=sys.stderr)
    finally:
        run.cli("down", "--timeout", "5", check=False)
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\nhost kill -> VIP answering again, {args.rounds} rounds, default timings "
          "(lease 10 s, heartbeat 2 s, grace 1 s), median (min, max):")
    print(f"  corral failover (warm standby, fence, start):  {fmt(corral)}   goal < 15 s")
    print(f"  lease alone (host marked down, no failover):    {fmt(lease)}   "
          f"corral/lease = {statistics.median(corral) / statistics.median(lease):.2f}x")
    if kept:
        print(f"  keepalived VRRP (hot standby, address only):    {fmt(kept)}   "
              f"corral/keepalived = {statistics.median(corral) / statistics.median(kept):.2f}x")
    else:
        print("  keepalived: not installed (scripts/bootstrap installs it as root); skipped")
    print(f"(total run {time.monotonic() - t_start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
