"""HTTP wire models, shared by the server (FastAPI) and every client (CLI, tests, dashboard).

The CLI imports only this package to talk to the server (as Nomad's ``command/`` only imports its
``api`` module), so these models are the contract; the OpenAPI document is generated from them.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, ValidationInfo, field_validator, model_validator

from corral.api.names import (
    HOST_PATTERN,
    IMAGE_PATTERN,
    MAX_PATH,
    TOKEN_NAME_PATTERN,
    path_problem,
)
from corral.api.names import NAME_PATTERN as NAME_PATTERN  # where the server's routes read it

#: an image an instance runs from (a shelved disk's ``@`` name is the server's own business)
RUN_IMAGE_PATTERN = IMAGE_PATTERN.replace("^@?", "^", 1)
HostName = Annotated[str, Field(pattern=HOST_PATTERN, description="a host's name")]
InstanceName = Annotated[str, Field(pattern=NAME_PATTERN, description="an instance's name")]
#: names of extra log sources (``tail``); stdout and stderr are always captured.
TAIL_SOURCE_PATTERN = r"^[a-z][a-z0-9_-]{0,31}$"
RESERVED_SOURCES = frozenset({"stdout", "stderr"})


def check_tail_path(source: str, path: str) -> None:
    """A ``tail`` path that cannot name something outside the instance's disk by itself (the
    agent also never follows one out of the disk when it opens it)."""
    if not path:
        raise ValueError(f"tail path of source {source!r} is empty: give a file, e.g. "
                         "logs/access.log (in the instance's disk)")
    if "\0" in path:
        raise ValueError(f"tail path {path[:80]!r} of source {source!r} contains a NUL byte")
    problem = path_problem(path, dotdot=True)  # '..' in a relative path: refused below
    if problem is not None:
        raise ValueError(f"tail path {path[:80]!r} of source {source!r} {problem}")
    if path.startswith("/"):
        return
    parts = path.split("/")
    if ".." in parts:
        raise ValueError(f"tail path {path!r} of source {source!r} contains '..': a relative "
                         "path is read inside the instance's disk and may not leave it; name "
                         "the file from the disk's top, e.g. logs/access.log")
    if all(p in ("", ".") for p in parts):
        raise ValueError(f"tail path {path!r} of source {source!r} names the instance's disk "
                         "itself: give a file in it, e.g. logs/access.log")


class RestartSpec(BaseModel):
    """``restart``: what the instance's agent does when it ends by itself (Nomad's restart
    block). ``on-failure`` restarts a failed one (crash, non-zero exit, killed behind corral's
    back), ``always`` an exited one too; each after ``delay`` seconds, at most ``attempts``
    within ``interval`` seconds, then it stays ``failed``. A stop or kill is never undone."""

    mode: Literal["no", "on-failure", "always"] = Field(
        default="no", description="no (default), on-failure or always")
    attempts: int = Field(default=3, ge=1, le=1000,
                          description="restarts allowed within interval before giving up")
    interval: float = Field(default=300.0, gt=0, le=30 * 86400,
                            description="the window attempts are counted in, seconds (> 0)")
    delay: float = Field(default=1.0, ge=0, le=3600,
                         description="seconds to wait before each restart")


#: ``--check`` targets: http://[HOST]:PORT[/PATH], tcp:[HOST]:PORT, exec:CMD
_CHECK_HTTP = re.compile(r"^http://(?P<host>[A-Za-z0-9.-]*|\[[0-9A-Fa-f:.]+\]):(?P<port>\d{1,5})"
                         r"(?P<path>/[^\s]*)?$")
_CHECK_TCP = re.compile(r"^tcp:(?P<host>[A-Za-z0-9.-]*|\[[0-9A-Fa-f:.]+\]):(?P<port>\d{1,5})$")
CHECK_HINT = ("write it as http://:PORT/PATH, tcp::PORT or exec:CMD (an empty host is the "
              "instance's own 127.0.0.1)")


def check_problem(target: str) -> str | None:
    """Why ``target`` is not a health check the agent can run (None: it is one)."""
    if "\0" in target or "\n" in target:
        return "contains a NUL or a newline"
    if target.startswith("exec:"):
        return None if target[5:].strip() else "has no command after exec:"
    m = _CHECK_HTTP.match(target) or _CHECK_TCP.match(target)
    if m is None:
        return "is not http://[HOST]:PORT/PATH, tcp:[HOST]:PORT or exec:CMD"
    if not 1 <= int(m.group("port")) <= 65535:
        return f"has port {m.group('port')}, not 1-65535"
    return None


class CheckSpec(BaseModel):
    """``check``: a health check the instance's agent runs while it runs. Health (unknown,
    healthy, unhealthy) shows in the view and the events; with restart on-failure or always
    an unhealthy instance is killed and restarted under its restart policy. ``failover`` is
    the server's, not the agent's (ha/unhealthy.py): kept here, in the check's JSON, because
    it only means something with a check."""

    target: str = Field(max_length=4096, description="http://:PORT/PATH (2xx/3xx is healthy), "
                        "tcp::PORT (a connection is accepted) or exec:CMD (sh -c CMD exits 0)")
    interval: float = Field(default=10.0, gt=0, le=86400, description="seconds between checks")
    timeout: float = Field(default=2.0, gt=0, le=3600, description="seconds one check may take")
    threshold: int = Field(default=3, ge=1, le=1000,
                           description="failures in a row that make it unhealthy")
    grace: float = Field(default=0.0, ge=0, le=86400, description=(
        "seconds after each start in which a failed check does not count (a success does): "
        "a slow start is not unhealthy (Docker's start period, Nomad's check_restart grace)"))
    failover: bool = Field(default=False, description=(
        "fail over to its standby (a promotion) when still unhealthy after its restart "
        "attempts (restart no: once unhealthy); at most once an hour, kept by the server"))

    @field_validator("target")
    @classmethod
    def _target(cls, v: str) -> str:
        problem = check_problem(v)
        if problem is not None:
            raise ValueError(f"check {v[:80]!r} {problem}: {CHECK_HINT}")
        return v


class CreateInstance(BaseModel):
    name: str = Field(pattern=NAME_PATTERN, description="lowercase letters, digits and dashes")
    cpus: float = Field(default=0.1, gt=0, le=4096, description="CPU reservation, in cores")
    memory_bytes: int = Field(default=64 * 1024**2, gt=0, description="memory reservation")
    driver: str = Field(default="process", pattern=r"^[a-z][a-z0-9_-]{0,31}$")
    host: str | None = Field(default=None, pattern=HOST_PATTERN,
                             description="pin to this host")
    rootfs: str | None = Field(default=None, max_length=MAX_PATH,
                               json_schema_extra={"pattern": "^/"},  # _rootfs words refusals
                               description="root filesystem path on the host (absolute)")
    image: str | None = Field(
        default=None, pattern=RUN_IMAGE_PATTERN,
        description="image of the server's store to materialise as the root (not with rootfs)")
    entrypoint: list[str] | None = Field(
        default=None, description="replaces the image's Entrypoint and drops its Cmd ([]: no "
                                  "entrypoint); empty means the image's")
    #: after image and entrypoint, so its validator sees them (an image may give the command)
    command: list[str] = Field(default_factory=list, validate_default=True,
                               description="argv of the workload (at least one word, unless an "
                                           "image gives its own: then it replaces the image's "
                                           "Cmd)")
    env: dict[str, str] = Field(default_factory=dict,
                                description="variable names without '=' or NUL; values "
                                            "without NUL (laid over an image's Env)")
    start: bool = Field(default=True, description="start right after creating")
    vip: str | None = Field(
        default=None, max_length=64,
        description="virtual IP with prefix (10.0.0.50/24) added on the instance's host while "
                    "it runs; it moves with failover (the agent must run as root)")
    tail: dict[str, Annotated[str, Field(json_schema_extra={"minLength": 1})]] = Field(
        default_factory=dict,
        description="log source name -> file to capture. A relative path is inside the "
                    "instance's own disk (a process's working directory, a container's root) on "
                    "whichever host it runs, e.g. {'access': 'logs/access.log'}; it may not "
                    "contain '..'. An absolute path is inside the rootfs when the instance has "
                    "one, else on the host, e.g. {'access': '/var/log/access.log'}",
    )

    restart: RestartSpec = Field(default_factory=RestartSpec,
                                 description="restart policy, run by the instance's agent")
    check: CheckSpec | None = Field(default=None,
                                    description="health check, run by the instance's agent")

    @field_validator("tail")
    @classmethod
    def _tail_sources(cls, v: dict[str, str]) -> dict[str, str]:
        for source, path in v.items():
            if not re.fullmatch(TAIL_SOURCE_PATTERN, source) or source in RESERVED_SOURCES:
                raise ValueError(f"tail source {source!r}: use {TAIL_SOURCE_PATTERN} and not "
                                 f"{' or '.join(sorted(RESERVED_SOURCES))}")
            check_tail_path(source, path)
        return v

    @field_validator("command", "entrypoint")
    @classmethod
    def _no_empty_program(cls, v: list[str] | None, info: ValidationInfo) -> list[str] | None:
        if info.field_name == "command" and not v and info.data.get("image") is None \
                and not info.data.get("entrypoint"):
            raise ValueError("at least 1 word is needed: only an image may say what to run")
        if v and not v[0].strip():
            raise ValueError("the program (first word of command) is empty")
        if any("\0" in word for word in v or []):  # no exec takes it: refused here
            raise ValueError("a word of the command contains a NUL byte")
        return v

    @field_validator("rootfs")
    @classmethod
    def _rootfs(cls, v: str | None) -> str | None:
        if v is None:
            return None
        problem = path_problem(v)
        if problem is not None:
            raise ValueError(f"rootfs {v[:80]!r} {problem}")
        if not v.startswith("/"):
            raise ValueError(f"rootfs {v[:80]!r} is not an absolute path")
        return v

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict[str, str]) -> dict[str, str]:
        # a NUL cannot cross exec, and a name with '=' would set another variable
        for key, value in v.items():
            if not key or "=" in key or "\0" in key:
                raise ValueError(f"environment variable name {key[:80]!r} is empty or has "
                                 "'=' or NUL in it")
            if "\0" in value:
                raise ValueError(f"the value of {key[:80]!r} contains a NUL byte")
        return v

    @field_validator("vip")
    @classmethod
    def _vip(cls, v: str | None) -> str | None:
        if v is None:
            return None
        from corral.api.addresses import parse_vip as parse
        from corral.errors import CorralError

        try:
            return str(parse(v))
        except CorralError as exc:
            raise ValueError(exc.message) from None

    @model_validator(mode="after")
    def _one_root(self) -> CreateInstance:
        if self.image is not None and self.rootfs is not None:
            raise ValueError("give either an image or a rootfs, not both (--image or --from)")
        return self


class ActionRequest(BaseModel):
    timeout: float | None = Field(default=None, gt=0, le=3600, description="stop: grace seconds")
    signal: int | None = Field(default=None, ge=1, le=64, description="kill: signal number")


class Usage(BaseModel):
    cpu_core_pct: float | None = Field(default=None, description="% of one core (can exceed 100)")
    cpu_host_pct: float | None = Field(default=None, description="% of the whole host")
    memory_bytes: int | None = None
    sampled_at: float | None = None


class InstanceView(BaseModel):
    name: str
    host: str | None
    driver: str
    command: list[str]
    cpus: float
    memory_bytes: int
    rootfs: str | None = None
    image: str | None = None
    tail: dict[str, str] = Field(default_factory=dict, description="captured files by source")
    vip: str | None = Field(default=None, description="virtual IP that moves with the instance")
    desired_state: str
    state: str
    pid: int | None = None
    exit_code: int | None = None
    epoch: int = 0
    created_at: float
    updated_at: float
    usage: Usage = Field(default_factory=Usage)
    allowed: list[str] = Field(default_factory=list, description="verbs allowed from this state")
    #: shelving: the host still keeping its disk, and the shelved manifest (when shelved)
    disk_host: str | None = None
    shelf: str | None = None
    restart: RestartSpec = Field(default_factory=RestartSpec, description="restart policy")
    restarts: int = Field(default=0, description="restarts its agent made of the current "
                          "copy under the policy")
    check: CheckSpec | None = Field(default=None, description="health check")
    health: str | None = Field(default=None, description="unknown, healthy or unhealthy (none "
                               "without a check)")
    image_config: dict[str, Any] | None = Field(
        default=None, description="what the image's config decided when it was created: user "
        "(as the image names it), uid, gid, additional_gids, cwd, stop_signal (0: SIGTERM), "
        "exposed_ports, healthcheck")


class Resources(BaseModel):
    cpus: float
    memory_bytes: int


class HostView(BaseModel):
    name: str
    address: str
    state: str  # up | down
    cores: int
    memory_bytes: int
    disk_bytes: int
    drivers: dict[str, dict[str, bool]]
    reserved: Resources
    free: Resources
    instances: int
    usage: Usage = Field(default_factory=Usage)
    #: % of the host used by everything that is not a corral instance (100 - sum - idle).
    rest_host_pct: float | None = None
    last_heartbeat: float | None = None
    lease_expires_at: float | None = None
    agent_version: str = ""
    #: ``corral host drain``: the scheduler places nothing new here
    draining: bool = False


class DrainRequest(BaseModel):
    """``POST /v1/hosts/{name}/drain``."""

    #: members not done this many seconds after the start fail the drain (None: no deadline)
    deadline_seconds: float | None = Field(default=None, gt=0)
    #: members in flight at once
    parallel: int = Field(default=4, ge=1, le=64)


class LeaderView(BaseModel):
    """The server that leads the fleet (its lease in the database) and its generation."""

    id: str
    api_url: str
    generation: int


class ServerView(BaseModel):
    """A ``corral server`` sharing the fleet's database, as of its last lease poll."""

    id: str
    api_url: str
    nats_url: str
    last_seen: float
    leader: bool = False


