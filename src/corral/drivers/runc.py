"""The ``runc`` driver: an instance is an OCI container run by runc (root only).

Each agent has its own runc state root, so agents sharing a machine (``corral up --netns``) never
see each other's containers. Starting goes through a small shim (``runc_shim.py``) that runs
``runc create`` and then waits for the container's init, so the exit status is known even though
``runc create`` orphans the init; the driver then calls ``runc start``.

Containers run in a user namespace (:mod:`corral.drivers.runc_userns`): before each start the
root filesystem's owners are moved into the containers' id range, and the shim binds it where
the container's root can reach it (``ROOT_MOUNT``, in a mount namespace of the create's own).

Reading state is kept cheap because the agent samples every second: status is one read of
``/proc/<pid>/stat`` (pid + start time from the handle) and one of the freezer state, and
:meth:`RuncDriver.stats` reads the cgroup files directly; runc itself is only run for verbs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import select
import shutil
import signal as sig
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from corral.drivers import procfs, reaping, runc_userns, runs
from corral.drivers.base import Capabilities, Handle, Spec, Stats, Status
from corral.drivers.cgroups import Hierarchy, Mounts, V1Hierarchy, V2Hierarchy, read_mounts
from corral.drivers.runc_config import cgroups_path, stop_signal, write_bundle
from corral.errors import Conflict, DriverError, InvalidRequest

log = logging.getLogger(__name__)

SHIM = Path(__file__).with_name("runc_shim.py")
#: where ``runc create`` finds a container's root: an empty directory every container's root
#: can reach, on which the shim binds that root in the create's own mount namespace (so every
#: container uses the same one and nothing is ever mounted on it in the host's namespace)
ROOT_MOUNT = Path("/run/corral-runc/root")
SHIM_EXIT_FILE = "runc-exit.json"
_CREATE_TIMEOUT = 60.0
_VERB_TIMEOUT = 30.0
_MSG_RE = re.compile(r'msg="((?:[^"\\]|\\.)*)"')


def runc_message(stderr: str) -> str:
    """runc's own words from its stderr/log (logrus text or JSON lines), without timestamps."""
    msgs: list[str] = []
    for line in stderr.splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            try:
                msgs.append(str(json.loads(line).get("msg", line)))
                continue
            except ValueError:
                pass
        m = _MSG_RE.search(line)
        msgs.append(m.group(1).replace('\\"', '"') if m else line)
    return "; ".join(dict.fromkeys(msgs)) or "(runc printed nothing)"


