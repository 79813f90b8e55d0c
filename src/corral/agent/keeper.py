"""The fence keeper: one small process per host that kills the guarded instances when the lease
runs out, whether or not the agent still lives.

The agent's own fence (:mod:`corral.agent.fence`) needs a living agent. An agent killed with -9
while its workloads live on fences nothing, and the server, seeing the lease run out, fails the
guarded instances (those with a standby) over: two copies, one virtual IP. So the act of fencing
lives here, in a process that needs nothing of the agent when it acts: the standard library only
(run as ``python -I -S .../keeper.py --dir DATA/fence`` it imports nothing of corral nor of the
virtualenv, so it works whatever state the agent's code is in), a state file the agent keeps
current, and the kernel. ``python -m corral.agent.keeper --dir DATA/fence`` runs it too.

**How it runs (decided).** The agent starts it once, detached (a session and process group of
its own, so a signal to the agent's group or a kill -9 of the agent leaves it alone), and a
restarted agent re-adopts it: ``keeper.pid`` names it, and the agent trusts that pid only when
``/proc/PID/cmdline`` is a keeper's for this directory and the start time (``/proc/PID/stat``
field 22) is the one recorded, so a reused pid is never taken for it. An exclusive ``flock`` on
``keeper.lock``, held for the keeper's life, makes a second keeper on the same directory exit at
once: never two. It is not put in any of the agent's instance cgroups (an instance stop or
``corral down`` removing those must not take it along); it stays in the agent's own cgroup, which
is where an agent run by hand or by ``corral up`` lives -- and under systemd, where the shipped
``corral-agent.service`` has ``KillMode=process`` so that a stop or restart of the unit signals
the agent alone, not the keeper (nor the runc and qemu shims) in its cgroup. A keeper unit of
its own (``WatchdogSec=`` with the keeper notifying) was the alternative; it would need a keeper
that stays up with nothing to guard and an agent that never starts one, and one design serves
every way an agent runs (see "From two bare machines to a fleet" in docs/operations.md).

**The interface** is two files in the agent's data dir, both 0600, each replaced by a rename:

* ``lease.json`` (the agent writes it when the lease is acknowledged and whenever the guarded
  instances, their processes or their addresses change): the deadline in ``CLOCK_MONOTONIC``
  seconds (one clock for every process of the machine: the agent's ``time.monotonic()`` is it),
  the boot id (the clock starts again at boot), the agent's pid and start time, and for each
  guarded alive instance exactly what it takes to kill it without a driver: its cgroup (a path
  relative to each cgroup hierarchy root, listed once), its main pid with start time (and its
  session, for the process driver's instances without a cgroup), and its virtual IPs with their
  interface. A runc container is all in its cgroup: killing every process there is enough, and
  the agent or runc removes the container's record later.
* ``fenced.json`` (the keeper writes it): the last fences, what was killed, when and why; the
  agent reads it when it starts and whenever it changes, so fenced instances read ``stopped``.

**The loop** stats ``lease.json`` every 100 ms (reading it only when it changed) and wakes at the
deadline itself. Once ``now >= deadline``, every listed instance not yet fenced for that deadline
is SIGKILLed (its cgroup's ``cgroup.kill`` where the kernel has one, every process in its cgroup
and below, thawed so a frozen one dies; the main pid and its session checked by start time), its
virtual IPs are deleted, the fence is recorded and logged (``keeper.log``). A deadline moved into
the future (an acknowledgement) starts the count again.

**It exits** on SIGTERM (a clean agent stop with nothing guarded, ``corral down``), when its
directory is gone, or when its agent is gone and everything listed has been fenced (or nothing
is listed): nothing is left to guard, and an agent that comes back starts a new keeper.

Safety: a malformed or oversized ``lease.json`` is ignored with one log line (the last good one
stands), as is one from another boot; pids 1, its own and the agent's are never signalled.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import ipaddress
import json
import logging
import logging.handlers
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: the format of both files; a keeper refuses a lease file of another version
VERSION = 1
DIR_NAME = "fence"
STATE_FILE = "lease.json"
FENCED_FILE = "fenced.json"
PID_FILE = "keeper.pid"
LOCK_FILE = "keeper.lock"
FENCED_LOCK = "fenced.lock"
LOG_FILE = "keeper.log"
MODULE = "corral.agent.keeper"
SCRIPT = Path(__file__).resolve()

#: lease.json bigger than this is refused by the writer and ignored by the keeper
MAX_STATE_BYTES = 4 << 20
MAX_INSTANCES = 10_000
#: fenced.json is cut to this by dropping its oldest records (a reader takes up to 4 times it)
MAX_FENCED_BYTES = 4 << 20
FENCES_KEPT = 16
#: pids named per instance in a fence record (the count is always there)
PIDS_KEPT = 64
POLL_SECONDS = 0.1
#: how long a fence keeps killing what is left of an instance (a fork race, a thawing task)
KILL_WAIT_SECONDS = 5.0
AGENT_CHECK_SECONDS = 1.0
LOG_MAX_BYTES = 1 << 20
#: cgroup directories walked below one instance's (a container may make its own)
MAX_CGROUP_DIRS = 1024

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_IFNAME = re.compile(r"^[A-Za-z0-9_.:@-]{1,15}$")

log = logging.getLogger("corral.keeper")


# --- the machine ---------------------------------------------------------------------------------

def monotonic() -> float:
    """CLOCK_MONOTONIC, named, not left to whatever ``time.monotonic`` picks elsewhere."""
    return time.clock_gettime(time.CLOCK_MONOTONIC)


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


@dataclass(frozen=True)
class Proc:
    pid: int
    state: str
    session: int
    start: int

    @property
    def alive(self) -> bool:
        return self.state not in ("Z", "X")


def proc(pid: int) -> Proc | None:
    """Fields of ``/proc/PID/stat`` (the name may hold ``)``: split after the last one)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            text = fh.read().decode(errors="replace")
        rest = text[text.rindex(")") + 2:].split()
        return Proc(pid, rest[0], int(rest[3]), int(rest[19]))
    except (OSError, ValueError, IndexError):
        return None


