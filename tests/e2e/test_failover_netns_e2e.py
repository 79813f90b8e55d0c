"""As root: failover, virtual IPs and self-fencing in a ``--netns`` fleet (hosts are network
namespaces on a bridge; the client is this test, in the root namespace, on the same bridge).

* A service with a VIP on host1 and a warm standby on host2; host1 dies (agent kill -9, workload
  kill -9, eth0 down). The instance comes back on host2 with a higher epoch, the VIP answers from
  host2's namespace, and a watcher saw at most one copy alive at any moment. When host1 returns
  (eth0 up, agent restarted) its stale copy, record, disk and address are gone.
* An agent cut off from the bus (its eth0 down) kills its workload within the lease, removes its
  VIP and reports it ``stopped`` (not failed) when it can talk again.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fleetkit import Fleet, fleet_for, restart_agent

from corral.rig import netns
from corral.rig.context import load_context

pytestmark = [
    pytest.mark.root,
    pytest.mark.timeout(900),
    pytest.mark.skipif(os.geteuid() != 0, reason="--netns fleets and VIPs need root"),
]

#: answers every connection with the network namespace it runs in (which host it is on)
SERVE = ("import os, socket; s = socket.socket(); "
         "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('0.0.0.0', {port})); "
         "s.listen(16)\n"
         "while True:\n c, _ = s.accept(); c.sendall(os.readlink('/proc/self/ns/net').encode()); "
         "c.close()  # {marker}")


@pytest.fixture(scope="module")
def hafleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    with fleet_for(tmp_path_factory.mktemp("hafleet"), "--hosts", "3", "--netns") as fleet:
        yield fleet


def agent_of(f: Fleet, host: str) -> Any:
    ctx = load_context(f.context_file)
    assert ctx is not None
    return next(a for a in ctx.agents if a.name == host)


def subnet(f: Fleet) -> int:
    assert f.ctx is not None and f.ctx.network is not None
    return int(f.ctx.network["subnet"])


def ns_inode(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/ns/net")


def ask(address: str, port: int, timeout: float = 1.0) -> str | None:
    """What the service at ``address`` answers (from the root namespace), None if nothing."""
    import socket

    try:
        with socket.create_connection((address, port), timeout=timeout) as c:
            c.settimeout(timeout)
            return c.recv(128).decode()
    except OSError:
        return None


def addresses(ns: str) -> str:
    return netns.ip("-n", ns, "-o", "-4", "addr", "show", "dev", "eth0").stdout


def copies(marker: str) -> dict[int, str]:
    """pid -> network namespace of every live process carrying ``marker``."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if marker.encode() in (d / "cmdline").read_bytes() and (
                    d / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                out[int(d.name)] = ns_inode(int(d.name))
    return out


class Watcher:
    """Samples, every 50 ms until stopped, in how many namespaces the workload runs at once."""

    def __init__(self, marker: str) -> None:
        self.marker = marker
        self.most = 0
        self.seen: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            spaces = set(copies(self.marker).values())
            self.most = max(self.most, len(spaces))
            self.seen |= spaces

    def __enter__(self) -> Watcher:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(10)


def wait_until(pred: Any, what: str, timeout: float, f: Fleet) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        assert time.monotonic() < deadline, f"{what} within {timeout:.0f}s\n{f.logs(30)}"
        time.sleep(0.2)


def link(ns: str, state: str) -> None:
    netns.ip("-n", ns, "link", "set", "eth0", state)


def test_dead_host_fails_over_with_its_vip(hafleet: Fleet) -> None:
    f = hafleet
    if f.cli("standby", "--help").returncode != 0:
        pytest.skip("'corral standby' is not built yet")
    marker = "ha-" + uuid.uuid4().hex[:8]
    vip_ip, port = f"10.213.{subnet(f)}.50", 7050
    agent1, agent2 = agent_of(f, "host1"), agent_of(f, "host2")
    f.ok("run", "web", "--host", "host1", "--vip", f"{vip_ip}/24", "--cpus", "0.1",
         "--memory", "32M", "--", sys.executable, "-c", SERVE.format(port=port, marker=marker))
    before = f.wait_state("web", {"running"})
    assert before["vip"] == f"{vip_ip}/24"
    assert wait_until(lambda: ask(vip_ip, port), "the VIP answering", 20, f) == ns_inode(
        agent1.pid)
    assert f" {vip_ip}/24 " in addresses(str(agent1.netns))
    f.ok("standby", "add", "web", "--host", "host2", "--every", "1h")

    with Watcher(marker) as watch:
        # host1 dies: its agent and workload stop at once, its link goes dark
        os.kill(agent1.pid, signal.SIGKILL)
        for pid in copies(marker):
            os.kill(pid, signal.SIGKILL)
        link(str(agent1.netns), "down")
        try:
            after = wait_until(lambda: (v := f.instance("web"))["host"] == "host2"
                               and v["state"] == "running" and v, "failover to host2", 90, f)
            assert after["epoch"] > before["epoch"]
            answer = wait_until(lambda: ask(vip_ip, port), "the VIP answering again", 30, f)
            assert answer == ns_inode(agent2.pid)
            op = f.json("ops", "ls", "--target", "web")[0]
            assert op["kind"] == "failover" and op["state"] == "succeeded", op
            assert {s["instance"] for s in f.json("standby", "ls")} == set() or all(
                s["instance"] != "web" for s in f.json("standby", "ls"))
        finally:
            link(str(agent1.netns), "up")
            restart_agent(f, "host1")

        # host1 is back: its copy is removed there, the VIP stays on host2
        host1_dir = Path(agent1.argv[agent1.argv.index("--data") + 1])
        wait_until(lambda: not (host1_dir / "instances" / "web").exists()
                   and not (host1_dir / "disks" / "web").exists(),
                   "the stale copy removed from host1", 60, f)
        assert f" {vip_ip}/" not in addresses(str(agent1.netns))
        assert ask(vip_ip, port) == ns_inode(agent2.pid)
        final = f.instance("web")
        assert (final["host"], final["state"]) == ("host2", "running")
    assert watch.most == 1, f"the workload ran in {watch.most} namespaces at once"
    assert ns_inode(agent2.pid) in watch.seen

    proc = f.cli("events", "--type", "instance", "--json")
    kinds = [json.loads(line)["type"] for line in proc.stdout.splitlines() if line.strip()]
    assert "instance.failover" in kinds and "instance.stale_copy_removed" in kinds
    f.ok("rm", "--force", "web")


