"""operations: durable records of the operation engine (one row per operation)

The table is defined once, in :mod:`corral.ops.store` (the engine's unit tests create it from
there); this revision creates exactly that table, columns and indexes, in the server's database.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from corral.ops.store import operations

revision = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    # a private copy, so creating it never touches the store module's own MetaData
    table = operations.to_metadata(sa.MetaData())
    table.create(op.get_bind())


def downgrade() -> None:
    op.drop_table("operations")
