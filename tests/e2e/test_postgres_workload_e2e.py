"""A real database as a workload: PostgreSQL from the Debian package, under a steady write
load, through every operation that moves an instance (issue 15, item 1).

PostgreSQL is a demanding tenant: it drops privileges, keeps a pid file that it checks against
live pids (a zombie left by the old copy makes the new one refuse: "Is another postmaster
running?"), fsyncs its WAL and verifies page checksums. After each operation the database
must start, pass its own checks (``pg_amcheck`` over every table and index, a full scan with
data checksums on) and, where the operation promises it (migrate, promote, shelve), still hold
every commit the writer saw acknowledged. A failover promises only the last sync: there the
rows must be a clean prefix of what was written.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from diskkit import kill_agent, revive
from fleetkit import Fleet, fleet_for

PGBIN = next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin"))), None)

pytestmark = [
    pytest.mark.timeout(900),
    pytest.mark.root,
    pytest.mark.postgres,
    pytest.mark.skipif(os.geteuid() != 0, reason="PostgreSQL runs as its own user: needs root"),
    pytest.mark.skipif(PGBIN is None or not (PGBIN / "postgres").exists(),
                       reason="needs the postgresql package (scripts/bootstrap installs it)"),
    pytest.mark.skipif(shutil.which("rsync") is None or shutil.which("setpriv") is None,
                       reason="needs rsync and setpriv"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pg_script(port: int) -> str:
    """The instance: initdb on first start (in its own disk), then postgres as the postgres
    user. ``setpriv`` execs (no supervisor process), so the shell knows the postmaster's pid
    and turns corral's SIGTERM into a fast shutdown (SIGINT), as the official image's
    STOPSIGNAL does; a smart shutdown would wait for the writer to disconnect."""
    return f"""
if [ ! -s pgdata/PG_VERSION ]; then
  rm -rf pgdata && mkdir -m 700 pgdata && chown postgres:postgres pgdata || exit 1
  runuser -u postgres -- {PGBIN}/initdb -D "$PWD/pgdata" -A trust -U postgres \
    --data-checksums >/dev/null || exit 1
fi
setpriv --reuid=postgres --regid=postgres --init-groups -- {PGBIN}/postgres -D "$PWD/pgdata" \
  -p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories= \
  -c shared_buffers=16MB -c max_connections=20 &
