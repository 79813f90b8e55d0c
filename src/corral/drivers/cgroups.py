"""Cgroups, v1 and v2, behind one small interface: create, join, read counters, freeze, remove.

Both versions are still met in the field (Debian 12 hosts booted with hybrid v1, newer ones with
the unified v2 hierarchy), and the layout is found at run time from ``/proc/self/mountinfo``
rather than assumed at ``/sys/fs/cgroup``: an agent started under ``ip netns exec`` gets a fresh
``/sys`` without any cgroup mounts, and saying so beats reading files that are not there.

A cgroup is named by a path relative to the hierarchy root (``corral/<scope>/<name>``), the same
string runc takes as ``cgroupsPath``, so the runc driver reads the counters of the cgroups runc
made and the process driver makes its own at the same place.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

from corral.errors import DriverError

MOUNTINFO = Path("/proc/self/mountinfo")
#: v1 controllers the process driver needs to count, limit and freeze a tree exactly.
V1_NEEDED = ("cpuacct", "memory", "freezer")
#: a freeze keeps retrying this long (a forking tree on v1 can take several passes)
_FREEZE_TIMEOUT = 20.0
#: each pass waits this long for FROZEN before writing it again
_FREEZE_POLL = 0.1
#: every this many passes, thaw a moment so a task stuck mid-fork can finish
_THAW_EVERY = 10


@dataclass(frozen=True)
class Mounts:
    """Where the cgroup hierarchies are: v1 controller -> mount point, and the v2 mount."""

    v1: dict[str, Path] = field(default_factory=dict)
    v2: Path | None = None
    #: every v1 mount (named ones like ``name=systemd`` too): runc puts a cgroup in each.
    v1_all: tuple[Path, ...] = ()

    @property
    def unified(self) -> bool:
        """True on a pure v2 host (runc's own test: ``/sys/fs/cgroup`` itself is cgroup2)."""
        return self.v2 is not None and not self.v1


def _unescape(path: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes (``\\040``)."""
    out, i = [], 0
    while i < len(path):
        if path[i] == "\\" and i + 4 <= len(path) and path[i + 1 : i + 4].isdigit():
            out.append(chr(int(path[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(path[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> Mounts:
    v1: dict[str, Path] = {}
    v1_all: list[Path] = []
    v2: Path | None = None
    for line in text.splitlines():
        if " - " not in line:
            continue
        left, right = line.split(" - ", 1)
        lf, rf = left.split(), right.split()
        if len(lf) < 5 or len(rf) < 3:
            continue
        mountpoint, fstype, superopts = Path(_unescape(lf[4])), rf[0], rf[2]
        if fstype == "cgroup2":
            if v2 is None or mountpoint == Path("/sys/fs/cgroup"):
                v2 = mountpoint
        elif fstype == "cgroup":
            v1_all.append(mountpoint)
            for opt in superopts.split(","):
                if opt in ("rw", "ro") or "=" in opt or opt.startswith("no") or opt in (
                    "relatime", "clone_children", "xattr", "cpuset_v2_mode", "favordynmods"
                ):
                    continue
                v1.setdefault(opt, mountpoint)
    return Mounts(v1=v1, v2=v2, v1_all=tuple(v1_all))


def read_mounts(path: Path = MOUNTINFO) -> Mounts:
    try:
        return parse_mountinfo(path.read_text())
    except OSError:
        return Mounts()


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (FileNotFoundError, ProcessLookupError, NotADirectoryError):
        return None


def _write(path: Path, value: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError as e:
        raise DriverError(f"cannot write {value.strip()!r} to {path}: {e.strerror}",
                          hint="is the cgroup filesystem mounted read-write, and are you root?"
                          ) from e


def own_cgroup_v2(path: Path = Path("/proc/self/cgroup")) -> str | None:
    """This process's v2 cgroup path (``0::/...`` line), without the leading slash."""
    text = _read(path) or ""
    for line in text.splitlines():
        if line.startswith("0::"):
            return line[3:].strip().lstrip("/")
    return None


class Hierarchy(ABC):
    """One cgroup layout; every method takes the cgroup's path relative to the hierarchy root."""

    version: int

    @abstractmethod
    def dirs(self, rel: str) -> list[Path]:
        """Every directory that makes up the cgroup (one per v1 mount, one on v2)."""

    @abstractmethod
    def procs_files(self, rel: str) -> list[Path]:
        """The ``cgroup.procs`` files a pid is written to, to join the cgroup."""

    @abstractmethod
    def cpu_ns(self, rel: str) -> int | None: ...

    @abstractmethod
    def memory_bytes(self, rel: str) -> int | None: ...

    @abstractmethod
    def set_frozen(self, rel: str, frozen: bool) -> None: ...

    @abstractmethod
    def is_frozen(self, rel: str) -> bool: ...

    @abstractmethod
    def set_limits(self, rel: str, cpus: float, memory_bytes: int) -> None: ...

    @property
    @abstractmethod
    def can_freeze(self) -> bool: ...

    def create(self, rel: str) -> None:
        for d in self.dirs(rel):
            d.mkdir(parents=True, exist_ok=True)

    def exists(self, rel: str) -> bool:
        return any(d.is_dir() for d in self.dirs(rel))

    def pids(self, rel: str) -> list[int]:
        """Processes in the cgroup (from the first hierarchy that has it)."""
        for f in self.procs_files(rel):
            text = _read(f)
            if text is not None:
                return [int(x) for x in text.split()]
        return []

    @abstractmethod
    def is_thawed(self, rel: str) -> bool:
        """Neither frozen nor on the way to it (a v1 cgroup may sit in FREEZING, where its
        frozen tasks ignore even SIGKILL until it is thawed)."""

    def freeze(self, rel: str, timeout: float = _FREEZE_TIMEOUT) -> None:
        """Freeze, retrying: a tree that forks while it is being frozen can leave a v1 cgroup
        in FREEZING (a task caught mid-fork is missed), and writing FROZEN again sweeps the
        tasks the last pass missed; now and then a short thaw lets a stuck fork finish (runc
        does the same). A freeze that does not complete is undone, never left half-done."""
        deadline = time.monotonic() + timeout
        attempt = 0
        while True:
            self.set_frozen(rel, True)
            left = max(0.0, deadline - time.monotonic())
            if self._wait_state(rel, True, min(_FREEZE_POLL, left)):
                return
            attempt += 1
            if time.monotonic() >= deadline:
                break
            if attempt % _THAW_EVERY == 0:
                self.set_frozen(rel, False)
                time.sleep(0.01)
        with contextlib.suppress(DriverError):
            self.thaw(rel)
        raise DriverError(f"cgroup {rel} did not freeze within {timeout:.0f} s "
                          f"({attempt} attempts); it was thawed again",
                          hint="a task stuck in the kernel (D state) blocks the freezer; "
                          "retry later", retryable=True)

    def thaw(self, rel: str) -> None:
        self.set_frozen(rel, False)
        if not self._wait_state(rel, False, _FREEZE_TIMEOUT):
            raise DriverError(f"cgroup {rel} did not thaw within {_FREEZE_TIMEOUT:.0f} s",
                              hint="retry; see the cgroup's freezer state", retryable=True)

    def _wait_state(self, rel: str, frozen: bool, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not (self.is_frozen(rel) if frozen else self.is_thawed(rel)):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)
        return True

    def remove(self, rel: str, timeout: float = 5.0) -> None:
        """rmdir every directory of the cgroup; it must hold no process (retried while the
        kernel finishes tearing down tasks that were just killed)."""
        deadline = time.monotonic() + timeout
        for d in reversed(self.dirs(rel)):
            while True:
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as e:
                    if e.errno != errno.EBUSY or time.monotonic() > deadline:
                        raise DriverError(f"cannot remove cgroup {d}: {e.strerror}",
                                          hint="a process is still in it; stop the instance "
                                          "first") from e
                    time.sleep(0.02)


class V1Hierarchy(Hierarchy):
    """Cgroup v1: one mount per controller (or group of co-mounted controllers)."""

    version = 1

    def __init__(self, mounts: Mounts, controllers: tuple[str, ...] = V1_NEEDED,
                 everywhere: bool = False) -> None:
        self.mounts = mounts
        self.controllers = controllers
        #: with ``everywhere``, dirs() lists every v1 mount and the hybrid v2 one, as runc does.
        self.everywhere = everywhere

    def _roots(self) -> list[Path]:
        if self.everywhere:
            roots = list(self.mounts.v1_all)
            if self.mounts.v2 is not None:
                roots.append(self.mounts.v2)
        else:
            roots = [self.mounts.v1[c] for c in self.controllers if c in self.mounts.v1]
        seen: list[Path] = []
        for r in roots:
            if r not in seen:
                seen.append(r)
        return seen

    def dirs(self, rel: str) -> list[Path]:
        return [root / rel for root in self._roots()]

    def _dir(self, controller: str, rel: str) -> Path | None:
        root = self.mounts.v1.get(controller)
        return None if root is None else root / rel

    def procs_files(self, rel: str) -> list[Path]:
        return [d / "cgroup.procs" for d in self.dirs(rel)]

    def cpu_ns(self, rel: str) -> int | None:
        d = self._dir("cpuacct", rel)
        text = None if d is None else _read(d / "cpuacct.usage")
        return None if text is None else int(text)

    def memory_bytes(self, rel: str) -> int | None:
        d = self._dir("memory", rel)
        text = None if d is None else _read(d / "memory.usage_in_bytes")
        return None if text is None else int(text)

    @property
    def can_freeze(self) -> bool:
        return "freezer" in self.mounts.v1

    def set_frozen(self, rel: str, frozen: bool) -> None:
        d = self._dir("freezer", rel)
        if d is None:
            raise DriverError("no v1 freezer controller is mounted", hint="mount the freezer")
        _write(d / "freezer.state", "FROZEN" if frozen else "THAWED")

    def _freezer_state(self, rel: str) -> str | None:
        d = self._dir("freezer", rel)
        text = None if d is None else _read(d / "freezer.state")
        return None if text is None else text.strip()

    def is_frozen(self, rel: str) -> bool:
        return self._freezer_state(rel) == "FROZEN"

    def is_thawed(self, rel: str) -> bool:
        return self._freezer_state(rel) in ("THAWED", None)

    def set_limits(self, rel: str, cpus: float, memory_bytes: int) -> None:
        cpu = self._dir("cpu", rel)
        if cpus > 0 and cpu is not None:
            cpu.mkdir(parents=True, exist_ok=True)
            _write(cpu / "cpu.cfs_period_us", "100000")
            _write(cpu / "cpu.cfs_quota_us", str(max(1000, int(cpus * 100000))))
        mem = self._dir("memory", rel)
        if memory_bytes > 0 and mem is not None:
            _write(mem / "memory.limit_in_bytes", str(memory_bytes))


class V2Hierarchy(Hierarchy):
    """Cgroup v2: one tree; counters from ``cpu.stat`` (always there) and ``memory.current``
    (only where the memory controller is enabled for the cgroup)."""

    version = 2

    def __init__(self, root: Path) -> None:
        self.root = root

    def dirs(self, rel: str) -> list[Path]:
        return [self.root / rel]

    def procs_files(self, rel: str) -> list[Path]:
        return [self.root / rel / "cgroup.procs"]

    def create(self, rel: str) -> None:
        """Make the cgroup, enabling cpu and memory on the way down where the parent has them
        (best effort: a delegated subtree may not be allowed to)."""
        parts = [p for p in rel.split("/") if p]
        cur = self.root
        for part in parts:
            avail = (_read(cur / "cgroup.controllers") or "").split()
            wanted = " ".join(f"+{c}" for c in ("cpu", "memory") if c in avail)
            if wanted:
                try:
                    with open(cur / "cgroup.subtree_control", "w") as f:
                        f.write(wanted)
                except OSError:
                    pass
            cur = cur / part
            cur.mkdir(exist_ok=True)

    def cpu_ns(self, rel: str) -> int | None:
        text = _read(self.root / rel / "cpu.stat")
        if text is None:
            return None
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "usage_usec":
                return int(value) * 1000
        return None

    def memory_bytes(self, rel: str) -> int | None:
        text = _read(self.root / rel / "memory.current")
        return None if text is None else int(text)

    @property
    def can_freeze(self) -> bool:
        return True  # cgroup.freeze is core v2 (Linux >= 5.2), no controller to mount

    def set_frozen(self, rel: str, frozen: bool) -> None:
        _write(self.root / rel / "cgroup.freeze", "1" if frozen else "0")

    def is_frozen(self, rel: str) -> bool:
        text = _read(self.root / rel / "cgroup.events") or ""
        return any(line.strip() == "frozen 1" for line in text.splitlines())

    def is_thawed(self, rel: str) -> bool:
        asked = (_read(self.root / rel / "cgroup.freeze") or "0").strip()
        return asked == "0" and not self.is_frozen(rel)

    def set_limits(self, rel: str, cpus: float, memory_bytes: int) -> None:
        d = self.root / rel
        if cpus > 0 and (d / "cpu.max").exists():
            _write(d / "cpu.max", f"{max(1000, int(cpus * 100000))} 100000")
        if memory_bytes > 0 and (d / "memory.max").exists():
            _write(d / "memory.max", str(memory_bytes))


def probe(hier: Hierarchy, rel: str) -> str | None:
    """None if a child cgroup can be made (and removed) under ``rel``, else why not."""
    test = f"{rel}/.probe-{os.getpid()}"
    parts = [p for p in rel.split("/") if p]
    # the parents this probe makes are removed again: it leaves the hierarchy as it found it
    made = [a for a in ("/".join(parts[: i + 1]) for i in range(len(parts)))
            if not hier.exists(a)]
    try:
        hier.create(test)
        ok = all(os.access(f, os.W_OK) for f in hier.procs_files(test))
        hier.remove(test, timeout=1.0)
    except (OSError, DriverError) as e:
        return f"cannot create cgroups under {rel}: {e}"
    finally:
        for parent in reversed(made):
            for d in hier.dirs(parent):
                with contextlib.suppress(OSError):
                    d.rmdir()
    return None if ok else f"cgroup.procs under {rel} is not writable"


def for_process_driver(scope: str, mounts: Mounts | None = None) -> tuple[Hierarchy, str] | str:
    """The hierarchy and the parent path (``corral/<scope>``) the process driver should use, or
    the reason it cannot use cgroups here.

    v1 (as root) needs cpuacct, memory and freezer. v2 is used as root at the top of the tree, or
    without root inside this process's own cgroup when it was delegated to us (writable).
    """
    m = mounts or read_mounts()
    if m.v1:
        missing = [c for c in V1_NEEDED if c not in m.v1]
        if missing:
            return f"cgroup v1 controllers missing: {', '.join(missing)}"
        if os.geteuid() != 0:
            return "cgroup v1 needs root"
        hier: Hierarchy = V1Hierarchy(m, (*V1_NEEDED, "cpu"))
        parent = f"corral/{scope}"
    elif m.v2 is not None:
        hier = V2Hierarchy(m.v2)
        if os.geteuid() == 0:
            parent = f"corral/{scope}"
        else:
            own = own_cgroup_v2()
            if own is None or not os.access(m.v2 / own, os.W_OK):
                return "no writable (delegated) cgroup v2 for this user"
            parent = f"{own}/corral/{scope}"
    else:
        return ("no cgroup filesystem is mounted "
                "(an agent under 'ip netns exec' loses /sys/fs/cgroup)")
    reason = probe(hier, parent)
    return reason if reason else (hier, parent)


def remove_scope(scope: str, mounts: Mounts | None = None) -> list[Path]:
    """Best effort: remove the ``corral/<scope>`` parents an agent's drivers made, in every
    hierarchy, once they are empty (for an agent shutting down, or a test's finalizer). Drivers
    never remove them on their own, since another instance of the same agent may be starting.
    Returns the directories that could not be removed (still in use)."""
    m = mounts or read_mounts()
    roots = list(m.v1_all) + ([m.v2] if m.v2 is not None else [])
    left: list[Path] = []
    for root in roots:
        d = root / "corral" / scope
        if not d.is_dir():
            continue
        try:
            d.rmdir()
        except OSError:
            left.append(d)
    return left