class FleetStatus(BaseModel):
    version: str
    hosts_up: int
    hosts_down: int
    instances: dict[str, int]
    nats_url: str
    db: str
    #: who leads (None: no server holds the lease right now)
    leader: LeaderView | None = None
    servers: list[ServerView] = Field(default_factory=list)
    #: every node of the bus this server knows (its own first)
    nats: list[str] = Field(default_factory=list)
    #: how often hosts heartbeat and how long a lease runs, for this fleet's size: past
    #: ``max_heartbeats_per_second`` both grow with the host count (control/pace.py)
    heartbeat_seconds: float = 0.0
    lease_seconds: float = 0.0


class ErrorBody(BaseModel):
    code: str
    message: str
    hint: str = ""
    retryable: bool = False
    details: dict[str, Any] = Field(default_factory=dict)


class ErrorResponse(BaseModel):
    error: ErrorBody


#: instances in one ``POST /v1/instances/batch``
MAX_BATCH_CREATE = 500


class CreateBatch(BaseModel):
    """Many creates in one call: placed together, each kept or not on its own."""

    instances: list[CreateInstance] = Field(min_length=1, max_length=MAX_BATCH_CREATE)


class BatchItem(BaseModel):
    name: str
    #: the HTTP status a single create of this instance would have answered
    status: int
    #: the instance as it was kept (null: nothing was kept)
    instance: InstanceView | None = None
    error: ErrorBody | None = None