def start_time(pid: int) -> int | None:
    p = proc(pid)
    return None if p is None else p.start


def is_alive(pid: int, start: int | None) -> bool:
    """The very process ``(pid, start)`` runs (a zombie does not)."""
    p = proc(pid)
    return p is not None and p.alive and (start is None or p.start == start)


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0")[:-1]]


def write_private(path: Path, data: bytes) -> None:
    """0600 through a temp file and a rename: a reader sees the old file or the new one. No
    fsync: both files describe this boot only, so a crash of the machine loses nothing usable."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)
    os.replace(tmp, path)


def read_bounded(path: Path, limit: int) -> bytes:
    """The file, or ValueError when it is over ``limit`` (read no further than that)."""
    with open(path, "rb") as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{path.name} is over {limit} bytes")
    return data


# --- lease.json ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Vip:
    address: str  # with its prefix, as ip(8) takes it
    interface: str


@dataclass(frozen=True)
class Entry:
    """One guarded instance: what kills every process of it, and the addresses it holds."""

    name: str
    generation: str = ""
    pid: int | None = None
    start: int | None = None
    #: the session of a process-driver instance (its leader's pid); checked by ``start``
    sid: int | None = None
    cgroup: str | None = None
    vips: tuple[Vip, ...] = ()

    @property
    def key(self) -> tuple[str, str]:
        return (self.name, self.generation)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "generation": self.generation, "pid": self.pid,
                "start": self.start, "sid": self.sid, "cgroup": self.cgroup,
                "vips": [{"address": v.address, "interface": v.interface} for v in self.vips]}


@dataclass(frozen=True)
class LeaseState:
    deadline: float
    boot: str
    agent_pid: int | None = None
    agent_start: int | None = None
    cgroup_roots: tuple[str, ...] = ()
    instances: tuple[Entry, ...] = ()
    #: the lease and the fencing window, for the log only
    lease: float = 0.0
    window: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"version": VERSION, "deadline": self.deadline, "boot": self.boot,
                "agent": {"pid": self.agent_pid, "start": self.agent_start},
                "lease": self.lease, "window": self.window,
                "cgroup_roots": list(self.cgroup_roots),
                "instances": [e.to_json() for e in self.instances]}


def encode_state(state: LeaseState) -> bytes:
    """The file's bytes; ValueError past the bounds a keeper accepts (it would ignore them)."""
    if len(state.instances) > MAX_INSTANCES:
        raise ValueError(f"{len(state.instances)} guarded instances, over {MAX_INSTANCES}")
    data = json.dumps(state.to_json(), sort_keys=True, separators=(",", ":")).encode()
    if len(data) > MAX_STATE_BYTES:
        raise ValueError(f"the lease file would be {len(data)} bytes, over {MAX_STATE_BYTES}")
    return data


