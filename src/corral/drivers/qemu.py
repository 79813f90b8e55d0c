"""The ``qemu`` driver: an instance is a virtual machine run by ``qemu-system-x86_64`` (root only).

**The disk is the instance's disk.** The VM's files live where any instance's do, in its disk
directory (``Spec.rootfs``, ``DISK_ROOT/NAME``, filled from an image by the agent as for runc),
so standbys, shelving and migration move a VM like anything else. That directory holds
``disk.raw`` or ``disk.qcow2``, attached as a virtio disk, and may hold ``vmlinux``/``vmlinuz``
with ``initrd.img`` (booted directly, no bootloader: the test guest of
:mod:`corral.drivers.qemu_guest` is such an image) and a ``vm.json`` with the image's port
forwards and kernel arguments. The instance's command is the guest's business: it is written to a
small shell script handed to the guest through fw_cfg (``opt/corral/run``), which corral's guest
runs; another guest may ignore it.

**Accelerator**: KVM when ``/dev/kvm`` can make a VM and the CPU shows vmx or svm, else TCG
(emulation; correct, many times slower). The flag matters: a paravirtual ``/dev/kvm`` (kvm_pvm,
as on some cloud sandboxes) creates VMs but runs only guests built for it, and hangs a stock
Debian kernel. ``Capabilities.kvm`` says which one is in force.

**Not the agent's child.** QEMU is started by a two-line ``sh`` shim in a session of its own: the
shim joins the VM's cgroup, starts QEMU, waits for it and writes its exit status (containerd's
shim in miniature, as runc's, but the size of a shell). An agent killed with -9 leaves both
running; the restarted agent finds QEMU by pid and start time, talks to it through the QMP
socket in the instance's directory, and never restarts it.

**Lifecycle through QMP**: stop presses the ACPI power button (``system_powerdown``) once a
second until the guest has powered off or the timeout passes, then ``quit`` (and SIGKILL if QMP
does not answer); freeze and thaw are ``stop`` and ``cont``; status is ``query-status``. The
guest reports how its workload ended on its second serial port (``guest-exit``); the first is
its console, appended to ``stdout.log`` like any instance's output.

**Counters**: CPU from the VM's own cgroup (``corral/<scope>/<name>``, as the process driver
makes them), so % of a core and % of the host mean what they mean for runc; memory is QEMU's
resident size (guest RAM it touched plus its own), not the cgroup's page cache of the disk file.

**Network**: QEMU's user-mode network (slirp) with ``hostfwd`` rules: the guest reaches out
through the host's own stack and its services appear on the host's addresses, in whatever
network namespace the agent runs in, as a runc container's do (containers share the host's
namespace). Nothing on the host is configured, so nothing is left behind, and the same rules
apply on whichever host the VM runs. Rules come from ``vm.json`` (``"forward"``) or, per
instance, from ``CORRAL_VM_FORWARD`` in its environment (``tcp::8080-:80,...``; empty: none).
A VM with a virtual IP (``--vip``) gets a tap instead, and the address is the guest's own, so
its connections survive a live migration (:mod:`corral.drivers.qemu_net`); forwards do not
apply then.

**Live migration** (``incoming``, ``migrate_out``, ``migration_abort``): QEMU's own block
migration over TLS with the hosts' certificates; the how and the why are in
:mod:`corral.drivers.qemu_migrate`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import re
import shlex
import shutil
import signal as sig
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corral.drivers import procfs, qemu_net, qemu_qmp, reaping, runs
from corral.drivers import qemu_migrate as mig
from corral.drivers.base import Capabilities, Handle, Spec, Stats, Status
from corral.drivers.cgroups import Hierarchy, for_process_driver
from corral.errors import Conflict, DriverError, InvalidRequest

QEMU = "qemu-system-x86_64"
QMP_SOCK = "qmp.sock"
PID_FILE = "qemu.pid"
QEMU_EXIT = "qemu-exit"
GUEST_EXIT = "guest-exit"
RUN_SCRIPT = "guest-run.sh"
VM_CONFIG = "vm.json"
DISKS = (("disk.raw", "raw"), ("disk.qcow2", "qcow2"))
KERNELS = ("vmlinux", "vmlinuz")
INITRD = "initrd.img"
#: what a direct kernel boot always gets; an image adds its own through vm.json "append"
BASE_APPEND = "console=ttyS0 panic=-1"
#: a driver option in the instance's environment, never passed to the guest
ENV_FORWARD = "CORRAL_VM_FORWARD"
ENV_PREFIX = "CORRAL_VM_"
MIB = 1024 * 1024
DEFAULT_MEMORY = 256 * MIB
MIN_MEMORY = 64 * MIB
#: the cgroup's memory limit is the guest's RAM plus this much for QEMU itself (TCG's
#: translation cache is capped to TB_SIZE_MIB of it)
QEMU_OVERHEAD = 256 * MIB
TB_SIZE_MIB = 64
#: QEMU may take this long to come up (its QMP socket answering)
START_TIMEOUT = 30.0
#: while stopping, the power button is pressed again this often (a guest still booting has
#: nobody listening for it yet)
PRESS_EVERY = 1.0
QMP_TIMEOUT = 5.0
_STATUS_QMP_TIMEOUT = 2.0
_JOIN_FAILED = 125
_FORWARD_RE = re.compile(r"^(tcp|udp):(\d{1,3}(\.\d{1,3}){3})?:\d{1,5}-(\d{1,3}(\.\d{1,3}){3})?"
                         r":\d{1,5}$")
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_EXIT_RE = re.compile(r"^(exit|signal) (\d+)\s*$")
_KVM_GET_API_VERSION = 0xAE00
_KVM_CREATE_VM = 0xAE01
#: the shim: join the cgroup, start QEMU, record its pid, wait, record how it ended
_SHIM = ('"$@" &\npid=$!\necho "$pid" > qemu.pid.tmp && mv -f qemu.pid.tmp qemu.pid\n'
         'wait "$pid"\nrc=$?\necho "$pid $rc" > qemu-exit.tmp && mv -f qemu-exit.tmp qemu-exit\n')


def kvm_usable(dev: Path = Path("/dev/kvm"), cpuinfo: Path = Path("/proc/cpuinfo")
               ) -> tuple[bool, str]:
    """Whether guests can run with KVM here, and if not, why (for the log and the docs)."""
    try:
        fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return False, f"{dev}: {e.strerror}"
    try:
        version = fcntl.ioctl(fd, _KVM_GET_API_VERSION)
        if version != 12:
            return False, f"{dev} speaks KVM API {version}, not 12"
        os.close(fcntl.ioctl(fd, _KVM_CREATE_VM, 0))
    except OSError as e:
        return False, f"{dev} cannot make a VM: {e.strerror}"
    finally:
        os.close(fd)
    try:
        flags = next((line.split(":", 1)[1].split() for line in cpuinfo.read_text().splitlines()
                      if line.startswith("flags")), [])
    except OSError:
        flags = []
    if not {"vmx", "svm"} & set(flags):
        return False, (f"{dev} is there but the CPU shows neither vmx nor svm: a paravirtual KVM "
                       "(such as kvm_pvm) runs only guests built for it")
    return True, ""


@dataclass(frozen=True)
class Layout:
    """What the instance's disk directory holds for QEMU."""

    disk: Path
    disk_format: str
    kernel: Path | None
    initrd: Path | None
    forward: tuple[str, ...]
    append: str


