"""Deployments carry the budgets the devices' offload policy keeps (`fleet deploy --p95-ms --mj-per-inference`).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02

Nullable: a deployment without them (every one made before this migration) leaves the class's budgets in force.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("deployments") as batch:
        batch.add_column(sa.Column("p95_ms", sa.Float(), nullable=True))
        batch.add_column(sa.Column("mj_per_inference", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("deployments") as batch:
        batch.drop_column("mj_per_inference")
        batch.drop_column("p95_ms")
