"""instances.image_config: what the image's config decided for the process at create

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision: str | None = "0009"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    # instances made before images carried a config run as root in "/": NULL says just that
    with op.batch_alter_table("instances") as batch:
        batch.add_column(sa.Column("image_config", sa.JSON, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("image_config")
