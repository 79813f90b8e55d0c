"""metric_history: CPU and memory of instances and hosts over time, in two tiers of buckets
(control/history.py)

Revision ID: 0013
Revises: 0012
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision: str | None = "0012"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    # no foreign keys: history must never hold up deleting an instance or forgetting a host;
    # the leader drops a deleted one's rows itself (and sweeps any it missed)
    op.create_table(
        "metric_history",
        sa.Column("kind", sa.String(8), primary_key=True),
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("tier", sa.SmallInteger, primary_key=True, autoincrement=False),
        sa.Column("t", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("samples", sa.Integer, nullable=False),
        sa.Column("cpu_n", sa.Integer, nullable=False),
        sa.Column("cpu_core_sum", sa.Float, nullable=False),
        sa.Column("cpu_host_sum", sa.Float, nullable=False),
        sa.Column("memory_max", sa.BigInteger, nullable=False),
        sa.Column("busy_n", sa.Integer, nullable=False),
        sa.Column("busy_sum", sa.Float, nullable=False),
    )
    # pruning deletes by tier and age across every series
    op.create_index("ix_metric_history_tier_t", "metric_history", ["tier", "t"])


def downgrade() -> None:
    op.drop_index("ix_metric_history_tier_t", table_name="metric_history")
    op.drop_table("metric_history")
