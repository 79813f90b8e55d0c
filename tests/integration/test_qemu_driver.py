"""The qemu driver beyond the conformance suite: what only a VM has.

An agent killed with -9 leaves its VMs running and a new one re-attaches through QMP; the guest's
service is reachable through its port forward and its records survive a restart of the VM; the
power button and the power cut; the guest formats a blank disk; the counters are the VM's cgroup
and QEMU's resident size; and the refusals that keep an image's files from reaching QEMU's
option parser or the host. Every VM, cgroup and socket is removed in a finalizer.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from corral.drivers import cgroups, procfs
from corral.drivers.base import Handle, Spec, Status
from corral.drivers.qemu import QMP_SOCK, QemuDriver, guest_script, kvm_usable
from corral.errors import Conflict, InvalidRequest

IS_ROOT = os.geteuid() == 0
BOOT = 120.0
SERVICE = "exec corral-guest-service"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class VMs:
    """VMs of one test: a scope of their own, every handle remembered for the finalizer."""

    tmp: Path
    guest: Path
    accel: str
    scope: str = field(default_factory=lambda: f"q{os.getpid()}-{uuid.uuid4().hex[:6]}")
    handles: dict[str, Handle] = field(default_factory=dict)
    driver: QemuDriver = field(init=False)

    def __post_init__(self) -> None:
        self.driver = self.make()

    def make(self) -> QemuDriver:
        return QemuDriver(self.scope, accel=self.accel)

    def spec(self, script: str, env: dict[str, str] | None = None, *, disk: Path | None = None,
             memory: int = 0) -> Spec:
        from corral.drivers.qemu_guest import clone_guest

        name = f"v{uuid.uuid4().hex[:8]}"
        wd = self.tmp / name
        root = disk if disk is not None else clone_guest(self.guest, wd / "disk")
        return Spec(name, ["sh", "-c", script], str(wd), rootfs=str(root),
                    env={"CORRAL_VM_FORWARD": "", **(env or {})}, memory_bytes=memory)

    def run(self, script: str, env: dict[str, str] | None = None, *, disk: Path | None = None,
            memory: int = 0) -> Handle:
        h = self.driver.create(self.spec(script, env, disk=disk, memory=memory))
        self.handles[h.name] = h
        h = self.driver.start(h)
        self.handles[h.name] = h
        return h

    def console(self, h: Handle) -> str:
        return (Path(str(h.data["spec"]["workdir"])) / "stdout.log").read_text(errors="replace")

    def wait_console(self, h: Handle, text: str, count: int = 1) -> None:
        deadline = time.monotonic() + BOOT
        while self.console(h).count(text) < count:
            assert time.monotonic() < deadline, f"never saw {text!r}:\n{self.console(h)[-2000:]}"
            time.sleep(0.1)

    def wait_state(self, h: Handle, states: set[str], driver: QemuDriver | None = None
                   ) -> Status:
        deadline = time.monotonic() + 30
        while (st := (driver or self.driver).status(h)).state not in states:
            assert time.monotonic() < deadline, f"{h.name} stayed {st}"
            time.sleep(0.1)
        return st

    def cleanup(self) -> None:
        for h in self.handles.values():
            try:
                self.driver.stop(h, 0.5)
                self.driver.delete(h)
            except Exception:
                for key in ("pid", "shim"):
                    with contextlib.suppress(OSError, TypeError, ValueError):
                        os.kill(int(h.data.get(key)), signal.SIGKILL)
                rel = h.data.get("cgroup")
                if rel and self.driver._cg is not None:
                    for pid in self.driver._cg.pids(str(rel)):
                        with contextlib.suppress(OSError):
                            os.kill(pid, signal.SIGKILL)
                    time.sleep(0.5)
                    with contextlib.suppress(Exception):
                        self.driver._cg.remove(str(rel))
        cgroups.remove_scope(self.scope)


@pytest.fixture(scope="module")
def guest() -> Path:
    from corral.drivers.qemu_guest import build_guest
    from corral.errors import ConfigError

    try:
        return build_guest()
    except ConfigError as e:
        pytest.skip(f"cannot build the qemu test guest: {e.message} ({e.hint})")


@pytest.fixture
def vms(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[VMs]:
    if not IS_ROOT:
        pytest.skip("the qemu driver needs root")
    probe = QemuDriver(f"probe{os.getpid()}")
    reason = probe.available()
    if reason:
        pytest.skip(reason)
    v = VMs(tmp_path, request.getfixturevalue("guest"), probe.accel)
    request.addfinalizer(v.cleanup)
    yield v


def http_get(port: int, path: str = "/", timeout: float = BOOT) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=3) as r:
                return str(r.read().decode())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def check_records(text: str) -> list[tuple[int, str]]:
    """(seq, boot id) of every record, each checked against its checksum."""
    out = []
    for line in text.splitlines():
        seq, when, boot, digest = line.split()
        body = f"{seq} {when} {boot}"
        assert hashlib.sha256(body.encode()).hexdigest()[:16] == digest, f"bad record {line!r}"
        out.append((int(seq), boot))
    return out


AGENT = r"""
import json, sys, time
from corral.drivers import reaping
from corral.drivers.base import Spec
from corral.drivers.qemu import QemuDriver
reaping.set_subreaper(True)  # as the agent is
args = json.loads(sys.argv[1])
d = QemuDriver(args["scope"], accel=args["accel"])
spec = Spec(**args["spec"])
h = d.start(d.create(spec))
with open(args["out"] + ".tmp", "w") as f:
    json.dump(h.to_dict(), f)