def _regular(path: Path) -> bool:
    """A regular file, not a symlink: a disk directory's files are data from an image, and a
    symlink named disk.raw must not hand the guest a host file."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _check_path(path: Path) -> Path:
    if "," in str(path):  # QEMU's option syntax: a comma would start another option
        raise InvalidRequest(f"path {path} holds a comma, which QEMU options cannot carry",
                             hint="use a data or disk directory without ',' in its path")
    return path


def read_layout(root: Path) -> Layout:
    if not root.is_dir():
        raise InvalidRequest(f"VM disk directory {root} is not a directory",
                             hint="run the VM from an image: corral run NAME --driver qemu "
                             "--image IMG -- CMD")
    disk = next(((root / n, f) for n, f in DISKS if _regular(root / n)), None)
    if disk is None:
        raise InvalidRequest(
            f"{root} holds no disk.raw or disk.qcow2 (as regular files)",
            hint="run the VM from an image whose tree holds one (build the test guest with "
                 "'python -m corral.drivers.qemu_guest' and 'corral image import' it)")
    kernel = next((root / n for n in KERNELS if _regular(root / n)), None)
    initrd = root / INITRD if kernel is not None and _regular(root / INITRD) else None
    config: dict[str, Any] = {}
    if (root / VM_CONFIG).exists():
        try:
            fd = os.open(root / VM_CONFIG, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            with os.fdopen(fd, "rb") as f:
                config = json.loads(f.read(65536))
            if not isinstance(config, dict):
                raise ValueError("not an object")
        except (OSError, ValueError) as e:
            raise InvalidRequest(f"{root / VM_CONFIG} is unreadable: {e}",
                                 hint='it is JSON like {"forward": ["tcp::8080-:80"]}') from e
    forward = config.get("forward") or []
    append = config.get("append") or ""
    if not isinstance(forward, list) or not isinstance(append, str):
        raise InvalidRequest(f"{root / VM_CONFIG}: 'forward' is a list, 'append' a string")
    return Layout(_check_path(disk[0]), disk[1], kernel and _check_path(kernel),
                  initrd and _check_path(initrd), tuple(check_forwards(forward)), append)


def check_forwards(rules: Sequence[object]) -> list[str]:
    """hostfwd rules, each ``tcp:[HOSTADDR]:HOSTPORT-[GUESTADDR]:GUESTPORT``; nothing else may
    reach QEMU's option parser."""
    out: list[str] = []
    for rule in rules:
        if not isinstance(rule, str) or not _FORWARD_RE.match(rule):
            raise InvalidRequest(f"port forward {rule!r} is not tcp|udp:[ADDR]:PORT-[ADDR]:PORT",
                                 hint="e.g. tcp::8080-:80 (host port 8080 to the guest's 80)")
        out.append(rule)
    return out