class BatchCreated(BaseModel):
    """One item per instance asked for, in the order asked."""

    results: list[BatchItem]


# --- events and live traffic (issue 4) -----------------------------------------------------------


class Event(BaseModel):
    """One committed change of fleet state, as kept on the CORRAL_EVENTS stream.

    ``index`` is the stream sequence JetStream gave it: monotonic, so a reader can resume after
    the last index it saw (0 only on an event not yet stored)."""

    index: int = 0
    type: str = Field(description="a registered type, e.g. instance.state (see docs)")
    ts: float = Field(description="when the change was committed (unix seconds)")
    host: str | None = None
    instance: str | None = None
    data: dict[str, Any] = Field(default_factory=dict)


class RateView(BaseModel):
    """Requests over one sliding window of whole seconds."""

    seconds: int
    hits: int
    hits_per_s: float
    status_per_s: dict[str, float] = Field(default_factory=dict, description="by status code")
    class_per_s: dict[str, float] = Field(default_factory=dict, description="2xx, 3xx, 4xx, 5xx")


class UrlOnline(BaseModel):
    url: str
    online: int


class ClientSeen(BaseModel):
    client: str
    last_seen: float


class TrafficView(BaseModel):
    """The live view of one instance's access log (built from lines with source "access")."""

    instance: str
    at: float = Field(description="the time the figures are for (unix seconds)")
    lines: int = Field(description="access-log lines received since the server started")
    hits: int = Field(description="lines parsed as requests")
    bad_lines: int = Field(description="lines that were not Common/Combined Log Format")
    online: int = Field(description="clients seen within online_window_s")
    online_window_s: float
    windows: list[RateView] = Field(default_factory=list)
    top_urls: list[UrlOnline] = Field(default_factory=list)
    url: str | None = None
    url_online: int | None = None
    clients: list[ClientSeen] = Field(default_factory=list,
                                      description="url's clients, latest access first")


