"""shelving: instances.disk_host, shelf, shelved_from, shelved_at, offload_at

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision: str | None = "0005"
branch_labels: str | None = None
depends_on: str | None = None

COLUMNS = ("disk_host", "shelf", "shelved_from", "shelved_at", "offload_at")


def upgrade() -> None:
    # instances that existed before shelving were never shelved: NULL everywhere
    with op.batch_alter_table("instances") as batch:
        batch.add_column(sa.Column("disk_host", sa.String(64), nullable=True))
        batch.add_column(sa.Column("shelf", sa.String(255), nullable=True))
        batch.add_column(sa.Column("shelved_from", sa.String(16), nullable=True))
        batch.add_column(sa.Column("shelved_at", sa.Float, nullable=True))
        batch.add_column(sa.Column("offload_at", sa.Float, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        for name in reversed(COLUMNS):
            batch.drop_column(name)
