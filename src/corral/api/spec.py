"""The declarative fleet file (``corral apply -f fleet.toml``): its model and its JSON Schema.

A file is a list of ``[[instance]]`` tables. Every key is checked (an unknown one is refused:
a typo must never pass as a default), sizes and durations are read here, and each entry is
turned into the :class:`~corral.api.models.CreateInstance` the server would be sent, so a
file that passes :func:`load` fails at the server only for reasons of the fleet (a full host,
a missing image), never for its own.
"""

from __future__ import annotations

import json
import re
import tomllib
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from corral.api.models import NAME_PATTERN, CheckSpec, CreateInstance, HostName, RestartSpec
from corral.errors import InvalidRequest

_UNITS: dict[str, int] = {"": 1, "b": 1}
for _i, _p in enumerate("kmgt", start=1):
    _UNITS[_p] = _UNITS[_p + "i"] = _UNITS[_p + "ib"] = 1024**_i
    _UNITS[_p + "b"] = 1000**_i
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*([a-zA-Z]*)\s*$")
SIZE_PATTERN = r"^\s*(\d+(\.\d+)?|\.\d+)\s*([KMGTkmgt]([iI]?[bB]?)?|[bB])?\s*$"
_TIME = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
DURATION_PATTERN = r"^\s*\d+(\.\d+)?\s*[smhd]?\s*$"


def size_bytes(value: int | str) -> int:
    """Bytes of ``64M``, ``1Gi``, ``100MB`` or a bare number (as ``corral run --memory``)."""
    if isinstance(value, int):
        n = value
    else:
        m = _SIZE.match(value)
        factor = _UNITS.get(m.group(2).lower()) if m else None
        if m is None or factor is None:
            raise ValueError(f"bad size {value!r}: use a number with an optional unit: 512K, "
                             "64M, 1.5G, 512Ki, 1Gi, 100MB (or bytes)")
        n = int(float(m.group(1)) * factor)
    if n <= 0:
        raise ValueError(f"bad size {value!r}: must be more than 0 bytes")
    return n


def seconds(value: float | str) -> float:
    """Seconds of ``90``, ``90s``, ``5m``, ``1h``, ``2d``."""
    if isinstance(value, (int, float)):
        return float(value)
    raw = value.strip().lower()
    unit = raw[-1:] if raw[-1:] in _TIME else ""
    try:
        return float(raw[:-1] if unit else raw) * _TIME.get(unit, 1.0)
    except ValueError:
        raise ValueError(f"{value!r} is not a duration: write it like 30s, 5m or 1h") from None


Size = Annotated[int | str, Field(description="bytes, or a number with a unit: 64M, 1G, 512Ki, "
                                  "100MB", json_schema_extra={"pattern": SIZE_PATTERN})]
Duration = Annotated[float | str, Field(description="seconds, or 30s, 5m, 1h, 2d",
                                        json_schema_extra={"pattern": DURATION_PATTERN})]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RestartEntry(RestartSpec):
    model_config = ConfigDict(extra="forbid", title="RestartSpec")


class CheckEntry(CheckSpec):
    model_config = ConfigDict(extra="forbid", title="CheckSpec")


class StandbyEntry(_Strict):
    """A warm copy of the instance's disk on another host (``corral standby add``)."""

    host: HostName | None = Field(default=None, description="standby host; absent: the "
                                  "scheduler's pick (then any host the standby is on is fine)")
    every: Duration = Field(default=60.0, description="refresh interval (>= 1s)")

    @field_validator("every")
    @classmethod
    def _every(cls, v: float | str) -> float:
        s = seconds(v)
        if not 1 <= s <= 7 * 86400:
            raise ValueError(f"a refresh every {s:g}s is out of range: give 1s to 7d")
        return s


class InstanceEntry(_Strict):
    """One ``[[instance]]``: what ``corral run`` takes, as data."""

    name: str = Field(pattern=NAME_PATTERN, description="lowercase letters, digits and dashes")
    cpus: float = Field(default=0.1, gt=0, le=4096, description="CPU reservation, in cores")
    memory: Size = Field(default="64M", validate_default=True,
                         description="memory reservation")
    driver: str | None = Field(default=None, pattern=r"^[a-z][a-z0-9_-]{0,31}$",
                               description="process or runc (default: runc with an image or "
                                           "rootfs, else process)")
    host: HostName | None = Field(default=None, description="pin to this host (absent: the "
                                  "scheduler's pick, and any host is fine later)")
    image: str | None = Field(default=None, description="image of the server's store")
    rootfs: str | None = Field(default=None, description="root filesystem path on the host")
    entrypoint: list[str] | None = Field(default=None, description="replaces the image's "
                                         "Entrypoint and drops its Cmd ([]: none)")
    command: list[str] = Field(default_factory=list, description="argv of the workload")
    env: dict[str, str] = Field(default_factory=dict, description="environment (set at "
                                "create; the API does not show it back, so apply cannot "
                                "see it drift)")
    vip: str | None = Field(default=None, description="virtual IP with prefix, e.g. "
                            "10.0.0.50/24")
    tail: dict[str, str] = Field(default_factory=dict,
                                 description="log source name -> file to capture")
    standby: StandbyEntry | None = Field(default=None, description="a warm standby")
    restart: RestartEntry | None = Field(default=None, description="restart policy")
    check: CheckEntry | None = Field(default=None, description="health check")

    @field_validator("memory")
    @classmethod
    def _memory(cls, v: int | str) -> int:
        return size_bytes(v)

    def request(self) -> CreateInstance:
        """What ``corral run`` would send for this entry (raises ValidationError)."""
        return CreateInstance(
            name=self.name, cpus=self.cpus, memory_bytes=int(self.memory),
            driver=self.driver or ("runc" if self.image or self.rootfs else "process"),
            host=self.host, rootfs=self.rootfs, image=self.image, entrypoint=self.entrypoint,
            command=list(self.command), env=dict(self.env), vip=self.vip,
            tail=dict(self.tail), restart=self.restart or RestartSpec(), check=self.check)


