"""Settings in layers: built-in defaults -> TOML file -> ``CORRAL_*`` environment -> flags.

Parsing (turning text into typed values, with errors that name the field and the value) is kept
apart from reading (where the text comes from), so each layer is one small function and the
precedence is visible in :func:`load`. Every field carries its documentation; a test checks that
``docs/configuration.md`` mentions each one.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corral.errors import ConfigError

ENV_PREFIX = "CORRAL_"


def _doc(text: str, default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    if "default_factory" in kw:
        return field(metadata={"doc": text}, **kw)
    return field(default=default, metadata={"doc": text})


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "corral"


@dataclass
class Settings:
    """Every setting of the server and the agent (each process reads the ones it needs)."""

    data_dir: Path = _doc(  # noqa: RUF009  (_doc returns a dataclasses.field)
        "directory for state: DB, NATS JetStream, agent handles, logs",
        default_factory=default_data_dir)
    token: str = _doc("bearer token for the API and the bus; generated into DATA/token if empty",
                      "")
    api_host: str = _doc("address the HTTP API listens on (never 0.0.0.0 unless you ask)",
                         "127.0.0.1")
    api_port: int = _doc("port of the HTTP API; 0 picks a free one", 7480)
    db_url: str = _doc("SQLAlchemy URL; empty means SQLite at DATA/corral.db "
                       "(postgresql+psycopg://user:pw@host/db for a shared database)", "")
    nats_url: str = _doc("NATS server to use; empty means spawn nats-server with JetStream in "
                         "DATA/nats", "")
    nats_host: str = _doc("address the embedded nats-server listens on", "127.0.0.1")
    nats_port: int = _doc("port of the embedded nats-server; 0 picks a free one", 0)
    heartbeat_seconds: float = _doc("how often agents heartbeat", 2.0)
    lease_seconds: float = _doc("how long a heartbeat keeps a host's lease", 10.0)
    sample_seconds: float = _doc("how often agents sample CPU and memory counters", 1.0)
    max_heartbeats_per_second: float = _doc(
        "server: the most heartbeats a second the leader asks of the whole fleet; a larger "
        "fleet heartbeats, samples and holds its leases proportionally longer than the three "
        "settings above (0 = no limit)", 500.0)
    max_instance_samples_per_second: float = _doc(
        "server: the most instance figures a second the leader takes from the fleet's "
        "samples (each sample carries every instance of its host); a denser fleet samples "
        "less often, at most every half lease (0 = no limit)", 20000.0)
    stop_timeout: float = _doc("seconds between SIGTERM and SIGKILL when stopping", 10.0)
    host_name: str = _doc("agent: this host's name (default: the machine's hostname)", "")
    host_address: str = _doc("agent: address other hosts reach this one at", "127.0.0.1")
    drivers: str = _doc("agent: comma-separated drivers to offer (those available here)",
                        "process,runc")
    log_level: str = _doc("logging level: debug, info, warning, error", "info")
    events_max_age_seconds: float = _doc("server: how long the event stream keeps an event",
                                         30 * 86400.0)
    events_max_msgs: int = _doc("server: how many events the event stream keeps at most",
                                1_000_000)
    traffic_online_seconds: float = _doc("server: a client counts as online this long after "
                                         "its last request (live traffic view)", 1800.0)
    hooks_dir: str = _doc("server: directory of operation hooks (pre-<op>, post-<op>, "
                          "<op>-failed); empty means DATA/hooks", "")
    failover_grace_seconds: float = _doc("server: after a host's lease ran out, wait this long "
                                         "more before failing its instances over", 1.0)
    disk_backend: str = _doc("agent: where instance disks live: dir (plain directories, moved "
                             "with rsync) or btrfs (subvolumes, moved with send/receive; "
                             "disk_root must be on btrfs)", "dir")
    disk_root: str = _doc("agent: directory of instance disks; empty means DATA/disks", "")
    data_port: int = _doc("agent: TCP port of the data channel for host-to-host disk "
                          "transfers and live migration streams, on host_address; 0 picks a "
                          "free one", 0)
    fence_margin_seconds: float = _doc("agent: stop this host's instances this long before "
                                       "its lease would run out without an acknowledged "
                                       "heartbeat (self-fencing)", 2.0)
    vip_interface: str = _doc("agent: network interface that virtual IPs are added to; empty "
                              "means the one that holds host_address", "")
    tls: str = _doc("server: 'on' serves the API over HTTPS and the bus over TLS, with "
                    "certificates from the fleet's own CA (DATA/pki); 'off' serves them in "
                    "clear, and only on loopback", "off")
    server_url: str = _doc("agent: the server's API, to enroll with a join token (https://...)",
                           "")
    join_token: str = _doc("agent: the one-time token from 'corral host add NAME', traded at "
                           "first start for this host's own identity", "")
    ca_file: str = _doc("agent: the fleet's CA certificate, to check the server with when "
                        "enrolling (later it is kept in DATA/identity)", "")
    shelved_offload_seconds: float = _doc("server: how long a shelved instance's disk stays on "
                                          "its host (a fast unshelve there) before it is "
                                          "removed; 0 = at once, -1 = never", 3600.0)

    leader_lease_seconds: float = _doc("server: how long a server leads the fleet without "
                                       "renewing its lease in the shared database (renewed "
                                       "every third of it); another server takes over once "
                                       "it ran out", 3.0)
    server_name: str = _doc("server: this server's node name in the NATS cluster (unique per "
                            "node); empty means the server's id (DATA/server-id)", "")
    nats_cluster_port: int = _doc("server: port the embedded nats-server listens on for the "
                                  "other nodes of its cluster (routes), on nats_host; 0 = no "
                                  "cluster", 0)
    nats_routes: str = _doc("server: the other nodes of the NATS cluster, comma-separated "
                            "nats-route://host:port", "")
    nats_cluster_name: str = _doc("server: name of the NATS cluster (the same on every node)",
                                  "corral")
    stream_replicas: int = _doc("server: copies JetStream keeps of the event and log streams "
                                "(1; 3 in a cluster of three nodes)", 1)
    failover: str = _doc("timing preset: empty keeps the defaults; 'fast' makes lease_seconds "
                         "2, heartbeat_seconds 0.5, fence_margin_seconds 0.5 and "
                         "failover_grace_seconds 0.5 (each still set on its own wins)", "")
    history_fine_seconds: float = _doc("server: metric history: width of a bucket of the "
                                       "fine tier (whole seconds, at least 1)", 10.0)
    history_fine_keep_seconds: float = _doc("server: metric history: how long the fine tier "
                                            "keeps its buckets", 86400.0)
    history_coarse_seconds: float = _doc("server: metric history: width of a bucket of the "
                                         "coarse tier (whole seconds, at least 1)", 300.0)
    history_coarse_keep_seconds: float = _doc("server: metric history: how long the coarse "
                                              "tier keeps its buckets", 30 * 86400.0)
    history_flush_seconds: float = _doc("server: metric history: how often the leader writes "
                                        "the samples it gathered (one transaction)", 10.0)
    live_migrate_downtime_ms: int = _doc("server: the longest pause a live migration of a VM "
                                         "may switch over in (QEMU's downtime-limit, 1 to "
                                         "60000 ms)", 300)


FIELDS: dict[str, dataclasses.Field[Any]] = {f.name: f for f in dataclasses.fields(Settings)}
#: named timing presets (``failover = "fast"``): defaults beneath every layer, so any of these
#: settings given on its own (file, environment, flag) still wins
PROFILES: dict[str, dict[str, float]] = {
    "": {},
    "fast": {"lease_seconds": 2.0, "heartbeat_seconds": 0.5, "fence_margin_seconds": 0.5,
             "failover_grace_seconds": 0.5},
}
#: the fence keeper's look at ``lease.json`` (``corral.agent.keeper.POLL_SECONDS``)
KEEPER_POLL_SECONDS = 0.1
#: the least ``fence_margin_seconds``: the keeper's poll, then killing the instances' cgroups
#: and deleting their VIPs (``ip addr del``), on a loaded host
MIN_FENCE_MARGIN = KEEPER_POLL_SECONDS + 0.15
#: the least ``lease_seconds - fence_margin_seconds``: how long an agent keeps its guarded
#: instances without an acknowledged heartbeat (a heartbeat's answer is awaited up to 1 s)
MIN_FENCE_WINDOW = 1.0
#: the fewest heartbeats a lease must hold (two may be late or lost before the host is down)
HEARTBEATS_PER_LEASE = 3
#: the fewest heartbeats the agent's fence window must hold (one may be slow before it fences)
HEARTBEATS_PER_FENCE_WINDOW = 2
_EPS = 1e-9

#: durations whose 0 and -1 mean something (the docs define them): what -1 means
SPECIAL_VALUES = {"shelved_offload_seconds": "never"}
#: floats for which 0 means something (no limit): 0 or more
ZERO_MEANS = {"max_heartbeats_per_second": "no limit",
              "max_instance_samples_per_second": "no limit"}
#: integers with bounds: the least and the most
INT_RANGES: dict[str, tuple[int, int]] = {"live_migrate_downtime_ms": (1, 60_000)}


def _parse(name: str, raw: Any, source: str) -> Any:
    f = FIELDS.get(name)
    if f is None:
        known = ", ".join(sorted(FIELDS))
        raise ConfigError(f"unknown setting '{name}' in {source}", hint=f"known settings: {known}")
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    try:
        if kind == "int":
            number = int(raw)
            low, high = INT_RANGES.get(name, (number, number))
            if not low <= number <= high:
                raise ValueError(f"must be between {low} and {high}")
            return number
        if kind == "float":
            value = float(raw)
            if name in SPECIAL_VALUES:
                if value < 0 and value != -1:
                    raise ValueError(f"must be 0 or more, or -1 ({SPECIAL_VALUES[name]})")
            elif name in ZERO_MEANS:
                if value < 0:
                    raise ValueError(f"must be 0 ({ZERO_MEANS[name]}) or more")
            elif value <= 0:
                raise ValueError("must be positive")
            return value
        if kind == "Path":
            return Path(str(raw)).expanduser()
        return str(raw)
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"setting '{name}' from {source} has a bad value {raw!r}: {exc}",
            hint=f"{name} takes a {kind}: {f.metadata['doc']}",
        ) from exc


def from_mapping(values: Mapping[str, Any], source: str) -> dict[str, Any]:
    return {k.replace("-", "_"): _parse(k.replace("-", "_"), v, source) for k, v in values.items()}


def read_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        return {}
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}",
                          hint="fix the file or move it away") from exc
    return from_mapping(raw, str(path))


def read_env(env: Mapping[str, str]) -> dict[str, Any]:
    picked = {
        k[len(ENV_PREFIX):].lower(): v
        for k, v in env.items()
        if k.startswith(ENV_PREFIX) and k[len(ENV_PREFIX):].lower() in FIELDS
    }
    return from_mapping(picked, "the environment")


def load(
    flags: Mapping[str, Any] | None = None,
    *,
    config_file: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> Settings:
    """Defaults, then the file, then the environment, then flags (``None`` flags are unset)."""
    env = os.environ if env is None else env
    merged: dict[str, Any] = {}
    set_flags = {k: v for k, v in (flags or {}).items() if v is not None}
    env_values = read_env(env)
    data_dir = set_flags.get("data_dir") or env_values.get("data_dir")
    path = config_file or (Path(data_dir) / "corral.toml" if data_dir else None)
    if path is not None:
        merged.update(read_file(Path(path)))
    merged.update(env_values)
    merged.update(from_mapping(set_flags, "the command line"))
    profile = str(merged.get("failover", "")).strip().lower()
    if profile == "default":
        profile = ""
    if profile not in PROFILES:
        raise ConfigError(f"setting 'failover' has a bad value {merged['failover']!r}",
                          hint="failover takes '' (the defaults) or "
                               + ", ".join(repr(k) for k in PROFILES if k))
    merged["failover"] = profile
    for key, value in PROFILES[profile].items():
        merged.setdefault(key, value)
    settings = Settings(**merged)
    check_timing(settings)
    return settings


def timing_problems(s: Settings) -> list[tuple[str, str]]:
    """What is wrong with the lease timings, as (problem, what to do) pairs; empty when sound.

    The rules (docs/configuration.md, "Lease and fencing timings"):

    1. ``heartbeat_seconds <= lease_seconds / 3``: the server's lease holds three heartbeats;
    2. ``fence_margin_seconds >= 0.25``: the agent's fence deadline falls at least the margin
       before the server's (it counts from the heartbeat's send, the server from its arrival),
       and the margin must cover the fence keeper's poll (0.1 s) and the kill itself, so the
       old copy is gone before the lease ends -- and ``failover_grace_seconds`` later the
       server fails it over;
    3. ``lease_seconds - fence_margin_seconds >= max(2 * heartbeat_seconds, 1.0)``: the agent
       keeps its instances through a heartbeat answered late, and for at least a second.
    """
    out: list[tuple[str, str]] = []
    lease, hb, margin = s.lease_seconds, s.heartbeat_seconds, s.fence_margin_seconds
    window = lease - margin
    if hb * HEARTBEATS_PER_LEASE > lease + _EPS:
        out.append((f"heartbeat_seconds {hb:g} is more than a third of lease_seconds {lease:g}: "
                    "a host would lose its lease after fewer than three heartbeats",
                    f"set heartbeat_seconds to at most {lease / HEARTBEATS_PER_LEASE:.3g}, or "
                    f"lease_seconds to at least {hb * HEARTBEATS_PER_LEASE:.3g}"))
    if margin + _EPS < MIN_FENCE_MARGIN:
        out.append((f"fence_margin_seconds {margin:g} is under {MIN_FENCE_MARGIN:g}: the fence "
                    "keeper's poll (0.1 s) and the kill may not be over before the server's "
                    "lease ends",
                    f"set fence_margin_seconds to at least {MIN_FENCE_MARGIN:g}"))
    need = max(HEARTBEATS_PER_FENCE_WINDOW * hb, MIN_FENCE_WINDOW)
    if window + _EPS < need:
        why = (f"shorter than {HEARTBEATS_PER_FENCE_WINDOW} heartbeats "
               f"({HEARTBEATS_PER_FENCE_WINDOW} x {hb:g})"
               if need > MIN_FENCE_WINDOW else f"under {MIN_FENCE_WINDOW:g} s")
        fixes = []
        if lease - need >= MIN_FENCE_MARGIN - _EPS:
            fixes.append(f"fence_margin_seconds to at most {lease - need:.3g}")
        fixes.append(f"lease_seconds to at least {need + max(margin, MIN_FENCE_MARGIN):.3g}")
        out.append((f"the fence window lease_seconds - fence_margin_seconds = {lease:g} - "
                    f"{margin:g} = {window:.3g} s is {why}: one slow heartbeat would make the "
                    "host fence its own instances",
                    "set " + ", or ".join(fixes)
                    + (f", or heartbeat_seconds to at most {window / 2:.3g}"
                       if need > MIN_FENCE_WINDOW and window / 2 >= 0.01 else "")))
    if s.max_heartbeats_per_second < 0:
        out.append((f"max_heartbeats_per_second {s.max_heartbeats_per_second:g} is negative",
                    "set it to 0 (no limit) or to the heartbeats a second the leader should "
                    "answer at most, e.g. 500"))
    if s.max_instance_samples_per_second < 0:
        out.append((f"max_instance_samples_per_second {s.max_instance_samples_per_second:g} "
                    "is negative", "set it to 0 (no limit) or to the instance figures a "
                    "second the leader should take at most, e.g. 20000"))
    return out


def check_timing(s: Settings) -> None:
    """Refuse lease timings that break a rule of :func:`timing_problems`, saying what to do."""
    problems = timing_problems(s)
    if problems:
        raise ConfigError(
            "bad lease timings: " + "; ".join(p for p, _ in problems),
            hint="; ".join(h for _, h in problems)
                 + ("" if s.failover else " (or --set failover=fast: lease 2 s, heartbeat 0.5 s,"
                    " fence margin 0.5 s, grace 0.5 s)")
                 + "; see 'Lease and fencing timings' in docs/configuration.md")


def ensure_token(settings: Settings) -> str:
    """The configured token, or the one in DATA/token, created (mode 0600) on first use."""
    if settings.token:
        return settings.token
    import secrets

    path = Path(settings.data_dir) / "token"
    if path.exists():
        token = path.read_text().strip()
        if not token:  # never "no auth": an empty secret would let anyone in
            raise ConfigError(f"the token file {path} is empty",
                              hint="remove it to have a new token made, or write the fleet's "
                                   "token into it")
        settings.token = token
        return token
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    settings.token = token
    return token