# --- operations (issues 3 and 5) -----------------------------------------------------------------


class StepView(BaseModel):
    """One step of an operation: pending, running, done, failed, undoing, undone, undo_failed."""

    name: str
    state: str
    started_at: float | None = None
    ended_at: float | None = None
    error: str = ""


class OperationView(BaseModel):
    """A durable multi-step action and how far it got (``GET /v1/ops/{id}``).

    ``state`` is running, rolling_back, succeeded, rolled_back or needs_attention; ``hooks``
    lists the hooks that ran, with their exit codes and (bounded) output."""

    id: str
    kind: str
    target: str
    state: str
    finished: bool
    params: dict[str, Any] = Field(default_factory=dict)
    data: dict[str, Any] = Field(default_factory=dict)
    error: dict[str, Any] | None = None
    hooks: list[dict[str, Any]] = Field(default_factory=list)
    steps: list[StepView] = Field(default_factory=list)
    #: the kind's typed result once it has ended (see api/operations.py): read this, not data
    result: dict[str, Any] | None = None
    created_at: float
    updated_at: float


class RecreateRequest(BaseModel):
    """``POST /v1/instances/{name}/recreate``: where to create it again (default: same host)."""

    to: HostName | None = Field(default=None,
                                description="target host; empty means its own host")


