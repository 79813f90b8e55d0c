"""A PostgreSQL that goes silent makes the server's calls fail, not hang.

The proxy's "blackhole" accepts a connection and never answers (a dropped route): libpq's
default waits for the server's greeting for ever, and the server's thread with it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from dbproxy import DbProxy
from sqlalchemy.engine import make_url
from test_postgres import pg_url  # noqa: F401  (the module's PostgreSQL server)

from corral.control.db import make_engine


@pytest.fixture
def proxy(pg_url: str) -> Iterator[tuple[DbProxy, str]]:  # noqa: F811
    u = make_url(pg_url)
    p = DbProxy(str(u.host or "127.0.0.1"), int(u.port or 5432))
    try:
        yield p, u.set(host="127.0.0.1", port=p.port).render_as_string(hide_password=False)
    finally:
        p.close()


def test_a_connect_to_a_silent_database_gives_up(proxy: tuple[DbProxy, str]) -> None:
    p, url = proxy
    engine = make_engine(make_url(url))
    try:
        with engine.connect() as conn:  # through the proxy while it forwards
            assert conn.execute(sa.text("SELECT 1")).scalar() == 1
        engine.dispose()
        p.cut("blackhole")
        outcome: list[BaseException | None] = []

        def attempt() -> None:
            try:
                with engine.connect() as conn:
                    conn.execute(sa.text("SELECT 1"))
                outcome.append(None)
            except BaseException as exc:
                outcome.append(exc)

        t = threading.Thread(target=attempt, daemon=True)
        t.start()
        t.join(60)  # connect_timeout is 10 s; libpq's default would wait here for ever
        assert outcome, "the connect to a silent database still waits"
        assert isinstance(outcome[0], sa.exc.OperationalError), outcome
    finally:
        p.heal()
        engine.dispose()


def test_the_operators_url_settings_win(pg_url: str) -> None:  # noqa: F811
    url = make_url(pg_url).update_query_dict({"connect_timeout": "3"})
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            dsn = conn.connection.dbapi_connection.info.dsn  # type: ignore[union-attr]
        assert "connect_timeout=3" in dsn and "tcp_user_timeout=15000" in dsn, dsn
    finally:
        engine.dispose()
