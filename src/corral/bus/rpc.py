"""Server -> agent calls, declared in one table with a timeout each (Ganeti's rpc_defs).

Each :class:`Call` names its verb, its timeout, the pydantic model of its arguments and the type
of its result, so both ends speak one typed contract: the server builds the argument model and
gets the result back validated (``AgentCaller.call``), the agent's dispatcher validates the
arguments before its handler runs and serialises what the handler returns. The server never
sends a verb that is not listed here, and the agent registers exactly one handler per listed
verb, taking that verb's argument model; a test checks both sides agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from corral.bus.messages import InstanceReport, WireSpec

A = TypeVar("A", bound=BaseModel)
R = TypeVar("R")

#: instance names as an agent accepts them (it checks again: see agent.store.check_name)
Name = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
#: sizes of files a live pass left out, by name (a receiver makes them sparse)
Shapes = Annotated[dict[Name, Annotated[int, Field(ge=0, le=1 << 50)]], Field(max_length=8)]
Slot = Literal["incoming", "standby"]
#: a chunk id sample is bounded (the server sends at most 256)
MAX_CHUNK_IDS = 4096


class Args(BaseModel):
    """Arguments of a call: unknown keys are refused (a server newer than its agent says so
    instead of being half-understood)."""

    model_config = ConfigDict(extra="forbid")


class NoArgs(Args):
    pass


class NameArgs(Args):
    name: Name


class CreateArgs(Args):
    spec: WireSpec
    #: a new instance: a disk left under its name is set aside, never inherited
    fresh: bool = False
    #: files a live migration's pass left out of the (adopted) disk, made in it as sparse
    #: files of these sizes before the driver sees it (QEMU's stream fills every block)
    shapes: Shapes = Field(default_factory=dict)


class StartArgs(NameArgs):
    epoch: int | None = None


class StopArgs(NameArgs):
    #: seconds between SIGTERM and SIGKILL (None: the agent's stop_timeout)
    timeout: float | None = Field(default=None, ge=0, le=3600)


class KillArgs(NameArgs):
    signal: int = Field(default=9, ge=1, le=64)
    #: act only on the copy at this epoch (reconcile's guard against a stale report)
    if_epoch: int | None = None


class DeleteArgs(NameArgs):
    keep_disk: bool = False
    #: keep the disk in DISK_ROOT/.orphaned instead of deleting it
    set_aside: bool = False
    if_epoch: int | None = None


class SlotArgs(NameArgs):
    slot: Slot = "incoming"


class SlotTarget(BaseModel):
    """Where a pass goes: what ``disk_recv`` answered, handed to the sender as is. Backends
    may add what their sender needs (btrfs: the received snapshots, as incremental parents)."""

    model_config = ConfigDict(extra="allow")

    address: str
    port: int
    path: str
    backend: str = "dir"


class SendArgs(NameArgs):
    target: SlotTarget
    mode: Literal["live", "frozen"] = "live"
    #: ties a frozen pass to its live pass (the dirty list since then)
    gen: str = ""
    #: leave the instance frozen after a frozen pass (a migration kills it next)
    keep_frozen: bool = False
    #: the server's signed permission for this pass (disks/tickets.py): the target's data
    #: channel lets nothing in without one
    ticket: str = Field(default="", max_length=4096)
    #: top-level files a live pass leaves out, sending their sizes only (a VM's raw disk,
    #: which QEMU's block migration sends whole)
    shape_only: list[Name] = Field(default_factory=list, max_length=8)


class SendResult(BaseModel):
    bytes: int
    files: int
    seconds: float
    freeze_ms: float | None = None
    full: bool
    gen: str
    #: when the copy's content was taken
    data_at: float
    shapes: Shapes = Field(default_factory=dict)


class DiskPath(BaseModel):
    path: str


class PushArgs(NameArgs):
    image: str = Field(min_length=1, max_length=256)


class PullArgs(PushArgs):
    #: a disk already there is an old copy: build it again
    replace: bool = False


class PushResult(BaseModel):
    uploaded_chunks: int
    uploaded_bytes: int


class PullResult(BaseModel):
    chunks: int
    fetched_chunks: int
    fetched_bytes: int
    #: the kept disk was there: nothing was fetched
    existing: bool


class DropResult(BaseModel):
    dropped: bool


class ChunksArgs(Args):
    ids: list[Annotated[str, Field(pattern=r"^[0-9a-f]{1,128}$")]] = Field(
        max_length=MAX_CHUNK_IDS)


class ChunksCached(BaseModel):
    have: int
    of: int


class IncomingArgs(NameArgs):
    """A live migration's destination: start the created instance waiting for the stream."""

    #: the source host: only its certificate may send the stream
    peer: Name
    epoch: int | None = None


