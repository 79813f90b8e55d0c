"""One conformance suite for every driver (Litestream's RunWithReplicaClient, Nomad's harness).

Each case runs against every driver usable here: the fake, the process driver with a cgroup
(v1 here; and on the hybrid v2 mount when there is one), the process driver reading /proc only,
runc when root, and qemu when root with qemu-system-x86_64 (its workload is the same shell
script, run by the test guest of ``corral.drivers.qemu_guest`` inside the VM). Real processes,
real cgroups, real runc, real VMs; every instance, cgroup and container a test makes is removed
in a finalizer, even when the test fails.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from corral.agent.busybox import build_busybox_rootfs, clone_rootfs
from corral.drivers import cgroups, procfs, reaping
from corral.drivers.base import Driver, Handle, Spec, Status
from corral.drivers.fake import FakeDriver, FakeWorld
from corral.drivers.process import ProcessDriver
from corral.drivers.qemu import QemuDriver
from corral.drivers.runc import RuncDriver
from corral.errors import Conflict, DriverError

BURN = "while :; do :; done"
SLEEPER = "while :; do sleep 1; done"
DEADLINE = 15.0
IS_ROOT = os.geteuid() == 0
MOUNTS = cgroups.read_mounts()


@dataclass
class Harness:
    kind: str
    scope: str
    tmp: Path
    make: Callable[[], Driver]
    #: hierarchy whose directories must vanish on delete (None: the driver uses no cgroup)
    hierarchy: cgroups.Hierarchy | None = None
    template: Path | None = None
    #: how an instance's root is made from ``template`` (default: a busybox root's clone)
    clone: Callable[[Path, Path], Path] | None = None
    handles: dict[str, Handle] = field(default_factory=dict)
    driver: Driver = field(init=False)

    def __post_init__(self) -> None:
        self.driver = self.make()

    @property
    def fake(self) -> FakeDriver:
        assert isinstance(self.driver, FakeDriver)
        return self.driver

    def create(self, script: str) -> Handle:
        name = f"i{uuid.uuid4().hex[:8]}"
        wd = self.tmp / name
        rootfs = None
        if self.template is not None:
            rootfs = str((self.clone or clone_rootfs)(self.template, wd / "rootfs"))
        h = self.driver.create(Spec(name, ["sh", "-c", script], str(wd), rootfs=rootfs))
        self.handles[name] = h
        return h

    def start(self, h: Handle, *, burn: bool = False, ignore_term: bool = False) -> Handle:
        h = self.driver.start(h)
        self.handles[h.name] = h
        if self.kind == "fake":
            self.fake.set_cpu_rate(h.name, 1.0 if burn else 0.0)
            self.fake.ignore_term(h.name, ignore_term)
        if self.kind == "qemu":
            self.wait_guest(h)
        return h

    def wait_guest(self, h: Handle) -> None:
        """A VM runs long before its workload does: wait (bounded) until the guest's init
        started the command, so the cases time the workload, not the boot."""
        log = Path(str(h.data["spec"]["workdir"])) / "stdout.log"
        deadline = time.monotonic() + QEMU_BOOT_DEADLINE
        while "corral-guest: running" not in log.read_text(errors="replace"):
            assert time.monotonic() < deadline, f"the guest did not boot: {log}"
            assert self.driver.status(h).state in ("running", "frozen"), f"VM ended: {log}"
            time.sleep(0.1)

    def kill_from_outside(self, h: Handle, signum: int) -> None:
        if self.kind == "fake":
            self.fake.crash(h.name, signal=signum)
        else:
            os.kill(int(h.data["pid"]), signum)

    def end_by_itself(self, h: Handle, code: int) -> None:
        """The real drivers' command already exits by itself; the fake is told to."""
        if self.kind == "fake":
            self.fake.crash(h.name, code)

    def wait_state(self, h: Handle, states: set[str], driver: Driver | None = None) -> Status:
        d = driver or self.driver
        deadline = time.monotonic() + DEADLINE
        while True:
            st = d.status(h)
            if st.state in states or time.monotonic() > deadline:
                return st
            time.sleep(0.05)

    def cpu_ns(self, h: Handle, driver: Driver | None = None) -> int:
        return (driver or self.driver).stats([h])[h.name].cpu_ns

    def cgroup_dirs(self, h: Handle) -> list[Path]:
        if self.hierarchy is None:
            return []
        return self.hierarchy.dirs(str(h.data["cgroup"]))

    def cleanup(self) -> None:
        for h in self.handles.values():
            try:
                self.driver.stop(h, 0.5)
                self.driver.delete(h)
            except Exception:  # last resort below; the test itself reports the failure
                pid = h.data.get("pid")
                rel = h.data.get("cgroup")
                if self.hierarchy is not None and rel:  # a frozen task ignores SIGKILL
                    with contextlib.suppress(Exception):
                        self.hierarchy.set_frozen(str(rel), False)
                    for member in self.hierarchy.pids(str(rel)):
                        with contextlib.suppress(OSError):
                            os.kill(member, signal.SIGKILL)
                if self.kind.startswith("process") and pid:
                    with contextlib.suppress(OSError):
                        os.killpg(int(pid), signal.SIGKILL)
                if self.kind == "qemu":  # QEMU and its shim are in no session of ours
                    for key in ("pid", "shim"):
                        with contextlib.suppress(OSError, TypeError, ValueError):
                            os.kill(int(h.data.get(key)), signal.SIGKILL)
                if self.kind == "runc" and isinstance(self.driver, RuncDriver):
                    subprocess.run(self.driver._cmd("delete", "--force", h.name),
                                   capture_output=True, timeout=30, check=False)
        if self.hierarchy is not None:
            for d in self.hierarchy.dirs(f"corral/{self.scope}"):
                for child in sorted(d.glob("*/"), reverse=True) if d.is_dir() else []:
                    with contextlib.suppress(OSError):
                        child.rmdir()
            cgroups.remove_scope(self.scope)