import os; os.rename(args["out"] + ".tmp", args["out"])
time.sleep(3600)
"""


def test_an_agent_killed_with_9_leaves_the_vm_running_and_a_new_one_reattaches(
        vms: VMs) -> None:
    port = free_port()
    spec = vms.spec(SERVICE, {"CORRAL_VM_FORWARD": f"tcp:127.0.0.1:{port}-:80"})
    out = vms.tmp / "handle.json"
    args = {"scope": vms.scope, "accel": vms.accel, "out": str(out),
            "spec": {"name": spec.name, "command": spec.command, "workdir": spec.workdir,
                     "rootfs": spec.rootfs, "env": spec.env}}
    agent = subprocess.Popen([sys.executable, "-c", AGENT, json.dumps(args)])
    try:
        deadline = time.monotonic() + 60
        while not out.exists():
            assert agent.poll() is None, "the agent died before starting the VM"
            assert time.monotonic() < deadline
            time.sleep(0.1)
        h = Handle.from_dict(json.loads(out.read_text()))
        vms.handles[h.name] = h
        boot = http_get(port).split()[-1]
    finally:
        agent.kill()
        agent.wait()
    fresh = vms.make()  # the restarted agent: a new driver and the persisted handle only
    vms.driver = fresh
    st = fresh.recover(h)
    assert st.state == "running"
    assert st.pid == h.data["pid"]
    assert procfs.is_alive(int(h.data["pid"]), int(h.data["starttime"]))
    assert http_get(port).split()[-1] == boot  # the same boot: never restarted
    fresh.freeze(h)
    assert fresh.status(h).state == "frozen"
    fresh.thaw(h)
    assert fresh.status(h).state == "running"
    assert fresh.stats([h])[h.name].generation == h.data["generation"]
    st = fresh.stop(h, 30.0)
    assert (st.state, st.exit_code, st.signal) == ("stopped", 0, None)  # the guest shut down
    wd = Path(spec.workdir)
    # the orphaned shim still saw QEMU end and said how
    assert (wd / "qemu-exit").read_text().split() == [str(h.data["pid"]), "0"]
    fresh.delete(h)
    assert not (wd / QMP_SOCK).exists()
    del vms.handles[h.name]


def test_the_service_answers_and_its_records_survive_a_restart(vms: VMs) -> None:
    port = free_port()
    h = vms.run(SERVICE, {"CORRAL_VM_FORWARD": f"tcp:127.0.0.1:{port}-:80",
                          "RECORD_INTERVAL": "0.2"})
    first = http_get(port).split()[-1]
    deadline = time.monotonic() + 60
    while len(check_records(http_get(port, "/records.log"))) < 5:
        assert time.monotonic() < deadline
        time.sleep(0.3)
    st = vms.driver.stop(h, 30.0)
    assert (st.state, st.exit_code) == ("stopped", 0)
    h = vms.driver.start(h)
    vms.handles[h.name] = h
    second = http_get(port).split()[-1]
    assert second != first  # a new boot...
    vms.wait_console(h, "corral-guest-service: http", count=2)
    time.sleep(1.0)
    records = check_records(http_get(port, "/records.log"))
    seqs = [s for s, _ in records]
    assert seqs == list(range(1, len(seqs) + 1)), "a gap or a repeat in the records"
    assert {b for _, b in records} == {first, second}  # ...on the same disk
    assert ", records from " in vms.console(h)


def test_term_presses_the_power_button_and_kill_cuts_the_power(vms: VMs) -> None:
    h = vms.run("while :; do sleep 1; done")
    vms.wait_console(h, "corral-guest: running")
    with pytest.raises(InvalidRequest):
        vms.driver.kill(h, signal.SIGHUP)
    vms.driver.kill(h, signal.SIGTERM)
    st = vms.wait_state(h, {"stopped", "exited"})
    assert (st.state, st.signal) == ("stopped", signal.SIGTERM)  # the guest's shell got TERM
    assert "power button" in vms.console(h)
    h = vms.driver.start(h)
    vms.handles[h.name] = h
    vms.wait_console(h, "corral-guest: running", count=2)
    vms.driver.freeze(h)
    vms.driver.kill(h, signal.SIGKILL)  # even a paused VM
    st = vms.wait_state(h, {"stopped", "exited"})
    assert (st.state, st.signal) == ("stopped", signal.SIGKILL)
    with pytest.raises(Conflict):
        vms.driver.kill(h, signal.SIGKILL)


def test_a_blank_disk_is_formatted_by_the_guest(vms: VMs) -> None:
    from corral.drivers.qemu_guest import clone_guest

    disk = clone_guest(vms.guest, vms.tmp / "blank")
    with open(disk / "disk.raw", "wb") as f:
        f.truncate(16 * 1024 * 1024)
    h = vms.run("grep ' /data ' /proc/mounts && echo kept > /data/kept", disk=disk)
    st = vms.wait_state(h, {"exited"})
    assert st.exit_code == 0, vms.console(h)
    assert "blank disk: making an ext2 filesystem" in vms.console(h)
    got = subprocess.run(["debugfs", "-R", "cat /kept", str(disk / "disk.raw")],
                         capture_output=True, text=True, check=True).stdout
    assert got.strip() == "kept"


def test_counters_are_the_vms_cgroup_and_qemus_resident_size(vms: VMs) -> None:
    h = vms.run("while :; do sleep 1; done", memory=128 * 1024 * 1024)
    vms.wait_console(h, "corral-guest: running")
    assert vms.driver._cg is not None
    rel = str(h.data["cgroup"])
    members = set(vms.driver._cg.pids(rel))
    assert int(h.data["pid"]) in members and int(h.data["shim"]) in members
    stats = vms.driver.stats([h])[h.name]
    cg_cpu = vms.driver._cg.cpu_ns(rel)
    assert cg_cpu is not None and abs(stats.cpu_ns - cg_cpu) < 200_000_000
    qemu = procfs.read_stat(int(h.data["pid"]))
    assert qemu is not None
    rss = qemu.rss_pages * procfs.PAGE_SIZE
    assert abs(stats.memory_bytes - rss) <= max(rss // 10, 8 << 20)
    assert b"-m" in (cmd := Path(f"/proc/{h.data['pid']}/cmdline").read_bytes().split(b"\0"))
    assert cmd[cmd.index(b"-m") + 1] == b"128M"


def test_refusals_before_anything_runs(tmp_path: Path) -> None:
    d = QemuDriver(f"r{os.getpid()}", accel="tcg")
    assert d.capabilities.can_live_migrate and d.capabilities.can_freeze
    assert not d.capabilities.kvm
    root = tmp_path / "disk"
    root.mkdir()

    def spec(**kw: object) -> Spec:
        base: dict[str, object] = {"name": "v", "command": ["true"],
                                   "workdir": str(tmp_path / "wd"), "rootfs": str(root)}
        base.update(kw)
        return Spec(**base)  # type: ignore[arg-type]

    with pytest.raises(InvalidRequest, match=r"no disk\.raw"):
        d.create(spec())
    (root / "disk.raw").symlink_to("/etc/hostname")
    with pytest.raises(InvalidRequest, match=r"no disk\.raw"):  # a symlink is no disk
        d.create(spec())
    (root / "disk.raw").unlink()
    (root / "disk.raw").write_bytes(b"\0" * 4096)
    assert d.create(spec()).data["pid"] is None
    for rule in ("tcp::80-:80,hostfwd=tcp::22-:22", "tcp::x-:80", "icmp::1-:1"):
        with pytest.raises(InvalidRequest, match="forward"):
            d.create(spec(env={"CORRAL_VM_FORWARD": rule}))
    with pytest.raises(InvalidRequest, match="memory"):
        d.create(spec(memory_bytes=32 * 1024 * 1024))
    with pytest.raises(InvalidRequest, match="export"):
        d.create(spec(env={"A-B": "1"}))
    (root / "vm.json").write_text('{"forward": ["tcp::1-:1,romfile=/etc/shadow"]}')
    with pytest.raises(InvalidRequest, match="forward"):
        d.create(spec())
    comma = tmp_path / "a,b"
    comma.mkdir()
    (comma / "disk.raw").write_bytes(b"\0" * 4096)
    with pytest.raises(InvalidRequest, match="comma"):
        d.create(spec(rootfs=str(comma)))


def test_the_guest_script_quotes_the_command_and_keeps_driver_options_out() -> None:
    script = guest_script(Spec("v", ["sh", "-c", "echo 'a b' $HOME"], "/w",
                               env={"GREETING": "it's", "CORRAL_VM_FORWARD": "tcp::1-:1"}))
    assert "CORRAL_VM_FORWARD" not in script
    out = subprocess.run(["sh", "-c", script.replace("exec ", "")],
                         env={"HOME": "/h", "PATH": os.environ["PATH"]}, capture_output=True,
                         text=True, check=True).stdout
    assert out == "a b /h\n"
    assert "export GREETING='it'\"'\"'s'" in script


def test_kvm_is_used_only_where_it_is_hardware_virtualisation(tmp_path: Path) -> None:
    ok, why = kvm_usable(tmp_path / "no-kvm")
    assert not ok and "no-kvm" in why
    hw, plain = tmp_path / "cpuinfo-vmx", tmp_path / "cpuinfo-plain"
    hw.write_text("processor\t: 0\nflags\t\t: fpu vmx sse2\n")
    plain.write_text("processor\t: 0\nflags\t\t: fpu sse2 hypervisor\n")
    if kvm_usable(cpuinfo=hw)[0]:  # /dev/kvm makes VMs here: the CPU's flags decide
        ok, why = kvm_usable(cpuinfo=plain)
        assert not ok and "vmx" in why
    d = QemuDriver(f"k{os.getpid()}")
    assert d.capabilities.kvm == (d.accel == "kvm") == kvm_usable()[0]