def forwards_for(spec: Spec, layout: Layout) -> list[str]:
    if ENV_FORWARD in spec.env:
        raw = spec.env[ENV_FORWARD].strip()
        return check_forwards([r.strip() for r in raw.split(",") if r.strip()])
    return list(layout.forward)


def memory_mib(spec: Spec) -> int:
    want = spec.memory_bytes or DEFAULT_MEMORY
    if want < MIN_MEMORY:
        raise InvalidRequest(f"instance {spec.name}: a VM needs at least {MIN_MEMORY // MIB} MiB "
                             f"of memory, not {want // MIB} MiB", hint="give --memory 256M")
    return want // MIB


def guest_script(spec: Spec) -> str:
    """The instance's command and environment, as the guest's shell runs them."""
    lines = ["# written by corral's qemu driver: the instance's command, run by the guest"]
    for k, v in sorted(spec.env.items()):
        if k.startswith(ENV_PREFIX):
            continue
        if not _ENV_NAME_RE.match(k):
            raise InvalidRequest(f"instance {spec.name}: {k!r} is no name the guest's shell "
                                 "can export", hint="use letters, digits and '_'")
        lines.append(f"export {k}={shlex.quote(v)}")
    lines.append("exec " + " ".join(shlex.quote(w) for w in spec.command))
    return "\n".join(lines) + "\n"