class IncomingTarget(BaseModel):
    """Where the stream goes: the destination's data channel."""

    address: str
    port: int


class LiveSendArgs(NameArgs):
    address: str = Field(min_length=1, max_length=255)
    port: int = Field(ge=1, le=65535)
    #: the destination host: its certificate must name it
    target: Name
    #: switch over when what is left to copy fits this pause (QEMU's default: 300 ms)
    downtime_ms: int = Field(default=300, ge=1, le=60_000)
    #: give up (and cancel) when not converged after this many seconds
    timeout: float = Field(default=1800.0, ge=1.0, le=6 * 3600.0)
    #: the server's ticket for this stream, which the destination's data channel checks
    ticket: str = Field(default="", max_length=4096)


class LiveStats(BaseModel):
    status: str
    total_ms: float
    downtime_ms: float | None = None
    setup_ms: float | None = None
    ram_bytes: int
    disk_bytes: int
    dirty_syncs: int


@dataclass(frozen=True)
class Call(Generic[A, R]):
    verb: str
    timeout: float
    args: type[A]
    #: the result's type (a model, a list of models, or None)
    result: Any
    doc: str

    def parse(self, raw: Any) -> R:
        """The agent's answer as this call's result type (raises ValidationError)."""
        out: R = TypeAdapter(self.result).validate_python(raw)
        return out

    def dump(self, result: Any) -> Any:
        """What goes on the wire for a handler's result."""
        return TypeAdapter(self.result).dump_python(result, mode="json")


CREATE: Call[CreateArgs, InstanceReport] = Call(
    "create", 120.0, CreateArgs, InstanceReport,
    "prepare an instance from a WireSpec (bundle, its disk); does not start it; a disk already "
    "at DISK_ROOT/NAME is used, unless fresh (a new instance): then it is set aside")
START: Call[StartArgs, InstanceReport] = Call(
    "start", 60.0, StartArgs, InstanceReport, "start or start again")
STOP: Call[StopArgs, InstanceReport] = Call(
    "stop", 90.0, StopArgs, InstanceReport,
    "SIGTERM, then SIGKILL after timeout seconds (the call's timeout covers it); returns once "
    "every process of it is reaped")
KILL: Call[KillArgs, InstanceReport] = Call(
    "kill", 15.0, KillArgs, InstanceReport,
    "send a signal to the whole tree (only to the copy at if_epoch, when given); SIGKILL waits "
    "until every process is reaped")
FREEZE: Call[NameArgs, InstanceReport] = Call(
    "freeze", 30.0, NameArgs, InstanceReport, "freeze with the cgroup freezer")
THAW: Call[NameArgs, InstanceReport] = Call(
    "thaw", 15.0, NameArgs, InstanceReport, "thaw a frozen instance")
DELETE: Call[DeleteArgs, None] = Call(
    "delete", 60.0, DeleteArgs, None,
    "remove an instance that is not alive, and its disk unless keep_disk (set_aside: keep it "
    "in DISK_ROOT/.orphaned instead); if_epoch: only that copy")
STATUS: Call[NameArgs, InstanceReport] = Call(
    "status", 10.0, NameArgs, InstanceReport, "what the driver sees now")
LIST: Call[NoArgs, list[InstanceReport]] = Call(
    "list", 10.0, NoArgs, list[InstanceReport], "every instance the agent holds")
