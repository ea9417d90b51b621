"""Telemetry batches are identified by (device, epoch, seq); windows say how their energy was measured.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02

`epoch` is the agent outbox's incarnation (protos/telemetry.py `TelemetryBatch.epoch`): an agent whose outbox state
was lost counts seq from 0 again, and (device, seq) alone would take its new batches for replays and drop them.
Batches stored before this migration get epoch 0, as an older agent sends. `merged_windows` counts windows a full
outbox merged into coarser ones (counted, never silent). Windows gain `energy_method` ("counter", "sampled",
"modelled", or "" before this), `energy_hz`, the idle-subtracted `row_net_mj` and the `idle_w` it subtracted.

The primary key changes, so on SQLite the table is rebuilt (batch mode, copy-and-move); on PostgreSQL the key is
dropped and made again in place.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("telemetry_batches", recreate="always") as batch:
        batch.add_column(sa.Column("epoch", sa.BigInteger(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("merged_windows", sa.Integer(), nullable=False, server_default="0"))
        batch.drop_constraint("pk_telemetry_batches", type_="primary")
        batch.create_primary_key("pk_telemetry_batches", ["device_id", "epoch", "seq"])
    with op.batch_alter_table("telemetry_windows") as batch:
        batch.add_column(sa.Column("epoch", sa.BigInteger(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("energy_method", sa.String(length=16), nullable=False, server_default=""))
        batch.add_column(sa.Column("energy_hz", sa.Float(), nullable=True))
        batch.add_column(sa.Column("row_net_mj", sa.Float(), nullable=True))
        batch.add_column(sa.Column("idle_w", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("telemetry_windows") as batch:
        for column in ("idle_w", "row_net_mj", "energy_hz", "energy_method", "epoch"):
            batch.drop_column(column)
    with op.batch_alter_table("telemetry_batches", recreate="always") as batch:
        batch.drop_constraint("pk_telemetry_batches", type_="primary")
        batch.create_primary_key("pk_telemetry_batches", ["device_id", "seq"])
        batch.drop_column("merged_windows")
        batch.drop_column("epoch")