def _process_cgroup_reason() -> str | None:
    if not IS_ROOT:
        return "needs root for cgroup v1 (or a delegated v2 cgroup)"
    found = cgroups.for_process_driver(f"probe{os.getpid()}")
    if isinstance(found, str):
        return found
    for d in found[0].dirs(found[1]):
        with contextlib.suppress(OSError):
            d.rmdir()
    return None


KINDS = ["fake", "process-cgroup", "process-proc", "process-cgroup-v2", "runc", "qemu"]
#: how long a VM may take to boot to its workload (TCG on two cores: about 3 s)
QEMU_BOOT_DEADLINE = 120.0


@pytest.fixture(scope="session")
def busybox_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_busybox_rootfs(tmp_path_factory.mktemp("rootfs") / "busybox")


@pytest.fixture(scope="session")
def qemu_guest() -> Path:
    """The test guest (kernel, initramfs, disk), built once from Debian packages and cached."""
    from corral.drivers.qemu_guest import build_guest
    from corral.errors import ConfigError

    try:
        return build_guest()
    except ConfigError as e:
        pytest.skip(f"cannot build the qemu test guest: {e.message} ({e.hint})")


@pytest.fixture(params=KINDS)
def hz(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    kind: str = request.param
    scope = f"t{os.getpid()}-{uuid.uuid4().hex[:6]}"
    if kind == "fake":
        world = FakeWorld()
        harness = Harness(kind, scope, tmp_path, lambda: FakeDriver(scope, world))
    elif kind == "process-proc":
        harness = Harness(kind, scope, tmp_path, lambda: ProcessDriver(scope, use_cgroup=False))
    elif kind == "process-cgroup":
        reason = _process_cgroup_reason()
        if reason:
            pytest.skip(f"process driver with a cgroup: {reason}")
        harness = Harness(kind, scope, tmp_path, lambda: ProcessDriver(scope, use_cgroup=True))
        assert isinstance(harness.driver, ProcessDriver)
        harness.hierarchy = harness.driver._cg
    elif kind == "process-cgroup-v2":
        if not IS_ROOT or MOUNTS.v2 is None or MOUNTS.unified:
            pytest.skip("needs root and a hybrid host's separate v2 mount (on a pure v2 host, "
                        "process-cgroup already runs on v2)")
        v2 = cgroups.V2Hierarchy(MOUNTS.v2)
        parent = f"corral/{scope}"
        harness = Harness(kind, scope, tmp_path,
                          lambda: ProcessDriver(scope, cgroups=(v2, parent)), hierarchy=v2)
    elif kind == "qemu":
        from corral.drivers.qemu_guest import clone_guest

        probe_vm = QemuDriver(scope)
        reason = probe_vm.available()
        if reason:
            pytest.skip(reason)
        accel = probe_vm.accel
        harness = Harness(kind, scope, tmp_path, lambda: QemuDriver(scope, accel=accel),
                          hierarchy=probe_vm._cg, template=request.getfixturevalue("qemu_guest"),
                          clone=clone_guest)
    else:
        if not IS_ROOT:
            pytest.skip("the runc driver needs root")
        state_root = tmp_path / "runc-state"
        probe = RuncDriver(scope, str(state_root))
        reason = probe.available()
        if reason:
            pytest.skip(reason)
        template = request.getfixturevalue("busybox_template")
        harness = Harness(kind, scope, tmp_path, lambda: RuncDriver(scope, str(state_root)),
                          hierarchy=cgroups.V1Hierarchy(MOUNTS, everywhere=True)
                          if not MOUNTS.unified else probe.hierarchy,
                          template=template)
    request.addfinalizer(harness.cleanup)
    yield harness


def test_create_start_status(hz: Harness) -> None:
    h = hz.create(SLEEPER)
    assert hz.driver.status(h).state == "created"
    h = hz.start(h)
    st = hz.driver.status(h)
    assert st.state == "running"
    assert st.pid is not None
    again = hz.driver.start(h)  # starting a running instance changes nothing
    assert again.data["generation"] == h.data["generation"]


def test_cpu_burner_counts_one_core(hz: Harness) -> None:
    h = hz.start(hz.create(BURN), burn=True)
    time.sleep(0.3)
    c0, t0 = hz.cpu_ns(h), time.monotonic()
    time.sleep(2.0)
    c1, t1 = hz.cpu_ns(h), time.monotonic()
    cores = (c1 - c0) / 1e9 / (t1 - t0)
    assert 0.6 <= cores <= 1.4, f"{hz.kind}: burner used {cores:.2f} cores"
    stats = hz.driver.stats([h])[h.name]
    assert stats.memory_bytes > 0
    assert stats.generation == h.data["generation"]


def test_freeze_stops_the_counter_and_thaw_resumes(hz: Harness) -> None:
    if not hz.driver.capabilities.can_freeze:
        pytest.skip("driver cannot freeze")
    h = hz.start(hz.create(BURN), burn=True)
    time.sleep(0.3)
    hz.driver.freeze(h)
    assert hz.driver.status(h).state == "frozen"
    time.sleep(0.1)
    a = hz.cpu_ns(h)
    time.sleep(0.6)
    b = hz.cpu_ns(h)
    assert b - a < 50_000_000, f"{hz.kind}: frozen instance used {(b - a) / 1e6:.0f} ms CPU"
    hz.driver.thaw(h)
    assert hz.driver.status(h).state == "running"
    c = hz.cpu_ns(h)
    time.sleep(1.0)
    d = hz.cpu_ns(h)
    assert d - c > 400_000_000, f"{hz.kind}: thawed instance used only {(d - c) / 1e6:.0f} ms"


def test_stop_works_on_a_frozen_instance(hz: Harness) -> None:
    if not hz.driver.capabilities.can_freeze:
        pytest.skip("driver cannot freeze")
    h = hz.start(hz.create(SLEEPER))
    hz.driver.freeze(h)
    assert hz.driver.status(h).state == "frozen"
    st = hz.driver.stop(h, 1.0)
    assert st.state == "stopped"
    assert h.name not in hz.driver.stats([h])


def test_a_tree_that_keeps_forking_freezes_and_stops(hz: Harness) -> None:
    """A shell forking as fast as it can (the case that once left a v1 cgroup FREEZING past
    the freezer's bound, and the test's process frozen for good) freezes, stays still, and
    stops."""
    if not hz.driver.capabilities.can_freeze:
        pytest.skip("driver cannot freeze")
    h = hz.start(hz.create("while :; do /bin/true; done"), burn=True)
    time.sleep(0.3)
    for _ in range(3):
        hz.driver.freeze(h)
        assert hz.driver.status(h).state == "frozen"
        a = hz.cpu_ns(h)
        time.sleep(0.3)
        assert hz.cpu_ns(h) - a < 50_000_000, f"{hz.kind}: a frozen forker kept running"
        hz.driver.thaw(h)
        assert hz.driver.status(h).state == "running"
    hz.driver.freeze(h)
    st = hz.driver.stop(h, 1.0)
    assert st.state == "stopped"


def test_stop_kills_what_ignores_sigterm(hz: Harness) -> None:
    h = hz.start(hz.create("trap '' TERM; while :; do sleep 0.1; done"), ignore_term=True)
    time.sleep(0.3)  # let the shell install its trap
    t0 = time.monotonic()
    st = hz.driver.stop(h, 1.0)
    assert time.monotonic() - t0 < 12.0
    assert st.state == "stopped"
    assert st.signal == signal.SIGKILL
    assert hz.driver.status(h).state == "stopped"
    assert h.name not in hz.driver.stats([h])


def test_stop_ends_a_cooperative_instance_with_sigterm(hz: Harness) -> None:
    if hz.kind == "runc":
        # pid 1 of a pid namespace ignores SIGTERM unless it installs a handler: trap it.
        h = hz.start(hz.create("trap 'exit 0' TERM; while :; do sleep 0.1; done"))
        time.sleep(0.3)
        st = hz.driver.stop(h, 5.0)
        assert (st.state, st.exit_code) == ("stopped", 0)
        return
    h = hz.start(hz.create(SLEEPER))
    st = hz.driver.stop(h, 5.0)
    assert st.state == "stopped"
    assert st.signal == signal.SIGTERM


def test_exit_by_itself_is_seen_with_its_code(hz: Harness) -> None:
    h = hz.start(hz.create("sleep 0.3; exit 7"))
    hz.end_by_itself(h, 7)
    st = hz.wait_state(h, {"exited"})
    assert st.state == "exited"
    assert st.exit_code == 7
    assert st.signal is None
    assert h.name not in hz.driver.stats([h])


def test_kill_9_from_outside_is_seen(hz: Harness) -> None:
    h = hz.start(hz.create(SLEEPER))
    hz.kill_from_outside(h, signal.SIGKILL)
    st = hz.wait_state(h, {"exited"})
    assert st.state == "exited"
    assert st.signal == signal.SIGKILL


def test_start_after_stop_is_a_new_generation(hz: Harness) -> None:
    h1 = hz.start(hz.create(SLEEPER))
    hz.driver.stop(h1, 2.0)
    h2 = hz.start(h1)
    assert h2.data["generation"] != h1.data["generation"]
    assert hz.driver.status(h2).state == "running"
    assert hz.driver.stats([h2])[h2.name].generation == h2.data["generation"]


def test_recover_reattaches_without_killing(hz: Harness) -> None:
    h = hz.start(hz.create(BURN), burn=True)
    pid = hz.driver.status(h).pid
    fresh = hz.make()  # the agent restarted: a new driver object, only the persisted handle
    restored = Handle.from_dict(h.to_dict())
    st = fresh.recover(restored)
    assert st.state == "running"
    assert st.pid == pid
    if hz.kind != "fake":
        os.kill(int(restored.data["pid"]), 0)  # still there
    c0 = hz.cpu_ns(restored, fresh)
    time.sleep(0.5)
    assert hz.cpu_ns(restored, fresh) > c0
    assert fresh.stats([restored])[h.name].generation == h.data["generation"]
    st = fresh.stop(restored, 2.0)
    assert st.state == "stopped"
    hz.driver = fresh
    hz.handles[h.name] = restored


def test_delete_refuses_a_live_instance_and_cleans_up(hz: Harness) -> None:
    h = hz.start(hz.create(SLEEPER))
    with pytest.raises(Conflict):
        hz.driver.delete(h)
    dirs = hz.cgroup_dirs(h)
    if hz.hierarchy is not None:
        assert any(d.is_dir() for d in dirs), f"{hz.kind}: no cgroup at {dirs}"
    hz.driver.stop(h, 2.0)
    hz.driver.delete(h)
    leftover = [d for d in dirs if d.exists()]
    assert not leftover, f"{hz.kind}: cgroup left after delete: {leftover}"
    del hz.handles[h.name]


@pytest.fixture
def subreaper() -> Iterator[None]:
    """This process adopts the orphans of instances, as the agent does: the driver must reap
    them, or they stay zombies (and their pids taken) for good."""
    assert reaping.set_subreaper(True)
    yield
    reaping.set_subreaper(False)


def _instance_procs(hz: Harness, h: Handle, at_least: int) -> set[tuple[int, int]]:
    """(pid, start time) of every process of the instance, once there are ``at_least``."""
    deadline = time.monotonic() + DEADLINE
    while True:
        found: set[tuple[int, int]] = set()
        if hz.hierarchy is not None:
            for pid in hz.hierarchy.pids(str(h.data["cgroup"])):
                st = procfs.read_stat(pid)
                if st is not None:
                    found.add((st.pid, st.starttime))
        sid = h.data.get("sid")
        if sid:
            found |= {(p.pid, p.starttime) for p in procfs.scan() if p.session == sid}
        if len(found) >= at_least or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def _left(procs: set[tuple[int, int]]) -> list[procfs.ProcStat]:
    """Which of ``procs`` still exist in /proc, zombies included."""
    return [st for pid, start in procs if (st := procfs.identify(pid, start)) is not None]


@pytest.mark.usefixtures("subreaper")
def test_stop_returns_only_when_every_process_is_reaped(hz: Harness) -> None:
    """A stopped instance has no process left, not even a zombie: a zombie keeps its pid, and
    a PostgreSQL started from the same disk elsewhere refuses while that pid answers."""
    if hz.kind in ("fake", "qemu"):
        pytest.skip("the fake driver has no processes; a VM's are the guest's, which end "
                    "with it (see test_qemu_driver.py for QEMU's own)")
    h = hz.start(hz.create("sleep 1000 & sleep 1000 & while :; do sleep 1; done"))
    procs = _instance_procs(hz, h, 3)
    assert len(procs) >= 3, f"{hz.kind}: the instance did not fork: {procs}"
    st = hz.driver.stop(h, 5.0)
    assert st.state == "stopped"
    assert not _left(procs), f"{hz.kind}: left after stop: {_left(procs)}"


@pytest.mark.usefixtures("subreaper")
def test_an_instance_ends_with_its_leader(hz: Harness) -> None:
    """When the leader exits, what it left behind is killed and reaped before the instance
    reads as exited (a container's processes end with its init; the process driver does the
    same), so ``exited`` means nothing of it runs."""
    if hz.kind in ("fake", "qemu"):
        pytest.skip("the fake driver has no processes; a VM's are the guest's, which end "
                    "with it (see test_qemu_driver.py for QEMU's own)")
    h = hz.start(hz.create("sleep 1000 & sleep 1000 & sleep 1; exit 3"))
    procs = _instance_procs(hz, h, 3)
    st = hz.wait_state(h, {"exited"})
    assert (st.state, st.exit_code) == ("exited", 3)
    assert not _left(procs), f"{hz.kind}: left after the leader exited: {_left(procs)}"


def test_verbs_on_a_stopped_instance_are_refused(hz: Harness) -> None:
    h = hz.start(hz.create(SLEEPER))
    hz.driver.stop(h, 2.0)
    with pytest.raises(Conflict):
        hz.driver.freeze(h)
    with pytest.raises(Conflict):
        hz.driver.kill(h, signal.SIGTERM)
    assert hz.driver.stop(h, 1.0).state == "stopped"  # stopping again is harmless


@pytest.mark.skipif(not IS_ROOT or shutil.which("runc") is None, reason="needs root and runc")
def test_runc_container_shares_the_host_network_namespace(
        busybox_template: Path, tmp_path: Path) -> None:
    scope = f"t{os.getpid()}-{uuid.uuid4().hex[:6]}"
    harness = Harness("runc", scope, tmp_path,
                      lambda: RuncDriver(scope, str(tmp_path / "state")),
                      hierarchy=cgroups.V1Hierarchy(MOUNTS, everywhere=True)
                      if not MOUNTS.unified else cgroups.V2Hierarchy(MOUNTS.v2 or Path()),
                      template=busybox_template)
    try:
        h = harness.start(harness.create("readlink /proc/1/ns/net; readlink /proc/self/ns/pid; "
                                         "sleep 0.2; exit 0"))
        assert harness.wait_state(h, {"exited"}).exit_code == 0
        out = (tmp_path / h.name / "stdout.log").read_text().split()
        assert out[0] == os.readlink("/proc/self/ns/net")
        assert out[1] != os.readlink("/proc/self/ns/pid")
    finally:
        harness.cleanup()


def test_process_driver_logs_append_and_rootfs_is_the_cwd(tmp_path: Path,
                                                           busybox_template: Path) -> None:
    d = ProcessDriver(f"t{os.getpid()}", use_cgroup=False)
    root = clone_rootfs(busybox_template, tmp_path / "root")
    h = d.create(Spec("logs", ["sh", "-c", "pwd; echo oops >&2"], str(tmp_path / "wd"),
                      rootfs=str(root)))
    hz = Harness("process-proc", "unused", tmp_path, lambda: d)
    for _ in range(2):
        h = d.start(h)
        st = hz.wait_state(h, {"exited"})
        assert (st.state, st.exit_code) == ("exited", 0)
    assert (tmp_path / "wd" / "stdout.log").read_text().split() == [str(root)] * 2
    assert (tmp_path / "wd" / "stderr.log").read_text().split() == ["oops"] * 2
    d.delete(h)


@pytest.mark.skipif(not IS_ROOT or shutil.which("runc") is None, reason="needs root and runc")
def test_runc_failure_is_a_driver_error_with_runc_words(busybox_template: Path,
                                                        tmp_path: Path) -> None:
    scope = f"t{os.getpid()}-{uuid.uuid4().hex[:6]}"
    d = RuncDriver(scope, str(tmp_path / "state"))
    wd = tmp_path / "bad"
    h = d.create(Spec("bad", ["/no/such/binary"], str(wd),
                      rootfs=str(clone_rootfs(busybox_template, wd / "rootfs"))))
    hier = cgroups.V1Hierarchy(MOUNTS, everywhere=True) if not MOUNTS.unified else d.hierarchy
    try:
        with pytest.raises(DriverError) as err:
            d.start(h)
        assert "/no/such/binary" in err.value.message
        assert "runc.log" in err.value.hint
        assert d.status(h).state == "created"
        d.delete(h)
        assert not any(p.exists() for p in hier.dirs(str(h.data["cgroup"])))
    finally:
        subprocess.run(d._cmd("delete", "--force", "bad"), capture_output=True, check=False)
        for p in hier.dirs(f"corral/{scope}"):
            with contextlib.suppress(OSError):
                p.rmdir()
