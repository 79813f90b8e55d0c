"""Alembic environment, driven from code: :func:`corral.control.db.migrate` hands over an open
connection in ``config.attributes["connection"]``, so no alembic.ini and no URL live here."""

from __future__ import annotations

from alembic import context

from corral.control.db import Base

config = context.config
connection = config.attributes.get("connection")
if connection is None:  # pragma: no cover - only reachable by running the alembic CLI directly
    raise RuntimeError("run migrations through corral.control.db.migrate(engine)")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    # SQLite cannot ALTER most things; batch mode rebuilds tables when a migration needs it.
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