pg=$!
trap 'kill -INT $pg' TERM
wait $pg; rc=$?
while kill -0 $pg 2>/dev/null; do wait $pg; rc=$?; done
exit $rc
"""


class Writer(threading.Thread):
    """One client inserting numbered rows, one commit each; ``acked`` holds the ids whose
    commit returned. Reconnects through outages; bounded in rows and time."""

    def __init__(self, port: int, first: int = 1, limit: int = 200_000,
                 seconds: float = 600) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.first = first
        self.limit = limit
        self.seconds = seconds
        self.acked: list[int] = []
        self.outages = 0
        self.halt = threading.Event()

    def run(self) -> None:
        conn: psycopg.Connection[tuple[object, ...]] | None = None
        deadline = time.monotonic() + self.seconds
        n = self.first - 1
        while not self.halt.is_set() and n < self.limit and time.monotonic() < deadline:
            try:
                if conn is None:
                    conn = connect(self.port)
                conn.execute("insert into t(id, v) values (%s, md5(%s::text))", (n + 1, n + 1))
                n += 1
                self.acked.append(n)
            except psycopg.errors.UniqueViolation:
                n += 1  # committed, but the answer was lost with the connection
            except psycopg.Error:
                self.outages += 1
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.close()
                conn = None
                time.sleep(0.05)
            time.sleep(0.003)
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def wait_rows(self, more: int, timeout: float = 60) -> None:
        want = len(self.acked) + more
        deadline = time.monotonic() + timeout
        while len(self.acked) < want:
            assert time.monotonic() < deadline, f"the writer is stuck at {len(self.acked)}"
            time.sleep(0.05)


def connect(port: int) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres",
                           autocommit=True, connect_timeout=2)


def wait_db(port: int, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with connect(port) as c:
                c.execute("select 1")
            return
        except psycopg.Error:
            assert time.monotonic() < deadline, "the database did not come back"
            time.sleep(0.2)


def rows(port: int) -> set[int]:
    with connect(port) as c:
        return {int(r[0]) for r in c.execute("select id from t").fetchall()}  # type: ignore[call-overload]


def db_checks(port: int) -> None:
    """PostgreSQL's own checks: every heap and B-tree index (pg_amcheck), then a full read
    of the table, which verifies each page's checksum."""
    assert PGBIN is not None
    r = subprocess.run([str(PGBIN / "pg_amcheck"), "-h", "127.0.0.1", "-p", str(port),
                        "-U", "postgres", "--install-missing", "--heapallindexed", "postgres"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"pg_amcheck: {r.stdout}{r.stderr}"
    with connect(port) as c:
        bad = c.execute("select count(*) from t where v <> md5(id::text)").fetchone()
    assert bad is not None and bad[0] == 0


def host_of(f: Fleet, name: str) -> str:
    return str(f.instance(name)["host"])


def postmasters(disk_root: Path) -> list[tuple[int, str]]:
    """(pid, host) of every postgres process (zombies too) whose data dir is in a host's
    disk under ``disk_root``."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            argv = (d / "cmdline").read_bytes().split(b"\0")
            if not argv[0].endswith(b"/postgres"):
                continue
            data = argv[argv.index(b"-D") + 1].decode()
            if data.startswith(str(disk_root)):
                out.append((int(d.name), Path(data).relative_to(disk_root).parts[0]))
    return out


@pytest.fixture(scope="module")
def disk_root() -> Iterator[Path]:
    """Disks where the postgres user can reach its own (pytest's temp dirs are 0700)."""
    root = Path(tempfile.mkdtemp(prefix="corral-pg-", dir="/var/tmp"))
    root.chmod(0o711)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, disk_root: Path) -> Iterator[Fleet]:
    with fleet_for(tmp_path_factory.mktemp("pgfleet"), "--hosts", "3",
                   "--disk-root", str(disk_root)) as f:
        yield f


def test_postgres_through_migrate_shelve_promote_and_failover(fleet: Fleet,
                                                             disk_root: Path) -> None:
    f = fleet
    port = free_port()
    f.ok("run", "pg", "--host", "host1", "--cpus", "0.5", "--memory", "512M", "--",
         "sh", "-c", pg_script(port))
    wait_db(port)
    with connect(port) as c:
        c.execute("create table t (id bigint primary key, v text not null)")
    writer = Writer(port)
    writer.start()
    try:
        writer.wait_rows(200)

        # warm migration: nothing acknowledged may be lost
        f.ok("migrate", "pg", "--to", "host2", timeout=300)
        assert host_of(f, "pg") == "host2"
        wait_db(port)
        assert set(writer.acked) <= rows(port)
        db_checks(port)
        assert [h for _, h in postmasters(disk_root)] == ["host2"] * len(postmasters(disk_root))
        writer.wait_rows(100)

        # shelve and unshelve: the stop is a clean shutdown, the disk comes back whole
        f.ok("shelve", "pg", timeout=300)
        assert not postmasters(disk_root)
        acked = set(writer.acked)
        f.ok("unshelve", "pg", timeout=300)
        wait_db(port)
        assert acked <= rows(port)
        db_checks(port)
        writer.wait_rows(100)

        # a warm standby, promoted: a final frozen pass, so nothing acknowledged is lost
        f.ok("standby", "add", "pg", "--host", "host3", "--every", "1h", timeout=300)
        f.ok("standby", "promote", "pg", timeout=300)
        assert host_of(f, "pg") == "host3"
        wait_db(port)
        assert set(writer.acked) <= rows(port)
        db_checks(port)
        writer.wait_rows(100)

        # the host dies: failover brings back the last sync, which must recover cleanly
        synced = max(writer.acked)  # committed before the sync's frozen pass begins
        f.ok("standby", "sync", "pg", timeout=300)
        standby_host = str(f.json("standby", "ls")[0]["host"])
        dead = host_of(f, "pg")
        writer.halt.set()  # what the copy holds is then exactly what failover restores
        writer.join(timeout=30)
        kill_agent(f, dead)
        for pid, host in postmasters(disk_root):
            if host == dead:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        try:
            deadline = time.monotonic() + 90
            while (v := f.instance("pg"))["host"] != standby_host or v["state"] != "running":
                assert time.monotonic() < deadline, f"no failover: {v}\n{f.logs(30)}"
                time.sleep(0.3)
            wait_db(port)
            got = rows(port)
            assert got == set(range(1, max(got) + 1)), "not a clean prefix after failover"
            assert max(got) >= synced, "the failover lost what the last sync held"
            db_checks(port)
            writer = Writer(port, first=max(got) + 1)
            writer.start()
            writer.wait_rows(50)
        finally:
            revive(f, dead)
    finally:
        writer.halt.set()
        writer.join(timeout=30)
    assert writer.acked, "the writer never wrote"
    f.ok("rm", "--force", "pg", timeout=120)
    deadline = time.monotonic() + 30
    while postmasters(disk_root):
        assert time.monotonic() < deadline, f"postgres left behind: {postmasters(disk_root)}"
        time.sleep(0.2)
