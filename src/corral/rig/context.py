"""Where the CLI finds its fleet: ``CORRAL_URL``/``CORRAL_TOKEN`` (and ``CORRAL_CA_FILE``),
else the context file.

``corral up`` writes the context file (URL, token, data dir, the processes it started and the
network it built) so that every later command, and ``corral down``, works without flags. The
file's path can be moved with ``CORRAL_CONTEXT`` (tests always do, so they never touch a real
user's fleet).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from corral.errors import CorralError

NO_FLEET_HINT = "run 'corral up' to start a local fleet, or set CORRAL_URL and CORRAL_TOKEN"


@dataclass
class ProcInfo:
    """A process ``corral up`` started; ``start`` (jiffies since boot) guards against pid reuse."""

    name: str
    pid: int
    start: int
    argv: list[str]
    log: str
    netns: str | None = None
    address: str | None = None


@dataclass
class FleetContext:
    url: str
    token: str
    data_dir: str | None = None
    nats_url: str | None = None
    server: ProcInfo | None = None
    agents: list[ProcInfo] = field(default_factory=list)
    #: network built for ``--netns`` fleets: {"tag", "bridge", "subnet", "namespaces"}
    network: dict[str, Any] | None = None
    #: the fleet's CA certificate (its API is https with a certificate this CA signed)
    ca_file: str | None = None
    #: the servers after the first (``up --servers N``); ``url`` lists every server's API
    servers: list[ProcInfo] = field(default_factory=list)
    #: the fleet's PostgreSQL (``up --postgres``)
    postgres: ProcInfo | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> FleetContext:
        server = raw.get("server")
        return cls(
            url=str(raw["url"]),
            token=str(raw["token"]),
            data_dir=raw.get("data_dir"),
            nats_url=raw.get("nats_url"),
            server=ProcInfo(**server) if server else None,
            agents=[ProcInfo(**a) for a in raw.get("agents") or []],
            network=raw.get("network"),
            ca_file=raw.get("ca_file"),
            servers=[ProcInfo(**p) for p in raw.get("servers") or []],
            postgres=ProcInfo(**raw["postgres"]) if raw.get("postgres") else None,
        )


def context_path() -> Path:
    override = os.environ.get("CORRAL_CONTEXT")
    if override:
        return Path(override).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "corral" / "context.json"


def load_context(path: Path | None = None) -> FleetContext | None:
    path = path or context_path()
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise CorralError(
            f"the context file {path} cannot be read: {exc}",
            hint="remove it (the fleet it described is then unknown) or set CORRAL_CONTEXT",
        ) from exc
    try:
        return FleetContext.from_dict(raw)
    except (KeyError, TypeError) as exc:
        raise CorralError(
            f"the context file {path} is not one corral wrote: missing {exc}",
            hint="remove it, or set CORRAL_CONTEXT to another path",
        ) from exc


def save_context(ctx: FleetContext, path: Path | None = None) -> Path:
    """Write atomically with mode 0600: the file holds the fleet's token."""
    path = path or context_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(ctx.to_dict(), fh, indent=2)
    os.replace(tmp, path)
    return path


def remove_context(path: Path | None = None) -> None:
    (path or context_path()).unlink(missing_ok=True)


def ca_file() -> str | None:
    """The CA to check the fleet's https certificate with: ``CORRAL_CA_FILE``, else the one
    the context file records for its fleet (None: the system's store)."""
    override = os.environ.get("CORRAL_CA_FILE", "").strip()
    if override:
        return override
    url = os.environ.get("CORRAL_URL", "").strip()
    ctx = load_context()
    if ctx is None or (url and ctx.url.rstrip("/") != url.rstrip("/")):
        return None
    return ctx.ca_file


def resolve() -> tuple[str, str]:
    """(url, token) of the fleet to talk to; the environment wins over the context file."""
    url = os.environ.get("CORRAL_URL", "").strip()
    token = os.environ.get("CORRAL_TOKEN", "").strip()
    if url:
        if not token:
            ctx = load_context()
            token = ctx.token if ctx and ctx.url.rstrip("/") == url.rstrip("/") else ""
        if not token:
            raise CorralError(
                f"CORRAL_URL is set ({url}) but CORRAL_TOKEN is not",
                hint="set CORRAL_TOKEN to the fleet's token (DATA/token on the server)",
            )
        return url, token
    ctx = load_context()
    if ctx is None:
        raise CorralError(f"no corral fleet found (no {context_path()})", hint=NO_FLEET_HINT)
    # a token given alone is for the context's fleet: an operator handed a read-only token
    # must not act with the admin token the context file holds without knowing it
    return ctx.url, token or ctx.token
