"""As root: ``corral migrate`` of a running VM between two hosts of a ``--netns`` fleet is live.

The guest counts in its shell's memory and prints each count with its uptime on its console
(``corral logs``), beside the built-in service (HTTP with its boot id, numbered checksummed
records on its disk). After ``corral migrate vm --to host2`` the VM answers on host2 with the
same boot id, the count goes on from where it was (never back to 1, never a second boot on the
console), the uptime keeps growing, the records are a clean prefix of one boot that grows on,
and the operation reports QEMU's downtime and the bytes moved. Then two migrations back fail
before the stream (a fire drill holds them there): one whose destination QEMU is killed while
it waits, one whose source agent is killed -9 and started again; a third is held after QEMU
completed and the target's copy became the instance, and the server is killed -9 and started
again there; a fourth the same with the destination's agent killed -9 and started again. The
first two roll back: the VM runs on where it was (the same QEMU), and nothing of it is left on
the other host. The last two complete: once QEMU completed, the guest has run on the target.

The VM has a virtual IP, so the address is the guest's own (drivers/qemu_net.py): a client in
the root namespace holds a TCP connection to the guest's counting stream (port 7000) open
through the migration and through every rollback, and the numbers it reads never repeat nor
skip; exactly one host answers ARP for the address, the one the VM runs on. Every QEMU of the
fleet is killed at the end, whatever happened.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fleetkit import Fleet, fleet_for
from test_ops_e2e import restart_server
from test_qemu_e2e import (
    BOOT,
    agent_of,
    fleet_qemus,
    get,
    offer_qemu,
    records,
    restart_and_rejoin,
    wait_until,
)
from test_qemu_e2e import guest as guest

from corral.drivers.qemu_guest import COUNT_PORT, SERVICE_PORT, CountStream
from corral.rig import netns, procs
from corral.rig.context import load_context

pytestmark = [
    pytest.mark.root,
    pytest.mark.timeout(900),
    pytest.mark.skipif(os.geteuid() != 0, reason="--netns fleets and the qemu driver need root"),
]

COUNTER = ("corral-guest-service & i=0; while :; do i=$((i + 1)); "
           "echo \"tick $i $(cut -d' ' -f1 /proc/uptime)\"; sleep 0.3; done")
TICK = re.compile(r"^(?:\S+\s+)*?tick (\d+) ([\d.]+)\s*$", re.M)


def ticks(text: str) -> list[tuple[int, float]]:
    return [(int(n), float(up)) for n, up in TICK.findall(text)]


@pytest.fixture(scope="module")
def lfleet(tmp_path_factory: pytest.TempPathFactory, guest: Path) -> Iterator[Fleet]:
    import shutil

    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 not installed (apt-get install qemu-system-x86)")
    with fleet_for(tmp_path_factory.mktemp("lfleet"), "--hosts", "2", "--netns") as fleet:
        try:
            offer_qemu(fleet, "host1")
            offer_qemu(fleet, "host2")
            yield fleet
        finally:
            for pid in fleet_qemus(fleet):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)


def api(f: Fleet) -> object:
    import ssl

    import httpx

    assert f.ctx is not None
    verify = ssl.create_default_context(cafile=f.ctx.ca_file) if f.ctx.ca_file else True
    return httpx.Client(base_url=f.ctx.url, verify=verify, timeout=30,
                        headers={"Authorization": f"Bearer {f.ctx.token}"})


def finished(f: Fleet, op_id: str, timeout: float = 300) -> dict[str, object]:
    return dict(wait_until(lambda: (op := json.loads(f.ok("ops", "show", op_id, "--json")))
                           ["finished"] and op, f"operation {op_id} finishing", timeout, f))


def paused_migration(f: Fleet, name: str, to: str, step: str,
                     fault: Callable[[], None]) -> dict[str, object]:
    """Migrate ``name`` to ``to`` with the operation held before ``step`` (a fire drill), run
    ``fault`` there, let it go on; the finished operation."""
    assert f.ctx is not None and f.ctx.data_dir
    drills = Path(f.ctx.data_dir) / "server" / "drills"
    drills.mkdir(parents=True, exist_ok=True)
    flag = drills / f"migrate.{step}.before"
    reached = flag.with_name(flag.name + ".reached")
    reached.unlink(missing_ok=True)
    flag.write_text("")
    try:
        with api(f) as c:  # type: ignore[attr-defined]
            resp = c.post(f"/v1/instances/{name}/migrate", json={"to": to})
            assert resp.status_code == 202, resp.text
            op_id = str(resp.json()["id"])
        wait_until(reached.exists, f"the migration waiting before {step}", 120, f)
        fault()
    finally:
        flag.unlink(missing_ok=True)
    return finished(f, op_id)


class Stream(CountStream):
    """The guest's counting stream held open by this test (drivers/qemu_guest.py)."""

    def __init__(self, address: str, f: Fleet) -> None:
        sock = wait_until(lambda: CountStream.connect(address),
                          f"{address}:{COUNT_PORT} answering", BOOT, f)
        super().__init__(sock, read_timeout=120)

    def grows(self, by: int, f: Fleet, timeout: float = 60) -> None:
        n = len(self.numbers)
        wait_until(lambda: len(self.numbers) >= n + by or self.error,
                   f"the counting stream going on ({self.error})", timeout, f)
        self.check()

    def check(self) -> None:
        why = self.broken()
        assert why is None, why


