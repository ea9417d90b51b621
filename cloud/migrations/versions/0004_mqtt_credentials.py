"""Per-device MQTT credentials: the broker login each device gets at enrollment, kept only as a salted hash.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26

One row per device (username = device id). Re-enrollment replaces the hash (rotation); revoking a device sets
`revoked_at`, and the broker refuses the login from then on. The plaintext password leaves the cloud twice only:
once in the EnrollResponse, once to the broker (a Mosquitto dynamic-security command); the embedded broker checks
against this table in-process.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "mqtt_credentials",
        sa.Column("device_id", sa.String(length=128), nullable=False),
        sa.Column("password_hash", sa.String(length=255), nullable=False),
        sa.Column("issued_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("device_id", name=op.f("pk_mqtt_credentials")),
    )


def downgrade() -> None:
    op.drop_table("mqtt_credentials")