class MigrateRequest(BaseModel):
    """``POST /v1/instances/{name}/migrate``."""

    to: HostName | None = Field(default=None,
                                description="target host; empty lets the scheduler pick")
    cold: bool = Field(default=False, description="stop first, then copy (no live pass)")


class StandbyRequest(BaseModel):
    """``POST /v1/instances/{name}/standby``: keep a warm copy on another host."""

    host: HostName | None = Field(default=None, description="standby host; empty lets the "
                                  "scheduler pick one (never the primary's)")
    every_seconds: float = Field(default=60.0, ge=1, le=7 * 86400,
                                 description="refresh interval")


class StandbyView(BaseModel):
    """A warm standby: where, how fresh (``data_age_seconds``), and what its refreshes cost."""

    instance: str
    host: str
    every_seconds: float
    #: new (never synced) | syncing | ready | stale (last refresh failed, previous copy kept)
    state: str
    last_sync_at: float | None = None
    #: when the copy's content was taken: a promoted standby drops back to this moment
    data_at: float | None = None
    data_age_seconds: float | None = None
    last_freeze_ms: float | None = None
    last_bytes: int | None = None
    total_bytes: int = 0
    syncs: int = 0
    last_error: str = ""


# --- shelving (issue 5) --------------------------------------------------------------------------


class ShelveRequest(BaseModel):
    """``POST /v1/instances/{name}/shelve``."""

    offload_after: float | None = Field(
        default=None, le=10 * 365 * 86400,
        description="seconds the disk stays on its host after shelving (a fast unshelve "
                    "there); 0 removes it at once, negative keeps it until unshelve or rm; "
                    "empty means the server's shelved_offload_seconds")


