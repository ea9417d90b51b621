"""Telemetry at fleet scale: hourly roll-ups, 64-bit window ids, and on PostgreSQL windows partitioned by day.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04

`telemetry_hourly` holds windows rolled up per device, (model, version) and UTC hour (cloud/telemetry_rollup.py):
additive sums, so an hour and the raw windows around it combine into the figures `telemetry_summary` computes.
`telemetry_windows.id` becomes 64-bit: at 100,000 windows a second 32 bits last six hours.

On PostgreSQL `telemetry_windows` becomes a table partitioned by range on `end`, one partition per UTC day, so
retention drops a day with `DROP TABLE` instead of deleting rows. A partitioned table's primary key must hold the
partition key: it is (id, end) there; ids still come from one sequence. The partitions live in their own schema,
`telemetry_partitions`, so the tables a reader of the main schema sees are the ones the models name. The existing
table is converted in place: renamed aside, the partitioned table made with the same columns and the same id
sequence (so ids keep rising), a default partition for days without their own, a partition for each day of the
last 30 and the next 7 that has (or will have) windows, every row copied, the old table dropped. All in the
migration's one transaction: a failure leaves the old table as it was. SQLite keeps one table (its rowid is 64-bit
already) and deletes by time.

Written out in full (no imports from edgefleet.cloud.db.models), like 0001.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

PARTITION_SCHEMA = "telemetry_partitions"
_DAYS_BACK, _DAYS_AHEAD = 30, 7
_COLUMNS = ("id", "device_id", "epoch", "seq", "model", "version", "start", "end", "count", "errors", "p50_ms",
            "p95_ms", "p99_ms", "mean_mj", "rows", "mean_ms", "row_ms", "row_mj", "energy_source", "energy_meter",
            "energy_method", "energy_hz", "row_net_mj", "idle_w", "where")


def _window_columns(id_default: str | None) -> list[sa.Column]:
    return [
        sa.Column("id", sa.BigInteger(), nullable=False, autoincrement=id_default is None,
                  server_default=sa.text(id_default) if id_default else None),
        sa.Column("device_id", sa.String(length=128), nullable=False),
        sa.Column("epoch", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("model", sa.String(length=64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("end", sa.DateTime(timezone=True), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("errors", sa.Integer(), nullable=False),
        sa.Column("p50_ms", sa.Float(), nullable=True),
        sa.Column("p95_ms", sa.Float(), nullable=True),
        sa.Column("p99_ms", sa.Float(), nullable=True),
        sa.Column("mean_mj", sa.Float(), nullable=True),
        sa.Column("rows", sa.BigInteger(), nullable=False),
        sa.Column("mean_ms", sa.Float(), nullable=True),
        sa.Column("row_ms", sa.Float(), nullable=True),
        sa.Column("row_mj", sa.Float(), nullable=True),
        sa.Column("energy_source", sa.String(length=16), nullable=False),
        sa.Column("energy_meter", sa.String(length=64), nullable=False),
        sa.Column("energy_method", sa.String(length=16), nullable=False, server_default=""),
        sa.Column("energy_hz", sa.Float(), nullable=True),
        sa.Column("row_net_mj", sa.Float(), nullable=True),
        sa.Column("idle_w", sa.Float(), nullable=True),
        sa.Column("where", sa.String(length=8), nullable=False),
    ]


def _create_hourly() -> None:
    figures = ("p50_ms", "p95_ms", "mean_ms", "mean_mj", "row_ms", "row_mj")
    op.create_table(
        "telemetry_hourly",
        sa.Column("device_id", sa.String(length=128), nullable=False),
        sa.Column("model", sa.String(length=64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("hour", sa.DateTime(timezone=True), nullable=False),
        sa.Column("windows", sa.BigInteger(), nullable=False),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.Column("errors", sa.BigInteger(), nullable=False),
        sa.Column("rows", sa.BigInteger(), nullable=False),
        *(c for f in figures[:2] for c in (sa.Column(f"{f}_sum", sa.Float(), nullable=True),
                                           sa.Column(f"{f}_weight", sa.Float(), nullable=False))),
        sa.Column("p99_ms", sa.Float(), nullable=True),
        *(c for f in figures[2:] for c in (sa.Column(f"{f}_sum", sa.Float(), nullable=True),
                                           sa.Column(f"{f}_weight", sa.Float(), nullable=False))),
        sa.Column("energy_source", sa.String(length=16), nullable=False),
        sa.Column("end", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("device_id", "model", "version", "hour", name="pk_telemetry_hourly"),
    )


def _day_partition(day: datetime) -> None:
    name = f"telemetry_windows_p{day:%Y%m%d}"
    op.execute(f'CREATE TABLE {PARTITION_SCHEMA}."{name}" PARTITION OF telemetry_windows FOR VALUES FROM '
               f"('{day.isoformat()}') TO ('{(day + timedelta(days=1)).isoformat()}')")


def _upgrade_postgresql() -> None:
    op.execute(f"CREATE SCHEMA IF NOT EXISTS {PARTITION_SCHEMA}")
    op.execute("ALTER TABLE telemetry_windows RENAME TO telemetry_windows_unpartitioned")
    op.execute("ALTER TABLE telemetry_windows_unpartitioned RENAME CONSTRAINT pk_telemetry_windows "
               "TO pk_telemetry_windows_unpartitioned")
    op.execute("ALTER INDEX ix_telemetry_windows_device_model_end RENAME TO ix_telemetry_windows_unpartitioned_end")
    # The serial's sequence moves to the new table: ids keep rising where they were, now 64-bit.
    op.execute("ALTER TABLE telemetry_windows_unpartitioned ALTER COLUMN id DROP DEFAULT")
    op.execute("ALTER SEQUENCE telemetry_windows_id_seq OWNED BY NONE")
    op.execute("ALTER SEQUENCE telemetry_windows_id_seq AS bigint MAXVALUE 9223372036854775807")
    op.create_table("telemetry_windows", *_window_columns("nextval('telemetry_windows_id_seq')"),
                    sa.PrimaryKeyConstraint("id", "end", name="pk_telemetry_windows"),
                    postgresql_partition_by='RANGE ("end")')
    op.execute("ALTER SEQUENCE telemetry_windows_id_seq OWNED BY telemetry_windows.id")
    op.create_index("ix_telemetry_windows_device_model_end", "telemetry_windows",
                    ["device_id", "model", "version", "end"])
    op.execute(f"CREATE TABLE {PARTITION_SCHEMA}.telemetry_windows_default PARTITION OF telemetry_windows DEFAULT")
    today = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    days = {today + timedelta(days=n) for n in range(_DAYS_AHEAD + 1)}
    bind = op.get_bind()
    days |= {d.astimezone(timezone.utc) for (d,) in bind.execute(sa.text(
        "SELECT DISTINCT date_trunc('day', \"end\", 'UTC') FROM telemetry_windows_unpartitioned "
        "WHERE \"end\" >= :lo AND \"end\" < :hi"), {"lo": today - timedelta(days=_DAYS_BACK), "hi": today})}
    for day in sorted(days):
        _day_partition(day)
    columns = ", ".join(f'"{c}"' for c in _COLUMNS)
    op.execute(f"INSERT INTO telemetry_windows ({columns}) SELECT {columns} FROM telemetry_windows_unpartitioned")
    op.drop_table("telemetry_windows_unpartitioned")


def upgrade() -> None:
    _create_hourly()
    if op.get_bind().dialect.name == "postgresql":
        _upgrade_postgresql()


def downgrade() -> None:
    op.drop_table("telemetry_hourly")
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("ALTER TABLE telemetry_windows RENAME TO telemetry_windows_partitioned")
    op.execute("ALTER TABLE telemetry_windows_partitioned RENAME CONSTRAINT pk_telemetry_windows "
               "TO pk_telemetry_windows_partitioned")
    op.execute("ALTER INDEX ix_telemetry_windows_device_model_end RENAME TO ix_telemetry_windows_partitioned_end")
    op.execute("ALTER TABLE telemetry_windows_partitioned ALTER COLUMN id DROP DEFAULT")
    op.execute("ALTER SEQUENCE telemetry_windows_id_seq OWNED BY NONE")
    op.create_table("telemetry_windows", *_window_columns("nextval('telemetry_windows_id_seq')"),
                    sa.PrimaryKeyConstraint("id", name="pk_telemetry_windows"))
    op.execute("ALTER SEQUENCE telemetry_windows_id_seq OWNED BY telemetry_windows.id")
    op.create_index("ix_telemetry_windows_device_model_end", "telemetry_windows",
                    ["device_id", "model", "version", "end"])
    columns = ", ".join(f'"{c}"' for c in _COLUMNS)
    op.execute(f"INSERT INTO telemetry_windows ({columns}) SELECT {columns} FROM telemetry_windows_partitioned")
    op.drop_table("telemetry_windows_partitioned")  # and its partitions with it
    op.execute(f"DROP SCHEMA IF EXISTS {PARTITION_SCHEMA} CASCADE")
