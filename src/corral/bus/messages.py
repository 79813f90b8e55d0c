"""Payloads that cross the bus between server and agents, as pydantic models.

Both sides validate what they receive, so a mismatched agent or a stray publisher gets a clear
error instead of a half-applied message. Encoding is JSON (see :mod:`corral.bus.codec`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class Capacity(BaseModel):
    cores: int = Field(ge=1)
    memory_bytes: int = Field(ge=0)
    disk_bytes: int = Field(ge=0)


class InstanceReport(BaseModel):
    """What an agent observed of one instance (driver view, see ``drivers.base.Status``)."""

    name: str
    driver: str
    state: str
    pid: int | None = None
    exit_code: int | None = None
    signal: int | None = None
    epoch: int = 0
    #: restarts the agent made of this copy under its restart policy (see agent/restart.py)
    restarts: int = 0
    #: unknown, healthy or unhealthy (agent/health.py); None: the instance has no check
    health: str | None = None
    #: why its check last failed, while unhealthy or once its agent ended it for that
    #: (the server's failover on unhealthy quotes it, ha/unhealthy.py)
    health_reason: str = ""
    #: its restart policy gave up on this copy: attempts used up, it stays as it ended
    gave_up: bool = False


#: a host's name, as ``bus.identity.HOST_RE`` and ``api.names.HOST_PATTERN`` have it: a
#: join or heartbeat naming anything else is dropped before the server writes a row for it
HOST_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$"


class JoinRequest(BaseModel):
    host: str = Field(pattern=HOST_PATTERN)
    address: str
    capacity: Capacity
    #: driver name -> capabilities (``dataclasses.asdict`` of ``Capabilities``)
    drivers: dict[str, dict[str, bool]]
    agent_version: str
    instances: list[InstanceReport] = []
    #: the data channel's port (host-to-host disk transfers); 0 = this agent moves no disks
    data_port: int = 0
    disk_backend: str = "dir"


class JoinReply(BaseModel):
    lease_seconds: float
    heartbeat_seconds: float
    sample_seconds: float
    #: the server's HTTP API (image chunks); "" when the server answered before it listened.
    api_url: str = ""
    #: instances on this host the server would fail over elsewhere (they have a standby): the
    #: only ones the agent must fence when it loses its lease. None: an older server, fence all.
    guarded: list[str] | None = None
    #: the public key (raw Ed25519, hex) transfer tickets are signed with: the agent's data
    #: channel accepts a pass only with a ticket this key signed (disks/tickets.py)
    ticket_key: str = ""


class Heartbeat(BaseModel):
    host: str = Field(pattern=HOST_PATTERN)
    seq: int
    sent_at: float
    instances: list[InstanceReport] = []


class HeartbeatReply(BaseModel):
    #: False when the server does not know this host (e.g. its DB was reset): the agent re-joins.
    known: bool
    lease_expires_at: float = 0.0
    #: the server's HTTP API, so an agent that joined before it was known still learns it.
    api_url: str = ""
    #: see :attr:`JoinReply.guarded`
    guarded: list[str] | None = None
    #: the fleet's pace now (control/pace.py): a large fleet heartbeats, samples and holds
    #: its leases longer than the settings say. 0: keep what the join said (older server)
    heartbeat_seconds: float = 0.0
    lease_seconds: float = 0.0
    sample_seconds: float = 0.0


class InstanceSample(BaseModel):
    name: str
    cpu_ns: int
    memory_bytes: int
    generation: str
    #: % of one core over the last interval; None on the first sample or after a reset.
    cpu_core_pct: float | None = None
    #: the same divided by the host's cores.
    cpu_host_pct: float | None = None


class MetricsSample(BaseModel):
    host: str
    wall_ns: int
    host_cores: int
    interval_s: float
    instances: list[InstanceSample] = []
    #: agent process CPU seconds spent sampling in this interval (for the accounting bench).
    sample_cpu_s: float = 0.0
    #: % of the whole host busy over the interval (every process, from /proc/stat); None when
    #: unknown. The server shows ``host_cpu_pct - sum(instances)`` as the host's "rest".
    host_cpu_pct: float | None = None
    #: bytes the instances wrote (stdout, stderr, tailed files) not yet on the bus; None when
    #: the agent does not say
    log_lag_bytes: int | None = None


class RestartPolicy(BaseModel):
    """What the agent does when an instance ends by itself (Nomad's ``restart`` block): with
    ``on-failure`` it starts a failed one again (a crash, a non-zero exit, a kill behind
    corral's back), with ``always`` an exited one too, each time after ``delay`` seconds, at
    most ``attempts`` times within ``interval`` seconds; past that it gives up and leaves the
    instance ``failed``. ``no``: the old behaviour, nothing is restarted. An end that was
    asked for (stop, kill, a fence) is never restarted."""

    mode: Literal["no", "on-failure", "always"] = "no"
    attempts: int = Field(default=3, ge=1, le=1000)
    interval: float = Field(default=300.0, gt=0, le=30 * 86400)
    delay: float = Field(default=1.0, ge=0, le=3600)


class HealthCheck(BaseModel):
    """A health check the agent runs while the instance runs (agent/health.py): ``target``
    is ``http://[HOST]:PORT/PATH`` (healthy on a 2xx or 3xx answer), ``tcp:[HOST]:PORT``
    (a connection is accepted) or ``exec:CMD`` (``sh -c CMD`` exits 0); an empty HOST is
    127.0.0.1 in the instance's network namespace. ``threshold`` failures in a row make it
    unhealthy, one success healthy again; failures within ``grace`` seconds of a start do
    not count."""

    target: str = Field(min_length=1, max_length=4096)
    interval: float = Field(default=10.0, gt=0, le=86400)
    timeout: float = Field(default=2.0, gt=0, le=3600)
    threshold: int = Field(default=3, ge=1, le=1000)
    #: seconds after each start in which a failure does not count (a success does)
    grace: float = Field(default=0.0, ge=0, le=86400)


class WireSpec(BaseModel):
    """What the server asks an agent to create."""

    name: str
    driver: str
    command: list[str]
    rootfs: str | None = None
    #: image in the server's store to materialise as the root (exclusive with ``rootfs``).
    image: str | None = None
    env: dict[str, str] = {}
    cpus: float = 0.0
    memory_bytes: int = 0
    epoch: int = 0
    #: extra log sources: name -> file to capture (inside ``rootfs`` when there is one).
    tail: dict[str, str] = {}
    #: virtual IP (``10.0.0.50/24``) the agent adds while the instance runs
    vip: str | None = None
    #: the process as an image's config decided it (``corral.images.oci_config``, resolved by
    #: the server at create): user and group ids inside the container (None: root), the
    #: working directory ("": "/"), the signal a stop sends first (0: SIGTERM). An older agent
    #: ignores them; the process driver runs neither as another user nor elsewhere.
    uid: int | None = Field(default=None, ge=0, le=65535)
    gid: int | None = Field(default=None, ge=0, le=65535)
    additional_gids: list[int] = []
    cwd: str = Field(default="", max_length=4096)
    stop_signal: int = Field(default=0, ge=0, le=64)
    #: what the agent does when it ends by itself (default: nothing; an older agent ignores it)
    restart: RestartPolicy = Field(default_factory=RestartPolicy)
    #: run by the agent while it runs; None: no check (an older agent ignores it)
    check: HealthCheck | None = None


#: the fields of :class:`WireSpec` an instance's ``image_config`` fills
PROCESS_FIELDS = ("uid", "gid", "additional_gids", "cwd", "stop_signal")


def process_fields(image_config: dict[str, Any] | None) -> dict[str, Any]:
    """The :class:`WireSpec` fields of what an instance keeps of its image's config."""
    return {k: v for k, v in (image_config or {}).items() if k in PROCESS_FIELDS}


class Command(BaseModel):
    verb: str
    args: dict[str, Any] = {}


class Reply(BaseModel):
    ok: bool
    result: Any = None
    #: ``CorralError.to_dict()`` when not ok
    error: dict[str, Any] | None = None


class LogBatch(BaseModel):
    """Lines of one source (an instance's stdout, stderr or a tailed file), batched.

    ``first_seq`` numbers the first line; line i has ``first_seq + i``. Sequences are per
    (host, instance, source, run) and survive agent restarts, so a sink can tell a gap from a
    repeat. ``run`` names one copy's capture on its host (made with its offsets file): an
    instance that comes back to a host it left numbers its lines from 1 again, and without it
    those lines would look like repeats of its first visit's and be dropped.
    """

    host: str
    instance: str
    #: stdout, stderr or a tail source's name (as the API allows them): no '/', bounded
    source: str = Field(pattern=r"^[a-z][a-z0-9_-]{0,31}$")
    first_seq: int = Field(ge=1)
    lines: list[str]
    ts: float
    run: str = Field(default="", max_length=16, pattern=r"^[0-9a-f]*$")

    @property
    def key(self) -> str:
        """What line numbers count within: one source of one copy on one host."""
        base = f"{self.host}/{self.instance}/{self.source}"
        return f"{base}/{self.run}" if self.run else base

    @property
    def msg_id(self) -> str:
        """JetStream dedup id: a batch re-sent after an agent restart is stored once."""
        return (f"{self.host}:{self.instance}:{self.source}:{self.run}:{self.first_seq}:"
                f"{len(self.lines)}")
