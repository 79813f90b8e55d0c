"""As root: the fence keeper in a ``--netns`` fleet, where VIPs are real addresses in each host's
network namespace.

An instance with a VIP and a synced standby runs on host1. Only host1's *agent* is killed with
-9; the workload lives on. Nobody in the agent is left to fence, so the keeper must: the old
copy's processes are all dead and its VIP gone from host1's namespace before the server starts
the failover (both clocks are this machine's), then the instance runs on host2 with its VIP.
Before that, a kill -9 and a quick restart of the agent shows the keeper re-adopted (the same
process, one per host); after it, the restarted agent reports the fenced copy stopped, runs
exactly one keeper, and ``corral down`` leaves none.
"""

from __future__ import annotations

import contextlib
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

from corral.agent import keeper as kp
from corral.rig import netns, procs
from corral.rig.context import ProcInfo, load_context

pytestmark = [
    pytest.mark.root,
    pytest.mark.timeout(900),
    pytest.mark.skipif(os.geteuid() != 0, reason="--netns fleets and VIPs need root"),
]

#: markers of the workloads this module started, killed at its end whatever happened
MARKERS: list[str] = []

#: answers every connection with the network namespace it runs in (which host it is on)
SERVE = ("import os, socket; s = socket.socket(); "
         "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('0.0.0.0', {port})); "
         "s.listen(16)\n"
         "while True:\n c, _ = s.accept(); c.sendall(os.readlink('/proc/self/ns/net').encode()); "
         "c.close()  # {marker}")


def host_dirs(tmp: Path) -> list[Path]:
    return sorted((tmp / "data" / "hosts").glob("host*"))


def marked(marker: str) -> dict[int, str]:
    """pid -> network namespace of every live process carrying ``marker``."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if marker.encode() in (d / "cmdline").read_bytes() and (
                    d / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                out[int(d.name)] = os.readlink(d / "ns" / "net")
    return out


@pytest.fixture(scope="module")
def kfleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("keeperfleet")
    try:
        with fleet_for(tmp, "--hosts", "2", "--netns") as fleet:
            yield fleet
    finally:  # whatever down did: no keeper, no workload outlives the module
        for d in host_dirs(tmp):
            kp.stop(d / kp.DIR_NAME, timeout=2)
        for m in MARKERS:
            for pid in marked(m):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def agent_of(f: Fleet, host: str) -> ProcInfo:
    ctx = load_context(f.context_file)
    assert ctx is not None
    return next(a for a in ctx.agents if a.name == host)


def data_of(agent: ProcInfo) -> Path:
    return Path(agent.argv[agent.argv.index("--data") + 1])


def ask(address: str, port: int, timeout: float = 1.0) -> str | None:
    import socket

    try:
        with socket.create_connection((address, port), timeout=timeout) as c:
            c.settimeout(timeout)
            return c.recv(128).decode()
    except OSError:
        return None


def on_eth0(ns: str) -> str:
    return netns.ip("-n", ns, "-o", "-4", "addr", "show", "dev", "eth0").stdout


def wait_until(pred: Any, what: str, timeout: float, f: Fleet) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        assert time.monotonic() < deadline, f"{what} within {timeout:.0f}s\n{f.logs(30)}"
        time.sleep(0.1)


def kill9(agent: ProcInfo) -> float:
    """kill -9 the agent alone (not its group: the workload and the keeper stay); when."""
    at = time.time()
    os.kill(agent.pid, signal.SIGKILL)
    while procs.alive(agent):
        procs.reap(agent.pid)
        time.sleep(0.01)
    return at


class Watch:
    """Every 50 ms: in how many namespaces the workload runs, and when (wall clock) the old
    copy's processes and its VIP were first seen gone from ``ns``."""

    def __init__(self, marker: str, ns: str, ns_inode: str, vip: str) -> None:
        self.marker, self.ns, self.inode, self.vip = marker, ns, ns_inode, vip
        self.most = 0
        self.dead_at: float | None = None
        self.vip_gone_at: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            now = time.time()
            spaces = marked(self.marker)
            self.most = max(self.most, len(set(spaces.values())))
            if self.dead_at is None and self.inode not in spaces.values():
                self.dead_at = now
            if self.vip_gone_at is None and f" {self.vip}/" not in on_eth0(self.ns):
                self.vip_gone_at = now

    def __enter__(self) -> Watch:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(10)


def guarded_by_keeper(data: Path, name: str) -> bool:
    try:
        return name in {e.name for e in kp.read_state(data / kp.DIR_NAME).instances}
    except (OSError, ValueError):
        return False