def check_cgroup(rel: str) -> str:
    """A cgroup path relative to a hierarchy root, that stays below it."""
    parts = rel.split("/")
    if (not rel or len(rel) > 4096 or "\0" in rel or rel.startswith("/")
            or any(p in ("", ".", "..") for p in parts)):
        raise ValueError(f"bad cgroup path {rel[:80]!r}")
    return rel


def _int(v: object, what: str, low: int = 0) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ValueError(f"{what} is not an integer >= {low}")
    return v


def _opt_int(v: object, what: str, low: int = 0) -> int | None:
    return None if v is None else _int(v, what, low)


def _str(v: object, what: str, longest: int) -> str:
    if not isinstance(v, str) or len(v) > longest or "\0" in v:
        raise ValueError(f"{what} is not a string of at most {longest} characters")
    return v


def _number(v: object, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise ValueError(f"{what} is not a finite number")
    return float(v)


def _list(v: object, what: str, longest: int) -> list[Any]:
    if not isinstance(v, list) or len(v) > longest:
        raise ValueError(f"{what} is not a list of at most {longest}")
    return v


def _dict(v: object, what: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise ValueError(f"{what} is not an object")
    return v


def parse_vip(raw: object) -> Vip:
    d = _dict(raw, "a vip")
    address = _str(d.get("address"), "vip address", 43)
    try:
        iface = ipaddress.IPv4Interface(address)
    except ValueError as exc:
        raise ValueError(f"bad vip address {address!r}") from exc
    name = _str(d.get("interface"), "vip interface", 15)
    if not _IFNAME.match(name):
        raise ValueError(f"bad interface name {name!r}")
    return Vip(str(iface), name)


def parse_entry(raw: object) -> Entry:
    d = _dict(raw, "an instance")
    name = _str(d.get("name"), "name", 128)
    if not _NAME.match(name):
        raise ValueError(f"bad instance name {name!r}")
    pid, start = _opt_int(d.get("pid"), "pid", 2), _opt_int(d.get("start"), "start")
    if (pid is None) != (start is None):
        raise ValueError(f"{name}: a pid goes with its start time")
    cgroup = d.get("cgroup")
    entry = Entry(name=name, generation=_str(d.get("generation", ""), "generation", 128),
                  pid=pid, start=start, sid=_opt_int(d.get("sid"), "sid", 2),
                  cgroup=None if cgroup is None else check_cgroup(_str(cgroup, "cgroup", 4096)),
                  vips=tuple(parse_vip(v) for v in _list(d.get("vips", []), "vips", 16)))
    if entry.pid is None and entry.cgroup is None:
        raise ValueError(f"{name}: neither a pid nor a cgroup to kill it by")
    return entry


def parse_state(raw: bytes) -> LeaseState:
    """Validate everything before anything is believed; ValueError says what is wrong."""
    if len(raw) > MAX_STATE_BYTES:
        raise ValueError(f"{len(raw)} bytes, over {MAX_STATE_BYTES}")
    try:
        d = _dict(json.loads(raw), "the lease file")
    except (UnicodeDecodeError, RecursionError) as exc:  # json.JSONDecodeError is a ValueError
        raise ValueError(str(exc)) from exc
    if d.get("version") != VERSION:
        raise ValueError(f"version {d.get('version')!r}, this keeper reads {VERSION}")
    agent = _dict(d.get("agent") or {}, "agent")
    roots = tuple(_str(r, "cgroup root", 4096) for r in _list(d.get("cgroup_roots", []),
                                                              "cgroup_roots", 64))
    for r in roots:
        if not r.startswith("/") or os.path.normpath(r) != r:
            raise ValueError(f"bad cgroup root {r[:80]!r}")
    entries = tuple(parse_entry(e) for e in _list(d.get("instances", []), "instances",
                                                  MAX_INSTANCES))
    if len({e.key for e in entries}) != len(entries):
        raise ValueError("an instance is listed twice")
    return LeaseState(deadline=_number(d.get("deadline"), "deadline"),
                      boot=_str(d.get("boot"), "boot", 64),
                      agent_pid=_opt_int(agent.get("pid"), "agent pid", 2),
                      agent_start=_opt_int(agent.get("start"), "agent start"),
                      cgroup_roots=roots, instances=entries,
                      lease=_number(d.get("lease", 0.0), "lease"),
                      window=_number(d.get("window", 0.0), "window"))


def read_state(directory: Path) -> LeaseState:
    """OSError when absent, ValueError when unusable."""
    return parse_state(read_bounded(directory / STATE_FILE, MAX_STATE_BYTES))


# --- killing -------------------------------------------------------------------------------------

def cgroup_mounts() -> set[str]:
    """Mount points of cgroup filesystems (v1 and v2) in this mount namespace."""
    found: set[str] = set()
    try:
        text = Path("/proc/self/mountinfo").read_text()
    except OSError:
        return found
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        lf, rf = left.split(), right.split()
        if sep and len(lf) >= 5 and rf and rf[0] in ("cgroup", "cgroup2"):
            found.add(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), lf[4]))
    return found


