"""The control plane's state: hosts and instances, in SQLite by default or PostgreSQL.

The schema is owned by Alembic migrations (``control/migrations/versions``); the ORM classes
below must match them, and a test compares the two. :func:`open_db` runs ``upgrade head`` at
every start for both backends through the same code path, so a shared PostgreSQL database and a
laptop's SQLite file never drift apart. Timestamps are POSIX seconds (floats): they cross the
API as numbers anyway and compare the same in every database.

To add a migration, copy the newest file in ``versions/``, bump ``revision`` and
``down_revision``, and write ``upgrade``/``downgrade`` by hand (no alembic.ini is needed).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    SmallInteger,
    String,
    Text,
    create_engine,
    event,
    false,
    text,
)
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from corral.bus.messages import HealthCheck, RestartPolicy, WireSpec, process_fields
from corral.config import Settings
from corral.errors import ConfigError

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"
#: the PostgreSQL advisory lock that serialises migrations of servers starting together
MIGRATION_LOCK = 0x636F7272  # "corr"


class Base(DeclarativeBase):
    pass


class Host(Base):
    __tablename__ = "hosts"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    address: Mapped[str] = mapped_column(String(255))
    cores: Mapped[int] = mapped_column(Integer)
    memory_bytes: Mapped[int] = mapped_column(BigInteger)
    disk_bytes: Mapped[int] = mapped_column(BigInteger)
    drivers: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    state: Mapped[str] = mapped_column(String(16), default="up")
    agent_version: Mapped[str] = mapped_column(String(64), default="")
    joined_at: Mapped[float] = mapped_column(Float, default=time.time)
    last_heartbeat: Mapped[float | None] = mapped_column(Float, nullable=True)
    lease_expires_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    #: the agent's data channel port for host-to-host disk transfers (migration 0005); 0 = none
    data_port: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    #: where instance disks live on this host: ``dir`` or ``btrfs`` (migration 0005)
    disk_backend: Mapped[str] = mapped_column(String(16), default="dir", server_default="dir")
    #: ``corral host drain``: the scheduler places nothing new here (migration 0011)
    draining: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


class HostIdentity(Base):
    """A host's bus identity: the public half of the nkey its agent made (migration 0008).
    Only hosts listed here may log in to the bus; removing the row revokes the host."""

    __tablename__ = "host_identities"

    host: Mapped[str] = mapped_column(String(64), primary_key=True)
    public_key: Mapped[str] = mapped_column(String(64), unique=True)
    enrolled_at: Mapped[float] = mapped_column(Float)


class JoinToken(Base):
    """A one-time, expiring token that lets one named host enroll (migration 0008); only
    its hash is kept."""

    __tablename__ = "join_tokens"

    host: Mapped[str] = mapped_column(String(64), primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[float] = mapped_column(Float)
    expires_at: Mapped[float] = mapped_column(Float)


class Instance(Base):
    __tablename__ = "instances"

    name: Mapped[str] = mapped_column(String(63), primary_key=True)
    host: Mapped[str | None] = mapped_column(
        String(64), ForeignKey("hosts.name"), nullable=True, index=True
    )
    driver: Mapped[str] = mapped_column(String(32))
    command: Mapped[list[str]] = mapped_column(JSON)
    rootfs: Mapped[str | None] = mapped_column(String(4096), nullable=True)
    #: image of the server's store the root is materialised from (migration 0004)
    image: Mapped[str | None] = mapped_column(String(255), nullable=True)
    env: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    #: extra log sources to capture (migration 0002): name -> path
    tail: Mapped[dict[str, str]] = mapped_column(JSON, default=dict, server_default="{}")
    cpus: Mapped[float] = mapped_column(Float)
    memory_bytes: Mapped[int] = mapped_column(BigInteger)
    desired_state: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16))
    pid: Mapped[int | None] = mapped_column(Integer, nullable=True)
    exit_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    epoch: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[float] = mapped_column(Float, default=time.time)
    updated_at: Mapped[float] = mapped_column(Float, default=time.time)
    #: virtual IP (``10.0.0.50/24``) that moves with the instance (migration 0005)
    vip: Mapped[str | None] = mapped_column(String(64), nullable=True)
    #: shelving (migration 0006): the host that still keeps a copy of the disk (the shelved
    #: disk, or an old copy left behind when it came back elsewhere), dropped at ``offload_at``
    #: (NULL: never); ``shelf`` names the shelved manifest in the image store, ``shelved_from``
    #: the state it was shelved from (unshelve starts it again if that was running)
    disk_host: Mapped[str | None] = mapped_column(String(64), nullable=True)
    shelf: Mapped[str | None] = mapped_column(String(255), nullable=True)
    shelved_from: Mapped[str | None] = mapped_column(String(16), nullable=True)
    shelved_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    offload_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    #: what its image's config decided at create (migration 0010, see images/oci_config.py):
    #: the process's ids, working directory and stop signal, and what ``show`` shows of it;
    #: kept here so every later copy (migrated, recreated, unshelved) runs the same process
    image_config: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    #: restart policy (migration 0012, ``RestartPolicy`` fields; NULL: "no"), enforced by the
    #: agent, and how many restarts the agent made of the current copy (from its reports)
    restart_policy: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    restarts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    #: health check (migration 0012, ``HealthCheck`` fields; NULL: none) and the health its
    #: agent last reported (unknown, healthy, unhealthy; NULL without a check)
    check_spec: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    health: Mapped[str | None] = mapped_column(String(16), nullable=True)

    def wire_spec(self, epoch: int | None = None) -> WireSpec:
        """What an agent is asked to create (the one place a row becomes a spec)."""
        return WireSpec(name=self.name, driver=self.driver, command=list(self.command),
                        rootfs=self.rootfs, image=self.image, env=dict(self.env or {}),
                        cpus=self.cpus, memory_bytes=self.memory_bytes,
                        epoch=self.epoch if epoch is None else epoch,
                        tail=dict(self.tail or {}), vip=self.vip,
                        restart=RestartPolicy.model_validate(self.restart_policy or {}),
                        check=(HealthCheck.model_validate(self.check_spec)
                               if self.check_spec else None),
                        **process_fields(self.image_config))


class Standby(Base):
    """A warm copy of an instance's disk on another host (migration 0005).

    ``data_at`` is when the copy's content was taken (the frozen pass of the last complete
    refresh): a promoted standby "drops back in time" to it. ``state`` is ``syncing`` while a
    refresh runs, ``ready`` after a complete one, ``stale`` when the last refresh failed (the copy
    still holds the previous complete refresh's files, none truncated).
    """

    __tablename__ = "standbys"

    instance: Mapped[str] = mapped_column(
        String(63), ForeignKey("instances.name", ondelete="CASCADE"), primary_key=True)
    host: Mapped[str] = mapped_column(String(64), ForeignKey("hosts.name"), index=True)
    every_seconds: Mapped[float] = mapped_column(Float)
    state: Mapped[str] = mapped_column(String(16))
    last_sync_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    data_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    last_freeze_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    last_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    total_bytes: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    syncs: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    last_error: Mapped[str] = mapped_column(Text, default="", server_default="")
    created_at: Mapped[float] = mapped_column(Float, default=time.time)


class ApiToken(Base):
    """An API bearer token with a role (migration 0007), kept as the SHA-256 of the whole
    token: a copy of the database lets nobody call the API. ``key_id`` is the token's public
    part, so a lookup finds one row and the secret is compared in constant time
    (``control/tokens.py``)."""

    __tablename__ = "api_tokens"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    key_id: Mapped[str] = mapped_column(String(32), unique=True)
    secret_sha256: Mapped[str] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[float] = mapped_column(Float)


class LeaderLease(Base):
    """The one lease row (id 1, migration 0009): which server leads, until when (the
    database's clock), and the fencing ``generation``, bumped at every takeover. Every write
    of the leader checks the generation in its own transaction (``control/leader.py``)."""

    __tablename__ = "leadership"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    generation: Mapped[int] = mapped_column(BigInteger)
    holder: Mapped[str] = mapped_column(String(64))
    holder_api_url: Mapped[str] = mapped_column(String(255))
    expires_at: Mapped[float] = mapped_column(Float)
    #: the longest host lease any leader granted (migration 0014, control/pace.py): a new
    #: leader's fresh leases are at least this long
    lease_ceiling: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")


class Server(Base):
    """A ``corral server`` sharing this database (migration 0009), refreshed with its lease
    polls: ``GET /v1/status`` lists them, enrolment hands hosts every node's bus URL."""

    __tablename__ = "servers"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    api_url: Mapped[str] = mapped_column(String(255))
    nats_url: Mapped[str] = mapped_column(String(1024))
    started_at: Mapped[float] = mapped_column(Float)
    last_seen: Mapped[float] = mapped_column(Float)
    version: Mapped[str] = mapped_column(String(64))


class MetricBucket(Base):
    """One bucket of metric history (migration 0013, ``control/history.py``): an instance's
    or a host's CPU and memory over ``[t, t + width)`` of one tier. Sums and counts, not
    averages, so a bucket written by two flushes (or merged into a wider one when a query
    coarsens) still averages exactly; memory is the most seen."""

    __tablename__ = "metric_history"
    __table_args__ = (Index("ix_metric_history_tier_t", "tier", "t"),)

    #: ``instance`` or ``host``
    kind: Mapped[str] = mapped_column(String(8), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    #: 0: the fine tier, 1: the coarse one
    tier: Mapped[int] = mapped_column(SmallInteger, primary_key=True, autoincrement=False)
    #: the bucket's start, unix seconds, a multiple of its tier's width
    t: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    samples: Mapped[int] = mapped_column(Integer)
    #: samples that carried CPU figures, and the sums of those figures
    cpu_n: Mapped[int] = mapped_column(Integer)
    cpu_core_sum: Mapped[float] = mapped_column(Float)
    cpu_host_sum: Mapped[float] = mapped_column(Float)
    memory_max: Mapped[int] = mapped_column(BigInteger)
    #: hosts: samples that said how busy the whole host was (every process), and their sum
    busy_n: Mapped[int] = mapped_column(Integer)
    busy_sum: Mapped[float] = mapped_column(Float)


def db_url(settings: Settings) -> URL:
    """``settings.db_url`` or the SQLite file in the data dir."""
    raw = settings.db_url or f"sqlite:///{Path(settings.data_dir) / 'corral.db'}"
    try:
        return make_url(raw)
    except Exception as exc:  # sqlalchemy raises ArgumentError with little context
        raise ConfigError(
            f"db_url {raw!r} is not a database URL: {exc}",
            hint="use sqlite:///path/to/file.db or postgresql+psycopg://user:pw@host/db",
        ) from exc


def safe_url(url: URL) -> str:
    """The URL with any password hidden, for status pages and logs."""
    return url.render_as_string(hide_password=True)


#: libpq settings that bound how long a call waits on a PostgreSQL that went silent (a cut
#: cable, a host frozen) instead of on the kernel's defaults, where an unanswered send is
#: retried for ~15 minutes and an idle connection is never probed: a leader stuck in such a
#: call cannot even notice its lease ran out. Keepalives find a dead peer of an idle
#: connection in ~11 s, tcp_user_timeout gives up on unacknowledged data after 15 s, and a
#: connect gives up after 10 s.
PG_CONNECT_ARGS: dict[str, Any] = {
    "connect_timeout": 10, "keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2,
    "keepalives_count": 3, "tcp_user_timeout": 15_000,
}


def make_engine(url: URL) -> Engine:
    if url.get_backend_name() == "sqlite":
        if url.database:
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            # FULL: a commit is on disk before the server acts on it (asks an agent to start
            # a copy, say); NORMAL could lose the last commits at a power loss while the
            # agents had already acted on them
            cur.execute("PRAGMA synchronous=FULL")
            cur.close()

        return engine
    # a URL's own settings win: they are the operator's
    args = {k: v for k, v in PG_CONNECT_ARGS.items() if k not in url.query}
    return create_engine(url, pool_pre_ping=True, connect_args=args)


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest revision (no-op when it is already there)."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            # servers of one fleet start together: one migrates, the others wait for its
            # transaction (PostgreSQL's DDL is transactional) and then find the schema at head
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


def open_db(settings: Settings) -> tuple[Engine, sessionmaker[Session]]:
    """Engine and session factory for ``settings``, with the schema migrated."""
    url = db_url(settings)
    engine: Engine | None = None
    try:
        engine = make_engine(url)
        migrate(engine)
    except Exception as exc:
        if engine is not None:
            engine.dispose()
        raise ConfigError(
            f"cannot open or migrate the database at {safe_url(url)}: {exc}",
            hint="check db_url, that the database exists and that this user may create tables",
        ) from exc
    log.info("database ready at %s", safe_url(url))
    return engine, sessionmaker(engine, expire_on_commit=False)
