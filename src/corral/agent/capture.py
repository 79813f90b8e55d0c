"""Log capture for every instance this agent holds: stdout, stderr and the files it tails.

Each source is one :class:`corral.telemetry.capture.LogCapture` (numbered batches to the
CORRAL_LOGS stream, offsets saved only after JetStream acknowledged), with its offsets under
``<workdir>/capture/<source>.json``. So an agent killed with -9 and started again publishes the
unacknowledged batch once more with the same line numbers: nothing lost, and a sink drops the
repeat by number. The pump runs every ~0.2 s on the agent's own NATS connection; while the bus
is away it simply fails and tries again, the files keep growing, the offsets hold the place.

A ``tail`` path is inside the instance's root filesystem when it has one; a path that resolves
outside that root (a symlink planted by the workload) is refused, so a container cannot make the
agent publish the host's files. Before an instance is deleted (its workdir goes with it) the
delete handler calls :meth:`CaptureManager.before_delete`, which pumps once more and stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corral.agent.state import AgentState
from corral.agent.store import InstanceRecord
from corral.bus import streams
from corral.telemetry.capture import LogCapture

log = logging.getLogger(__name__)

PUMP_SECONDS = 0.2
#: a delete waits at most this long for the last lines to reach the bus.
FINAL_PUMP_TIMEOUT = 5.0
CAPTURE_DIR = "capture"
#: written by the driver into the agent's workdir, never by the workload's own paths.
WORKDIR_SOURCES = frozenset({"stdout", "stderr"})


def instance_root(rec: InstanceRecord) -> Path | None:
    """The root filesystem the driver was given (the agent may have made one), if any."""
    if rec.extra.get("cwd_disk"):
        return None  # a plain process's disk is its working directory, not its root
    spec = rec.handle.data.get("spec") if isinstance(rec.handle.data, dict) else None
    root = (spec or {}).get("rootfs") or rec.spec.rootfs
    return Path(str(root)) if root else None


def source_paths(rec: InstanceRecord, workdir: Path) -> dict[str, Path]:
    """Every source of one instance: the drivers' stdout/stderr files, then its ``tail``."""
    out = {"stdout": workdir / "stdout.log", "stderr": workdir / "stderr.log"}
    root = instance_root(rec)
    for source, path in rec.spec.tail.items():
        out[source] = root / path.lstrip("/") if root else Path(path)
    return out


def confined(path: Path, root: Path | None) -> bool:
    """False when ``path`` resolves outside ``root`` (symlinks followed)."""
    if root is None:
        return True
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    return real == real_root or real.startswith(real_root.rstrip("/") + "/")


@dataclass
class _Held:
    root: Path | None
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
        caps = {src: LogCapture(path, cdir / f"{src}.json", self.host, rec.name, src)
                for src, path in source_paths(rec, workdir).items()}
        return _Held(instance_root(rec), caps)

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
                if src not in WORKDIR_SOURCES and not confined(cap.path, held.root):
                    if src not in held.refused:
                        held.refused.add(src)
                        log.warning("not capturing %s/%s: %s leaves the instance's root",
                                    name, src, cap.path)
                    continue
                n = await cap.pump(self.js)
                sent += n
                self.sent += n
        return sent

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
        js = nc.jetstream()
        while not stop.is_set():
            try:
                await streams.ensure(js, streams.logs_config())
                break
            except Exception as exc:
                log.warning("cannot ensure the %s stream yet: %s", streams.LOGS, exc)
                await _sleep_or_stop(stop, 1.0)
        self.js = js
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
