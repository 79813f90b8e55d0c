"""What each operation kind takes and what it gives back, as wire models.

The engine validates an operation's ``params`` against its kind's model before anything is
recorded, and when the operation ends it stores the kind's ``result`` (built from what the steps
learned), so the API, the CLI and the dashboard read ``downtime_ms`` or ``fetched_bytes`` from
one typed place instead of digging in the steps' blackboard. Shared by server and client.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

HostName = Annotated[str, Field(min_length=1, max_length=64)]
InstanceName = Annotated[str, Field(min_length=1, max_length=63)]


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Result(BaseModel):
    pass


# -- params ------------------------------------------------------------------------------------
class NoParams(Params):
    pass


class ToParams(Params):
    #: the host to go to (None: the scheduler's pick)
    to: HostName | None = None


class MigrateParams(ToParams):
    #: stop first, then one pass (no live pass, no freeze)
    cold: bool = False


class FailoverParams(Params):
    #: the host that went down (the failover is refused if the instance is not there any more)
    from_: HostName = Field(alias="from")


class PromoteParams(Params):
    #: why the server promoted the standby by itself (``--failover-on-unhealthy``, see
    #: ha/unhealthy.py); empty when an operator asked
    reason: str = Field(default="", max_length=2000)


class ShelveParams(Params):
    #: seconds the disk stays on its host (0: at once, -1: never; None: the server's setting)
    offload_after: float | None = None


class UnshelveGroupParams(Params):
    names: list[InstanceName] = Field(min_length=1, max_length=10_000)
    to: HostName | None = None
    #: unshelves in flight at once
    parallel: int = Field(default=8, ge=1, le=256)


class DrainParams(Params):
    #: seconds from the start: members not done by then fail the drain (None: no deadline)
    deadline_seconds: float | None = Field(default=None, gt=0)
    #: members (migrations, standby moves, kept-disk checks) in flight at once
    parallel: int = Field(default=4, ge=1, le=64)


# -- results -----------------------------------------------------------------------------------
class RecreateResult(Result):
    host: str | None = None


class MoveResult(Result):
    """A migration or a promotion: what moved and what the workload noticed."""

    source: str | None = None
    target: str | None = None
    bytes: int = 0
    passes: int = 0
    #: the last frozen pass (how long the instance stood still for it)
    freeze_ms: float | None = None
    #: from the moment it stopped answering on the source to its start on the target
    downtime_ms: float | None = None
    #: when the copy's content was taken
    data_at: float | None = None
    #: a live migration (the instance never stopped; downtime_ms is the hypervisor's pause)
    live: bool = False
    #: bytes of memory and of disk the live migration's stream carried
    memory_bytes: int | None = None
    disk_bytes: int | None = None


class SyncResult(Result):
    host: str | None = None
    bytes: int = 0
    freeze_ms: float | None = None
    data_at: float | None = None


class FailoverResult(Result):
    source: str | None = None
    target: str | None = None
    #: how far back in time it went: the standby's last sync
    data_at: float | None = None


class ShelveResult(Result):
    host: str | None = None
    shelf: str | None = None
    files: int | None = None
    size: int | None = None
    stored_size: int | None = None
    uploaded_chunks: int | None = None
    uploaded_bytes: int | None = None
    #: seconds the disk stays on its host (0: removed at once, None: until unshelve or rm)
    offload_after: float | None = None


class UnshelveResult(Result):
    host: str | None = None
    #: its disk was still on that host: nothing was fetched
    disk_was_there: bool | None = None
    chunks: int | None = None
    fetched_chunks: int | None = None
    fetched_bytes: int | None = None


class GroupMember(BaseModel):
    name: str
    op: str | None = None
    state: str
    error: str = ""
    result: UnshelveResult | None = None


class UnshelveGroupResult(Result):
    members: list[GroupMember] = []

    @property
    def failed(self) -> list[GroupMember]:
        return [m for m in self.members if m.state != "succeeded"]


class DrainMember(BaseModel):
    """One thing a drain moved off its host: an instance (migrated), a standby (placed again
    elsewhere) or a kept disk (dropped once its shelf is whole in the store)."""

    kind: str
    name: str
    op: str | None = None
    state: str
    host: str | None = None
    error: str = ""


class DrainResult(Result):
    host: str
    members: list[DrainMember] = []
