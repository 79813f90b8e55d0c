"""hosts and instances

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "hosts",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("address", sa.String(255), nullable=False),
        sa.Column("cores", sa.Integer, nullable=False),
        sa.Column("memory_bytes", sa.BigInteger, nullable=False),
        sa.Column("disk_bytes", sa.BigInteger, nullable=False),
        sa.Column("drivers", sa.JSON, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("agent_version", sa.String(64), nullable=False),
        sa.Column("joined_at", sa.Float, nullable=False),
        sa.Column("last_heartbeat", sa.Float, nullable=True),
        sa.Column("lease_expires_at", sa.Float, nullable=True),
    )
    op.create_table(
        "instances",
        sa.Column("name", sa.String(63), primary_key=True),
        sa.Column("host", sa.String(64), sa.ForeignKey("hosts.name"), nullable=True),
        sa.Column("driver", sa.String(32), nullable=False),
        sa.Column("command", sa.JSON, nullable=False),
        sa.Column("rootfs", sa.String(4096), nullable=True),
        sa.Column("env", sa.JSON, nullable=False),
        sa.Column("cpus", sa.Float, nullable=False),
        sa.Column("memory_bytes", sa.BigInteger, nullable=False),
        sa.Column("desired_state", sa.String(16), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("pid", sa.Integer, nullable=True),
        sa.Column("exit_code", sa.Integer, nullable=True),
        sa.Column("epoch", sa.Integer, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    op.create_index("ix_instances_host", "instances", ["host"])


def downgrade() -> None:
    op.drop_index("ix_instances_host", table_name="instances")
    op.drop_table("instances")
    op.drop_table("hosts")