DISK_RECV: Call[SlotArgs, SlotTarget] = Call(
    "disk_recv", 60.0, SlotArgs, SlotTarget,
    "make a slot (incoming|standby) ready to receive a disk; where to send it")
DISK_SEND: Call[SendArgs, SendResult] = Call(
    "disk_send", 6 * 3600.0, SendArgs, SendResult,
    "one pass of the disk to another host's slot: live, or frozen (the short one)")
DISK_DISCARD: Call[SlotArgs, None] = Call(
    "disk_discard", 120.0, SlotArgs, None, "remove a slot's copy")
DISK_COMMIT: Call[SlotArgs, None] = Call(
    "disk_commit", 60.0, SlotArgs, None,
    "a pass completed: keep only what the next incremental pass needs")
DISK_ADOPT: Call[SlotArgs, DiskPath] = Call(
    "disk_adopt", 120.0, SlotArgs, DiskPath,
    "the slot's copy becomes this host's live disk of the instance")
DISK_DEMOTE: Call[NameArgs, DiskPath] = Call(
    "disk_demote", 120.0, NameArgs, DiskPath,
    "this host's live disk (no instance left here) becomes its standby copy")
DISK_PUSH: Call[PushArgs, PushResult] = Call(
    "disk_push", 3600.0, PushArgs, PushResult,
    "shelve: chunk the stopped instance's disk, upload what the store lacks, name it")
DISK_PULL: Call[PullArgs, PullResult] = Call(
    "disk_pull", 3600.0, PullArgs, PullResult,
    "unshelve: build DISK_ROOT/NAME from a shelved manifest (kept if already there)")
DISK_DROP: Call[NameArgs, DropResult] = Call(
    "disk_drop", 120.0, NameArgs, DropResult,
    "remove a kept (shelved) disk; refused while an instance here uses it")
CHUNKS_CACHED: Call[ChunksArgs, ChunksCached] = Call(
    "chunks_cached", 10.0, ChunksArgs, ChunksCached,
    "how many of these chunk ids this host's cache holds (unshelve placement)")
LIVE_INCOMING: Call[IncomingArgs, IncomingTarget] = Call(
    "live_incoming", 120.0, IncomingArgs, IncomingTarget,
    "a live migration's destination: start the created instance waiting for the source's "
    "stream (TLS, the source's certificate only) on a port of this host's address")
LIVE_SEND: Call[LiveSendArgs, LiveStats] = Call(
    "live_send", 6 * 3600.0, LiveSendArgs, LiveStats,
    "a live migration's source: send memory and disk to the waiting destination; returns "
    "once the instance runs there (this copy stays paused) or fails, the instance running on")
LIVE_ABORT: Call[NameArgs, InstanceReport] = Call(
    "live_abort", 120.0, NameArgs, InstanceReport,
    "a live migration's undo on the source: cancel it and let the instance run on here")
LIVE_CLAIM: Call[NameArgs, InstanceReport] = Call(
    "live_claim", 60.0, NameArgs, InstanceReport,
    "a live migration's switch-over on the destination: the copy here, running, is the "
    "instance now (it takes the virtual IP over, the source having let it go)")

CALLS: dict[str, Call[Any, Any]] = {
    c.verb: c
    for c in (CREATE, START, STOP, KILL, FREEZE, THAW, DELETE, STATUS, LIST, DISK_RECV,
              DISK_SEND, DISK_DISCARD, DISK_COMMIT, DISK_ADOPT, DISK_DEMOTE, DISK_PUSH,
              DISK_PULL, DISK_DROP, CHUNKS_CACHED, LIVE_INCOMING, LIVE_SEND, LIVE_ABORT,
              LIVE_CLAIM)
}


def call_timeout(call: Call[Any, Any], args: BaseModel | None = None) -> float:
    """The reply timeout for ``call``; a stop also waits for its own grace period."""
    base = call.timeout
    if isinstance(args, StopArgs) and args.timeout is not None:
        base = max(base, float(args.timeout) + 30.0)
    return base
