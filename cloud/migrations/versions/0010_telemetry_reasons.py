"""The offload policy's decisions per window and reason (protos/telemetry.py `reasons`), for `fleet status`.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-02

A table of its own rather than a column of telemetry_windows: most agents send no reasons, and the windows' binary
COPY stays as it is. Deleted by time with the raw windows' retention.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "telemetry_reasons",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("device_id", sa.String(length=128), nullable=False),
        sa.Column("model", sa.String(length=64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("where", sa.String(length=8), nullable=False),
        sa.Column("end", sa.DateTime(timezone=True), nullable=False),
        sa.Column("reason", sa.String(length=48), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_telemetry_reasons")),
    )
    op.create_index("ix_telemetry_reasons_device_end", "telemetry_reasons", ["device_id", "end"])


def downgrade() -> None:
    op.drop_index("ix_telemetry_reasons_device_end", table_name="telemetry_reasons")
    op.drop_table("telemetry_reasons")