def cgroup_dirs(entry: Entry, roots: Sequence[str]) -> list[Path]:
    """The instance's cgroup in every hierarchy that has it, and what is below it."""
    if entry.cgroup is None:
        return []
    out: list[Path] = []
    for root in roots:
        top = Path(root) / entry.cgroup
        if not top.is_dir():
            continue
        for here, subdirs, _files in os.walk(top, followlinks=False):
            out.append(Path(here))
            if len(out) >= MAX_CGROUP_DIRS:
                subdirs.clear()
    return out


def _read_pids(path: Path) -> set[int]:
    try:
        return {int(t) for t in path.read_text().split() if t.isdigit()}
    except OSError:
        return set()


def sessions() -> dict[int, set[int]]:
    """Live pids by session id, from one walk of /proc."""
    out: dict[int, set[int]] = {}
    with contextlib.suppress(OSError):
        for name in os.listdir("/proc"):
            if name.isdigit():
                p = proc(int(name))
                if p is not None and p.alive:
                    out.setdefault(p.session, set()).add(p.pid)
    return out


def members(entry: Entry, dirs: Sequence[Path], by_session: dict[int, set[int]]) -> set[int]:
    """Live processes of the instance: its cgroup's, its leader if that very process still
    runs, and its session's while the session id is not another process's pid (the kernel
    keeps a session's id from being reused while any member lives)."""
    pids: set[int] = set()
    for d in dirs:
        pids |= _read_pids(d / "cgroup.procs")
    if entry.pid is not None and entry.start is not None:
        leader = proc(entry.pid)
        if leader is not None and leader.start == entry.start and leader.alive:
            pids.add(entry.pid)
        if entry.sid == entry.pid and (leader is None or leader.start == entry.start):
            pids |= by_session.get(entry.pid, set())
    return {p for p in pids if (st := proc(p)) is not None and st.alive}


def _write(path: Path, value: str) -> None:
    with contextlib.suppress(OSError), open(path, "w") as fh:
        fh.write(value)


