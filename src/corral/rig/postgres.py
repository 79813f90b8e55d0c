"""A PostgreSQL server for ``corral up --postgres``, from the Debian package's binaries.

Several corral servers share one database; on one machine the rig starts it in the fleet's
directory (``DATA/postgres``), listening on loopback only, with password authentication
(scram-sha-256) for the user ``corral``. The password is made here and kept in
``DATA/postgres/password`` (0600); the servers get the database URL in their environment, never
in argv. As root, PostgreSQL runs as the ``postgres`` user (initdb refuses root), so its
directory is that user's and the fleet's directory must let it pass (traverse-only, 0711).

``up`` records the process like the others: ``corral down`` stops it last, after the servers,
with a "fast" shutdown (SIGINT), so no client is waited for and nothing is lost.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from corral import perms
from corral.bus.embedded import stable_port
from corral.errors import ConfigError, CorralError
from corral.rig import procs
from corral.rig.context import ProcInfo

if TYPE_CHECKING:
    import psycopg

USER = "corral"
DATABASE = "corral"
START_TIMEOUT = 60.0


def bin_dir() -> Path:
    for cand in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if Path(cand, "initdb").exists() and Path(cand, "postgres").exists():
            return Path(cand)
    found = shutil.which("initdb")
    if found and Path(found).with_name("postgres").exists():
        return Path(found).parent
    raise ConfigError("PostgreSQL is not installed (no initdb/postgres binaries)",
                      hint="bash scripts/bootstrap installs it (apt-get install postgresql)")


def _owner() -> pwd.struct_passwd | None:
    """Who PostgreSQL runs as: ``postgres`` when we are root, else ourselves (None)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        raise ConfigError("as root, PostgreSQL must run as the 'postgres' user, which is missing",
                          hint="apt-get install postgresql (it makes the user)") from None


def start(top: Path, say: Callable[[str], None]) -> tuple[ProcInfo, str]:
    """Start (after making, the first time) the fleet's PostgreSQL in ``top``; return its
    process and the SQLAlchemy URL of the ``corral`` database (password included)."""
    bindir = bin_dir()
    owner = _owner()
    if owner is not None and (blocking := perms.blocking_ancestor(top)) is not None:
        raise ConfigError(f"PostgreSQL runs as the user {owner.pw_name}, which cannot reach "
                          f"{top}: {blocking} lets only its owner through",
                          hint="give 'corral up --data' a directory others may traverse, "
                               f"e.g. /var/lib/corral/fleet, or 'chmod o+x {blocking}'")
    data = top / "data"
    password_file = top / "password"
    top.mkdir(parents=True, exist_ok=True)
    os.chmod(top, 0o700)
    if owner is not None:
        os.chown(top, owner.pw_uid, owner.pw_gid)
    if not (data / "PG_VERSION").exists():
        say("making the fleet's PostgreSQL database")
        shutil.rmtree(data, ignore_errors=True)
        password = secrets.token_urlsafe(24)
        _initdb(bindir, data, password, top, owner)
        perms.write_private(password_file, password)
    password = password_file.read_text().strip()
    port = stable_port("127.0.0.1")
    argv = [str(bindir / "postgres"), "-D", str(data), "-k", str(top), "-p", str(port),
            "-h", "127.0.0.1"]
    say("starting PostgreSQL")
    proc = procs.spawn("postgres", argv, top / "postgres.log",
                       user=owner.pw_name if owner else None)
    _wait_ready(proc, port, password)
    _ensure_database(port, password)
    return proc, f"postgresql+psycopg://{USER}:{password}@127.0.0.1:{port}/{DATABASE}"


def _initdb(bindir: Path, data: Path, password: str, top: Path,
            owner: pwd.struct_passwd | None) -> None:
    # the password reaches initdb in a file only its user can read, removed right after
    pwfile = top / ".initdb-password"
    fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(password + "\n")
    if owner is not None:
        os.chown(pwfile, owner.pw_uid, owner.pw_gid)
    try:
        as_user = {"user": owner.pw_uid, "group": owner.pw_gid, "extra_groups": []} if (
            owner is not None) else {}
        done = subprocess.run(
            [str(bindir / "initdb"), "-D", str(data), "-U", USER, "--auth=scram-sha-256",
             f"--pwfile={pwfile}", "-E", "UTF8"],
            capture_output=True, text=True, timeout=180, cwd=top,
            **as_user)  # type: ignore[call-overload]
    finally:
        pwfile.unlink(missing_ok=True)
    if done.returncode != 0:
        raise CorralError(f"initdb failed (exit {done.returncode})",
                          hint=(done.stderr or done.stdout).strip()[-800:])


def _connect(port: int, password: str, dbname: str = "postgres") -> psycopg.Connection[Any]:
    import psycopg

    return psycopg.connect(host="127.0.0.1", port=port, user=USER, password=password,
                           dbname=dbname, autocommit=True, connect_timeout=2)


def _wait_ready(proc: ProcInfo, port: int, password: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    last = ""
    while time.monotonic() < deadline:
        if not procs.alive(proc):
            procs.reap(proc.pid)
            raise CorralError("PostgreSQL exited while starting",
                              hint=f"its log {proc.log} ends with:\n{procs.tail(proc.log)}")
        try:
            conn = _connect(port, password)
        except Exception as exc:  # not accepting connections yet
            last = str(exc)
            time.sleep(0.1)
            continue
        conn.close()
        return
    raise CorralError(f"PostgreSQL did not accept connections within {START_TIMEOUT:.0f}s",
                      hint=f"last error: {last}; see {proc.log}", retryable=True)


def _ensure_database(port: int, password: str) -> None:
    conn = _connect(port, password)
    try:
        cur = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,))
        if cur.fetchone() is None:
            conn.execute(f"CREATE DATABASE {DATABASE}")
    finally:
        conn.close()


def url_of(proc: ProcInfo, top: Path) -> str:
    """The database URL of a PostgreSQL :func:`start` started (its port from its argv, the
    password from ``top/password``): what a server restarted later is given again."""
    port = proc.argv[proc.argv.index("-p") + 1]
    password = (top / "password").read_text().strip()
    return f"postgresql+psycopg://{USER}:{password}@127.0.0.1:{port}/{DATABASE}"