def proxied_on(f: Fleet, host: str) -> str:
    """The addresses ``host`` answers ARP for on a VM's behalf."""
    return netns.ip("-n", str(agent_of(f, host).netns), "-4", "neigh", "show", "proxy").stdout


def qemus_of(f: Fleet, marker: bytes) -> list[int]:
    """The fleet's QEMUs (not their shims) whose command line holds ``marker``."""
    out = []
    for pid in fleet_qemus(f):
        with contextlib.suppress(OSError):
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            if cmd.split(b"\0")[0].endswith(b"qemu-system-x86_64") and marker in cmd:
                out.append(pid)
    return out


def test_a_running_vm_moves_live_and_a_failed_move_leaves_it_running(
        lfleet: Fleet, guest: Path) -> None:
    f = lfleet
    for h in ("host1", "host2"):
        caps = next(x for x in f.json("host", "ls") if x["name"] == h)["drivers"]["qemu"]
        assert caps["can_live_migrate"] is True
    f.ok("image", "import", "lguest", str(guest), timeout=300)
    assert f.ctx is not None and f.ctx.network is not None
    vip = f"10.213.{f.ctx.network['subnet']}.60"
    f.ok("run", "lvm", "--driver", "qemu", "--image", "lguest", "--host", "host1",
         "--cpus", "1", "--memory", "128M", "--vip", f"{vip}/24", "--", "sh", "-c", COUNTER)
    f.wait_state("lvm", {"running"}, timeout=60)
    url1 = url2 = f"http://{vip}:{SERVICE_PORT}"
    boot = wait_until(lambda: get(url1 + "/").split()[-1], "the guest's HTTP service", BOOT, f)
    stream = Stream(vip, f)
    try:
        _moves(f, vip, url1, url2, boot, stream)
    finally:
        stream.close()