def _signal(pid: int, entry: Entry, by_session: dict[int, set[int]]) -> bool:
    """SIGKILL ``pid``; a pid reached through the leader or the session is checked again
    right before (a pid reused since the walk must not be hit)."""
    if pid == entry.pid and entry.start is not None and start_time(pid) != entry.start:
        return False
    if pid in by_session.get(entry.sid or -1, set()):
        now = proc(pid)
        if now is None or now.session != entry.sid:
            return False
    try:
        os.kill(pid, signal.SIGKILL)
        return True
    except ProcessLookupError:
        return False
    except PermissionError as exc:
        log.error("cannot kill pid %d of %s: %s", pid, entry.name, exc)
        return False


def kill_all(entries: Sequence[Entry], roots: Sequence[str], protect: set[int],
             wait: float = KILL_WAIT_SECONDS) -> dict[tuple[str, str], dict[str, Any]]:
    """SIGKILL every process of every entry, again until none is left or ``wait`` runs out;
    per entry, the pids killed and those left. Killing what is already dead is harmless."""
    usable = cgroup_mounts()
    ok_roots = [r for r in roots if r in usable]
    for r in sorted(set(roots) - set(ok_roots)):
        log.error("%s is not a cgroup filesystem here; not killing through it", r)
    killed: dict[tuple[str, str], set[int]] = {e.key: set() for e in entries}
    until = monotonic() + wait
    while True:
        left: dict[tuple[str, str], list[int]] = {e.key: [] for e in entries}
        by_session = sessions() if any(e.sid is not None for e in entries) else {}
        busy = False
        for e in entries:
            dirs = cgroup_dirs(e, ok_roots)
            pids = members(e, dirs, by_session) - protect
            if not pids:
                continue
            busy = True
            for d in dirs:
                if (d / "cgroup.kill").exists():
                    _write(d / "cgroup.kill", "1")  # the whole subtree, forks included
            killed[e.key] |= {pid for pid in pids if _signal(pid, e, by_session)}
            for d in dirs:  # a frozen task dies only once thawed
                if (d / "freezer.state").exists():
                    _write(d / "freezer.state", "THAWED")
                if (d / "cgroup.freeze").exists():
                    _write(d / "cgroup.freeze", "0")
            left[e.key] = sorted(pids)
        if not busy or monotonic() >= until:
            break
        time.sleep(0.02)
    return {e.key: {"name": e.name, "generation": e.generation, "pid": e.pid, "start": e.start,
                    "killed": sorted(killed[e.key])[:PIDS_KEPT],
                    "killed_count": len(killed[e.key]),
                    "left": left[e.key][:PIDS_KEPT]}
            for e in entries}


def _ip() -> str:
    return shutil.which("ip") or shutil.which("ip", path="/usr/sbin:/sbin:/usr/bin:/bin") or "ip"


def addresses(interface: str) -> dict[str, str]:
    """address -> address/prefix of the IPv4 addresses on ``interface``."""
    out = subprocess.run([_ip(), "-o", "-4", "addr", "show", "dev", interface],
                         capture_output=True, text=True, timeout=10).stdout
    found: dict[str, str] = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[2] == "inet":
            found[parts[3].split("/")[0]] = parts[3]
    return found


def proxied(interface: str) -> set[str]:
    """Addresses ``interface`` answers ARP for on another's behalf (a VM's routed VIP)."""
    out = subprocess.run([_ip(), "-4", "neigh", "show", "proxy", "dev", interface],
                         capture_output=True, text=True, timeout=10).stdout
    return {line.split()[0] for line in out.splitlines() if line.split()}


