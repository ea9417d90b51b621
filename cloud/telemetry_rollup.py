"""Telemetry upkeep: raw windows rolled up to hourly sums, day partitions made ahead, old data dropped.

Theory of operation: the serve loop calls `maintain_telemetry(store, settings, now)` every
`telemetry_maintenance_interval_s`. `plan(now, settings)` decides, with no I/O, the cut-offs of each retention
(`telemetry_raw_retention_h` for windows, `telemetry_hourly_retention_d` for hours, `telemetry_dedup_retention_h`
for batch claims) and the days whose partitions must exist (today to `telemetry_partition_days_ahead` ahead); the
store acts (cloud/store_telemetry.py):

1. `telemetry_rollup`: the windows stored since the call before last are added to `telemetry_hourly`, each once
   (an id watermark), late ones to their own hour; summaries read those hours instead of the windows.
2. `telemetry_partitions_ensure` (PostgreSQL): the day partitions ahead, so a COPY never lands in the default
   partition, which would then have to be emptied before its day could be attached.
3. `telemetry_retention`: raw windows past their retention (only once rolled up: a window is never dropped before
   it is summed), on PostgreSQL whole day partitions at once; hours and batch claims past theirs.

Every step is idempotent and safe to run from several replicas (one advisory lock on PostgreSQL; SQLite has one
writer); a failure raises `Unavailable` and the next interval tries again, losing nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edgefleet.cloud.settings import Settings
    from edgefleet.cloud.store import Store


@dataclass(frozen=True)
class Plan:
    """What one upkeep run does: cut-offs (older is dropped) and the first day and number of days of partitions."""

    raw_before: datetime
    hourly_before: datetime
    claims_before: datetime
    first_day: datetime
    days: int


@dataclass(frozen=True)
class Upkeep:
    """What a run did, for the log line and tests."""

    rolled_up: int
    partitions_made: list[str] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)


def plan(now: datetime, settings: Settings) -> Plan:
    today = now.astimezone(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    return Plan(raw_before=now - timedelta(hours=settings.telemetry_raw_retention_h),
                hourly_before=now - timedelta(days=settings.telemetry_hourly_retention_d),
                claims_before=now - timedelta(hours=settings.telemetry_dedup_retention_h),
                first_day=today, days=settings.telemetry_partition_days_ahead + 1)


def maintain_telemetry(store: Store, settings: Settings, now: datetime) -> Upkeep:
    """One upkeep run (see the module docstring)."""
    p = plan(now, settings)
    rolled = store.telemetry_rollup()
    made = store.telemetry_partitions_ensure(p.first_day, p.days)
    dropped = store.telemetry_retention(p.raw_before, p.hourly_before, p.claims_before)
    return Upkeep(rolled, made, dropped)


__all__ = ["Plan", "Upkeep", "maintain_telemetry", "plan"]