class QemuDriver:
    name = "qemu"

    def __init__(self, scope: str, state_dir: Path | None = None, *, accel: str | None = None,
                 binary: str = QEMU, cgroups: tuple[Hierarchy, str] | None = None) -> None:
        """``accel``: "kvm" or "tcg" to force one (tests), None to pick (see the module doc).
        ``cgroups`` overrides detection with (hierarchy, parent path), as for the process
        driver."""
        self.scope = scope
        self.binary = binary
        self._cg: Hierarchy | None = None
        self._cg_parent = ""
        self._cg_reason = ""
        found = cgroups if cgroups is not None else for_process_driver(scope)
        if isinstance(found, str):
            self._cg_reason = found
        else:
            self._cg, self._cg_parent = found
        if accel is None:
            ok, self.accel_reason = kvm_usable()
            accel = "kvm" if ok else "tcg"
        else:
            self.accel_reason = "chosen by the caller"
        if accel not in ("kvm", "tcg"):
            raise InvalidRequest(f"accelerator {accel!r}: choose kvm or tcg")
        self.accel = accel
        self.capabilities = Capabilities(can_freeze=True, needs_root=True, cgroup_accounting=True,
                                         needs_rootfs=True, can_live_migrate=True,
                                         vip_in_guest=True, kvm=accel == "kvm")
        self._lock = threading.Lock()
        self._qmp_locks: dict[str, threading.Lock] = {}
        self._shims: dict[str, subprocess.Popen[bytes]] = {}

    # -- helpers ---------------------------------------------------------------------------
    def _cg_of(self, handle: Handle) -> tuple[Hierarchy, str] | None:
        rel = handle.data.get("cgroup")
        if rel and self._cg is not None and handle.data.get("cgroup_version") == self._cg.version:
            return self._cg, str(rel)
        return None

    @contextlib.contextmanager
    def _qmp(self, handle: Handle, timeout: float = QMP_TIMEOUT) -> Iterator[qemu_qmp.QMP]:
        """One QMP conversation with the VM; one at a time per VM (QEMU serves one client)."""
        with self._lock:
            lock = self._qmp_locks.setdefault(handle.name, threading.Lock())
        if not lock.acquire(timeout=timeout):
            raise qemu_qmp.QMPUnreachable(f"QMP of {handle.name} is busy", retryable=True)
        try:
            with qemu_qmp.QMP(runs.workdir(handle) / QMP_SOCK, timeout) as q:
                yield q
        finally:
            lock.release()

    def _execute(self, handle: Handle, command: str, timeout: float = QMP_TIMEOUT,
                 arguments: dict[str, Any] | None = None) -> Any:
        with self._qmp(handle, timeout) as q:
            return q.execute(command, arguments)

    def _qemu(self, handle: Handle) -> procfs.ProcStat | None:
        """QEMU's stat if that very process is alive (not a zombie)."""
        pid, start = handle.data.get("pid"), handle.data.get("starttime")
        if pid is None or start is None:
            return None
        st = procfs.identify(int(pid), int(start))
        return st if st is not None and st.alive else None

    def _vm_running(self, handle: Handle) -> bool | None:
        """QEMU's ``query-status``: True when the guest's CPUs run, None when QMP is silent."""
        try:
            ret = self._execute(handle, "query-status", _STATUS_QMP_TIMEOUT)
        except qemu_qmp.QMPUnreachable:
            return None
        return bool(ret.get("running")) if isinstance(ret, dict) else None

    def _reap_shim(self, handle: Handle) -> None:
        gen = str(handle.data.get("generation") or "")
        with self._lock:
            shim = self._shims.get(gen)
        if shim is not None:
            if shim.poll() is not None:
                with self._lock:
                    self._shims.pop(gen, None)
                reaping.release(shim.pid)
            return
        pid, start = handle.data.get("shim"), handle.data.get("shim_starttime")
        st = None if pid is None else procfs.identify(int(pid), int(start or -1))
        if st is not None and not st.alive and st.ppid == os.getpid():
            # our child, started by an earlier driver object in this process
            with contextlib.suppress(ChildProcessError):
                os.waitpid(int(pid or 0), os.WNOHANG)

    def _leftovers(self, handle: Handle) -> list[procfs.ProcStat]:
        """Every process of the VM still in /proc (QEMU, its shim, anything in its cgroup),
        zombies included, after reaping what is this process's to reap."""
        self._reap_shim(handle)
        reaping.reap_orphans()  # QEMU, if its shim died first and we adopted it
        found: dict[int, procfs.ProcStat] = {}
        for key, start_key in (("pid", "starttime"), ("shim", "shim_starttime")):
            pid, start = handle.data.get(key), handle.data.get(start_key)
            if pid is not None:
                st = procfs.identify(int(pid), int(start or -1))
                if st is not None:
                    found[st.pid] = st
        cg = self._cg_of(handle)
        if cg is not None:
            for pid in cg[0].pids(cg[1]):
                st = procfs.read_stat(pid)
                if st is not None:
                    found[pid] = st
        return list(found.values())

    def _gone(self, handle: Handle) -> bool:
        return not self._leftovers(handle)

    def _wait_gone(self, handle: Handle, timeout: float,
                   every: Callable[[], None] | None = None) -> bool:
        """Wait until nothing of the VM is left; ``every`` runs once a second meanwhile."""
        if every is None:
            return runs.wait_until(lambda: self._gone(handle), timeout)
        pressed = [0.0]

        def done() -> bool:
            if self._gone(handle):
                return True
            now = time.monotonic()
            if now - pressed[0] >= PRESS_EVERY:
                pressed[0] = now
                every()
            return False

        return runs.wait_until(done, timeout)

    def _press(self, handle: Handle) -> None:
        """The ACPI power button; a VM that is already going away is not an error."""
        with contextlib.suppress(qemu_qmp.QMPUnreachable):
            self._execute(handle, "system_powerdown")

    def _pull_plug(self, handle: Handle) -> None:
        """End QEMU now: ``quit`` (it closes its disk cleanly), SIGKILL if QMP is silent or
        QEMU lingers. Recorded as SIGKILL: the guest was ended, not shut down."""
        runs.record_exit(handle, None, int(sig.SIGKILL))
        with contextlib.suppress(qemu_qmp.QMPUnreachable, qemu_qmp.QMPError):
            self._execute(handle, "quit", 2.0)
        if not runs.wait_until(lambda: self._qemu(handle) is None, 3.0):
            self._kill_qemu(handle, sig.SIGKILL)
        cg = self._cg_of(handle)
        if cg is not None:  # anything else that joined the cgroup (nothing should)
            for pid in cg[0].pids(cg[1]):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig.SIGKILL)

    def _kill_qemu(self, handle: Handle, signum: int) -> None:
        q = self._qemu(handle)
        if q is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(q.pid, signum)

    def _end_leftovers(self, handle: Handle) -> None:
        """SIGKILL what is left of an ended VM (a cgroup member, a lingering QEMU) and wait
        until it is reaped."""
        if self._gone(handle):
            return
        self._kill_qemu(handle, sig.SIGKILL)
        cg = self._cg_of(handle)
        if cg is not None:
            for pid in cg[0].pids(cg[1]):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig.SIGKILL)
        if not self._wait_gone(handle, runs.KILL_WAIT):
            left = ", ".join(f"{p.pid} ({p.comm}, {p.state})" for p in self._leftovers(handle))
            raise DriverError(f"VM {handle.name}: processes left after SIGKILL: {left}",
                              hint="a process stuck in the kernel (D state); retry later",
                              retryable=True)

    def _ended(self, handle: Handle) -> tuple[int | None, int | None]:
        """How the VM's run ended: the guest's own word on its workload first, then an end the
        driver forced, then how QEMU itself exited (as its shim saw it)."""
        wd = runs.workdir(handle)
        with contextlib.suppress(OSError):
            lines = (wd / GUEST_EXIT).read_text(errors="replace").replace("\r", "").splitlines()
            for line in reversed(lines):
                m = _EXIT_RE.match(line.strip())
                if m:
                    n = int(m.group(2))
                    return (n, None) if m.group(1) == "exit" else (None, n)
        forced = runs.read_exit(handle)
        if forced is not None:
            return forced
        with contextlib.suppress(OSError, ValueError):
            pid, rc = (wd / QEMU_EXIT).read_text().split()
            if int(pid) == handle.data.get("pid"):
                code = int(rc)
                return (None, code - 128) if code > 128 else (code, None)
        return (None, None)

    def _require_alive(self, handle: Handle, verb: str) -> Status:
        st = self.status(handle)
        if st.state not in ("running", "frozen"):
            raise Conflict(f"cannot {verb} VM {handle.name}: it is {st.state}",
                           hint="start it first")
        return st

    def _argv(self, spec: Spec, layout: Layout) -> list[str]:
        vcpus = max(1, min(math.ceil(spec.cpus or 1), os.cpu_count() or 1))
        accel = ["-accel", "kvm", "-cpu", "host"] if self.accel == "kvm" else \
            ["-accel", f"tcg,tb-size={TB_SIZE_MIB}"]
        net = "user,id=net0" + "".join(f",hostfwd={r}" for r in forwards_for(spec, layout))
        device = "virtio-net-pci,netdev=net0,romfile="
        more: list[str] = []
        if spec.vip:
            net, device, more = qemu_net.qemu_args(spec.name, spec.vip)
        argv = [
            self.binary, "-name", f"{spec.name},debug-threads=on", "-machine", "pc", *accel,
            "-smp", str(vcpus), "-m", f"{memory_mib(spec)}M",
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
            "-chardev", f"socket,id=qmp,path={QMP_SOCK},server=on,wait=off",
            "-mon", "chardev=qmp,mode=control",
            "-chardev", "stdio,id=console,signal=off", "-serial", "chardev:console",
            "-chardev", f"file,id=exit,path={GUEST_EXIT}", "-serial", "chardev:exit",
            "-drive", f"file={layout.disk},format={layout.disk_format},if=virtio,"
                      "cache=writeback,discard=unmap",
            "-netdev", net, "-device", device,
            "-fw_cfg", f"name=opt/corral/run,file={RUN_SCRIPT}", *more,
        ]
        if layout.kernel is not None:
            argv += ["-kernel", str(layout.kernel),
                     "-append", f"{BASE_APPEND} {layout.append}".strip()]
            if layout.initrd is not None:
                argv += ["-initrd", str(layout.initrd)]
        return argv

    def _stderr_tail(self, wd: Path) -> str:
        try:
            text = (wd / "stderr.log").read_text(errors="replace")
        except OSError:
            return "(no stderr.log)"
        return " ".join(text.strip().splitlines()[-5:])[-600:] or "(QEMU printed nothing)"

    # -- the Driver protocol ---------------------------------------------------------------
    def available(self) -> str | None:
        if shutil.which(self.binary) is None:
            return f"{self.binary} not found; apt-get install qemu-system-x86"
        if os.geteuid() != 0:
            return "the qemu driver needs root (each VM gets a cgroup, as a runc container)"
        if self._cg is None:
            return f"no usable cgroup for the VMs: {self._cg_reason}"
        return None

    def create(self, spec: Spec) -> Handle:
        runs.check_spec(spec, needs_rootfs=True)
        if spec.vip:
            qemu_net.address_of(spec.vip)
        layout = read_layout(Path(spec.rootfs or ""))
        forwards_for(spec, layout)
        memory_mib(spec)
        guest_script(spec)
        _check_path(Path(spec.workdir))
        Path(spec.workdir).mkdir(parents=True, exist_ok=True)
        rel = f"{self._cg_parent}/{spec.name}" if self._cg is not None else None
        return Handle(self.name, spec.name, {
            "spec": runs.spec_to_data(spec),
            "cgroup": rel,
            "cgroup_version": None if self._cg is None else self._cg.version,
            "pid": None, "starttime": None, "shim": None, "shim_starttime": None,
            "generation": None, "accel": None,
        })

    def start(self, handle: Handle) -> Handle:
        if self._qemu(handle) is not None:
            return handle
        return self._launch(handle, ())

    def _launch(self, handle: Handle, extra: Sequence[str]) -> Handle:
        """Start QEMU for ``handle``; ``extra`` goes after the VM's own options (a live
        migration's destination adds ``-incoming defer``)."""
        spec = runs.spec_from_handle(handle)
        layout = read_layout(Path(spec.rootfs or ""))
        wd = Path(spec.workdir)
        wd.mkdir(parents=True, exist_ok=True)
        cg = self._cg_of(handle)
        if cg is None:
            raise DriverError(f"VM {spec.name} has no usable cgroup here",
                              hint=self._cg_reason or "the handle names another cgroup version")
        hier, rel = cg
        self._end_leftovers(handle)
        if hier.exists(rel):  # counters start from zero with each generation
            hier.remove(rel)
        hier.create(rel)
        hier.set_limits(rel, spec.cpus, memory_mib(spec) * MIB + QEMU_OVERHEAD)
        for stale in (QMP_SOCK, PID_FILE, QEMU_EXIT, GUEST_EXIT):
            (wd / stale).unlink(missing_ok=True)
        runs.clear_run_files(wd)
        (wd / RUN_SCRIPT).write_text(guest_script(spec))
        joins = " && ".join(f"echo $$ > {shlex.quote(str(f))}" for f in hier.procs_files(rel))
        script = f"{{ {joins}; }} || exit {_JOIN_FAILED}\n{_SHIM}"
        argv = ["/bin/sh", "-c", script, "corral-qemu", *self._argv(spec, layout), *extra]
        env = {"PATH": runs.DEFAULT_PATH, "LANG": "C.UTF-8"}
        with open(wd / "stdout.log", "ab") as out, open(wd / "stderr.log", "ab") as err, \
                reaping.owned() as own:
            try:
                shim = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                        cwd=wd, env=env, start_new_session=True, close_fds=True)
            except OSError as e:
                raise DriverError(f"cannot start the VM {spec.name}: {e}") from e
            own(shim.pid)
        shim_st = procfs.read_stat(shim.pid)
        try:
            pid = self._wait_pid(wd, shim)
        except DriverError:
            self._collect(shim)
            raise
        st = procfs.read_stat(pid)
        starttime = st.starttime if st is not None else 0
        gen = f"{pid}-{starttime}"
        with self._lock:
            self._shims[gen] = shim
        new = Handle(self.name, handle.name, dict(
            handle.data, pid=pid, starttime=starttime, shim=shim.pid,
            shim_starttime=shim_st.starttime if shim_st is not None else None,
            generation=gen, accel=self.accel, incoming_sock=None))
        if not runs.wait_until(lambda: self._vm_running(new) is not None
                               or self._qemu(new) is None, START_TIMEOUT, 0.02):
            self._pull_plug(new)
        if self._qemu(new) is None:
            self._wait_gone(new, runs.KILL_WAIT)
            raise DriverError(f"QEMU of {spec.name} did not come up: {self._stderr_tail(wd)}",
                              hint=f"see {wd}/stderr.log (the command is in the agent log)")
        if spec.vip:
            try:
                qemu_net.plumb(spec.name, spec.vip)
            except BaseException:
                self._pull_plug(new)
                self._wait_gone(new, runs.KILL_WAIT)
                raise
        return new

    @staticmethod
    def _collect(shim: subprocess.Popen[bytes]) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            shim.wait(timeout=5)
        reaping.release(shim.pid)

    def _wait_pid(self, wd: Path, shim: subprocess.Popen[bytes]) -> int:
        """QEMU's pid, once the shim has joined the cgroup and started it."""
        path = wd / PID_FILE
        runs.wait_until(lambda: path.exists() or shim.poll() is not None, 10.0, 0.005)
        try:
            return int(path.read_text())
        except (OSError, ValueError):
            rc = shim.poll()
            why = ("it could not join its cgroup" if rc == _JOIN_FAILED
                   else self._stderr_tail(wd))
            raise DriverError(f"QEMU did not start: {why}",
                              hint=f"see {wd}/stderr.log") from None

    def stop(self, handle: Handle, timeout: float) -> Status:
        st = self.status(handle)
        if st.state not in ("running", "frozen"):
            self._end_leftovers(handle)
            return st
        runs.mark_stop(handle)
        if st.state == "frozen":
            self.thaw(handle)  # a paused guest cannot hear the button
        if not self._wait_gone(handle, timeout, every=lambda: self._press(handle)):
            self._pull_plug(handle)
            if not self._wait_gone(handle, runs.KILL_WAIT):
                raise DriverError(f"VM {handle.name} survived quit and SIGKILL for "
                                  f"{runs.KILL_WAIT:.0f} s", hint="QEMU stuck in the kernel "
                                  "(D state)?", retryable=True)
        return self.status(handle)

    def kill(self, handle: Handle, signal: int) -> None:
        """SIGKILL ends QEMU at once (a power cut); SIGTERM, SIGINT, SIGQUIT and SIGPWR press the
        power button (the guest's shutdown); other signals mean nothing to a VM."""
        st = self._require_alive(handle, "signal")
        if signal == sig.SIGKILL:
            def send(n: int) -> None:
                self._kill_qemu(handle, sig.SIGKILL)
        elif signal in (sig.SIGTERM, sig.SIGINT, sig.SIGQUIT, sig.SIGPWR):
            def send(n: int) -> None:
                self._press(handle)
        else:
            raise InvalidRequest(f"signal {signal} means nothing to a VM",
                                 hint="send TERM (the power button) or KILL (a power cut)")
        runs.signal_instance(handle, signal, st.state == "frozen", send=send,
                             thaw=lambda: self._thaw_if_alive(handle))

    def _thaw_if_alive(self, handle: Handle) -> None:
        if self._qemu(handle) is not None:
            with contextlib.suppress(qemu_qmp.QMPUnreachable):
                self.thaw(handle)

    def freeze(self, handle: Handle) -> None:
        st = self._require_alive(handle, "freeze")
        if st.state == "frozen":
            return
        runs.mark_frozen(handle, True)
        self._execute(handle, "stop")

    def thaw(self, handle: Handle) -> None:
        if self._qemu(handle) is not None:
            self._execute(handle, "cont")
        runs.mark_frozen(handle, False)

    def status(self, handle: Handle) -> Status:
        if handle.data.get("pid") is None:
            return Status("created")
        q = self._qemu(handle)
        if q is not None:
            running = self._vm_running(handle)
            frozen = runs.frozen_marked(handle) if running is None else not running
            return Status("frozen" if frozen else "running", pid=q.pid)
        if not runs.wait_until(lambda: self._gone(handle), 2.0):
            self._end_leftovers(handle)  # QEMU ended: its shim writes its exit and follows
        code, signal = self._ended(handle)
        state = "stopped" if runs.stop_requested(handle) else "exited"
        return Status(state, exit_code=code, signal=signal)

    def stats(self, handles: Sequence[Handle]) -> dict[str, Stats]:
        out: dict[str, Stats] = {}
        for h in handles:
            q = self._qemu(h)
            cg = self._cg_of(h)
            if q is None or cg is None:
                continue
            cpu = cg[0].cpu_ns(cg[1])
            if cpu is None:
                continue
            out[h.name] = Stats(cpu, q.rss_pages * procfs.PAGE_SIZE, str(h.data["generation"]))
        return out

    def delete(self, handle: Handle) -> None:
        st = self.status(handle)
        if st.state in ("running", "frozen"):
            raise Conflict(f"VM {handle.name} is {st.state}", hint="stop it before deleting")
        self._end_leftovers(handle)
        cg = self._cg_of(handle)
        if cg is not None:
            cg[0].remove(cg[1])
        wd = runs.workdir(handle)
        for name in (QMP_SOCK, PID_FILE, RUN_SCRIPT):
            with contextlib.suppress(OSError):
                (wd / name).unlink()
        with self._lock:
            shim = self._shims.pop(str(handle.data.get("generation") or ""), None)
            self._qmp_locks.pop(handle.name, None)
        if shim is not None:
            self._collect(shim)

    def recover(self, handle: Handle) -> Status:
        if handle.driver != self.name:
            raise InvalidRequest(f"handle of driver {handle.driver!r} given to {self.name!r}")
        return self.status(handle)

    # -- live migration (the mechanism and its reasons: drivers/qemu_migrate.py) ------------
    def stream_dir(self, handle: Handle) -> Path:
        return runs.workdir(handle)

    def incoming(self, handle: Handle, peer: str) -> tuple[Handle, str]:
        """Start this (created) VM as a migration's destination: QEMU with the VM's own
        machine, devices and disk and ``-incoming defer``, listening on a unix socket in its
        directory for the stream the agent tunnels in from ``peer``. Returns the new handle
        and the socket's name. Idempotent: a VM already waiting answers with its socket."""
        if self._qemu(handle) is not None:
            sock = handle.data.get("incoming_sock")
            if sock:
                return handle, str(sock)
            raise Conflict(f"VM {handle.name} already runs here",
                           hint="a migration's destination must not hold a running copy")
        new = self._launch(handle, ["-incoming", "defer"])
        try:
            (runs.workdir(new) / mig.IN_SOCK).unlink(missing_ok=True)
            with self._qmp(new, mig.SETUP_TIMEOUT) as q:
                q.execute("migrate-set-capabilities", mig.capabilities())
                q.execute("migrate-incoming", {"uri": mig.uri(mig.IN_SOCK)})
        except BaseException:
            self._pull_plug(new)
            self._wait_gone(new, runs.KILL_WAIT)
            raise
        return Handle(new.driver, new.name, dict(new.data, incoming_sock=mig.IN_SOCK)), \
            mig.IN_SOCK

    def migrate_out(self, handle: Handle, sock: str, target: str, downtime_ms: int,
                    timeout: float) -> mig.MigrationStats:
        """Send the running VM into the unix socket ``sock`` of its directory, the agent's
        end of the tunnel to host ``target``; returns once QEMU says completed (the guest
        now runs there and this QEMU is paused for good) or raises, the guest running on
        here."""
        self._require_alive(handle, "migrate")
        with self._qmp(handle, mig.SETUP_TIMEOUT) as q:
            now = q.execute("query-migrate") or {}
            if now.get("status") not in (None, "none", *mig.ENDED):
                raise Conflict(f"VM {handle.name} is already migrating ({now.get('status')})",
                               hint="wait for it to end, or undo the operation that runs it")
            mig.set_send_params(q.execute, downtime_ms)
            q.execute("migrate", {"uri": mig.uri(sock)})
        deadline = time.monotonic() + timeout
        disk: dict[str, Any] = {}
        done_at: float | None = None
        while True:
            info = self._execute(handle, "query-migrate") or {}
            status = info.get("status")
            disk = info.get("disk") or disk  # QEMU drops it once block migration is over
            if status == "completed":
                now = time.monotonic()
                done_at = now if done_at is None else done_at
                if mig.settled(info, done_at, now):
                    return mig.parse_stats({**info, "disk": disk}, completed=True)
            if status in ("failed", "cancelled"):
                raise DriverError(f"live migration of {handle.name} to {target} "
                                  f"{status}: {mig.failure(info)}",
                                  hint="the VM runs on here; see the destination's QEMU "
                                       "stderr.log", retryable=True)
            if time.monotonic() > deadline:
                with contextlib.suppress(qemu_qmp.QMPError):
                    self._execute(handle, "migrate_cancel")
                raise DriverError(f"live migration of {handle.name} did not converge in "
                                  f"{timeout:.0f} s (QEMU: {status})",
                                  hint="the guest dirties memory faster than the link sends "
                                       "it; migrate it cold (--cold) or raise the downtime "
                                       "limit", retryable=True)
            time.sleep(mig.POLL_EVERY)

    def resumed(self, handle: Handle) -> bool | None:
        """Only QEMU's own ``running`` counts: a QMP that does not answer is not a guest
        that runs (``status`` would read it as running when not marked frozen)."""
        if self._qemu(handle) is None:
            return None
        return self._vm_running(handle) is True

    def migration_abort(self, handle: Handle) -> None:
        """The source's undo: cancel a migration in flight and let the guest run on here
        (also after QEMU completed it: the caller has ended the destination first)."""
        if self._qemu(handle) is None:
            return
        info = self._execute(handle, "query-migrate") or {}
        if info.get("status") not in (None, "none", *mig.ENDED):
            self._execute(handle, "migrate_cancel")
            runs.wait_until(lambda: (self._execute(handle, "query-migrate") or {})
                            .get("status") in mig.ENDED, 30.0, 0.1)
        if self._vm_running(handle) is False and not runs.frozen_marked(handle):
            self._execute(handle, "cont")  # a completed migration left it paused