class FleetSpec(_Strict):
    """A fleet file: the instances ``corral apply`` makes the fleet have."""

    model_config = ConfigDict(extra="forbid", title="corral fleet file")

    instance: list[InstanceEntry] = Field(default_factory=list,
                                          description="the instances, one [[instance]] each")

    @field_validator("instance")
    @classmethod
    def _once_each(cls, v: list[InstanceEntry]) -> list[InstanceEntry]:
        seen: set[str] = set()
        for i, entry in enumerate(v):
            if entry.name in seen:
                raise ValueError(f"instance[{i}]: {entry.name!r} is named twice: name each "
                                 "instance once")
            seen.add(entry.name)
        return v


def schema() -> dict[str, Any]:
    """The JSON Schema of a fleet file (docs/fleet.schema.json is a copy)."""
    out = FleetSpec.model_json_schema()
    out["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return out


class _Lines:
    """Where each ``[[instance]]`` starts and where its top-level keys are (1-based lines),
    to point at the line of a problem (a JSON file, or a key not found, gets the key alone)."""

    def __init__(self, text: str) -> None:
        self.text = text.splitlines()
        self.heads = [n for n, line in enumerate(self.text, 1)
                      if re.match(r"^\s*\[\[\s*instance\s*\]\]", line)]

    def of(self, index: int, key: str | None) -> int | None:
        if index >= len(self.heads):
            return None
        start = self.heads[index]
        end = self.heads[index + 1] if index + 1 < len(self.heads) else len(self.text) + 1
        if key is not None:
            for n in range(start + 1, end):
                if re.match(rf"^\s*\"?{re.escape(key)}\"?\s*[=.]", self.text[n - 1]):
                    return n
        return start


def _where(loc: tuple[Any, ...], lines: _Lines) -> str:
    key = ".".join(str(p) for p in loc)
    if len(loc) >= 2 and loc[0] == "instance" and isinstance(loc[1], int):
        rest = ".".join(str(p) for p in loc[2:])
        key = f"instance[{loc[1]}]" + (f".{rest}" if rest else "")
        line = lines.of(loc[1], str(loc[2]) if len(loc) > 2 else None)
        if line is not None:
            return f"line {line}, {key}"
    return key or "the file"


def load(text: str, source: str = "fleet file") -> FleetSpec:
    """Parse and check a fleet file; every problem is an InvalidRequest naming its line/key."""
    hint = "see 'corral apply --schema' and docs/operations.md (Declarative fleet)"
    try:
        # 'corral export --json' writes the same data as JSON; no TOML file starts with '{'
        raw = json.loads(text) if text.lstrip().startswith("{") else tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidRequest(f"{source}: not valid TOML: {exc}", hint=hint) from None
    except ValueError as exc:
        raise InvalidRequest(f"{source}: not valid JSON: {exc}", hint=hint) from None
    if not isinstance(raw, dict):
        raise InvalidRequest(f"{source}: not a table of [[instance]] entries", hint=hint)
    lines = _Lines(text)
    try:
        spec = FleetSpec.model_validate(raw)
    except ValidationError as exc:
        raise InvalidRequest(f"{source}: " + _problems(exc, (), lines), hint=hint) from None
    for i, entry in enumerate(spec.instance):
        try:
            entry.request()
        except ValidationError as exc:
            raise InvalidRequest(f"{source}: " + _problems(exc, ("instance", i), lines),
                                 hint=hint) from None
    return spec


def _problems(exc: ValidationError, prefix: tuple[Any, ...], lines: _Lines) -> str:
    parts = []
    for e in exc.errors()[:5]:
        loc = prefix + tuple(p for p in e["loc"] if p not in ("int", "str", "float")
                             and not str(p).startswith("function-"))
        msg = str(e["msg"]).removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (a typo?)"
        parts.append(f"{_where(loc, lines)}: {msg}")
    more = len(exc.errors()) - 5
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")
