"""Devices keep the key that enrolled them, and a record of refused enrollments; tokens can be revoked and listed.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01

`public_key` is the agent's own ed25519 key (base64), registered at the first enrollment: only a request signed by it
re-enrolls the id (`cloud/enrollment.py`). `last_proof_at` is the newest accepted proof's timestamp (no replay).
`reset_at` marks an operator's `fleet devices reset`: the next enrollment registers whatever key it brings.
`enrollments_refused`, `last_refused_at` and `last_refused_reason` show attempts on the device's page. Devices enrolled
before this migration have no key: they re-enroll only after a reset.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.add_column(sa.Column("public_key", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("last_proof_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("reset_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("enrollments_refused", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("last_refused_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("last_refused_reason", sa.String(length=300), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        for column in ("last_refused_reason", "last_refused_at", "enrollments_refused", "reset_at", "last_proof_at",
                       "public_key"):
            batch.drop_column(column)
