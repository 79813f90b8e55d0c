#!/usr/bin/env python3
"""Figures: host killed or cut off -> its service's virtual IP answering again from another host.

As root. Builds a ``corral up --netns`` fleet of 3 hosts, once per timing profile -- the defaults
(lease 10 s, heartbeat 2 s, fence margin 2 s, grace 1 s) and ``failover = "fast"`` (lease 2 s,
heartbeat 0.5 s, fence margin 0.5 s, grace 0.5 s) -- runs a small TCP service with a VIP on host1
and a warm standby on host2, and measures, from the root namespace on the same bridge:

* **kill** rounds: host1 dies the way a power cut would (agent kill -9, workload kill -9, eth0
  down) at a random point of the heartbeat period; time until the VIP answers from host2, and
  until the server marks host1 down (**lease alone**: the earliest moment a person or a script
  without HA could even learn of the outage);
* **partition** rounds: host1 stays alive but its link is cut (eth0 down in its namespace);
  time until host1 has fenced itself (the service's processes gone, killed by its own fence
  keeper) and until the VIP answers from host2; a round where host2 answered while host1's copy
  still ran counts as **served twice** (must be 0). The link comes back, the agent rejoins by
  itself and its stale copy is removed.

After each round host1 comes back and the service is removed. Baselines, same run:
**keepalived** (Debian's) with VRRP adverts every 1 s (its default) and every 0.1 s (VRRPv3),
on two namespaces of its own with the service already running on both (a hot standby that only
moves the address): kill -9 the master's keepalived and service and take its link down, time
until the VIP answers from the backup. It moves an address; corral also fences, picks the copy
and starts the service from a disk.

``--soak SECONDS`` instead runs the fast profile that long with the CPU saturated (a busy-loop
process per core) and 200 ms (``--soak-latency MS``) of added latency on host1's link (tc netem
in its namespace; where the kernel has no netem, a proxy in this process holds everything
host1's agent sends on the bus that long, reached through a DNAT rule in host1's namespace and
a restart of its agent), services with standbys on host1 and host3, and counts what must not
happen: ``host.down`` events, failovers and self-fences (the acceptance check is ``--soak 600``:
all 0; ``--soak 15 --soak-latency 3000`` shows each counted once).

Every figure is printed last as ``figure: NAME VALUE UNIT``. Other load on the machine makes
the figures noisy. Namespaces, fleets and processes it made are removed even on failure.

    .venv/bin/python bench/failover.py                 # 3 rounds of each
    .venv/bin/python bench/failover.py --rounds 10 --profiles fast
    .venv/bin/python bench/failover.py --soak 600                 # 10 minutes
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import glob
import json
import os
import random
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from corral.config import PROFILES as PRESETS
from corral.rig import netns, procs
from corral.rig.context import load_context, save_context

SERVE = ("import os, socket; s = socket.socket(); "
         "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('0.0.0.0', {port})); "
         "s.listen(64)\n"
         "while True:\n c, _ = s.accept(); c.sendall(os.readlink('/proc/self/ns/net').encode()); "
         "c.close()  # {marker}")
PORT = 7080
#: directories of fleets that could not be stopped: kept, so that ``corral down`` still can
KEEP: list[Path] = []
#: the timings of each profile, as the CORRAL_* variables ``corral up`` passes to its fleet
PROFILES: dict[str, dict[str, float]] = {
    "default": {"lease_seconds": 10.0, "heartbeat_seconds": 2.0, "fence_margin_seconds": 2.0,
                "failover_grace_seconds": 1.0},
    "fast": PRESETS["fast"],
}


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


@dataclass
class Round:
    answered: float  # seconds from the kill or cut until the VIP answered from host2
    down: float  # ... until the server said host1 is down
    fenced: float | None = None  # partition: ... until host1's copy was dead
    twice: bool = False  # partition: host2 answered while host1's copy still ran


class Watch(threading.Thread):
    """Looks at a host's state through the CLI (slow: a process per look) beside the fast loop
    that asks the VIP; notes when it first reads ``down``."""

    def __init__(self, run: CorralRun, host: str, t0: float) -> None:
        super().__init__(daemon=True)
        self.run_, self.host, self.t0 = run, host, t0
        self.down_at: float | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set() and self.down_at is None:
            try:
                if self.run_.host_state(self.host) == "down":
                    self.down_at = time.monotonic()
            except (SystemExit, Exception):
                pass
            self.stop.wait(0.05)


class CorralRun:
    """A --netns fleet driven through the CLI, with its own context file."""

    def __init__(self, tmp: Path, timings: dict[str, float]) -> None:
        self.tmp = tmp
        self.timings = timings
        self.hb = timings["heartbeat_seconds"]
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
        self.env["CORRAL_CONTEXT"] = str(tmp / "context.json")
        self.env.update({f"CORRAL_{k.upper()}": str(v) for k, v in timings.items()})

    def cli(self, *args: str, check: bool = True) -> str:
        proc = subprocess.run([sys.executable, "-m", "corral.cli", *args], env=self.env,
                              capture_output=True, text=True, timeout=300)
        if check and proc.returncode != 0:
            raise SystemExit(f"corral {' '.join(args)} failed: {proc.stderr or proc.stdout}")
        return proc.stdout

    def down(self) -> None:
        """Stop the fleet; if that fails, keep its directory (the context file is what
        ``corral down`` needs) and say how to stop it."""
        proc = subprocess.run([sys.executable, "-m", "corral.cli", "down", "--timeout", "5"],
                              env=self.env, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0 and Path(self.env["CORRAL_CONTEXT"]).exists():
            KEEP.append(self.tmp)
            print(f"corral down failed ({proc.stderr.strip() or proc.stdout.strip()}); stop it "
                  f"with: CORRAL_CONTEXT={self.env['CORRAL_CONTEXT']} corral down",
                  file=sys.stderr)

    def ctx(self) -> Any:
        ctx = load_context(Path(self.env["CORRAL_CONTEXT"]))
        assert ctx is not None
        return ctx

    def show(self, name: str) -> dict[str, Any]:
        return dict(json.loads(self.cli("show", name, "--json")))

    def host_state(self, host: str) -> str:
        return str({h["name"]: h["state"] for h in json.loads(self.cli("host", "ls", "--json"))}
                   [host])

    def events(self, kind: str, since: float) -> list[dict[str, Any]]:
        out = self.cli("events", "--type", kind, "--since", f"{since:.0f}", "--json")
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def restart_agent(self, host: str) -> None:
        ctx = self.ctx()
        old = next(a for a in ctx.agents if a.name == host)
        new = procs.spawn(old.name, old.argv, Path(old.log),
                          env={**self.env, "CORRAL_TOKEN": ctx.token}, netns=old.netns,
                          address=old.address)
        ctx.agents = [new if a.name == host else a for a in ctx.agents]
        save_context(ctx, Path(self.env["CORRAL_CONTEXT"]))

    def service(self, i: int, host: str, standby: str, vip_octet: int = 60
                ) -> tuple[str, str, str]:
        """A guarded service on ``host`` (standby on ``standby``): its name, marker, VIP."""
        ctx = self.ctx()
        vip = f"10.213.{ctx.network['subnet']}.{vip_octet}"
        name, marker = f"svc{i}", f"failover-bench-{secrets.token_hex(4)}"
        self.cli("run", name, "--host", host, "--vip", f"{vip}/24", "--cpus", "0.1",
                 "--memory", "32M", "--", sys.executable, "-c",
                 SERVE.format(port=PORT, marker=marker))
        ns = os.readlink(f"/proc/{self.agent(host).pid}/ns/net")
        wait(lambda: ask(vip, PORT) == ns, f"the VIP answering on {host}", 30)
        self.cli("standby", "add", name, "--host", standby, "--every", "1h")
        return name, marker, vip

    def agent(self, host: str) -> Any:
        return next(a for a in self.ctx().agents if a.name == host)

    def round(self, i: int, partition: bool) -> Round:
        """host1 killed (or, ``partition``, cut off) at a random point of the heartbeat period."""
        name, marker, vip = self.service(i, "host1", "host2")
        h1 = self.agent("host1")
        host2_ns = os.readlink(f"/proc/{self.agent('host2').pid}/ns/net")
        # a few heartbeats after setup, then a random point of the period
        time.sleep(2 * self.hb + random.uniform(0, self.hb))
        t0 = time.monotonic()
        if not partition:
            os.kill(h1.pid, signal.SIGKILL)
            for pid in pids_with(marker):
                os.kill(pid, signal.SIGKILL)
        netns.ip("-n", str(h1.netns), "link", "set", "eth0", "down")
        watch = Watch(self, "host1", t0)
        watch.start()
        fenced_at: float | None = None if partition else t0
        answered_at: float | None = None
        twice = False
        deadline = t0 + 120
        try:
            while (answered_at is None or fenced_at is None) and time.monotonic() < deadline:
                if fenced_at is None and not pids_with(marker):
                    fenced_at = time.monotonic()
                if answered_at is None and ask(vip, PORT, timeout=0.1) == host2_ns:
                    answered_at = time.monotonic()
                    twice = fenced_at is None and bool(pids_with(marker))
                time.sleep(0.01)
        finally:
            watch.stop.set()
            watch.join(30)
            netns.ip("-n", str(h1.netns), "link", "set", "eth0", "up", check=False)
        if answered_at is None:
            raise SystemExit(f"round {i}: the VIP never answered from host2")
        if fenced_at is None:
            raise SystemExit(f"round {i}: host1 never fenced its copy of {name}")
        down_at = watch.down_at if watch.down_at is not None else answered_at
        if not partition:
            self.restart_agent("host1")
        wait(lambda: self.host_state("host1") == "up", "host1 back", 60, every=0.3)
        self.cli("rm", "--force", name)
        return Round(answered=answered_at - t0, down=down_at - t0,
                     fenced=fenced_at - t0 if partition else None, twice=twice)


def keepalived_round(i: int, advert: float) -> float:
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
            version = "  version 3\n" if advert < 1 else ""  # sub-second adverts are VRRPv3
            conf.write_text(
                f"vrrp_instance VI {{\n  state {role}\n  interface eth0\n  virtual_router_id 51\n"
                f"{version}  priority {150 - 50 * k}\n  advert_int {advert:g}\n"
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
        time.sleep(2 * advert + 1 + random.uniform(0, advert))
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


def figures(out: list[str], name: str, xs: list[float]) -> None:
    if xs:
        out += [f"figure: {name}_median {statistics.median(xs):.2f} s",
                f"figure: {name}_min {min(xs):.2f} s", f"figure: {name}_max {max(xs):.2f} s"]


def fleet(tmp: Path, profile: str) -> CorralRun:
    run = CorralRun(tmp / profile, PROFILES[profile])
    (tmp / profile).mkdir(parents=True)
    t = run.timings
    print(f"starting a 3-host --netns fleet, profile {profile} (lease {t['lease_seconds']:g} s, "
          f"heartbeat {t['heartbeat_seconds']:g} s, fence margin "
          f"{t['fence_margin_seconds']:g} s, grace {t['failover_grace_seconds']:g} s)...",
          file=sys.stderr)
    run.cli("up", "--hosts", "3", "--netns", "--data", str(tmp / profile / "data"))
    return run


def fences_in(run: CorralRun) -> int:
    n = 0
    for f in glob.glob(str(run.tmp / "data" / "**" / "fence" / "fenced.json"), recursive=True):
        with contextlib.suppress(OSError, ValueError):
            n += len(json.loads(Path(f).read_text()).get("fences", []))
    return n


def add_latency(space: str, delay: str) -> bool:
    """``tc netem`` on eth0 in ``space``; False (and why, on stderr) where the kernel has no
    netem qdisc (a container's kernel without sch_netem)."""
    proc = subprocess.run(["ip", "netns", "exec", space, "tc", "qdisc", "add", "dev", "eth0",
                           "root", "netem", "delay", delay], capture_output=True, text=True,
                          timeout=30)
    if proc.returncode != 0:
        print(f"soak: tc netem refused ({proc.stderr.strip()}); delaying host1's bus "
              "connection through a proxy instead", file=sys.stderr)
    return proc.returncode == 0


class DelayProxy(threading.Thread):
    """Where the kernel has no netem: a TCP proxy that holds what the client sends ``delay``
    seconds before passing it on (what netem on the client's egress does; answers are not
    held), on ``host`` in this namespace, to ``target``. ``delay`` may change at any time."""

    def __init__(self, host: str, target: tuple[str, int], delay: float) -> None:
        super().__init__(daemon=True)
        self.host, self.target, self.delay = host, target, delay
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.port = 0
        self.chunks = 0  # held and passed on

    def run(self) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(asyncio.start_server(self._conn, self.host, 0))
        self.port = server.sockets[0].getsockname()[1]
        self.ready.set()
        try:
            self.loop.run_forever()
        finally:
            server.close()
            for task in asyncio.all_tasks(self.loop):
                task.cancel()
            self.loop.run_until_complete(asyncio.sleep(0))
            self.loop.close()

    def stop(self) -> None:
        if self.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.join(10)

    async def _conn(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        try:
            ur, uw = await asyncio.open_connection(*self.target)
        except OSError:
            cw.close()
            return
        await asyncio.gather(self._pump(cr, uw, True), self._pump(ur, cw, False),
                             return_exceptions=True)
        for w in (cw, uw):
            w.close()

    async def _pump(self, r: asyncio.StreamReader, w: asyncio.StreamWriter,
                    held_back: bool) -> None:
        held: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def feed() -> None:
            while data := await r.read(65536):
                held.put_nowait((self.loop.time() + (self.delay if held_back else 0.0), data))
            held.put_nowait((self.loop.time(), b""))

        feeder = asyncio.ensure_future(feed())
        try:
            while True:
                due, data = await held.get()
                await asyncio.sleep(max(0.0, due - self.loop.time()))
                if not data:
                    break
                w.write(data)
                await w.drain()
                self.chunks += held_back and self.delay > 0
        finally:
            feeder.cancel()
            w.close()


def delay_bus(run: CorralRun, host: str, delay: float) -> DelayProxy:
    """Send ``host``'s bus traffic through a :class:`DelayProxy` (a DNAT rule in its namespace)
    and restart its agent, so that its connection is a new one, through the proxy."""
    agent = run.agent(host)
    url = urlsplit(agent.argv[agent.argv.index("--nats") + 1].split(",")[0])
    assert url.hostname is not None and url.port is not None
    proxy = DelayProxy(url.hostname, (url.hostname, url.port), delay)
    proxy.start()
    proxy.ready.wait(10)
    netns.ip("netns", "exec", str(agent.netns), "iptables", "-t", "nat", "-A", "OUTPUT", "-p",
             "tcp", "-d", url.hostname, "--dport", str(url.port), "-j", "DNAT",
             "--to-destination", f"{url.hostname}:{proxy.port}")
    os.kill(agent.pid, signal.SIGTERM)
    wait(lambda: not procs.alive(agent), f"{host}'s agent stopping", 30, every=0.1)
    run.restart_agent(host)
    wait(lambda: run.host_state(host) == "up", f"{host} back through the proxy", 60, every=0.3)
    return proxy


def soak(tmp: Path, seconds: float, latency_ms: int = 200) -> list[str]:
    """The fast profile under load and latency: nothing may be failed over or fenced."""
    run = fleet(tmp, "fast")
    burners: list[subprocess.Popen[bytes]] = []
    space = ""
    latency = False
    proxy: DelayProxy | None = None
    try:
        space = str(run.agent("host1").netns)
        if not add_latency(space, "1ms"):  # probe only: the services start without latency
            proxy = delay_bus(run, "host1", 0.0)
        svcs = [run.service(0, "host1", "host2", 60), run.service(1, "host3", "host2", 61)]
        fences_before = fences_in(run)
        if proxy is not None:
            proxy.delay = latency_ms / 1000
        else:
            netns.ip("netns", "exec", space, "tc", "qdisc", "change", "dev", "eth0", "root",
                     "netem", "delay", f"{latency_ms}ms")
            latency = True
        for _ in range(os.cpu_count() or 1):
            burners.append(subprocess.Popen([sys.executable, "-c", "while True: pass"]))
        since = time.time() - 1
        how = (f"+{latency_ms} ms on host1's link (netem)" if latency
               else f"+{latency_ms} ms on host1's bus connection (proxy)")
        print(f"soak: {seconds:.0f} s, {len(burners)} busy loop(s), {how}...", file=sys.stderr)
        t_end = time.monotonic() + seconds
        lost = 0  # looks at which a service did not answer
        looks = 0
        while time.monotonic() < t_end:
            for _, _, vip in svcs:
                looks += 1
                if ask(vip, PORT, timeout=1.0) is None:
                    lost += 1
            time.sleep(1.0)
        for b in burners:
            b.kill()
        time.sleep(2)  # a failover the load started shows as an event by now
        downs = run.events("host.down", since)
        failovers = run.events("instance.failover", since)
        fences = fences_in(run) - fences_before
        where = {n: run.show(n).get("host") for n, _, _ in svcs}
    finally:
        for b in burners:
            b.kill()
            b.wait(10)
        if proxy is None and space:
            netns.ip("netns", "exec", space, "tc", "qdisc", "del", "dev", "eth0", "root",
                     check=False)
        run.down()
        if proxy is not None:
            proxy.stop()
    print(f"\nsoak {seconds:.0f} s, fast profile, CPU saturated, {how}"
          f"{f', {proxy.chunks} chunks held' if proxy else ''}: "
          f"{len(downs)} host.down, {len(failovers)} failover(s), {fences} self-fence(s), "
          f"{lost}/{looks} service looks unanswered; services on {where}")
    return [f"figure: soak_seconds {seconds:.0f} s",
            f"figure: soak_added_latency {latency_ms} ms",
            f"figure: soak_host_down_events {len(downs)} count",
            f"figure: soak_failovers {len(failovers)} count",
            f"figure: soak_self_fences {fences} count",
            f"figure: soak_unanswered_looks {lost} count"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--rounds", type=int, default=3, help="rounds of each kind (10+ for figures)")
    p.add_argument("--profiles", default="default,fast",
                   help="comma-separated timing profiles: default, fast")
    p.add_argument("--no-partition", action="store_true", help="skip the cut-link rounds")
    p.add_argument("--no-keepalived", action="store_true")
    p.add_argument("--soak", type=float, metavar="SECONDS",
                   help="only the false-failover soak of the fast profile, this long")
    p.add_argument("--soak-latency", type=int, default=200, metavar="MS",
                   help="latency added to host1's link during the soak")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("bench/failover.py needs root (network namespaces, VIPs)", file=sys.stderr)
        return 2
    profiles = [x.strip() for x in args.profiles.split(",") if x.strip()]
    if unknown := [x for x in profiles if x not in PROFILES]:
        p.error(f"unknown profile(s) {unknown}; known: {', '.join(PROFILES)}")
    tmp = Path(tempfile.mkdtemp(prefix="corral-bench-failover-"))
    t_start = time.monotonic()
    out: list[str] = []
    try:
        if args.soak is not None:
            out += soak(tmp, args.soak, args.soak_latency)
        else:
            out += rounds(tmp, profiles, args)
    finally:
        if not KEEP:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"(total run {time.monotonic() - t_start:.0f} s; other load on this machine makes "
          "these noisy)")
    print("\n".join(out))
    return 0


def rounds(tmp: Path, profiles: list[str], args: argparse.Namespace) -> list[str]:
    use_keepalived = not args.no_keepalived and shutil.which("keepalived") is not None
    results: dict[str, tuple[list[Round], list[Round]]] = {}
    for profile in profiles:
        run = fleet(tmp, profile)
        kills: list[Round] = []
        cuts: list[Round] = []
        results[profile] = (kills, cuts)
        try:
            for i in range(args.rounds):
                r = run.round(i, partition=False)
                kills.append(r)
                print(f"  {profile} kill {i + 1}: VIP answers again after {r.answered:.2f} s "
                      f"(host marked down after {r.down:.2f} s)", file=sys.stderr)
            for i in range(0 if args.no_partition else args.rounds):
                r = run.round(100 + i, partition=True)
                cuts.append(r)
                print(f"  {profile} partition {i + 1}: fenced on host1 after {r.fenced:.2f} s, "
                      f"VIP answers from host2 after {r.answered:.2f} s"
                      f"{'  SERVED TWICE' if r.twice else ''}", file=sys.stderr)
        finally:
            run.down()
    kept: dict[float, list[float]] = {}
    for advert in ((1.0, 0.1) if use_keepalived else ()):
        kept[advert] = []
        for i in range(args.rounds):
            kept[advert].append(keepalived_round(i, advert))
            print(f"  keepalived advert {advert:g} s round {i + 1}: {kept[advert][-1]:.2f} s",
                  file=sys.stderr)
    out: list[str] = []
    print(f"\nhost kill or cut -> VIP answering again, {args.rounds} rounds, median (min, max):")
    for profile, (kills, cuts) in results.items():
        t = PROFILES[profile]
        print(f" {profile} (lease {t['lease_seconds']:g} s, heartbeat "
              f"{t['heartbeat_seconds']:g} s, margin {t['fence_margin_seconds']:g} s, grace "
              f"{t['failover_grace_seconds']:g} s):")
        k_vip, k_down = [r.answered for r in kills], [r.down for r in kills]
        print(f"  kill: corral failover (warm standby, fence, start): {fmt(k_vip)}")
        print(f"  kill: lease alone (host marked down, no failover):   {fmt(k_down)}   "
              f"corral/lease = {statistics.median(k_vip) / statistics.median(k_down):.2f}x")
        figures(out, f"{profile}_kill_failover", k_vip)
        figures(out, f"{profile}_kill_host_down", k_down)
        if cuts:
            c_fence = [r.fenced for r in cuts if r.fenced is not None]
            c_vip = [r.answered for r in cuts]
            twice = sum(r.twice for r in cuts)
            print(f"  cut link: self-fenced on the host:                 {fmt(c_fence)}")
            print(f"  cut link: VIP answering from another host:         {fmt(c_vip)}   "
                  f"served twice: {twice}")
            figures(out, f"{profile}_partition_self_fence", c_fence)
            figures(out, f"{profile}_partition_failover", c_vip)
            out.append(f"figure: {profile}_partition_served_twice {twice} count")
    for advert, xs in kept.items():
        print(f" keepalived VRRP advert {advert:g} s (hot standby, address only): {fmt(xs)}")
        figures(out, f"keepalived_advert_{advert:g}s".replace(".", "_"), xs)
    if not use_keepalived:
        print(" keepalived: not installed (scripts/bootstrap installs it as root); skipped")
    return out


if __name__ == "__main__":
    raise SystemExit(main())
