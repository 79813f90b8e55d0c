"""The driver contract: what every way of running an instance (process, runc, qemu) offers.

Drivers are synchronous and stateless between calls: everything a driver needs to find its
instance again lives in a JSON-serialisable :class:`Handle` that the agent persists. That is what
lets an agent killed with -9 come back, call :meth:`Driver.recover` and re-attach to what is still
running without killing or doubling it (Nomad's RecoverTask).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from corral.errors import NotSupported


@dataclass(frozen=True)
class Capabilities:
    """What a driver can do beyond the required verbs; the agent reports it to the server."""

    can_freeze: bool = False
    can_checkpoint: bool = False
    needs_root: bool = False
    #: counters come from a cgroup (exact) rather than from /proc of the process tree.
    cgroup_accounting: bool = False
    #: needs a root filesystem (``Spec.rootfs``) to run.
    needs_rootfs: bool = False
    #: can move a running instance to another host without stopping it (a VM's memory is
    #: copied while it runs; a process tree's cannot be).
    can_live_migrate: bool = False
    #: the instance holds its virtual IP itself (a VM's own NIC, on a tap): the host routes the
    #: address to it and answers ARP for it, rather than holding it (agent/vips.py)
    vip_in_guest: bool = False
    #: runs guests with hardware virtualisation (KVM); a VM driver without it emulates (TCG),
    #: many times slower. A bool, as the wire carries capabilities as ``dict[str, bool]``.
    kvm: bool = False


@dataclass(frozen=True)
class Spec:
    """What to run. ``workdir`` is the agent's per-instance directory (logs, bundle, state).

    ``uid``/``gid``/``additional_gids`` (None: root), ``cwd`` ("" : "/") and ``stop_signal``
    (0: SIGTERM) come from an image's config; they mean something inside a container's root,
    so a driver without one (process) leaves them alone."""

    name: str
    command: list[str]
    workdir: str
    rootfs: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    cpus: float = 0.0
    memory_bytes: int = 0
    uid: int | None = None
    gid: int | None = None
    additional_gids: tuple[int, ...] = ()
    cwd: str = ""
    stop_signal: int = 0
    #: the instance's virtual IP (``ADDR/PREFIX``): a VM holds it itself, on a tap the host
    #: routes to (drivers sharing the host's network leave it to the agent's interface)
    vip: str | None = None


@dataclass
class Handle:
    """Everything needed to find an instance again after the agent restarts."""

    driver: str
    name: str
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"driver": self.driver, "name": self.name, "data": dict(self.data)}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Handle:
        return cls(driver=str(raw["driver"]), name=str(raw["name"]), data=dict(raw["data"]))


@dataclass(frozen=True)
class Status:
    """What the driver sees now. ``state`` is one of: created, running, frozen, stopped, exited.

    ``exit_code`` is set when the workload ended and the code is known (it may be unknown after an
    agent restart, when the workload was reaped by someone else); ``signal`` when a signal ended it.
    """

    state: str
    pid: int | None = None
    exit_code: int | None = None
    signal: int | None = None


@dataclass(frozen=True)
class Stats:
    """Cumulative counters. ``generation`` changes whenever the counters start again from zero
    (a new process, a new cgroup), so accounting can tell a reset from a decrease."""

    cpu_ns: int
    memory_bytes: int
    generation: str


@runtime_checkable
class Driver(Protocol):
    name: str
    capabilities: Capabilities

    def available(self) -> str | None:
        """None when usable here, else why not (e.g. 'runc not found; apt-get install runc')."""
        ...

    def create(self, spec: Spec) -> Handle:
        """Prepare the instance without starting it; idempotent for the same spec."""
        ...

    def start(self, handle: Handle) -> Handle:
        """Start (or start again after stop/exit); returns the updated handle to persist."""
        ...

    def stop(self, handle: Handle, timeout: float) -> Status:
        """SIGTERM, wait up to ``timeout`` seconds, then SIGKILL; the whole tree."""
        ...

    def kill(self, handle: Handle, signal: int) -> None: ...

    def freeze(self, handle: Handle) -> None:
        """Raise :class:`NotSupported` unless ``capabilities.can_freeze``."""
        ...

    def thaw(self, handle: Handle) -> None: ...

    def status(self, handle: Handle) -> Status: ...

    def stats(self, handles: Sequence[Handle]) -> dict[str, Stats]:
        """Counters for many instances at once (one /proc scan, not one per instance); keyed by
        handle name; instances not running are left out."""
        ...

    def delete(self, handle: Handle) -> None:
        """Remove everything the driver made; the instance must not be alive."""
        ...

    def recover(self, handle: Handle) -> Status:
        """Re-attach after an agent restart. Never kills or restarts anything."""
        ...


@dataclass(frozen=True)
class MigrationStats:
    """How a live migration went, as the hypervisor counts it."""

    status: str
    total_ms: float
    #: how long the guest stood still at the switch-over
    downtime_ms: float | None
    setup_ms: float | None
    ram_bytes: int
    disk_bytes: int
    dirty_syncs: int


@runtime_checkable
class LiveMigration(Protocol):
    """What a driver with ``capabilities.can_live_migrate`` adds: the destination waits for
    the stream, the source sends it and returns once the guest runs on the destination (or
    raises, the guest running on at the source), and the source's undo."""

    def stream_dir(self, handle: Handle) -> Path:
        """The private directory where the stream's unix sockets are (the hypervisor's own
        working directory, so it names them by a short relative name). The agents carry the
        stream between hosts over their data channel (:mod:`corral.disks.tunnel`)."""
        ...

    def incoming(self, handle: Handle, peer: str) -> tuple[Handle, str]:
        """Start the created instance waiting for ``peer``'s stream; the new handle and the
        name of the unix socket in :meth:`stream_dir` where it listens."""
        ...

    def migrate_out(self, handle: Handle, sock: str, target: str, downtime_ms: int,
                    timeout: float) -> MigrationStats:
        """Send the running instance into the unix socket ``sock`` of :meth:`stream_dir`
        (the agent's end of the tunnel to ``target``)."""
        ...

    def migration_abort(self, handle: Handle) -> None:
        """Cancel a migration in flight and let the instance run on here."""
        ...

    def resumed(self, handle: Handle) -> bool | None:
        """On a migration's destination: whether the guest runs here now (the stream
        completed); None when the copy is gone (nothing to wait for)."""
        ...


def not_supported(driver: str, verb: str) -> NotSupported:
    return NotSupported(
        f"the {driver} driver cannot {verb}",
        hint=f"use a driver that can {verb} (see 'corral host ls' for each host's drivers)",
    )
