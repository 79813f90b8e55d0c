"""Log capture for every instance this agent holds: stdout, stderr and the files it tails.

Each source is one :class:`corral.telemetry.capture.LogCapture` (numbered batches to the
CORRAL_LOGS stream, offsets saved only after JetStream acknowledged), with its offsets under
``<workdir>/capture/<source>.json``. So an agent killed with -9 and started again publishes the
unacknowledged batch once more with the same line numbers: nothing lost, and a sink drops the
repeat by number. The pump runs every ~0.2 s on the agent's own NATS connection; while the bus
is away it simply fails and tries again, the files keep growing, the offsets hold the place.

A ``tail`` path is read where the workload sees it, on whichever host it runs. An absolute path
is inside the instance's root filesystem when it has one (a container's root, a ``--from`` or
image root), else a host path the operator chose. A relative path is inside the instance's own
disk: its working directory (a plain process's ``DISK_ROOT/NAME``, so it moves with a migration)
or a container's root. Such a file is opened with ``openat2`` and ``RESOLVE_IN_ROOT`` (a root:
absolute symlinks stay inside, as the container sees them) or ``RESOLVE_BENEATH`` (a working
directory: any way out is refused), so no symlink or ``..`` planted by the workload makes the
agent open, let alone publish, a file outside; without ``openat2`` the file opened is checked
to lie inside (``/proc/self/fd``) before a byte is read. Only regular files are read (a FIFO
would block the agent). Before an instance is deleted (its workdir goes with it) the delete
handler calls :meth:`CaptureManager.before_delete`, which pumps once more and stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from corral.agent.state import AgentState
from corral.agent.store import InstanceRecord
from corral.telemetry.capture import LogCapture

log = logging.getLogger(__name__)

PUMP_SECONDS = 0.2
#: a delete waits at most this long for the last lines to reach the bus.
FINAL_PUMP_TIMEOUT = 5.0
CAPTURE_DIR = "capture"
#: written by the driver into the agent's workdir, never by the workload's own paths.
WORKDIR_SOURCES = ("stdout", "stderr")


def _driver_root(rec: InstanceRecord) -> Path | None:
    """The root directory the driver was given (its disk, a ``--from`` path, an image root)."""
    spec = rec.handle.data.get("spec") if isinstance(rec.handle.data, dict) else None
    root = (spec or {}).get("rootfs") or rec.spec.rootfs
    return Path(str(root)) if root else None


def instance_root(rec: InstanceRecord) -> Path | None:
    """The root filesystem the driver was given (the agent may have made one), if any."""
    if rec.extra.get("cwd_disk"):
        return None  # a plain process's disk is its working directory, not its root
    return _driver_root(rec)


def instance_cwd(rec: InstanceRecord, workdir: Path) -> Path:
    """Where a relative ``tail`` path starts: the workload's working directory (a plain
    process runs in its disk, or its ``--from``/image root) or a container's root."""
    return _driver_root(rec) or workdir


@dataclass(frozen=True)
class TailPath:
    """Where one tailed file is: ``rel`` under ``base`` (confined), or ``base`` alone (a host
    path, ``rel`` empty). ``in_root``: ``base`` is the workload's ``/``, not its cwd."""

    base: Path
    rel: str = ""
    in_root: bool = False

    @property
    def path(self) -> Path:
        return self.base / self.rel if self.rel else self.base


def tail_path(rec: InstanceRecord, workdir: Path, path: str) -> TailPath:
    root = instance_root(rec)
    if root is not None:
        return TailPath(root, path.lstrip("/") or ".", in_root=True)
    if path.startswith("/"):
        return TailPath(Path(path))  # a plain process's absolute path: on the host, as given
    return TailPath(instance_cwd(rec, workdir), path)


def _inside(real: str, real_root: str) -> bool:
    return real == real_root or real.startswith(real_root.rstrip("/") + "/")


class Refused(Exception):
    """A tailed path that is not read: it leads out of the instance's disk, or is not a file."""


# -- opening without leaving the disk ------------------------------------------------------------
_SYS_OPENAT2 = 437  # the same number on every Linux architecture (a syscall newer than 5.1)
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_BENEATH = 0x08
_RESOLVE_IN_ROOT = 0x10
_OPEN_FLAGS = os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