class UnshelveGroupRequest(BaseModel):
    """``POST /v1/unshelve``: many shelved instances back as one operation group."""

    names: list[InstanceName] = Field(default_factory=list, max_length=10_000,
                                      description="instances to unshelve (empty with all: "
                                                  "every one)")
    all: bool = Field(default=False, description="every shelved instance")
    to: HostName | None = Field(default=None, description="one host for all of them")
    parallel: int = Field(default=8, ge=1, le=256, description="unshelves in flight at once")

    @field_validator("names")
    @classmethod
    def _once_each(cls, v: list[str]) -> list[str]:
        seen: set[str] = set()
        for name in v:
            if name in seen:
                raise ValueError(f"{name!r} is named twice: name each instance once")
            seen.add(name)
        return v


class UnshelveRequest(BaseModel):
    """``POST /v1/instances/{name}/unshelve``."""

    to: HostName | None = Field(default=None, description="host to unshelve on; empty: its "
                                "old host when the disk is there and it fits, else the "
                                "scheduler's choice")


class ShelfView(BaseModel):
    """A shelved instance: its reservations (held by no host now) and where its disk is."""

    name: str
    driver: str
    cpus: float
    memory_bytes: int
    image: str | None = None
    shelf: str | None = Field(default=None, description="the shelved manifest's store name")
    shelved_from: str | None = None
    shelved_at: float | None = None
    disk_host: str | None = Field(default=None, description="host still keeping the disk")
    offload_at: float | None = Field(default=None, description="when that copy is removed; "
                                     "empty: kept until unshelve or rm")
    size: int | None = Field(default=None, description="bytes of the disk's files")
    stored_size: int | None = Field(default=None, description="bytes of its distinct chunks")
    unique_size: int | None = Field(default=None,
                                    description="bytes of its chunks no image shares")


# --- API tokens (issue 10) -----------------------------------------------------------------------

#: admin: everything; read-only: GET routes only; host: what an agent needs of the image store
TokenRole = Literal["admin", "read-only", "host"]
ROLES: tuple[TokenRole, ...] = ("admin", "read-only", "host")


class TokenCreate(BaseModel):
    """``POST /v1/tokens``: a new named token (its secret is in the answer, once)."""

    name: str = Field(pattern=TOKEN_NAME_PATTERN, description="a name to list and revoke it by")
    role: TokenRole = Field(description="admin, read-only (GET routes only) or host (the "
                                        "image-store routes an agent uses)")


class TokenView(BaseModel):
    """A stored token as listed: never its secret (only a hash of it is kept)."""

    name: str
    role: TokenRole
    created_at: float


class TokenCreated(TokenView):
    """The answer to ``POST /v1/tokens``: the only time the token itself is shown."""

    token: str = Field(description="the bearer token; store it now, it is not kept")


# --- metric history (issue 14) -------------------------------------------------------------------


class MetricPoint(BaseModel):
    """One bucket of a series: averages over ``[t, t + step_seconds)``, memory the most seen
    in it; None where no sample said."""

    t: float = Field(description="the bucket's start (unix seconds)")
    cpu_core_pct: float | None = Field(default=None, description="average % of one core")
    cpu_host_pct: float | None = Field(default=None, description="average % of the host")
    memory_bytes: int | None = Field(default=None, description="the most memory seen")
    host_busy_pct: float | None = Field(
        default=None, description="host series only: average % of the whole host busy (every "
                                  "process, not only the instances)")


class MetricSeries(BaseModel):
    """``GET /v1/instances/{name}/metrics`` and ``GET /v1/hosts/{name}/metrics``: the
    server's metric history, oldest first; buckets without a sample are left out. A host's
    series sums its instances."""

    instance: str = Field(description="the instance (or host) the series is of")
    kind: Literal["instance", "host"] = "instance"
    step_seconds: int = Field(description="width of each point's bucket")
    since: float
    until: float
    points: list[MetricPoint] = Field(default_factory=list)
