"""The ``process`` driver: an instance is a plain process tree in its own session.

It needs no root, so it is what ``corral up`` uses by default. When a cgroup is usable (root on
v1 with cpuacct+memory+freezer, or v2 as root or in a delegated subtree) each instance gets its
own ``corral/<scope>/<name>`` cgroup and counters come from the kernel, exact and cheap. Without
one, CPU and memory are summed over every process of the instance's session from a single walk of
/proc per :meth:`ProcessDriver.stats` call.

Freeze without a cgroup is SIGSTOP to every process of the session, repeated until none is left
running (so a process forked mid-freeze is caught too). It stops the tree as the freezer does,
but unlike the freezer it is visible to the workload (a parent waiting with WUNTRACED sees it),
and a process that left the session with setsid escapes it; ``can_freeze`` is True in both
modes and ``cgroup_accounting`` tells which one is in force.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal as sig
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path

from corral.drivers import procfs, reaping, runs
from corral.drivers.base import Capabilities, Handle, Spec, Stats, Status
from corral.drivers.cgroups import Hierarchy, for_process_driver
from corral.errors import Conflict, DriverError, InvalidRequest

_JOIN_FAILED = 125
_KILL_WAIT = runs.KILL_WAIT
#: how long a freeze waits for the leader itself to show stopped (see ``freeze``)
LEADER_SETTLE = 1.0


class ProcessDriver:
    name = "process"

    def __init__(self, scope: str, use_cgroup: bool | None = None, *,
                 cgroups: tuple[Hierarchy, str] | None = None) -> None:
        """``use_cgroup``: None = use one when usable, True = require one, False = never.
        ``cgroups`` overrides detection with (hierarchy, parent path) — for tests of v2 code."""
        self.scope = scope
        self._reason: str | None = None
        self._cg: Hierarchy | None = None
        self._cg_parent = ""
        if use_cgroup is not False:
            found = cgroups if cgroups is not None else for_process_driver(scope)
            if isinstance(found, str):
                if use_cgroup:
                    self._reason = f"a cgroup was required but none is usable: {found}"
            else:
                self._cg, self._cg_parent = found
        self.capabilities = Capabilities(can_freeze=True, cgroup_accounting=self._cg is not None)
        self._lock = threading.Lock()
        self._popens: dict[str, subprocess.Popen[bytes]] = {}
        self._exits: dict[str, tuple[int | None, int | None]] = {}
        #: generations with no process left (see :meth:`_gone`)
        self._finished: set[str] = set()

    # -- helpers ---------------------------------------------------------------------------
    def _cg_of(self, handle: Handle) -> tuple[Hierarchy, str] | None:
        rel = handle.data.get("cgroup")
        if rel and self._cg is not None and handle.data.get("cgroup_version") == self._cg.version:
            return self._cg, str(rel)
        return None

    def _procs(self, handle: Handle) -> list[procfs.ProcStat]:
        """Every process of the instance still in /proc, zombies included, after reaping the
        ones that are this process's to reap: its cgroup's members and its session's.

        A session id is a pid, and the kernel keeps it from being reused while any process of
        the session exists; once it is free, a new process may take that pid and start a
        session of its own. So a session whose leader is another process than ours (same pid,
        other start time) is not ours any more."""
        self._reap(handle)
        procs = procfs.scan()
        if reaping.reap_orphans(procs):
            procs = procfs.scan()
        cg = self._cg_of(handle)
        in_cg = set(cg[0].pids(cg[1])) if cg is not None else set()
        sid = handle.data.get("sid")
        start = handle.data.get("starttime")
        if sid and any(p.pid == sid and p.starttime != start for p in procs):
            sid = None  # the pid was reused: the old session is over
        return [p for p in procs if (sid and p.session == sid) or p.pid in in_cg]

    def _members(self, handle: Handle) -> list[int]:
        """Live processes of the instance (zombies have ended: only their reaping is due)."""
        return [p.pid for p in self._procs(handle) if p.alive]

    def _signal_tree(self, handle: Handle, signum: int) -> None:
        pgid = handle.data.get("pgid")
        members = self._members(handle)
        if pgid and (self._leader(handle) is not None or members):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(int(pgid), signum)
        for pid in members:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signum)

    def _leader(self, handle: Handle) -> procfs.ProcStat | None:
        """The leader's stat if that very process is alive (zombies are reaped on the way)."""
        pid, start = handle.data.get("pid"), handle.data.get("starttime")
        if pid is None or start is None:
            return None
        self._reap(handle)
        st = procfs.identify(int(pid), int(start))
        return st if st is not None and st.alive else None

    def _reap(self, handle: Handle) -> tuple[int | None, int | None] | None:
        """Collect the leader's exit if it was ours to collect; the exit if known."""
        gen = str(handle.data.get("generation") or "")
        with self._lock:
            if gen in self._exits:
                return self._exits[gen]
            popen = self._popens.get(gen)
        result: tuple[int | None, int | None] | None = None
        if popen is not None:
            rc = popen.poll()
            if rc is not None:
                result = runs.decode_returncode(rc)
        else:
            pid, start = handle.data.get("pid"), handle.data.get("starttime")
            st = None if pid is None else procfs.identify(int(pid), int(start or -1))
            if st is not None and not st.alive and st.ppid == os.getpid():
                # our own child whose Popen belonged to an earlier driver object
                try:
                    done, status = os.waitpid(int(pid or 0), os.WNOHANG)
                    if done:
                        result = runs.decode_wait_status(status)
                except ChildProcessError:
                    pass
        if result is not None:
            with self._lock:
                self._exits[gen] = result
                self._popens.pop(gen, None)
            reaping.release(int(handle.data.get("pid") or 0))
            runs.record_exit(handle, *result)
        return result

    def _gone(self, handle: Handle) -> bool:
        """No process of this run is left, not even a zombie: only then may a copy of the
        instance start anywhere (remembered per generation: a finished run stays finished)."""
        gen = str(handle.data.get("generation") or "")
        with self._lock:
            if gen in self._finished:
                return True
        if self._leader(handle) is not None or self._procs(handle):
            return False
        with self._lock:
            self._finished.add(gen)
        return True

    def _wait_gone(self, handle: Handle, timeout: float) -> bool:
        return runs.wait_until(lambda: self._gone(handle), timeout)

    def _kill_tree(self, handle: Handle) -> None:
        """SIGKILL every process, thawing first: a frozen task, or one in a v1 cgroup left
        FREEZING by a freeze that did not complete, does not die until it is thawed."""
        cg = self._cg_of(handle)
        if cg is not None and cg[0].exists(cg[1]) and not cg[0].is_thawed(cg[1]):
            cg[0].thaw(cg[1])
        self._signal_tree(handle, sig.SIGKILL)
        if cg is None:
            self._signal_tree(handle, sig.SIGCONT)

    def _end_leftovers(self, handle: Handle) -> bool:
        """SIGKILL what is left of a tree whose leader has exited (it ended with its leader,
        as a container's processes end with its init); True when nothing was left."""
        if self._gone(handle):
            return True
        if self._members(handle):
            self._kill_tree(handle)
        return False

    def _kill_leftovers(self, handle: Handle) -> None:
        if not self._end_leftovers(handle) and not self._wait_gone(handle, _KILL_WAIT):
            left = ", ".join(f"{p.pid} ({p.comm}, {p.state})" for p in self._procs(handle))
            raise DriverError(f"instance {handle.name}: processes left after SIGKILL: {left}",
                              hint="a process stuck in the kernel (D state) or a zombie "
                              "whose parent does not reap it; retry later", retryable=True)

    def _require_alive(self, handle: Handle, verb: str) -> Status:
        st = self.status(handle)
        if st.state not in ("running", "frozen"):
            raise Conflict(f"cannot {verb} instance {handle.name}: it is {st.state}",
                           hint="start it first")
        return st

    # -- the Driver protocol ---------------------------------------------------------------
    def available(self) -> str | None:
        return self._reason

    def create(self, spec: Spec) -> Handle:
        runs.check_spec(spec)
        Path(spec.workdir).mkdir(parents=True, exist_ok=True)
        rel = f"{self._cg_parent}/{spec.name}" if self._cg is not None else None
        return Handle(self.name, spec.name, {
            "spec": runs.spec_to_data(spec),
            "cgroup": rel,
            "cgroup_version": None if self._cg is None else self._cg.version,
            "pid": None, "starttime": None, "pgid": None, "sid": None, "generation": None,
        })

    def _argv(self, spec: Spec, cwd: str, env: dict[str, str], cg: tuple[Hierarchy, str] | None
              ) -> list[str]:
        exe = spec.command[0]
        found = (os.path.join(cwd, exe) if "/" in exe else shutil.which(exe, path=env["PATH"]))
        if not found or not os.access(found, os.X_OK):
            raise InvalidRequest(f"instance {spec.name}: command {exe!r} not found or not "
                                 "executable", hint="give a full path or a command on PATH")
        if cg is None:
            return list(spec.command)
        joins = " && ".join(f"echo $$ > {shlex.quote(str(f))}" for f in cg[0].procs_files(cg[1]))
        script = f"{{ {joins}; }} || exit {_JOIN_FAILED}; exec \"$@\""
        return ["/bin/sh", "-c", script, "corral-join", *spec.command]

    def start(self, handle: Handle) -> Handle:
        if self._leader(handle) is not None:
            return handle
        spec = runs.spec_from_handle(handle)
        wd = Path(spec.workdir)
        wd.mkdir(parents=True, exist_ok=True)
        cg = self._cg_of(handle)
        if cg is not None:
            hier, rel = cg
            if hier.exists(rel):  # counters start from zero with each generation
                self._kill_leftovers(handle)
                hier.remove(rel)
            hier.create(rel)
            hier.set_limits(rel, spec.cpus, spec.memory_bytes)
        cwd = spec.rootfs or spec.workdir
        env = runs.base_env(spec)
        argv = self._argv(spec, cwd, env, cg)
        with open(wd / "stdout.log", "ab") as out, open(wd / "stderr.log", "ab") as err, \
                reaping.owned() as own:
            try:
                popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                         cwd=cwd, env=env, start_new_session=True, close_fds=True)
            except OSError as e:
                raise DriverError(f"cannot start {spec.name}: {e}",
                                  hint="check the command and the working directory") from e
            own(popen.pid)
        st = procfs.read_stat(popen.pid)
        starttime = st.starttime if st is not None else 0
        gen = f"{popen.pid}-{starttime}"
        with self._lock:
            self._popens[gen] = popen
        runs.clear_run_files(wd)
        data = dict(handle.data, pid=popen.pid, starttime=starttime, pgid=popen.pid,
                    sid=popen.pid, generation=gen)
        new = Handle(self.name, handle.name, data)
        if cg is not None:
            self._check_joined(new, popen, cg)
        return new

    def _check_joined(self, handle: Handle, popen: subprocess.Popen[bytes],
                      cg: tuple[Hierarchy, str]) -> None:
        """Wait (briefly) until the leader sits in its cgroup, so no CPU goes uncounted."""
        joined = runs.wait_until(
            lambda: popen.pid in cg[0].pids(cg[1]) or popen.poll() is not None, 5.0, 0.002)
        if popen.poll() == _JOIN_FAILED or not joined:
            tail = (runs.workdir(handle) / "stderr.log").read_text(errors="replace")[-400:]
            raise DriverError(f"instance {handle.name} could not join cgroup {cg[1]}: {tail}",
                              hint="is the cgroup filesystem writable by the agent?")

    def stop(self, handle: Handle, timeout: float) -> Status:
        st = self.status(handle)
        if st.state not in ("running", "frozen"):
            self._kill_leftovers(handle)
            return st
        runs.stop_then_kill(
            handle, st.state == "frozen", timeout,
            signal=lambda n: self._signal_tree(handle, n),
            kill_all=lambda: self._kill_tree(handle),
            gone=lambda t: self._wait_gone(handle, t),
            thaw=lambda: self.thaw(handle), what="instance")
        return self.status(handle)

    def kill(self, handle: Handle, signal: int) -> None:
        st = self._require_alive(handle, "signal")
        runs.signal_instance(handle, signal, st.state == "frozen",
                               send=lambda n: self._signal_tree(handle, n),
                               thaw=lambda: self.thaw(handle))

    def freeze(self, handle: Handle) -> None:
        st = self._require_alive(handle, "freeze")
        if st.state == "frozen":
            return
        cg = self._cg_of(handle)
        if cg is not None:
            cg[0].freeze(cg[1])
            return

        def all_stopped() -> bool:
            # D counts as stopping: it runs no user code, and the SIGSTOP sent to it here
            # stops it as it leaves D (a vfork parent waits in D for a child that was stopped
            # before its exec). It is sent one all the same: a leader first seen in D was
            # once never signalled, woke up and ran on, "frozen"
            running = False
            for s in procfs.scan():
                if s.session != handle.data.get("sid") or not s.alive or s.state in ("T", "t"):
                    continue
                with contextlib.suppress(ProcessLookupError):
                    os.kill(s.pid, sig.SIGSTOP)
                running = running or s.state != "D"
            return not running

        runs.mark_frozen(handle, True)

        if not runs.wait_until(all_stopped, 5.0, 0.005):
            raise DriverError(f"instance {handle.name} kept forking while being frozen",
                              hint="retry, or run it where a freezer cgroup is usable",
                              retryable=True)

        def leader_still() -> bool:
            # a leader seen in D with the SIGSTOP pending runs a moment (R) when it leaves D,
            # before it stops: status read then said "running" right after a freeze
            leader = self._leader(handle)
            return leader is None or leader.state in ("T", "t")

        # bounded: a vfork parent stays in D while its child is stopped (status counts that)
        runs.wait_until(leader_still, LEADER_SETTLE, 0.005)

    def thaw(self, handle: Handle) -> None:
        cg = self._cg_of(handle)
        if cg is not None:
            if cg[0].exists(cg[1]) and not cg[0].is_thawed(cg[1]):
                cg[0].thaw(cg[1])
            return
        self._signal_tree(handle, sig.SIGCONT)
        runs.mark_frozen(handle, False)

    def status(self, handle: Handle) -> Status:
        if handle.data.get("pid") is None:
            return Status("created")
        leader = self._leader(handle)
        if leader is not None:
            cg = self._cg_of(handle)
            if cg is not None:
                frozen = cg[0].is_frozen(cg[1])
            else:
                frozen = leader.state in ("T", "t") or (
                    leader.state == "D" and runs.frozen_marked(handle))
            return Status("frozen" if frozen else "running", pid=leader.pid)
        if not self._end_leftovers(handle):
            # the leader is gone, the rest is being killed: not ended until all are reaped
            return Status("running")
        ended = self._reap(handle) or runs.read_exit(handle) or (None, None)
        state = "stopped" if runs.stop_requested(handle) else "exited"
        return Status(state, exit_code=ended[0], signal=ended[1])

    def stats(self, handles: Sequence[Handle]) -> dict[str, Stats]:
        started = [h for h in handles if h.data.get("pid") is not None]
        need_scan = any(self._cg_of(h) is None for h in started)
        procs = procfs.scan() if need_scan else []
        by_pid = {p.pid: p for p in procs}
        usage = procfs.usage_by_session(procs)
        out: dict[str, Stats] = {}
        for h in started:
            pid, start = int(h.data["pid"]), int(h.data["starttime"])
            gen = str(h.data["generation"])
            cg = self._cg_of(h)
            if cg is None:
                leader = by_pid.get(pid)
                if leader is None or leader.starttime != start or not leader.alive:
                    continue
                tree = usage[leader.session]
                out[h.name] = Stats(tree.cpu_ns, tree.rss_bytes, gen)
                continue
            if not procfs.is_alive(pid, start):
                continue
            cpu = cg[0].cpu_ns(cg[1])
            if cpu is None:
                continue
            mem = cg[0].memory_bytes(cg[1])
            if mem is None:  # v2 without the memory controller: resident size of the tree
                stats = [procfs.read_stat(p) for p in cg[0].pids(cg[1])]
                mem = sum(s.rss_pages for s in stats if s is not None) * procfs.PAGE_SIZE
            out[h.name] = Stats(cpu, mem, gen)
        return out

    def delete(self, handle: Handle) -> None:
        st = self.status(handle)
        if st.state in ("running", "frozen"):
            raise Conflict(f"instance {handle.name} is {st.state}", hint="stop it before deleting")
        cg = self._cg_of(handle)
        self._kill_leftovers(handle)
        if cg is not None:
            cg[0].remove(cg[1])
        gen = str(handle.data.get("generation") or "")
        with self._lock:
            self._popens.pop(gen, None)
            self._exits.pop(gen, None)

    def recover(self, handle: Handle) -> Status:
        if handle.driver != self.name:
            raise InvalidRequest(f"handle of driver {handle.driver!r} given to {self.name!r}")
        return self.status(handle)