def drop_vips(vips: Iterable[Vip]) -> tuple[list[str], list[str]]:
    """``ip addr del`` each address still on its interface, and ``ip neigh del proxy`` each
    one routed into a VM (its QEMU dies with the fence, but the host would go on answering
    ARP for the address the new owner announces): (removed, errors)."""
    removed: list[str] = []
    errors: list[str] = []
    for vip in sorted(set(vips), key=lambda v: (v.interface, v.address)):
        ip = vip.address.split("/")[0]
        try:
            if ip in proxied(vip.interface):
                r = subprocess.run([_ip(), "neigh", "del", "proxy", ip, "dev", vip.interface],
                                   capture_output=True, text=True, timeout=10)
                if r.returncode != 0 and ip in proxied(vip.interface):
                    errors.append(f"{vip.address} on {vip.interface}: {r.stderr.strip()}")
                else:
                    removed.append(f"{vip.address} (routed) on {vip.interface}")
            here = addresses(vip.interface).get(ip)
            if here is None:
                continue
            r = subprocess.run([_ip(), "addr", "del", here, "dev", vip.interface],
                               capture_output=True, text=True, timeout=10)
            if r.returncode != 0 and ip in addresses(vip.interface):
                errors.append(f"{vip.address} on {vip.interface}: {r.stderr.strip()}")
            else:
                removed.append(f"{vip.address} on {vip.interface}")
        except (OSError, subprocess.SubprocessError) as exc:
            errors.append(f"{vip.address} on {vip.interface}: {exc}")
    return removed, errors


def fence(state: LeaseState, entries: Sequence[Entry], why: str, by: str,
          wait: float = KILL_WAIT_SECONDS) -> dict[str, Any]:
    """Kill ``entries`` and drop their addresses: the one way a fence is done, by the keeper
    and by an agent that finds no keeper alive. Returns the fence's record."""
    began, began_mono = time.time(), monotonic()
    protect = {1, os.getpid()}
    if state.agent_pid is not None and is_alive(state.agent_pid, state.agent_start):
        protect.add(state.agent_pid)
    killed = kill_all(entries, state.cgroup_roots, protect, wait)
    removed, errors = drop_vips(v for e in entries for v in e.vips)
    return {"at": time.time(), "began": began, "monotonic": began_mono,
            "deadline": state.deadline, "boot": state.boot, "by": by, "why": why,
            "instances": [killed[e.key] for e in entries],
            "vips_removed": removed, "vip_errors": errors}


def read_fenced(directory: Path) -> list[dict[str, Any]]:
    """The fence records kept (oldest first); nothing when absent or unreadable."""
    try:
        raw = json.loads(read_bounded(directory / FENCED_FILE, 4 * MAX_FENCED_BYTES))
    except (OSError, ValueError, RecursionError):
        return []
    fences = raw.get("fences") if isinstance(raw, dict) else None
    return [f for f in fences if isinstance(f, dict)] if isinstance(fences, list) else []


