"""disks and standbys: hosts.data_port/disk_backend, instances.vip, the standbys table

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision: str | None = "0004"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    # hosts that joined before disks moved between hosts offer no data port (0) and plain dirs
    with op.batch_alter_table("hosts") as batch:
        batch.add_column(sa.Column("data_port", sa.Integer, nullable=False, server_default="0"))
        batch.add_column(sa.Column("disk_backend", sa.String(16), nullable=False,
                                   server_default="dir"))
    with op.batch_alter_table("instances") as batch:
        batch.add_column(sa.Column("vip", sa.String(64), nullable=True))
    op.create_table(
        "standbys",
        sa.Column("instance", sa.String(63), sa.ForeignKey("instances.name", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("host", sa.String(64), sa.ForeignKey("hosts.name"), nullable=False,
                  index=True),
        sa.Column("every_seconds", sa.Float, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("last_sync_at", sa.Float, nullable=True),
        sa.Column("data_at", sa.Float, nullable=True),
        sa.Column("last_freeze_ms", sa.Float, nullable=True),
        sa.Column("last_bytes", sa.BigInteger, nullable=True),
        sa.Column("total_bytes", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("syncs", sa.Integer, nullable=False, server_default="0"),
        sa.Column("last_error", sa.Text, nullable=False, server_default=""),
        sa.Column("created_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("standbys")
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("vip")
    with op.batch_alter_table("hosts") as batch:
        batch.drop_column("disk_backend")
        batch.drop_column("data_port")