def test_the_keeper_fences_a_dead_agent_s_workload_before_the_failover(kfleet: Fleet) -> None:
    f = kfleet
    assert f.ctx is not None and f.ctx.network is not None
    marker = "keep-" + uuid.uuid4().hex[:8]
    MARKERS.append(marker)
    vip_ip, port = f"10.213.{int(f.ctx.network['subnet'])}.60", 7060
    agent1, agent2 = agent_of(f, "host1"), agent_of(f, "host2")
    ns1, ns2 = str(agent1.netns), str(agent2.netns)
    host1 = data_of(agent1)
    fdir = host1 / kp.DIR_NAME
    inode1, inode2 = (os.readlink(f"/proc/{a.pid}/ns/net") for a in (agent1, agent2))
    f.ok("run", "web", "--host", "host1", "--vip", f"{vip_ip}/24", "--cpus", "0.1",
         "--memory", "32M", "--", sys.executable, "-c", SERVE.format(port=port, marker=marker))
    before = f.wait_state("web", {"running"})
    assert wait_until(lambda: ask(vip_ip, port), "the VIP answering", 20, f) == inode1
    f.ok("standby", "add", "web", "--host", "host2", "--every", "1h")
    wait_until(lambda: guarded_by_keeper(host1, "web"), "web guarded in the keeper's file", 20, f)
    keeper = kp.identify(fdir)
    assert keeper is not None and [k.pid for k in kp.find_all(fdir)] == [keeper.pid]
    assert os.getsid(keeper.pid) == keeper.pid  # a session of its own: not the agent's group
    (entry,) = [e for e in kp.read_state(fdir).instances if e.name == "web"]
    assert entry.cgroup and entry.vips == (kp.Vip(f"{vip_ip}/24", "eth0"),)

    # a kill -9 and a quick restart: the same keeper is adopted, nothing is fenced
    workload = set(marked(marker))
    kill9(agent1)
    assert kp.identify(fdir) == keeper
    restart_agent(f, "host1")
    agent1 = agent_of(f, "host1")
    wait_until(lambda: "(adopted)" in Path(agent1.log).read_text(), "the keeper adopted", 30, f)
    assert [k.pid for k in kp.find_all(fdir)] == [keeper.pid]
    wait_until(lambda: {h["name"]: h["state"] for h in f.json("host", "ls")}["host1"] == "up",
               "host1 up again", 30, f)
    assert set(marked(marker)) == workload and not kp.read_fenced(fdir)

    # now the agent dies for good: the keeper, alone, fences before the server fails over
    time.sleep(1.0)  # a heartbeat or two of the restarted agent
    with Watch(marker, ns1, inode1, vip_ip) as watch:
        killed_at = kill9(agent1)
        assert set(marked(marker)) == workload  # the agent's death alone kills nothing
        after = wait_until(lambda: (v := f.instance("web"))["host"] == "host2"
                           and v["state"] == "running" and v, "failover to host2", 90, f)
        assert wait_until(lambda: ask(vip_ip, port), "the VIP answering on host2", 30,
                          f) == inode2
    assert after["epoch"] > before["epoch"]
    assert f" {vip_ip}/24 " in on_eth0(ns2)
    op = next(o for o in f.json("ops", "ls", "--target", "web") if o["kind"] == "failover")
    assert op["state"] == "succeeded", op
    (fence,) = kp.read_fenced(fdir)
    (inst,) = fence["instances"]
    assert inst["name"] == "web" and inst["killed_count"] >= 1 and not inst["left"]
    assert fence["vips_removed"] == [f"{vip_ip}/24 on eth0"] and "agent gone" in fence["why"]
    assert watch.dead_at is not None and watch.vip_gone_at is not None
    failover_at = float(op["created_at"])
    timings = (f"after the agent's kill -9: old copy dead at +{watch.dead_at - killed_at:.2f}s, "
               f"its VIP gone at +{watch.vip_gone_at - killed_at:.2f}s, the keeper's record "
               f"at +{fence['at'] - killed_at:.2f}s, the failover started at "
               f"+{failover_at - killed_at:.2f}s")
    print(timings)
    assert watch.dead_at < failover_at and watch.vip_gone_at < failover_at, timings
    assert fence["at"] < failover_at, timings
    assert watch.most == 1, f"the workload ran in {watch.most} namespaces at once"
    assert f" {vip_ip}/" not in on_eth0(ns1)
    wait_until(lambda: not kp.find_all(fdir), "the keeper gone: nothing left to guard", 10, f)

    # the agent comes back: it learns of the fence, runs one keeper, its stale copy goes
    restart_agent(f, "host1")
    agent1 = agent_of(f, "host1")
    wait_until(lambda: "web was fenced by the fence keeper" in Path(agent1.log).read_text(),
               "the agent reporting the fenced copy stopped", 30, f)
    wait_until(lambda: not (host1 / "instances" / "web").exists(),
               "the stale copy removed from host1", 60, f)
    found = wait_until(lambda: kp.find_all(fdir), "a keeper for host1 again", 10, f)
    time.sleep(1.0)
    assert [k.pid for k in kp.find_all(fdir)] == [k.pid for k in found]
    assert len(found) == 1 and kp.identify(fdir) == kp.Found(found[0].pid, found[0].start, 1)
    assert f" {vip_ip}/" not in on_eth0(ns1)
    assert ask(vip_ip, port) == inode2
    log = (fdir / kp.LOG_FILE).read_text()
    assert "FENCE" in log and (fdir / kp.LOG_FILE).stat().st_mode & 0o077 == 0
    f.ok("rm", "--force", "web")


def test_down_leaves_no_keeper(kfleet: Fleet) -> None:
    f = kfleet
    dirs = [d / kp.DIR_NAME for d in host_dirs(f.tmp)]
    assert all(kp.find_all(d) for d in dirs), "every living agent runs a keeper"
    # one agent dies with a guarded instance: its keeper stays armed, down ends it too
    marker = "down-" + uuid.uuid4().hex[:8]
    MARKERS.append(marker)
    f.ok("run", "db", "--host", "host2", "--cpus", "0.1", "--memory", "32M", "--",
         sys.executable, "-c", SERVE.format(port=7061, marker=marker))
    f.wait_state("db", {"running"})
    f.ok("standby", "add", "db", "--host", "host1", "--every", "1h")
    agent2 = agent_of(f, "host2")
    wait_until(lambda: guarded_by_keeper(data_of(agent2), "db"), "db guarded", 20, f)
    kill9(agent2)
    out = f.ok("down", "--timeout", "5")
    left = {str(d): kp.find_all(d) for d in dirs if kp.find_all(d)}
    assert not left, f"keepers left after down: {left}\n{out}"
    assert not marked(marker), out
