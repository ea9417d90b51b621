"""Devices remember which enrollment token enrolled them, so another token cannot take a device id over.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25

Nullable: devices enrolled before this migration have none recorded, and the first re-enrollment records it.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.add_column(sa.Column("enrolled_by", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("enrolled_by")
