"""The same migrations and API against a real PostgreSQL server started for this test run.

The server runs from the PostgreSQL binaries (as the ``postgres`` user when we are root, since
initdb refuses root), listens on 127.0.0.1 on a free port with its socket in a temp dir, and is
stopped in a finalizer whatever happens.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from corral.bus.embedded import free_port
from corral.config import Settings
from corral.control.db import MIGRATIONS, Base, open_db
from corral.ops.store import operations

pytestmark = pytest.mark.postgres

GiB = 1024**3


def _pg_bin() -> Path | None:
    for cand in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if Path(cand, "initdb").exists():
            return Path(cand)
    found = shutil.which("initdb")
    return Path(found).parent if found else None


def _as_pg(argv: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    bindir = _pg_bin()
    if bindir is None:
        pytest.skip("PostgreSQL binaries (initdb, postgres) not found; apt-get install postgresql")
    if os.geteuid() == 0 and (shutil.which("runuser") is None or _no_user("postgres")):
        pytest.skip("running as root needs runuser and a 'postgres' user to run initdb")
    # not under pytest's tmp dir: that one is private to root and postgres must reach it
    top = Path(tempfile.mkdtemp(prefix="corral-pg-"))
    proc: subprocess.Popen[bytes] | None = None
    try:
        if os.geteuid() == 0:
            shutil.chown(top, "postgres", "postgres")
        data = top / "data"
        subprocess.run(_as_pg([str(bindir / "initdb"), "-D", str(data), "-U", "corral",
                               "--auth=trust", "-E", "UTF8", "--no-sync"]),
                       check=True, capture_output=True, timeout=120)
        port = free_port("127.0.0.1")
        # postgres itself is our child (not runuser's), so the finalizer's signal reaches it
        as_user = {"user": "postgres", "group": "postgres", "extra_groups": []} if (
            os.geteuid() == 0) else {}
        with (top / "pg.log").open("wb") as logf:
            proc = subprocess.Popen(
                [str(bindir / "postgres"), "-D", str(data), "-k", str(top), "-p", str(port),
                 "-h", "127.0.0.1", "-c", "fsync=off"],
                stdout=logf, stderr=subprocess.STDOUT, **as_user)  # type: ignore[call-overload]
        url = f"postgresql+psycopg://corral@127.0.0.1:{port}/postgres"
        _wait_ready(port, proc, top / "pg.log")
        import psycopg

        with psycopg.connect(f"host=127.0.0.1 port={port} user=corral dbname=postgres",
                             autocommit=True) as conn:
            conn.execute("CREATE DATABASE corral_test")
        yield url.replace("/postgres", "/corral_test")
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # "fast" shutdown: disconnect clients, stop
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        shutil.rmtree(top, ignore_errors=True)


def _no_user(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
    except KeyError:
        return True
    return False


def _wait_ready(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    import psycopg

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"postgres exited: {log.read_text()[-2000:]}")
        try:
            with psycopg.connect(f"host=127.0.0.1 port={port} user=corral dbname=postgres",
                                 connect_timeout=2):
                return
        except psycopg.OperationalError:
            time.sleep(0.1)
    raise AssertionError("postgres did not accept connections in 60s")


def _schema() -> sa.MetaData:
    """What the migrations must build: the ORM's tables and the operation store's table."""
    meta = sa.MetaData()
    for table in Base.metadata.tables.values():
        table.to_metadata(meta)
    operations.to_metadata(meta)
    return meta


def _head() -> str:
    """The newest revision in control/migrations/versions (there must be exactly one)."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    heads = ScriptDirectory.from_config(cfg).get_heads()
    assert len(heads) == 1, f"migrations have several heads: {heads}"
    return str(heads[0])


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_migrations_match_the_models_and_are_idempotent(
        backend: str, pg_url: str, tmp_path: Path) -> None:
    url = pg_url if backend == "postgresql" else ""
    settings = Settings(data_dir=tmp_path, db_url=url)
    for _ in range(2):  # a second start finds the schema at head and changes nothing
        engine, _sessions = open_db(settings)
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(ctx, _schema()) == []
            assert ctx.get_current_revision() == _head()
        engine.dispose()


@pytest.fixture
async def pg_harness(pg_url: str, tmp_path: Path) -> AsyncIterator[object]:
    from test_api import settings_for, start_harness

    async for harness in start_harness(settings_for(tmp_path, db_url=pg_url)):
        yield harness


async def test_api_round_trip_on_postgresql(pg_harness: object) -> None:
    from test_api import Harness

    h = pg_harness
    assert isinstance(h, Harness)
    await h.agent("pg1", cores=4, memory=16 * GiB)
    r = await h.create("big", memory_bytes=8 * GiB, cpus=2.0, env={"K": "v"})
    assert r.status_code == 201, r.text
    assert (await h.create("small", start=False)).status_code == 201
    listed = (await h.http.get("/v1/instances")).json()
    assert [(i["name"], i["state"], i["memory_bytes"]) for i in listed] == [
        ("big", "running", 8 * GiB), ("small", "created", 64 * 1024**2)]
    host = (await h.http.get("/v1/hosts/pg1")).json()
    assert host["memory_bytes"] == 16 * GiB and host["reserved"]["cpus"] == 2.5
    assert (await h.http.post("/v1/instances/big/stop")).json()["state"] == "stopped"
    assert (await h.http.delete("/v1/instances/big")).status_code == 204
    status = (await h.http.get("/v1/status")).json()
    assert status["db"].startswith("postgresql+psycopg://corral@127.0.0.1:")
    assert status["instances"] == {"created": 1}
