"""Telemetry windows count rows (inferences) apart from requests, with per-row latency and energy.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03

A batched request of 1,200 rows used to be stored as one inference of 110 ms and 708 mJ; the calibration refit then
took it for a device 60x slower than it is. `count` and `errors` stay requests; `rows` counts the rows in them,
`mean_ms` is the mean latency per request, `row_ms` and `row_mj` the latency and energy per row (protos/telemetry.py).
Windows stored before this migration came from agents that did not count rows: they are read as batch 1, as the
contract reads such a window today (rows = count, the median latency standing in for both means, row_mj = mean_mj).

Written out in full (no imports from edgefleet.cloud.db.models), like 0001. `rows` is added nullable, filled, then
made NOT NULL; on SQLite each step is a batch (copy-and-move) alteration.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_FIGURES = ("mean_ms", "row_ms", "row_mj")


def upgrade() -> None:
    with op.batch_alter_table("telemetry_windows") as batch:
        batch.add_column(sa.Column("rows", sa.BigInteger(), nullable=True))
        for column in _FIGURES:
            batch.add_column(sa.Column(column, sa.Float(), nullable=True))
    windows = sa.table("telemetry_windows", *(sa.column(c) for c in ("count", "p50_ms", "mean_mj", "rows",
                                                                      *_FIGURES)))
    op.execute(windows.update().values(rows=windows.c["count"], mean_ms=windows.c["p50_ms"],
                                       row_ms=windows.c["p50_ms"], row_mj=windows.c["mean_mj"]))
    with op.batch_alter_table("telemetry_windows") as batch:
        batch.alter_column("rows", existing_type=sa.BigInteger(), nullable=False)


def downgrade() -> None:
    with op.batch_alter_table("telemetry_windows") as batch:
        for column in ("row_mj", "row_ms", "mean_ms", "rows"):
            batch.drop_column(column)