def test_cut_off_agent_fences_its_workload(hafleet: Fleet) -> None:
    """host3 is cut off from the bus while it runs two workloads: the one with a standby (the
    server will start it elsewhere) is fenced before the server gives up on the host, then
    failed over; the one without keeps running (nobody else will run it). When host3 is back
    its fenced copy is removed and the other one is still there, untouched."""
    f = hafleet
    marker = "fence-" + uuid.uuid4().hex[:8]
    kept = "kept-" + uuid.uuid4().hex[:8]
    vip_ip, port = f"10.213.{subnet(f)}.51", 7051
    f.ok("run", "fenced", "--host", "host3", "--vip", f"{vip_ip}/24", "--cpus", "0.1",
         "--memory", "32M", "--", sys.executable, "-c", SERVE.format(port=port, marker=marker))
    f.ok("run", "kept", "--host", "host3", "--cpus", "0.1", "--memory", "32M", "--",
         sys.executable, "-c", SERVE.format(port=7052, marker=kept))
    f.wait_state("fenced", {"running"})
    f.wait_state("kept", {"running"})
    f.ok("standby", "add", "fenced", "--host", "host1", "--every", "1h")
    agent3 = agent_of(f, "host3")
    ns = str(agent3.netns)
    wait_until(lambda: ask(vip_ip, port), "the VIP answering", 20, f)
    time.sleep(2.5)  # a heartbeat tells the agent which of its instances are guarded
    assert copies(marker) and copies(kept)
    link(ns, "down")  # the agent lives on, but cannot reach the bus
    try:
        wait_until(lambda: not copies(marker), "the workload fenced", 60, f)
        os.kill(agent3.pid, 0)  # the agent itself lives on: it fenced, it did not die
        wait_until(lambda: f" {vip_ip}/" not in addresses(ns), "the VIP removed by the fence",
                   30, f)
        host3_dir = Path(agent3.argv[agent3.argv.index("--data") + 1])
        rec = json.loads((host3_dir / "instances" / "fenced" / "instance.json").read_text())
        assert rec["stop_requested"] and "fenced_at" in rec["extra"]
        # it fenced before the server gave up on the host, not after
        wait_until(lambda: {h["name"]: h["state"] for h in f.json("host", "ls")}["host3"]
                   == "down", "host3 marked down", 60, f)
        proc = f.cli("events", "--type", "host.down", "--json")
        downs = [e for e in map(json.loads, filter(str.strip, proc.stdout.splitlines()))
                 if e["host"] == "host3"]
        assert downs and rec["extra"]["fenced_at"] < downs[-1]["ts"]
        moved = wait_until(lambda: (v := f.instance("fenced"))["host"] == "host1"
                           and v["state"] == "running" and v, "failover to host1", 60, f)
        assert moved["vip"] == f"{vip_ip}/24"
        assert copies(kept), "an instance without a standby was fenced"
    finally:
        link(ns, "up")
    assert wait_until(lambda: ask(vip_ip, port), "the VIP answering on host1", 30,
                      f) == ns_inode(agent_of(f, "host1").pid)
    wait_until(lambda: not (host3_dir / "instances" / "fenced").exists(),
               "the fenced copy removed from host3", 60, f)
    view = wait_until(lambda: (v := f.instance("kept"))["state"] == "running" and v,
                      "host3 back with its unguarded instance", 60, f)
    assert view["host"] == "host3" and copies(kept)
    f.ok("rm", "--force", "fenced")
    f.ok("rm", "--force", "kept")


def test_a_bad_vip_is_refused_before_anything_is_placed(hafleet: Fleet) -> None:
    proc = hafleet.cli("run", "badvip", "--vip", "10.1.2.999/24", "--", "true")
    assert proc.returncode != 0 and "bad virtual IP" in (proc.stdout + proc.stderr)
    assert all(i["name"] != "badvip" for i in hafleet.json("ls"))