_libc: Any = None
#: False once the kernel (or a seccomp filter) refused openat2: the checked fallback is used
openat2_usable = True


def _openat2(dirfd: int, rel: str, resolve: int) -> int:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.syscall.restype = ctypes.c_long
    how = _OpenHow(_OPEN_FLAGS, 0, resolve)
    fd = int(_libc.syscall(ctypes.c_long(_SYS_OPENAT2), ctypes.c_int(dirfd),
                           ctypes.c_char_p(os.fsencode(rel)), ctypes.byref(how),
                           ctypes.c_size_t(ctypes.sizeof(how))))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), rel)
    return fd


def open_confined(base: Path, rel: str, in_root: bool) -> int:
    """A read-only fd of ``base/rel`` that never left ``base`` on the way (``in_root``:
    ``base`` is ``/``, absolute symlinks start there). Raises :class:`Refused` for a way out,
    FileNotFoundError while there is nothing there yet."""
    global openat2_usable
    dirfd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if openat2_usable:
            resolve = _RESOLVE_NO_MAGICLINKS | (_RESOLVE_IN_ROOT if in_root else _RESOLVE_BENEATH)
            try:
                return _openat2(dirfd, rel, resolve)
            except OSError as exc:
                if exc.errno == errno.EXDEV:
                    raise Refused(f"{rel} leads out of {base}") from None
                if exc.errno == errno.ELOOP:
                    raise Refused(f"{rel}: too many symlinks, or a /proc link") from None
                if exc.errno not in (errno.ENOSYS, errno.EPERM):
                    raise
                openat2_usable = False
                log.info("openat2 is not available (%s); tailed files are checked after "
                         "opening instead", exc.strerror)
        return _open_checked(base, rel)
    finally:
        os.close(dirfd)


def _open_checked(base: Path, rel: str) -> int:
    """Without openat2: refuse what resolves outside now, open, then make sure the file
    opened is inside ``base`` (what ``/proc/self/fd`` says, whatever was swapped meanwhile)."""
    real_base = os.path.realpath(base)
    if not _inside(os.path.realpath(base / rel), real_base):
        raise Refused(f"{rel} leads out of {base}")
    fd = os.open(base / rel, _OPEN_FLAGS)
    try:
        opened = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        opened = ""
    if not _inside(opened, real_base):
        os.close(fd)
        raise Refused(f"{rel} leads out of {base}")
    return fd


class TailCapture(LogCapture):
    """A tailed file, opened confined to the instance's disk (or as given, for a host path),
    and only when it is a regular file. ``refused`` says why it was not read, if it was not."""

    def __init__(self, where: TailPath, state: Path, host: str, instance: str,
                 source: str) -> None:
        super().__init__(where.path, state, host, instance, source)
        self.where = where
        self.refused: str | None = None

    def _fd(self) -> int:
        w = self.where
        if not w.rel:
            return os.open(w.base, _OPEN_FLAGS)
        return open_confined(w.base, w.rel, w.in_root)

    def open(self) -> IO[bytes] | None:
        try:
            fd = self._fd()
        except (FileNotFoundError, NotADirectoryError):
            self.refused = None
            return None
        except Refused as exc:
            self.refused = str(exc)
            return None
        except OSError as exc:
            self.refused = f"{self.path}: {exc.strerror or exc}"
            return None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            self.refused = f"{self.path} is not a regular file"
            return None
        self.refused = None
        return os.fdopen(fd, "rb")


def skip_copied_lines(rec: InstanceRecord, workdir: Path) -> list[str]:
    """A copy made from a disk that came from another host (a migration, a standby, a shelf)
    tails files that hold what the copies before it wrote, which their own hosts captured
    (an agent pumps a copy's last lines before it is deleted). Read from their start, every
    line came again after each move. Called when such a copy is created, before it runs: each
    tailed file is read from its end as it is now, so every line this copy writes is captured
    and none before it. Returns the sources skipped."""
    cdir = workdir / CAPTURE_DIR
    cdir.mkdir(parents=True, exist_ok=True)
    skipped = []
    for src, path in rec.spec.tail.items():
        cap = TailCapture(tail_path(rec, workdir, path), cdir / f"{src}.json", "", rec.name, src)
        try:
            if cap.skip_existing():
                skipped.append(src)
        except OSError as exc:  # the copy runs anyway; its file is then read from its start
            log.warning("%s/%s: cannot note where its copied file ends: %s", rec.name, src, exc)
    return skipped


