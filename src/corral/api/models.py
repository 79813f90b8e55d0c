"""HTTP wire models, shared by the server (FastAPI) and every client (CLI, tests, dashboard).

The CLI imports only this package to talk to the server (as Nomad's ``command/`` only imports its
``api`` module), so these models are the contract; the OpenAPI document is generated from them.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, field_validator

NAME_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"


class CreateInstance(BaseModel):
    name: str = Field(pattern=NAME_PATTERN, description="lowercase letters, digits and dashes")
    command: list[str] = Field(min_length=1, description="argv of the workload")
    cpus: float = Field(default=0.1, gt=0, le=4096, description="CPU reservation, in cores")
    memory_bytes: int = Field(default=64 * 1024**2, gt=0, description="memory reservation")
    driver: str = Field(default="process", pattern=r"^[a-z][a-z0-9_-]*$")
    host: str | None = Field(default=None, description="pin to this host")
    rootfs: str | None = Field(default=None, description="root filesystem path on the host")
    env: dict[str, str] = Field(default_factory=dict)
    start: bool = Field(default=True, description="start right after creating")

    @field_validator("command")
    @classmethod
    def _no_empty_program(cls, v: list[str]) -> list[str]:
        if not v[0].strip():
            raise ValueError("the program (first word of command) is empty")
        return v


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
    desired_state: str
    state: str
    pid: int | None = None
    exit_code: int | None = None
    epoch: int = 0
    created_at: float
    updated_at: float
    usage: Usage = Field(default_factory=Usage)
    allowed: list[str] = Field(default_factory=list, description="verbs allowed from this state")


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


class FleetStatus(BaseModel):
    version: str
    hosts_up: int
    hosts_down: int
    instances: dict[str, int]
    nats_url: str
    db: str


class ErrorBody(BaseModel):
    code: str
    message: str
    hint: str = ""
    retryable: bool = False
    details: dict[str, Any] = Field(default_factory=dict)


class ErrorResponse(BaseModel):
    error: ErrorBody
