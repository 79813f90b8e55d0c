"""instances.image: the image an instance's root is materialised from

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision: str | None = "0003"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    # rows that existed before images ran from a rootfs path (or none): NULL
    with op.batch_alter_table("instances") as batch:
        batch.add_column(sa.Column("image", sa.String(255), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("image")