def record_fence(directory: Path, record: dict[str, Any]) -> None:
    """Append ``record`` to ``fenced.json``, keeping the last ones within the bound."""
    fd = os.open(directory / FENCED_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # the keeper and an agent's own fence may both write
        fences = [*read_fenced(directory), record][-FENCES_KEPT:]
        while True:  # the oldest go first; the newest is written whole whatever its size
            data = json.dumps({"version": VERSION, "fences": fences}, sort_keys=True).encode()
            if len(data) <= MAX_FENCED_BYTES or len(fences) == 1:
                break
            fences = fences[1:]
        write_private(directory / FENCED_FILE, data)
    finally:
        os.close(fd)


# --- finding a keeper ----------------------------------------------------------------------------

def argv_for(directory: Path) -> list[str]:
    """How the agent starts a keeper: this file as a script, isolated from the environment and
    from site-packages."""
    return [sys.executable, "-I", "-S", str(SCRIPT), "--dir", str(directory)]


def is_keeper_argv(argv: Sequence[str], directory: Path, cwd: str = "/") -> bool:
    """``argv`` runs a keeper for ``directory`` (a relative ``--dir`` read from ``cwd``)."""
    runs = any(a == MODULE or a.endswith("/corral/agent/keeper.py") for a in argv[:6])
    if not runs or "--dir" not in argv:
        return False
    i = list(argv).index("--dir")
    return i + 1 < len(argv) and (os.path.normpath(os.path.join(cwd, argv[i + 1]))
                                  == os.path.abspath(directory))


def is_keeper(pid: int, directory: Path) -> bool:
    try:
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        cwd = "/"
    return is_keeper_argv(cmdline(pid), directory, cwd)


@dataclass(frozen=True)
class Found:
    pid: int
    start: int
    version: int | None = None


def identify(directory: Path) -> Found | None:
    """The keeper ``keeper.pid`` names, if that very process runs and is a keeper for
    ``directory`` (pid, start time and command line all agree)."""
    try:
        raw = _dict(json.loads(read_bounded(directory / PID_FILE, 4096)), "pid file")
        pid, start = _int(raw.get("pid"), "pid", 2), _int(raw.get("start"), "start")
    except (OSError, ValueError):
        return None
    if not is_alive(pid, start) or not is_keeper(pid, directory):
        return None
    version = raw.get("version")
    return Found(pid, start, version if isinstance(version, int) else None)


def find_all(directory: Path) -> list[Found]:
    """Every live keeper process for ``directory`` (a walk of /proc: for cleanup and tests)."""
    out: list[Found] = []
    with contextlib.suppress(OSError):
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            p = proc(int(name))
            if p is not None and p.alive and is_keeper(p.pid, directory):
                out.append(Found(p.pid, p.start))
    return out


def stop(directory: Path, timeout: float = 5.0) -> list[int]:
    """SIGTERM every keeper of ``directory``, SIGKILL what is left after ``timeout``; the pids
    stopped. Each is checked by start time right before it is signalled."""
    found = {f.pid: f for f in find_all(directory)}
    named = identify(directory)
    if named is not None:
        found[named.pid] = named
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for f in found.values():
            if is_alive(f.pid, f.start):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(f.pid, sig)
        until = monotonic() + timeout
        while any(is_alive(f.pid, f.start) for f in found.values()) and monotonic() < until:
            for f in found.values():  # our own child: reap it, or it stays a zombie
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(f.pid, os.WNOHANG)
            time.sleep(0.02)
        if not any(is_alive(f.pid, f.start) for f in found.values()):
            break
    return sorted(found)


# --- the keeper process --------------------------------------------------------------------------

@dataclass
class Keeper:
    directory: Path
    poll: float = POLL_SECONDS
    kill_wait: float = KILL_WAIT_SECONDS
    boot: str = field(default_factory=boot_id)
    state: LeaseState | None = None
    stopping: bool = False
    #: (name, generation) fenced for the deadline ``armed_for``
    done: set[tuple[str, str]] = field(default_factory=set)
    armed_for: float | None = None
    _seen: tuple[int, int, int] | None = None
    _agent_checked: float = -math.inf
    #: a fence that failed is tried again from then on (not at every look)
    _retry_at: float = -math.inf

    def load(self) -> None:
        """Take ``lease.json`` when it changed; a bad one is logged once and ignored."""
        path = self.directory / STATE_FILE
        try:
            st = path.stat()
        except OSError:
            return
        sig = (st.st_ino, st.st_mtime_ns, st.st_size)
        if sig == self._seen:
            return
        self._seen = sig
        try:
            if st.st_size > MAX_STATE_BYTES:
                raise ValueError(f"{st.st_size} bytes, over {MAX_STATE_BYTES}")
            state = read_state(self.directory)
            if state.boot != self.boot:
                raise ValueError(f"written in another boot ({state.boot[:8]}...)")
        except (OSError, ValueError) as exc:
            kept = "the last good one stands" if self.state else "nothing is guarded yet"
            log.error("ignoring %s: %s (%s)", path, exc, kept)
            return
        if self.state is None or state.instances != self.state.instances:
            log.info("guarding %d instance(s): %s", len(state.instances),
                     ", ".join(e.name for e in state.instances) or "none")
        self.state = state

    def step(self) -> str | None:
        """One look; the reason to exit, if there is one."""
        if not self.directory.is_dir():
            return f"{self.directory} is gone"
        self.load()
        state = self.state
        if state is None:
            return None
        now = monotonic()
        if state.deadline != self.armed_for:
            if now < state.deadline:  # renewed: what was fenced for an older deadline is history
                self.done.clear()
            self.armed_for = state.deadline
        if now >= state.deadline and now >= self._retry_at:
            todo = [e for e in state.instances if e.key not in self.done]
            if todo:
                self.fence(state, todo, now)
        if now - self._agent_checked >= AGENT_CHECK_SECONDS:
            self._agent_checked = now
            gone = (state.agent_pid is not None
                    and not is_alive(state.agent_pid, state.agent_start))
            if gone and all(e.key in self.done for e in state.instances):
                return "its agent is gone and nothing it listed is left to guard"
        return None

    def fence(self, state: LeaseState, todo: list[Entry], now: float) -> None:
        agent = ("alive" if state.agent_pid is not None
                 and is_alive(state.agent_pid, state.agent_start) else "gone")
        why = (f"lease ran out {now - state.deadline:.2f}s ago (lease {state.lease:.1f}s, "
               f"fencing {state.window:.1f}s after the last acknowledgement; agent {agent})")
        log.critical("FENCE: %s; killing %s", why, ", ".join(e.name for e in todo))
        try:
            record = fence(state, todo, why, "keeper", self.kill_wait)
        except Exception:  # never die of a fence: log it, and try again in a second
            log.exception("FENCE: failed")
            self._retry_at = monotonic() + 1.0
            return
        self.done |= {e.key for e in todo}
        for inst in record["instances"]:
            log.critical("FENCE: %s: killed %d process(es) %s%s", inst["name"],
                         inst["killed_count"], inst["killed"],
                         f", still there: {inst['left']}" if inst["left"] else "")
        for what in record["vips_removed"]:
            log.critical("FENCE: virtual IP %s removed", what)
        for err in record["vip_errors"]:
            log.error("FENCE: could not remove virtual IP %s", err)
        try:
            record_fence(self.directory, record)
        except OSError as exc:
            log.error("could not record the fence in %s: %s", self.directory, exc)

    def sleep_for(self) -> float:
        state = self.state
        now = monotonic()
        if (state is None or state.deadline <= now
                or all(e.key in self.done for e in state.instances)):
            return self.poll
        return max(0.001, min(self.poll, state.deadline - now))

    def run(self) -> str:
        while not self.stopping:
            try:
                why = self.step()
            except Exception:  # nothing a bad file or a vanished process does may end it
                log.exception("keeper step failed")
                why = None
            if why:
                return why
            time.sleep(self.sleep_for())
        return "asked to stop"


def _setup_log(directory: Path) -> None:
    handler = logging.handlers.RotatingFileHandler(directory / LOG_FILE,
                                                   maxBytes=LOG_MAX_BYTES, backupCount=1)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s keeper[%(process)d]: "
                                           "%(message)s"))
    with contextlib.suppress(OSError):
        os.chmod(directory / LOG_FILE, 0o600)
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="corral-fence-keeper",
                                description="kill this host's guarded instances when its lease "
                                            "runs out (started by the corral agent)")
    p.add_argument("--dir", required=True, type=Path, help="the agent's DATA/fence directory")
    p.add_argument("--poll", type=float, default=POLL_SECONDS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    directory = Path(os.path.abspath(args.dir))
    os.umask(0o077)
    if not directory.is_dir():
        print(f"corral-fence-keeper: {directory} is not a directory", file=sys.stderr)
        return 2
    _setup_log(directory)
    lock = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        other = identify(directory)
        log.info("another keeper (pid %s) guards %s; this one exits",
                 other.pid if other else "?", directory)
        return 0
    keeper = Keeper(directory, poll=max(0.01, args.poll))

    def on_term(signum: int, _frame: object) -> None:
        keeper.stopping = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    with contextlib.suppress(OSError):  # the OOM killer takes workloads before their fence
        Path("/proc/self/oom_score_adj").write_text("-1000")
    me = {"pid": os.getpid(), "start": start_time(os.getpid()), "version": VERSION,
          "boot": keeper.boot}
    write_private(directory / PID_FILE, json.dumps(me).encode())
    log.info("keeper %d (version %d) started for %s", os.getpid(), VERSION, directory)
    why = keeper.run()
    log.info("keeper %d exits: %s", os.getpid(), why)
    with contextlib.suppress(OSError, ValueError):
        if json.loads((directory / PID_FILE).read_text()).get("pid") == os.getpid():
            (directory / PID_FILE).unlink()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
