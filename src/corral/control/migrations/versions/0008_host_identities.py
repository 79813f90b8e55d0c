"""host identities: each host's bus key (nkey) and the one-time join tokens that enroll hosts

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision: str | None = "0007"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "host_identities",
        sa.Column("host", sa.String(64), primary_key=True),
        sa.Column("public_key", sa.String(64), nullable=False, unique=True),
        sa.Column("enrolled_at", sa.Float, nullable=False),
    )
    op.create_table(
        "join_tokens",
        sa.Column("host", sa.String(64), primary_key=True),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("join_tokens")
    op.drop_table("host_identities")
