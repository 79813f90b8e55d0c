"""instances.restart_policy, restarts, check_spec, health: restart policies and health
checks, both run by the agent

Revision ID: 0012
Revises: 0011
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision: str | None = "0011"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    # instances made before restart policies never restart: NULL reads as mode "no"
    with op.batch_alter_table("instances") as batch:
        batch.add_column(sa.Column("restart_policy", sa.JSON, nullable=True))
        batch.add_column(sa.Column("restarts", sa.Integer, nullable=False, server_default="0"))
        batch.add_column(sa.Column("check_spec", sa.JSON, nullable=True))
        batch.add_column(sa.Column("health", sa.String(16), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("health")
        batch.drop_column("check_spec")
        batch.drop_column("restarts")
        batch.drop_column("restart_policy")
