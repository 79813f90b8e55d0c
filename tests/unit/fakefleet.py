"""A model of the hosts an operation talks to, answering every agent call as agents do, with
one failure injected where a test says: the operation builders' rollback, tested without root.

Each host keeps what a real agent keeps: instance records (state, epoch), live disks, and slot
copies (``incoming``/``standby``). A call can fail *before* it does anything (the agent never
got it) or *after* (it happened, the reply was lost): an undo must be right either way.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from corral.bus import rpc
from corral.bus.messages import InstanceReport
from corral.errors import Conflict, HostUnavailable, NotFound
from corral.images.store import ImageStore
from corral.images.tree import Manifest


@dataclass
class Copy:
    state: str
    epoch: int


@dataclass
class FakeHost:
    instances: dict[str, Copy] = field(default_factory=dict)
    disks: set[str] = field(default_factory=set)
    slots: set[tuple[str, str]] = field(default_factory=set)


@dataclass
class Inject:
    """Fail the ``at``-th call (1-based) ``when`` before or after doing it."""

    at: int
    when: str = "before"


class FakeAgents:
    def __init__(self, hosts: dict[str, FakeHost], store: ImageStore | None = None) -> None:
        self.hosts = hosts
        self.store = store
        self.calls: list[tuple[str, str]] = []
        self.inject: Inject | None = None
        self.failed: tuple[str, str] | None = None
        #: hosts whose agent does not answer
        self.down: set[str] = set()

    def snapshot(self) -> dict[str, FakeHost]:
        return copy.deepcopy(self.hosts)

    async def call(self, host: str, call: rpc.Call[Any, Any], args: BaseModel) -> Any:
        if host in self.down:
            raise HostUnavailable(f"{host} does not answer", retryable=True)
        self.calls.append((host, call.verb))
        n = len(self.calls)
        hit = self.inject is not None and self.inject.at == n
        if hit and self.inject is not None and self.inject.when == "before":
            self.failed = (host, call.verb)
            raise HostUnavailable(f"injected: {call.verb} on {host} never arrived",
                                  retryable=True)
        out = getattr(self, "_" + call.verb)(self.hosts[host], host, args)
        if hit:
            self.failed = (host, call.verb)
            raise HostUnavailable(f"injected: the reply to {call.verb} on {host} was lost",
                                  retryable=True)
        return call.parse(out.model_dump() if isinstance(out, BaseModel) else out)

    # -- instance verbs ----------------------------------------------------------------------
    @staticmethod
    def _report(h: FakeHost, name: str) -> InstanceReport:
        c = h.instances.get(name)
        if c is None:
            raise NotFound(f"instance '{name}' is not on this host")
        return InstanceReport(name=name, driver="process", state=c.state, epoch=c.epoch)

    def _create(self, h: FakeHost, host: str, a: rpc.CreateArgs) -> InstanceReport:
        name = a.spec.name
        if name not in h.instances:
            h.instances[name] = Copy("created", a.spec.epoch)
            h.disks.add(name)
        return self._report(h, name)

    def _start(self, h: FakeHost, host: str, a: rpc.StartArgs) -> InstanceReport:
        c = h.instances[a.name]
        c.state = "running"
        c.epoch = a.epoch if a.epoch is not None else c.epoch
        return self._report(h, a.name)

    def _stop(self, h: FakeHost, host: str, a: rpc.StopArgs) -> InstanceReport:
        h.instances[a.name].state = "stopped"
        return self._report(h, a.name)

    def _kill(self, h: FakeHost, host: str, a: rpc.KillArgs) -> InstanceReport:
        h.instances[a.name].state = "stopped"
        return self._report(h, a.name)

    def _freeze(self, h: FakeHost, host: str, a: rpc.NameArgs) -> InstanceReport:
        h.instances[a.name].state = "frozen"
        return self._report(h, a.name)

    def _thaw(self, h: FakeHost, host: str, a: rpc.NameArgs) -> InstanceReport:
        h.instances[a.name].state = "running"
        return self._report(h, a.name)

    def _status(self, h: FakeHost, host: str, a: rpc.NameArgs) -> InstanceReport:
        return self._report(h, a.name)

    def _delete(self, h: FakeHost, host: str, a: rpc.DeleteArgs) -> None:
        c = h.instances.get(a.name)
        if c is None:
            return
        if c.state in ("running", "frozen"):
            raise Conflict(f"instance '{a.name}' is {c.state}")
        del h.instances[a.name]
        if not a.keep_disk:
            h.disks.discard(a.name)

    # -- disks -------------------------------------------------------------------------------
    def _disk_recv(self, h: FakeHost, host: str, a: rpc.SlotArgs) -> rpc.SlotTarget:
        h.slots.add((a.name, a.slot))
        return rpc.SlotTarget(address=host, port=1, path=f"/{a.slot}/{a.name}")

    def _disk_send(self, h: FakeHost, host: str, a: rpc.SendArgs) -> rpc.SendResult:
        if a.name not in h.disks:
            raise NotFound(f"no disk for '{a.name}' here")
        target = self.hosts[a.target.address]
        slot = a.target.path.split("/")[1]
        if (a.name, slot) not in target.slots:
            raise NotFound("the target slot is not ready")
        c = h.instances.get(a.name)
        if a.mode == "frozen" and c is not None and c.state == "running" and a.keep_frozen:
            c.state = "frozen"
        return rpc.SendResult(bytes=100, files=1, seconds=0.01,
                              freeze_ms=5.0 if a.mode == "frozen" else None, full=False,
                              gen="g1", data_at=1000.0)

    def _disk_discard(self, h: FakeHost, host: str, a: rpc.SlotArgs) -> None:
        h.slots.discard((a.name, a.slot))

    def _disk_commit(self, h: FakeHost, host: str, a: rpc.SlotArgs) -> None:
        pass

    def _disk_adopt(self, h: FakeHost, host: str, a: rpc.SlotArgs) -> rpc.DiskPath:
        if (a.name, a.slot) not in h.slots:
            if a.name in h.disks:  # adopted already (a retried adopt)
                return rpc.DiskPath(path=f"/{a.name}")
            raise NotFound(f"no {a.slot} copy of '{a.name}' here")
        h.slots.discard((a.name, a.slot))
        h.disks.add(a.name)
        return rpc.DiskPath(path=f"/{a.name}")

    def _disk_demote(self, h: FakeHost, host: str, a: rpc.NameArgs) -> rpc.DiskPath:
        if a.name in h.instances:
            raise Conflict(f"instance '{a.name}' still exists on this host")
        if a.name in h.disks:
            h.disks.discard(a.name)
            h.slots.add((a.name, "standby"))
        return rpc.DiskPath(path=f"/standby/{a.name}")

    def _disk_push(self, h: FakeHost, host: str, a: rpc.PushArgs) -> rpc.PushResult:
        assert self.store is not None
        if a.name not in h.disks:
            raise NotFound(f"no disk for '{a.name}' here")
        self.store.put_manifest(a.image, Manifest([]), replace=True)
        return rpc.PushResult(uploaded_chunks=0, uploaded_bytes=0)

    def _disk_pull(self, h: FakeHost, host: str, a: rpc.PullArgs) -> rpc.PullResult:
        if a.name in h.instances:
            raise Conflict(f"instance '{a.name}' already exists on this host")
        existing = a.name in h.disks and not a.replace
        h.disks.add(a.name)
        return rpc.PullResult(chunks=0, fetched_chunks=0, fetched_bytes=0, existing=existing)

    def _disk_drop(self, h: FakeHost, host: str, a: rpc.NameArgs) -> rpc.DropResult:
        if a.name in h.instances:
            raise Conflict(f"instance '{a.name}' exists on this host")
        existed = a.name in h.disks
        h.disks.discard(a.name)
        return rpc.DropResult(dropped=existed)

    def _chunks_cached(self, h: FakeHost, host: str, a: rpc.ChunksArgs) -> rpc.ChunksCached:
        return rpc.ChunksCached(have=0, of=len(a.ids))

    # -- live migration ----------------------------------------------------------------------
    def _live_incoming(self, h: FakeHost, host: str, a: rpc.IncomingArgs) -> rpc.IncomingTarget:
        c = h.instances[a.name]
        if c.state not in ("created", "frozen"):
            raise Conflict(f"instance '{a.name}' is {c.state} here")
        c.state = "frozen"  # waiting for the stream, as QEMU's -incoming reads
        c.epoch = a.epoch if a.epoch is not None else c.epoch
        return rpc.IncomingTarget(address=host, port=5000)

    def _live_send(self, h: FakeHost, host: str, a: rpc.LiveSendArgs) -> rpc.LiveStats:
        c = h.instances.get(a.name)
        if c is None or c.state != "running":
            raise Conflict(f"instance '{a.name}' is not running here")
        dest = self.hosts[a.address].instances.get(a.name)
        if dest is None or dest.state != "frozen":
            raise HostUnavailable("nothing waits for the stream", retryable=True)
        dest.state, c.state = "running", "frozen"  # the source stays paused for good
        return rpc.LiveStats(status="completed", total_ms=100.0, downtime_ms=20.0,
                             setup_ms=1.0, ram_bytes=1000, disk_bytes=500, dirty_syncs=2)

    def _live_abort(self, h: FakeHost, host: str, a: rpc.NameArgs) -> InstanceReport:
        c = h.instances.get(a.name)
        if c is not None and c.state == "frozen":
            c.state = "running"
        return self._report(h, a.name)

    def _live_claim(self, h: FakeHost, host: str, a: rpc.NameArgs) -> InstanceReport:
        c = h.instances.get(a.name)
        if c is None or c.state != "running":
            raise Conflict(f"the copy of '{a.name}' here is not running", retryable=True)
        return self._report(h, a.name)
