"""As root: a VM on a ``corral up --netns`` fleet, driven through the CLI as an operator would.

The test guest (``corral.drivers.qemu_guest``) is imported as an image and run with
``--driver qemu``; its HTTP service is read over TCP at the host's address (a user-mode network
port forward in the host's namespace), ``corral logs`` shows its serial console, its records
survive a stop and start, and an agent killed with -9 and started again finds the very same QEMU
running. ``corral up`` offers process and runc; the test restarts the agent with qemu added to
its ``--drivers``. Whatever happens, every QEMU of the fleet is killed at the end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import shutil
import signal
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fleetkit import Fleet, fleet_for, restart_agent

from corral.rig import procs
from corral.rig.context import ProcInfo, load_context, save_context

pytestmark = [
    pytest.mark.root,
    pytest.mark.timeout(900),
    pytest.mark.skipif(os.geteuid() != 0, reason="--netns fleets and the qemu driver need root"),
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None,
                       reason="qemu-system-x86_64 not installed (apt-get install "
                              "qemu-system-x86)"),
]

BOOT = 180.0


def wait_until(pred: Any, what: str, timeout: float, fleet: Fleet) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError, AssertionError, KeyError):
            got = pred()
            if got:
                return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}\n{fleet.logs()}"
        time.sleep(0.3)


def agent_of(fleet: Fleet, name: str) -> ProcInfo:
    ctx = load_context(fleet.context_file)
    assert ctx is not None
    return next(a for a in ctx.agents if a.name == name)


def joins(fleet: Fleet, name: str) -> int:
    """How many times ``name``'s agent has joined (its log is kept across restarts)."""
    return Path(agent_of(fleet, name).log).read_text(errors="replace").count(f"joined as {name}")


def restart_and_rejoin(fleet: Fleet, name: str) -> None:
    """Start the agent again and wait until it has joined (its lease may not have run out, so
    the host reads "up" all along)."""
    before = joins(fleet, name)
    restart_agent(fleet, name)
    wait_until(lambda: joins(fleet, name) > before, f"{name}'s agent joining again", 60, fleet)


def host_view(fleet: Fleet, name: str) -> dict[str, Any]:
    return dict(next(h for h in fleet.json("host", "ls") if h["name"] == name))


def offer_qemu(fleet: Fleet, name: str) -> None:
    """Restart ``name``'s agent with qemu among its drivers (``corral up`` offers process and
    runc), and wait until the server knows."""
    ctx = load_context(fleet.context_file)
    assert ctx is not None
    old = next(a for a in ctx.agents if a.name == name)
    argv = list(old.argv)
    i = argv.index("--drivers") + 1
    argv[i] = f"{argv[i]},qemu"
    os.kill(old.pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while procs.alive(old) and time.monotonic() < deadline:
        time.sleep(0.1)
    if procs.alive(old):
        os.kill(old.pid, signal.SIGKILL)
    ctx.agents = [dataclasses.replace(a, argv=argv) if a.name == name else a for a in ctx.agents]
    save_context(ctx, fleet.context_file)
    restart_and_rejoin(fleet, name)
    wait_until(lambda: (h := host_view(fleet, name))["state"] == "up" and "qemu" in h["drivers"],
               f"{name} offering qemu", 60, fleet)


def fleet_qemus(fleet: Fleet) -> list[int]:
    """Pids of QEMUs (and their shims) whose command line names this fleet's directory."""
    mark = str(fleet.tmp).encode()
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            cmd = (d / "cmdline").read_bytes()
            if mark in cmd and (b"qemu-system" in cmd or b"corral-qemu" in cmd):
                found.append(int(d.name))
    return found


@pytest.fixture(scope="module")
def guest() -> Path:
    from corral.drivers.qemu_guest import build_guest
    from corral.errors import ConfigError

    try:
        return build_guest()
    except ConfigError as e:
        pytest.skip(f"cannot build the qemu test guest: {e.message} ({e.hint})")


@pytest.fixture(scope="module")
def qfleet(tmp_path_factory: pytest.TempPathFactory, guest: Path) -> Iterator[Fleet]:
    with fleet_for(tmp_path_factory.mktemp("qfleet"), "--hosts", "1", "--netns") as fleet:
        try:
            offer_qemu(fleet, "host1")
            yield fleet
        finally:  # a VM a failed test left behind dies here, whatever corral down manages
            for pid in fleet_qemus(fleet):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)


