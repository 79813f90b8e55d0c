"""instances.tail: extra log sources to capture (name -> path)

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    # rows that existed before capture was configurable tail nothing: default {}
    with op.batch_alter_table("instances") as batch:
        batch.add_column(sa.Column("tail", sa.JSON, nullable=False, server_default="{}"))


def downgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("tail")
