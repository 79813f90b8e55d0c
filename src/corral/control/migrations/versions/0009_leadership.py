"""leadership: the one lease row servers take turns holding (with its fencing generation),
and the servers that share the database

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision: str | None = "0008"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    leadership = op.create_table(
        "leadership",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("generation", sa.BigInteger, nullable=False),
        sa.Column("holder", sa.String(64), nullable=False),
        sa.Column("holder_api_url", sa.String(255), nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
    )
    # the one row, there from the start: taking the lease is then always an UPDATE, which
    # waits on the row's locks (an INSERT race would not)
    op.bulk_insert(leadership, [{"id": 1, "generation": 0, "holder": "", "holder_api_url": "",
                                 "expires_at": 0.0}])
    op.create_table(
        "servers",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("api_url", sa.String(255), nullable=False),
        sa.Column("nats_url", sa.String(1024), nullable=False),
        sa.Column("started_at", sa.Float, nullable=False),
        sa.Column("last_seen", sa.Float, nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("servers")
    op.drop_table("leadership")
