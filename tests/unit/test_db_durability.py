"""Every connection to the server's SQLite commits to disk before the server acts on it."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa

from corral.control.db import make_engine


def test_every_sqlite_connection_is_wal_and_synchronous_full(tmp_path: Path) -> None:
    engine = make_engine(sa.engine.make_url(f"sqlite:///{tmp_path / 'corral.db'}"))
    try:
        conns = [engine.connect() for _ in range(3)]  # each a connection of its own
        for conn in conns:
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        for conn in conns:
            conn.close()
    finally:
        engine.dispose()