def get(url: str, timeout: float = 3) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return str(r.read().decode())


def records(text: str) -> list[tuple[int, str]]:
    out = []
    for line in text.splitlines():
        seq, when, boot, digest = line.split()
        assert hashlib.sha256(f"{seq} {when} {boot}".encode()).hexdigest()[:16] == digest, line
        out.append((int(seq), boot))
    return out


def test_a_vm_from_an_image_serves_logs_restarts_and_outlives_its_agent(
        qfleet: Fleet, guest: Path) -> None:
    f = qfleet
    caps = host_view(f, "host1")["drivers"]["qemu"]
    assert caps["can_live_migrate"] is True and caps["can_freeze"] is True
    assert "kvm" in caps  # True with hardware virtualisation, False under TCG
    f.ok("image", "import", "guest", str(guest), timeout=300)
    f.ok("run", "vm1", "--driver", "qemu", "--image", "guest", "--host", "host1",
         "--cpus", "1", "--memory", "512M", "--", "corral-guest-service")
    view = f.wait_state("vm1", {"running"}, timeout=60)
    assert (view["driver"], view["memory_bytes"]) == ("qemu", 512 * 1024 * 1024)
    url = f"http://{agent_of(f, 'host1').address}:8080"

    boot1 = wait_until(lambda: get(url + "/").split()[-1], "the guest's HTTP service", BOOT, f)
    logs = wait_until(lambda: (out := f.ok("logs", "vm1")) and "corral-guest: running" in out
                      and out, "the console in corral logs", 60, f)
    assert "Linux version" in logs and "corral-guest-service: http on port 80" in logs

    # stop (the power button) and start: a new boot, the same disk
    wait_until(lambda: len(records(get(url + "/records.log"))) >= 2, "two records", 60, f)
    f.ok("stop", "vm1")
    assert f.wait_state("vm1", {"stopped"})["state"] == "stopped"
    f.ok("start", "vm1")
    f.wait_state("vm1", {"running"}, timeout=60)
    boot2 = wait_until(lambda: (b := get(url + "/").split()[-1]) != boot1 and b,
                       "the guest booted again", BOOT, f)
    got = wait_until(lambda: (r := records(get(url + "/records.log")))
                     and r[-1][1] == boot2 and r, "a record of the second boot", 60, f)
    assert [s for s, _ in got] == list(range(1, len(got) + 1)), "records lost or repeated"
    assert {b for _, b in got} == {boot1, boot2}

    # the agent dies with -9 and comes back: the VM ran on, untouched
    pid = f.instance("vm1")["pid"]
    assert pid
    agent = agent_of(f, "host1")
    os.kill(agent.pid, signal.SIGKILL)
    wait_until(lambda: not procs.alive(agent), "the agent gone", 10, f)
    os.kill(pid, 0)  # QEMU is not the agent's child in a way that dies with it
    assert get(url + "/").split()[-1] == boot2
    restart_and_rejoin(f, "host1")
    view = wait_until(lambda: (v := f.instance("vm1"))["state"] == "running" and v,
                      "vm1 running after the agent's restart", 60, f)
    assert view["pid"] == pid, "the agent restarted QEMU instead of re-attaching"
    assert get(url + "/").split()[-1] == boot2
    f.ok("stop", "vm1")  # QMP through the socket the new agent found
    assert f.wait_state("vm1", {"stopped"})["state"] == "stopped"
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)

    f.ok("rm", "vm1")
    wait_until(lambda: "vm1" not in f.ok("ls"), "vm1 removed", 30, f)
    assert not fleet_qemus(f)
