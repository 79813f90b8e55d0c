"""The agent's durable memory: one JSON record per instance, written atomically.

An agent may be killed with -9 at any moment and must come back knowing every instance it holds
(to call ``driver.recover``), which spec made it and the newest epoch it accepted (the fencing
token). So every change is written to ``<data_dir>/instances/<name>/instance.json`` through a temp
file, fsync and rename: a reader sees the old record or the new one, never half of one. The
instance's directory is also its workdir (bundle, logs, rootfs copy).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corral.bus.messages import WireSpec
from corral.drivers.base import Handle
from corral.errors import InvalidRequest

log = logging.getLogger(__name__)

RECORD_FILE = "instance.json"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")


@dataclass
class InstanceRecord:
    """What the agent keeps per instance. ``state`` is the last *observed* lifecycle state."""

    spec: WireSpec
    handle: Handle
    epoch: int = 0
    state: str = "created"
    pid: int | None = None
    exit_code: int | None = None
    signal: int | None = None
    #: set by stop/kill so that the end of the workload reads as "stopped", not "failed".
    stop_requested: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def driver(self) -> str:
        return self.spec.driver

    def to_dict(self) -> dict[str, Any]:
        return {
            "spec": self.spec.model_dump(mode="json"),
            "handle": self.handle.to_dict(),
            "epoch": self.epoch,
            "state": self.state,
            "pid": self.pid,
            "exit_code": self.exit_code,
            "signal": self.signal,
            "stop_requested": self.stop_requested,
            "extra": self.extra,
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> InstanceRecord:
        return cls(
            spec=WireSpec.model_validate(raw["spec"]),
            handle=Handle.from_dict(raw["handle"]),
            epoch=int(raw.get("epoch", 0)),
            state=str(raw.get("state", "created")),
            pid=raw.get("pid"),
            exit_code=raw.get("exit_code"),
            signal=raw.get("signal"),
            stop_requested=bool(raw.get("stop_requested", False)),
            extra=dict(raw.get("extra") or {}),
        )


def check_name(name: str) -> str:
    """Refuse names that could escape the instances directory or break a NATS subject."""
    if not _SAFE_NAME.match(name):
        raise InvalidRequest(
            f"instance name {name!r} is not allowed on this agent",
            hint="use letters, digits, '-' and '_' only (at most 128 characters)",
        )
    return name


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` so that ``path`` holds either its old content or all of the new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class Store:
    """Instance records under ``<data_dir>/instances``.

    A record is written (and fsynced) only when its content changed: every status refresh
    saves its record, and rewriting an unchanged one (two fsyncs, on the event loop) was most
    of an idle agent's cost (50 sleeping instances: ~20 writes a second)."""

    def __init__(self, data_dir: Path) -> None:
        self.root = Path(data_dir) / "instances"
        self.root.mkdir(parents=True, exist_ok=True)
        #: what each record's file holds, as this process last wrote or read it
        self._on_disk: dict[str, bytes] = {}

    def dir_for(self, name: str) -> Path:
        return self.root / check_name(name)

    def save(self, record: InstanceRecord) -> None:
        d = self.dir_for(record.name)
        d.mkdir(parents=True, exist_ok=True)
        # compact: with ``indent`` json falls back to its pure-Python encoder (~10x slower),
        # and every refresh serialises its record to compare it
        payload = json.dumps(record.to_dict(), sort_keys=True, separators=(",", ":")).encode()
        if self._on_disk.get(record.name) == payload:
            return
        self._on_disk.pop(record.name, None)  # unknown until the write is done
        write_atomic(d / RECORD_FILE, payload)
        self._on_disk[record.name] = payload

    def load_all(self) -> dict[str, InstanceRecord]:
        """Every readable record; an unreadable one is logged and skipped, never deleted."""
        out: dict[str, InstanceRecord] = {}
        for d in sorted(self.root.iterdir()):
            path = d / RECORD_FILE
            if not path.is_file():
                continue
            try:
                raw = path.read_bytes()
                record = InstanceRecord.from_dict(json.loads(raw))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.error("skipping unreadable instance record %s: %s", path, exc)
                continue
            out[record.name] = record
            if record.name == d.name:
                self._on_disk[record.name] = raw
        return out

    def remove(self, name: str) -> None:
        """Drop the record first (so a crash midway leaves no half-known instance), then files."""
        d = self.dir_for(name)
        self._on_disk.pop(name, None)
        with contextlib.suppress(FileNotFoundError):
            (d / RECORD_FILE).unlink()
        shutil.rmtree(d, ignore_errors=True)