@dataclass
class _Held:
    captures: dict[str, LogCapture]
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    refused: set[str] = field(default_factory=set)


class CaptureManager:
    def __init__(self, state: AgentState, host: str, interval: float = PUMP_SECONDS) -> None:
        self.state = state
        self.host = host
        self.interval = interval
        self.js: Any = None
        self._held: dict[str, _Held] = {}
        #: names whose delete is under way: not captured again until their lock is released.
        self._deleting: set[str] = set()
        self.sent = 0

    def _hold(self, rec: InstanceRecord) -> _Held:
        workdir = self.state.store.dir_for(rec.name)
        cdir = workdir / CAPTURE_DIR
        cdir.mkdir(parents=True, exist_ok=True)
        caps: dict[str, LogCapture] = {
            src: LogCapture(workdir / f"{src}.log", cdir / f"{src}.json", self.host, rec.name,
                            src) for src in WORKDIR_SOURCES}
        for src, path in rec.spec.tail.items():
            caps[src] = TailCapture(tail_path(rec, workdir, path), cdir / f"{src}.json",
                                    self.host, rec.name, src)
        return _Held(caps)

    def sync(self) -> None:
        """Start capturing new instances; forget those that are gone."""
        records = self.state.records
        for name in list(self._deleting):
            if not self.state.lock(name).locked():
                self._deleting.discard(name)  # the delete ended (or failed: capture resumes)
        for name in [n for n in self._held if n not in records]:
            del self._held[name]
        for name, rec in list(records.items()):
            if name not in self._held and name not in self._deleting:
                try:
                    self._held[name] = self._hold(rec)
                except OSError as exc:  # workdir vanishing under a concurrent delete
                    log.warning("cannot capture %s yet: %s", name, exc)

    async def _pump(self, name: str, held: _Held) -> int:
        sent = 0
        async with held.lock:
            for src, cap in held.captures.items():
                n = await cap.pump(self.js)
                why = cap.refused if isinstance(cap, TailCapture) else None
                if why is None:
                    held.refused.discard(src)
                elif src not in held.refused:
                    held.refused.add(src)
                    log.warning("not capturing %s/%s: %s", name, src, why)
                sent += n
                self.sent += n
        return sent

    def lag_bytes(self) -> int:
        """What the instances wrote that the bus has not got yet, over every source."""
        return sum(cap.lag_bytes for held in list(self._held.values())
                   for cap in held.captures.values())

    async def pump_all(self) -> int:
        sent = 0
        for name, held in list(self._held.items()):
            sent += await self._pump(name, held)
        return sent

    async def before_delete(self, name: str) -> None:
        """The last lines of ``name`` go out (bounded wait), then its capture stops."""
        self._deleting.add(name)
        held = self._held.pop(name, None)
        if held is None or self.js is None:
            return
        try:
            await asyncio.wait_for(self._pump(name, held), FINAL_PUMP_TIMEOUT)
        except Exception as exc:
            log.warning("last lines of %s may not have reached the bus: %s", name,
                        exc or type(exc).__name__)

    async def run(self, nc: Any, stop: asyncio.Event) -> None:
        """Pump every ``interval`` until ``stop``; bus failures are retried, never fatal."""
        # the server makes the stream (a host may not touch the JetStream API): until it is
        # there, a pump fails and the next one tries again
        self.js = nc.jetstream()
        failing = False
        while not stop.is_set():
            self.sync()
            try:
                await self.pump_all()
                if failing:
                    log.info("log capture is publishing again")
                failing = False
            except Exception as exc:
                if not failing:
                    log.warning("log capture paused (%s); offsets hold the place",
                                exc or type(exc).__name__)
                failing = True
                await _sleep_or_stop(stop, 1.0)
            await _sleep_or_stop(stop, self.interval)


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)