def _moves(f: Fleet, vip: str, url1: str, url2: str, boot: str, stream: Stream) -> None:
    stream.grows(5, f)
    assert vip in proxied_on(f, "host1") and vip not in proxied_on(f, "host2")
    wait_until(lambda: len(ticks(f.ok("logs", "lvm"))) >= 5, "the counter counting", 120, f)
    wait_until(lambda: len(records(get(url1 + "/records.log"))) >= 2, "two records", 60, f)
    pid1 = f.instance("lvm")["pid"]

    out = json.loads(f.ok("migrate", "lvm", "--to", "host2", "--json", timeout=600))
    assert out["state"] == "succeeded", out
    res = out["result"]
    print(f"live migration host1 -> host2: {res}")  # the figures, with -s
    assert res["live"] is True and res["source"] == "host1" and res["target"] == "host2"
    assert res["downtime_ms"] is not None and res["downtime_ms"] >= 0
    assert res["memory_bytes"] > 0 and res["disk_bytes"] >= 32 * 1024 * 1024
    assert res["bytes"] >= res["memory_bytes"] + res["disk_bytes"]
    view = f.wait_state("lvm", {"running"})
    assert view["host"] == "host2" and view["pid"] != pid1
    with pytest.raises(ProcessLookupError):  # the source's QEMU ended and was reaped
        os.kill(pid1, 0)
    assert len(qemus_of(f, b"lvm")) == 1, "two QEMUs of the VM after the move"
    stream.grows(10, f)  # the connection held open through the move goes on
    print(f"held connection: {len(stream.numbers)} numbers, longest pause "
          f"{stream.longest_pause() * 1000:.0f} ms (one every 100 ms)")
    assert vip in proxied_on(f, "host2") and vip not in proxied_on(f, "host1")

    # the same boot: the service answers on host2 with its boot id, the counter goes on
    assert wait_until(lambda: get(url2 + "/").split()[-1], "the service on host2", 60, f) == boot
    moved_at = len(ticks(f.ok("logs", "lvm")))
    logs = wait_until(lambda: len(ticks(out := f.ok("logs", "lvm"))) >= moved_at + 5 and out,
                      "the counter counting on host2", 120, f)
    got = ticks(logs)
    nums = [n for n, _ in got]
    assert nums[0] == 1 and all(b > a for a, b in itertools.pairwise(nums)), \
        f"the counter restarted or went back: {nums}"
    assert nums.count(1) == 1
    ups = [u for _, u in got]
    assert all(b >= a for a, b in itertools.pairwise(ups)), "the uptime went back"
    assert logs.count("Linux version") == 1, "the guest booted again"
    recs = wait_until(lambda: (r := records(get(url2 + "/records.log"))) and len(r) >= 4 and r,
                      "records on host2", 60, f)
    assert [s for s, _ in recs] == list(range(1, len(recs) + 1)), "records lost or repeated"
    assert {b for _, b in recs} == {boot}

    # back to host1, its destination QEMU killed while it waits: rolled back, still on host2
    pid2 = f.instance("lvm")["pid"]

    def kill_waiting_qemu() -> None:
        waiting = [p for p in qemus_of(f, b"lvm") if p != pid2]
        assert len(waiting) == 1 and b"-incoming" in Path(
            f"/proc/{waiting[0]}/cmdline").read_bytes()
        os.kill(waiting[0], signal.SIGKILL)

    # and again, the source's agent killed -9 at that step (the step meets it dead) and
    # started again (the undo waits for it)
    def kill_source_agent() -> None:
        agent = agent_of(f, "host2")
        os.kill(agent.pid, signal.SIGKILL)
        wait_until(lambda: not procs.alive(agent), "host2's agent gone", 10, f)
        assert f.ctx is not None and f.ctx.data_dir
        flag = Path(f.ctx.data_dir) / "server" / "drills" / "migrate.live-send.before"
        flag.unlink()
        time.sleep(1.0)
        restart_and_rejoin(f, "host2")

    for step, fault in (("live-send", kill_waiting_qemu), ("live-send", kill_source_agent)):
        op = paused_migration(f, "lvm", "host1", step, fault)
        assert op["state"] == "rolled_back", (fault.__name__, op)
        view = f.wait_state("lvm", {"running"})
        assert view["host"] == "host2" and view["pid"] == pid2, fault.__name__
        assert qemus_of(f, b"lvm") == [pid2], fault.__name__
        assert get(url2 + "/").split()[-1] == boot
        stream.grows(5, f)
        assert vip in proxied_on(f, "host2") and vip not in proxied_on(f, "host1"), \
            fault.__name__
        seen = len(ticks(f.ok("logs", "lvm")))
        wait_until(lambda seen=seen: len(ticks(f.ok("logs", "lvm"))) >= seen + 3,
                   "the counter going on", 60, f)
        assert f.ctx is not None and f.ctx.data_dir
        disks1 = Path(f.ctx.data_dir) / "hosts" / "host1" / "disks"  # nothing left on host1
        assert not (disks1 / "lvm").exists() and not (disks1 / ".incoming" / "lvm").exists()

    # once QEMU completed, the guest has run on the target (it may have answered clients), so
    # the move only goes forward: the server killed -9 after that step and started again
    # finishes it (host2's paused copy ended and removed), and so does one whose destination
    # agent is killed -9 there and started again (it finds its QEMU running)
    def kill_server() -> None:
        ctx = load_context(f.context_file)
        assert ctx is not None and ctx.server is not None and ctx.data_dir
        os.kill(ctx.server.pid, signal.SIGKILL)
        (Path(ctx.data_dir) / "server" / "drills" / "migrate.end-source.before").unlink()
        restart_server(f)

    def kill_target_agent() -> None:
        agent = agent_of(f, "host2")
        os.kill(agent.pid, signal.SIGKILL)
        wait_until(lambda: not procs.alive(agent), "host2's agent gone", 10, f)
        restart_and_rejoin(f, "host2")

    for to, fault in (("host1", kill_server), ("host2", kill_target_agent)):
        op = paused_migration(f, "lvm", to, "end-source", fault)
        assert op["state"] == "succeeded", (fault.__name__, op)
        view = f.wait_state("lvm", {"running"})
        assert view["host"] == to and len(qemus_of(f, b"lvm")) == 1, fault.__name__
        assert get(url1 + "/").split()[-1] == boot
        stream.grows(5, f)
        back = "host2" if to == "host1" else "host1"
        assert vip in proxied_on(f, to) and vip not in proxied_on(f, back), fault.__name__
        assert f.ctx is not None and f.ctx.data_dir
        left = Path(f.ctx.data_dir) / "hosts" / back / "disks" / "lvm"
        wait_until(lambda left=left: not left.exists(), f"nothing of lvm left on {back}", 60, f)

    f.ok("stop", "lvm")
    f.wait_state("lvm", {"stopped"}, timeout=60)
    assert vip not in proxied_on(f, "host2")
    f.ok("rm", "lvm")
    wait_until(lambda: "lvm" not in f.ok("ls"), "lvm removed", 30, f)
    assert not qemus_of(f, b"lvm")


