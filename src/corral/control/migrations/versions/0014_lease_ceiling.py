"""leadership.lease_ceiling: the longest host lease any leader granted (control/pace.py)

Revision ID: 0014
Revises: 0013
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision: str | None = "0013"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    with op.batch_alter_table("leadership") as batch:
        batch.add_column(sa.Column("lease_ceiling", sa.Float, nullable=False,
                                   server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("leadership") as batch:
        batch.drop_column("lease_ceiling")