class RuncDriver:
    name = "runc"
    capabilities = Capabilities(can_freeze=True, needs_root=True, cgroup_accounting=True,
                                needs_rootfs=True)

    def __init__(self, scope: str, state_root: str, runc: str = "runc") -> None:
        self.scope = scope
        self.state_root = Path(state_root)
        self.runc = runc
        self.mounts: Mounts = read_mounts()
        self._lock = threading.Lock()
        self._shims: dict[str, subprocess.Popen[bytes]] = {}

    # -- helpers ---------------------------------------------------------------------------
    @property
    def hierarchy(self) -> Hierarchy:
        """Where the counters are: runc itself picks v2 only on a pure unified host."""
        if self.mounts.unified and self.mounts.v2 is not None:
            return V2Hierarchy(self.mounts.v2)
        return V1Hierarchy(self.mounts)

    def _all_dirs(self) -> Hierarchy:
        """Every hierarchy runc makes the cgroup in (all v1 mounts and hybrid v2)."""
        if self.mounts.unified and self.mounts.v2 is not None:
            return V2Hierarchy(self.mounts.v2)
        return V1Hierarchy(self.mounts, everywhere=True)

    def cgroup_rel(self, name: str) -> str:
        return cgroups_path(self.scope, name).lstrip("/")

    def _cmd(self, *args: str) -> list[str]:
        return [self.runc, "--root", str(self.state_root), *args]

    def _run(self, verb: str, name: str, *flags: str, after: Sequence[str] = (),
             hint: str = "") -> str:
        """``runc VERB FLAGS NAME AFTER``, with a failure turned into a DriverError."""
        cmd = self._cmd(verb, *flags, name, *after)
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=_VERB_TIMEOUT,
                               stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as e:
            raise DriverError(f"runc {verb} {name} did not finish in {_VERB_TIMEOUT:.0f} s",
                              hint="the host may be overloaded; retry", retryable=True) from e
        except FileNotFoundError as e:
            raise DriverError(f"runc not found at {self.runc!r}",
                              hint="apt-get install runc") from e
        if r.returncode != 0:
            raise DriverError(
                f"runc {verb} {name} failed: {runc_message(r.stderr)}",
                hint=hint or f"inspect it with 'runc --root {self.state_root} state {name}'",
                details={"verb": verb, "returncode": r.returncode})
        return r.stdout

    def _has_container(self, name: str) -> bool:
        return (self.state_root / name / "state.json").is_file()

    def _alive(self, handle: Handle) -> procfs.ProcStat | None:
        pid, start = handle.data.get("pid"), handle.data.get("starttime")
        if pid is None or start is None:
            return None
        st = procfs.identify(int(pid), int(start))
        return st if st is not None and st.alive else None

    def _shim_exit(self, handle: Handle) -> tuple[int | None, int | None] | None:
        """The exit the shim recorded for this run; waits a moment for a shim still writing."""
        gen = str(handle.data.get("generation") or "")
        path = runs.workdir(handle) / SHIM_EXIT_FILE
        with self._lock:
            shim = self._shims.get(gen)
        if shim is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                shim.wait(timeout=1.0)
            with self._lock:
                if shim.poll() is not None:
                    self._shims.pop(gen, None)
                    reaping.release(shim.pid)
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if raw.get("pid") != handle.data.get("pid"):
            return None
        code, signal = raw.get("exit_code"), raw.get("signal")
        return (None if code is None else int(code), None if signal is None else int(signal))

    def _require_alive(self, handle: Handle, verb: str) -> Status:
        st = self.status(handle)
        if st.state not in ("running", "frozen"):
            raise Conflict(f"cannot {verb} instance {handle.name}: it is {st.state}",
                           hint="start it first")
        return st

    def _kill(self, handle: Handle, signum: int, all_procs: bool = False) -> None:
        """``runc kill``; a container that ended meanwhile is not an error."""
        args = ["--all"] if all_procs else []
        try:
            self._run("kill", handle.name, *args, after=[str(int(signum))])
        except DriverError:
            if self._alive(handle) is not None:
                raise

    def _gone(self, handle: Handle) -> bool:
        """The container's init is reaped (not a zombie any more) and its cgroup is empty:
        only then may a copy of the instance start anywhere. When the init of a pid namespace
        dies the kernel kills the rest of it, so waiting is all there is to do; the shim reaps
        the init, and if the shim is gone the agent (a subreaper) does."""
        if self._alive(handle) is not None:
            return False
        if self.hierarchy.pids(str(handle.data["cgroup"])):
            return False
        pid, start = handle.data.get("pid"), handle.data.get("starttime")
        if pid is None:
            return True
        if procfs.identify(int(pid), int(start or 0)) is None:
            return True
        reaping.reap_orphans()
        return procfs.identify(int(pid), int(start or 0)) is None

    def _wait_dead(self, handle: Handle, timeout: float) -> bool:
        return runs.wait_until(lambda: self._gone(handle), timeout)

    # -- the Driver protocol ---------------------------------------------------------------
    def available(self) -> str | None:
        if shutil.which(self.runc) is None:
            return f"runc not found ({self.runc}); apt-get install runc"
        if os.geteuid() != 0:
            return "the runc driver needs root"
        if not runc_userns.user_namespaces_enabled():
            return ("user namespaces are off on this host (user.max_user_namespaces is 0, or "
                    "the kernel has none): runc containers run in one; sysctl "
                    "user.max_user_namespaces=15000")
        m = self.mounts
        if not (m.unified or all(c in m.v1 for c in ("cpuacct", "memory", "freezer"))):
            return ("no usable cgroup filesystem (need v2, or v1 cpuacct+memory+freezer); "
                    "an agent under 'ip netns exec' loses /sys/fs/cgroup: use nsenter --net")
        return None

    def create(self, spec: Spec) -> Handle:
        runs.check_spec(spec, needs_rootfs=True)
        runc_userns.check_container_root(spec.rootfs or "")
        wd = Path(spec.workdir)
        wd.mkdir(parents=True, exist_ok=True)
        write_bundle(wd / "bundle", spec, self.scope, str(ROOT_MOUNT))
        return Handle(self.name, spec.name, {
            "spec": runs.spec_to_data(spec),
            "bundle": str(wd / "bundle"),
            "cgroup": self.cgroup_rel(spec.name),
            "pid": None, "starttime": None, "generation": None,
        })

    def start(self, handle: Handle) -> Handle:
        if self._alive(handle) is not None:
            return handle
        spec = runs.spec_from_handle(handle)
        wd = Path(spec.workdir)
        rootfs = self._give_root(spec)
        bundle = write_bundle(wd / "bundle", spec, self.scope, str(ROOT_MOUNT)).parent
        self.state_root.mkdir(parents=True, exist_ok=True)
        if self._has_container(spec.name):  # an earlier run (stopped, exited or half-made)
            self._run("delete", spec.name, "--force")
        runs.clear_run_files(wd)
        pid_file = wd / "init.pid"
        for stale in (pid_file, wd / SHIM_EXIT_FILE):
            stale.unlink(missing_ok=True)
        cfg = {
            "create": self._cmd("--log", str(wd / "runc.log"), "--log-format", "json", "create",
                                "--bundle", str(bundle), "--pid-file", str(pid_file), spec.name),
            "stdout": str(wd / "stdout.log"), "stderr": str(wd / "stderr.log"),
            "bundle": str(bundle), "pid_file": str(pid_file),
            "exit_file": str(wd / SHIM_EXIT_FILE),
            "rootfs": str(rootfs), "root_mount": str(ROOT_MOUNT), "log": str(wd / "runc.log"),
        }
        # the shim gets a bare environment: the agent's (with the fleet token) stays with it
        env = {"PATH": os.environ.get("PATH", runs.DEFAULT_PATH)}
        with open(wd / "shim.log", "ab") as shim_log, reaping.owned() as own:
            shim = subprocess.Popen([sys.executable, "-I", "-S", str(SHIM), json.dumps(cfg)],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=shim_log, start_new_session=True, close_fds=True,
                                    env=env)
            own(shim.pid)
        line = self._read_line(shim)
        if not line.startswith("created "):
            shim.wait(timeout=10)
            reaping.release(shim.pid)
            raise DriverError(f"runc create {spec.name} failed: {self._log_tail(wd)}",
                              hint=f"see {wd}/runc.log and {bundle}/config.json")
        pid = int(line.split()[1])
        st = procfs.read_stat(pid)
        gen = f"{pid}-{st.starttime if st else 0}"
        with self._lock:
            self._shims[gen] = shim
        try:
            self._run("start", spec.name, hint=f"see {wd}/stderr.log")
        except DriverError:
            self._run("delete", spec.name, "--force")
            raise
        data = dict(handle.data, pid=pid, starttime=st.starttime if st else 0, generation=gen,
                    cgroup=self.cgroup_rel(spec.name))  # the bundle was just written with it
        return Handle(self.name, handle.name, data)

    @staticmethod
    def _give_root(spec: Spec) -> Path:
        """The root filesystem, owned by the container's ids (checked again: a handle from an
        older agent never went through this create), and the empty directory it is bound on."""
        rootfs = Path(spec.rootfs or "").absolute()
        runc_userns.check_container_root(str(rootfs))
        done = runc_userns.shift_tree(rootfs)
        if done.chowned or done.stripped:
            log.info("root filesystem of %s given to its user namespace: %d owners moved, "
                     "%d setuid/setgid bits taken off (%d entries)", spec.name, done.chowned,
                     done.stripped, done.seen)
        for d in (ROOT_MOUNT.parent, ROOT_MOUNT):
            d.mkdir(mode=0o711, parents=True, exist_ok=True)
            if d.stat().st_mode & 0o7777 != 0o711:
                d.chmod(0o711)
        return rootfs

    @staticmethod
    def _read_line(shim: subprocess.Popen[bytes]) -> str:
        assert shim.stdout is not None
        ready, _, _ = select.select([shim.stdout], [], [], _CREATE_TIMEOUT)
        line = shim.stdout.readline().decode(errors="replace").strip() if ready else ""
        shim.stdout.close()
        return line

    @staticmethod
    def _log_tail(wd: Path) -> str:
        try:
            lines = (wd / "runc.log").read_text(errors="replace").splitlines()[-10:]
        except OSError:
            return "(no runc.log)"
        errors = [ln for ln in lines if '"error"' in ln or "level=error" in ln] or lines[-3:]
        return runc_message("\n".join(errors))

    def stop(self, handle: Handle, timeout: float) -> Status:
        st = self.status(handle)
        if st.state not in ("running", "frozen"):
            return st
        first = stop_signal(runs.spec_from_handle(handle))  # the image's StopSignal
        runs.stop_then_kill(
            handle, st.state == "frozen", timeout,
            signal=lambda n: self._kill(handle, first if n == sig.SIGTERM else n),
            kill_all=lambda: self._kill(handle, sig.SIGKILL, all_procs=True),
            gone=lambda t: self._wait_dead(handle, t),
            thaw=lambda: self.thaw(handle), what="container")
        return self.status(handle)

    def kill(self, handle: Handle, signal: int) -> None:
        st = self._require_alive(handle, "signal")
        runs.signal_instance(handle, signal, st.state == "frozen",
                               send=lambda n: self._kill(handle, n),
                               thaw=lambda: self.thaw(handle))

    def freeze(self, handle: Handle) -> None:
        if self._require_alive(handle, "freeze").state == "running":
            self._run("pause", handle.name)

    def thaw(self, handle: Handle) -> None:
        if self.status(handle).state == "frozen":
            self._run("resume", handle.name)

    def status(self, handle: Handle) -> Status:
        if handle.data.get("pid") is None:
            return Status("created")
        st = self._alive(handle)
        if st is not None:
            frozen = self.hierarchy.is_frozen(str(handle.data["cgroup"]))
            return Status("frozen" if frozen else "running", pid=st.pid)
        if not self._gone(handle):
            return Status("running")  # its init died; the rest is being killed and reaped
        ended = self._shim_exit(handle) or (None, None)
        state = "stopped" if runs.stop_requested(handle) else "exited"
        return Status(state, exit_code=ended[0], signal=ended[1])

    def stats(self, handles: Sequence[Handle]) -> dict[str, Stats]:
        hier = self.hierarchy
        out: dict[str, Stats] = {}
        for h in handles:
            if self._alive(h) is None:
                continue
            rel = str(h.data["cgroup"])
            cpu = hier.cpu_ns(rel)
            if cpu is None:
                continue
            mem = hier.memory_bytes(rel)
            if mem is None:
                rss = [procfs.read_stat(p) for p in hier.pids(rel)]
                mem = sum(s.rss_pages for s in rss if s is not None) * procfs.PAGE_SIZE
            out[h.name] = Stats(cpu, mem, str(h.data["generation"]))
        return out

    def delete(self, handle: Handle) -> None:
        st = self.status(handle)
        if st.state in ("running", "frozen"):
            raise Conflict(f"container {handle.name} is {st.state}",
                           hint="stop it before deleting")
        if self._has_container(handle.name):
            self._run("delete", handle.name, "--force")
        self._all_dirs().remove(str(handle.data["cgroup"]))
        with self._lock:
            shim = self._shims.pop(str(handle.data.get("generation") or ""), None)
        if shim is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                shim.wait(timeout=2.0)
                reaping.release(shim.pid)

    def recover(self, handle: Handle) -> Status:
        if handle.driver != self.name:
            raise InvalidRequest(f"handle of driver {handle.driver!r} given to {self.name!r}")
        return self.status(handle)