def test_a_vm_shelves_keeps_a_standby_and_fails_over_with_its_vip(
        lfleet: Fleet, guest: Path) -> None:
    """The rest of what moves a VM, disk only: shelved and brought back (a new boot, its
    records going on), a warm standby on host2, and host1 dying (agent and QEMU killed -9, its
    link down): the VM boots on host2 from the standby's disk, its VIP answers from there, and
    the records are one clean run across every boot. Last in the module: it kills a host."""
    f = lfleet
    assert f.ctx is not None and f.ctx.network is not None
    vip = f"10.213.{f.ctx.network['subnet']}.61"
    url = f"http://{vip}:{SERVICE_PORT}"
    f.ok("image", "import", "hguest", str(guest), timeout=300)
    f.ok("run", "hvm", "--driver", "qemu", "--image", "hguest", "--host", "host1",
         "--cpus", "1", "--memory", "128M", "--vip", f"{vip}/24", "--",
         "corral-guest-service")
    f.wait_state("hvm", {"running"}, timeout=60)
    boot1 = wait_until(lambda: get(url + "/").split()[-1], "the guest's HTTP service", BOOT, f)
    wait_until(lambda: len(records(get(url + "/records.log"))) >= 3, "three records", 60, f)

    # shelved: stopped, its disk in the store; back on host1: a new boot, the records go on
    f.ok("shelve", "hvm", timeout=300)
    f.wait_state("hvm", {"shelved"}, timeout=120)
    assert not qemus_of(f, b"hvm")
    assert vip not in proxied_on(f, "host1")
    f.ok("unshelve", "hvm", "--to", "host1", timeout=300)
    f.wait_state("hvm", {"running"}, timeout=120)
    boot2 = wait_until(lambda: (b := get(url + "/").split()[-1]) != boot1 and b,
                       "the unshelved guest's HTTP service", BOOT, f)
    wait_until(lambda: {b for _, b in records(get(url + "/records.log"))} == {boot1, boot2},
               "records of the second boot", 60, f)

    # a warm standby on host2 (a frozen pass of the disk: the guest paused, not stopped)
    f.ok("standby", "add", "hvm", "--host", "host2", "--every", "1h", timeout=300)
    synced = wait_until(lambda: [s for s in f.json("standby", "ls") if s["instance"] == "hvm"
                                 and s["state"] == "ready"], "the standby synced", 300, f)
    assert synced[0]["host"] == "host2" and synced[0]["last_freeze_ms"] is not None, synced
    assert get(url + "/").split()[-1] == boot2  # the same boot: the standby pass froze it

    # host1 dies: the VM boots on host2 from the standby's disk, with its VIP
    agent1 = agent_of(f, "host1")
    before = f.instance("hvm")
    os.kill(agent1.pid, signal.SIGKILL)
    for pid in qemus_of(f, b"hvm"):
        os.kill(pid, signal.SIGKILL)
    netns.ip("-n", str(agent1.netns), "link", "set", "eth0", "down")
    try:
        after = wait_until(lambda: (v := f.instance("hvm"))["host"] == "host2"
                           and v["state"] == "running" and v, "failover to host2", 120, f)
        assert after["epoch"] > before["epoch"]
        boot3 = wait_until(lambda: (b := get(url + "/").split()[-1]) not in (boot1, boot2)
                           and b, "the guest booted on host2, on its VIP", BOOT, f)
        recs = wait_until(lambda: (r := records(get(url + "/records.log")))
                          and r[-1][1] == boot3 and r, "records of the boot on host2", 60, f)
        assert [s for s, _ in recs] == list(range(1, len(recs) + 1)), \
            "records lost in the middle or repeated"
        assert [b for _, b in recs] == sorted((b for _, b in recs),
                                              key=[boot1, boot2, boot3].index)
        assert vip in proxied_on(f, "host2")
        assert len(qemus_of(f, b"hvm")) == 1
    finally:
        netns.ip("-n", str(agent1.netns), "link", "set", "eth0", "up")
        restart_and_rejoin(f, "host1")
    assert f.ctx.data_dir
    disks1 = Path(f.ctx.data_dir) / "hosts" / "host1" / "disks"
    wait_until(lambda: not (disks1 / "hvm").exists(), "the stale copy removed from host1", 60, f)
    assert vip not in proxied_on(f, "host1") and vip in proxied_on(f, "host2")
    f.ok("rm", "--force", "hvm")
    wait_until(lambda: not qemus_of(f, b"hvm"), "hvm's QEMU gone", 60, f)
