"""Log capture for every instance this agent holds: stdout, stderr and the files it tails.

Each source is one :class:`corral.telemetry.capture.LogCapture` (numbered batches to the
CORRAL_LOGS stream, offsets saved only after JetStream acknowledged), with its offsets under
``<workdir>/capture/<source>.json``. So an agent killed with -9 and started again publishes the
unacknowledged batch once more with the same line numbers: nothing lost, and a sink drops the
repeat by number. The pump runs every ~0.2 s on the agent's own NATS connection (sooner again
right after it sent lines: see :data:`BUSY_PUMP_SECONDS`); while the bus is away it simply
fails and tries again, the files keep growing, the offsets hold the place.

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

Between pumps the manager also waits on inotify: each file a capture opened is watched (through
``/proc/self/fd``, so the watch is on the very file opened, confined like the read), and a write
to any of them starts the next pump at once (or :data:`LINGER_SECONDS` after a pump that sent
lines). A line then reaches the bus in tens of milliseconds rather than up to a whole interval
(the p99 of a line's latency at 2,000 lines/s was the 0.2 s interval). The interval stays, for
files not there yet and for when inotify is not to be had (no watches left: the pump polls as
before). A wake pumps every file, so after a pump the manager rests four times what it spent on
files that had nothing new: one chatty file cannot make an agent with many instances check all
the others without pause.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import functools
import logging
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from inotify_simple import INotify
from inotify_simple import flags as F

from corral.agent.state import AgentState
from corral.agent.store import InstanceRecord
from corral.telemetry.capture import LogCapture

log = logging.getLogger(__name__)

PUMP_SECONDS = 0.2
#: the polling wait after a pump that sent lines, doubled after each pump that sent none (0.01,
#: 0.02, 0.04, 0.08 s) and then the interval again: a burst's next lines are not held for a
#: whole interval (where inotify is not to be had), while an idle agent still pumps every
#: ``PUMP_SECONDS`` (each pump opens every captured file)
BUSY_PUMP_SECONDS = 0.01
_BUSY_DOUBLINGS_UNTIL = 0.05
#: after a pump, rest this many times what it spent on files with nothing new
IDLE_SHARE_FACTOR = 4.0
#: after a pump that sent lines, the next one waits this long, write or not: the lines written
#: meanwhile go out as one batch. A batch per write (5 lines each at 2,000 lines/s) cost the
#: server, the bus and every follower so much per message that they fell seconds behind.
LINGER_SECONDS = 0.02
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


class _Wakeup:
    """Sets ``event`` when a watched file is written. Watches are per file (device and inode),
    added when a capture opens the file and removed once no capture reads that file."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self._ino: INotify | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wds: dict[tuple[int, int], int] = {}
        self._key_of: dict[LogCapture, tuple[int, int]] = {}
        self._said = False

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            self._ino = INotify(nonblocking=True)
        except OSError as exc:
            log.info("no inotify for log capture (%s): files are polled", exc.strerror)
            return
        self._loop = loop
        loop.add_reader(self._ino.fileno(), self._readable)

    def close(self) -> None:
        if self._ino is not None:
            if self._loop is not None:
                self._loop.remove_reader(self._ino.fileno())
            self._ino.close()
            self._ino = None
        self._wds.clear()
        self._key_of.clear()

    def _readable(self) -> None:
        assert self._ino is not None
        try:
            events = self._ino.read(timeout=0)
        except OSError:
            events = []
        gone = {ev.wd for ev in events if ev.mask & F.IGNORED}
        if gone:  # the file was deleted: its inode number may come back as another file
            for key in [k for k, wd in self._wds.items() if wd in gone]:
                del self._wds[key]
        self.event.set()

    def watch(self, cap: LogCapture, fd: int) -> None:
        if self._ino is None:
            return
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        self._key_of[cap] = key
        if key in self._wds:
            return
        try:
            self._wds[key] = self._ino.add_watch(f"/proc/self/fd/{fd}", F.MODIFY)
        except OSError as exc:  # e.g. out of watches: this file is polled
            if not self._said:
                log.warning("cannot watch %s for writes (%s): it is polled", cap.path,
                            exc.strerror)
                self._said = True

    def keep(self, caps: set[LogCapture]) -> None:
        """Forget the captures not in ``caps`` and unwatch the files none of them reads."""
        for cap in [c for c in self._key_of if c not in caps]:
            del self._key_of[cap]
        live = set(self._key_of.values())
        for key in [k for k in self._wds if k not in live]:
            wd = self._wds.pop(key)
            if self._ino is not None:
                with contextlib.suppress(OSError):  # gone with its file already
                    self._ino.rm_watch(wd)


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
        self._wakeup = _Wakeup()
        #: False: writes do not start a pump (only the interval does)
        self.wake_on_write = True
        #: time the pumps spent on files that had nothing new (what a wake costs beyond the
        #: lines it moves)
        self._idle_seconds = 0.0

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
        for cap in caps.values():
            cap.on_open = functools.partial(self._wakeup.watch, cap)
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
        self._wakeup.keep({cap for held in self._held.values()
                           for cap in held.captures.values()})

    async def _pump(self, name: str, held: _Held) -> int:
        sent = 0
        async with held.lock:
            for src, cap in held.captures.items():
                began = time.monotonic()
                n = await cap.pump(self.js)
                if not n:
                    self._idle_seconds += time.monotonic() - began
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
        """Pump every ``interval``, on a write to a captured file, and soon again after a pump
        that sent lines, until ``stop``; bus failures are retried, never fatal."""
        # the server makes the stream (a host may not touch the JetStream API): until it is
        # there, a pump fails and the next one tries again
        self.js = nc.jetstream()
        self._wakeup.start(asyncio.get_running_loop())
        try:
            await self._run(stop)
        finally:
            self._wakeup.close()

    async def _run(self, stop: asyncio.Event) -> None:
        failing = False
        wait = self.interval
        while not stop.is_set():
            self.sync()
            self._idle_seconds = 0.0
            self._wakeup.event.clear()  # a write from now on (even during the pump) wakes it
            try:
                sent = await self.pump_all()
                if failing:
                    log.info("log capture is publishing again")
                failing = False
            except Exception as exc:
                if not failing:
                    log.warning("log capture paused (%s); offsets hold the place",
                                exc or type(exc).__name__)
                failing = True
                sent = 0
                await _sleep_or_stop(stop, 1.0)
            if sent:
                wait = BUSY_PUMP_SECONDS
            else:
                wait = wait * 2 if wait < _BUSY_DOUBLINGS_UNTIL else self.interval
            # a wake pumps every instance's files: checking the idle ones may take at most a
            # fifth of the time (a pump's length is no measure: it goes on while lines come,
            # and resting as long as it took held lines back for up to an interval)
            rest = min(self.interval, IDLE_SHARE_FACTOR * self._idle_seconds)
            if sent:
                rest = max(rest, LINGER_SECONDS)
            await _sleep_or_stop(stop, rest)
            if self.wake_on_write:
                await _wait_any(stop, self._wakeup.event, max(0.0, wait - rest))
            else:
                await _sleep_or_stop(stop, max(0.0, wait - rest))


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)


async def _wait_any(stop: asyncio.Event, wake: asyncio.Event, seconds: float) -> None:
    """Until ``stop`` or ``wake`` is set, or ``seconds`` passed."""
    if stop.is_set() or wake.is_set():
        return
    waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(wake.wait())]
    try:
        await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
