"""Telemetry upkeep in SQL: the hourly roll-up, retention and PostgreSQL's day partitions; a part of `Store` (mixed
into it) beside store_telemetry.py, which writes and reads the windows.

Theory: raw windows roll up into `telemetry_hourly` by an id watermark (`telemetry_rollup`), so summaries read whole
hours from there (store_telemetry.py `telemetry_summary`); retention then drops what was rolled up and is older
than the raw retention (on PostgreSQL whole day partitions of `telemetry_windows`, schema `telemetry_partitions`,
migration 0008), old hours and old batch claims. cloud/telemetry_rollup.py decides when and how far.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from sqlalchemy import case, delete, func, or_, select, text

from edgefleet.cloud.db.models import (
    Counter,
    TelemetryBatchRow,
    TelemetryHourlyRow,
    TelemetryReasonRow,
    TelemetryWindowRow,
)
from edgefleet.cloud.store_telemetry import _WEIGHTED, ROLLUP_SEEN, ROLLUP_THROUGH, _admitted, _counter, _window_sums

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    from sqlalchemy.orm import Session

# Day partitions of telemetry_windows on PostgreSQL (migration 0008), outside the main schema.
PARTITION_SCHEMA = "telemetry_partitions"
_PARTITION_RE = re.compile(r"telemetry_windows_p(\d{8})")
_ROLLUP_LOCK = 0x6564676566_6C74  # pg_advisory_xact_lock key of roll-up, retention and partition upkeep


class TelemetryUpkeepMixin:
    """Roll-up, retention and partitions; needs `_tx()`, `_insert()` and `_dialect` from `Store`."""

    if TYPE_CHECKING:
        _dialect: str

        def _tx(self) -> AbstractContextManager[Session]: ...

        def _insert(self, table: Any) -> Any: ...


    def telemetry_rollup(self) -> int:
        """Add the windows stored since the last call but one to `telemetry_hourly`; how many were added.

        Each window is summed once: by id, from the watermark `telemetry_rollup_through_id` up to the highest id
        the previous call saw (`telemetry_rollup_seen_id`), in one transaction that moves the watermark. Reaching
        only as far as the previous call's view, not the newest id, is what keeps a window whose transaction was
        still open (its id taken, its commit to come) from being stepped over: ids are handed out at insert, not at
        commit. That holds while no ingest transaction outlives the interval between two calls (ingest commits in
        well under a second; the serve loop calls this every few minutes). Late windows (an hour already summed)
        are added to their hour. Two callers at once are serialised (an advisory lock on PostgreSQL; SQLite has a
        single writer)."""
        w, h = TelemetryWindowRow, TelemetryHourlyRow
        with self._tx() as s:
            if self._dialect == "postgresql":
                s.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _ROLLUP_LOCK})
            through, seen = _counter(s, ROLLUP_THROUGH), _counter(s, ROLLUP_SEEN)
            newest = s.scalar(select(func.max(w.id))) or 0
            rolled = 0
            if seen > through:
                hour = (func.date_trunc("hour", w.end, "UTC") if self._dialect == "postgresql"
                        else func.substr(w.end, 1, 13).concat(":00:00.000000"))
                sums = _window_sums(w.id > through, w.id <= seen, *_admitted(w), hour=hour)
                rolled = int(s.scalar(select(func.count()).where(w.id > through, w.id <= seen, *_admitted(w)))
                             or 0)
                columns = ["device_id", "model", "version", "hour", "windows", "count", "errors", "rows",
                           *(f"{f}_{part}" for f in _WEIGHTED for part in ("sum", "weight")), "p99_ms",
                           "energy_source", "end"]
                add = self._insert(h).from_select(columns, sums)
                x = add.excluded
                greatest = self._greatest
                update: dict[str, Any] = {
                    "windows": h.windows + x["windows"], "count": h.count + x["count"],
                    "errors": h.errors + x["errors"], "rows": h.rows + x["rows"],
                    "p99_ms": greatest(h.p99_ms, x["p99_ms"]),
                    "energy_source": _weaker(h.energy_source, x["energy_source"]), "end": greatest(h.end, x["end"])}
                for f in _WEIGHTED:
                    total, more = getattr(h, f"{f}_sum"), x[f"{f}_sum"]
                    update[f"{f}_sum"] = func.coalesce(total + more, total, more)  # NULL: no window had it
                    update[f"{f}_weight"] = getattr(h, f"{f}_weight") + x[f"{f}_weight"]
                add = add.on_conflict_do_update(index_elements=[h.device_id, h.model, h.version, h.hour], set_=update)
                s.execute(add)
                _set_counter(self, s, ROLLUP_THROUGH, seen)
            _set_counter(self, s, ROLLUP_SEEN, max(newest, seen))
        return rolled

    def _greatest(self, a: Any, b: Any) -> Any:
        # NULL-ignoring greatest: PostgreSQL's GREATEST is; SQLite's two-argument max() is NULL if either is.
        if self._dialect == "postgresql":
            return func.greatest(a, b)
        return func.max(func.coalesce(a, b), func.coalesce(b, a))

    def telemetry_retention(self, raw_before: datetime, hourly_before: datetime,
                            claims_before: datetime) -> dict[str, int]:
        """Drop what is past its retention: raw windows that ended before `raw_before` (rolled up ones only: a
        window the roll-up has not summed yet stays until it has), hours before `hourly_before`, batch claims
        received before `claims_before`. On PostgreSQL a day partition wholly before `raw_before` and wholly
        rolled up goes with one DROP TABLE; the rest (the default partition, SQLite) is deleted by time."""
        w, h, b = TelemetryWindowRow, TelemetryHourlyRow, TelemetryBatchRow
        out = {"partitions_dropped": 0, "raw_deleted": 0, "hourly_deleted": 0, "claims_deleted": 0,
               "reasons_deleted": 0}
        with self._tx() as s:
            if self._dialect == "postgresql":
                s.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _ROLLUP_LOCK})
            through = _counter(s, ROLLUP_THROUGH)
            if self._dialect == "postgresql":
                for name, day in _day_partitions(s):
                    if day + timedelta(days=1) > raw_before:
                        continue
                    newest = s.scalar(text(f'SELECT max(id) FROM {PARTITION_SCHEMA}."{name}"'))
                    if newest is None or newest <= through:
                        s.execute(text(f'DROP TABLE {PARTITION_SCHEMA}."{name}"'))
                        out["partitions_dropped"] += 1
            out["raw_deleted"] = s.execute(delete(w).where(w.end < raw_before, w.id <= through)).rowcount or 0
            out["hourly_deleted"] = s.execute(delete(h).where(h.hour < hourly_before)).rowcount or 0
            out["claims_deleted"] = s.execute(delete(b).where(b.received_at < claims_before)).rowcount or 0
            r = TelemetryReasonRow
            out["reasons_deleted"] = s.execute(delete(r).where(r.end < raw_before)).rowcount or 0
        return out

    def telemetry_partitions_ensure(self, first_day: datetime, days: int) -> list[str]:
        """PostgreSQL: make the day partitions of `telemetry_windows` from `first_day` (UTC midnight) for `days`
        days that do not exist yet; the names made. Windows the default partition holds for such a day are moved
        into it first (a day may not be attached while the default partition has rows of it). SQLite: nothing."""
        if self._dialect != "postgresql":
            return []
        made: list[str] = []
        with self._tx() as s:
            s.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _ROLLUP_LOCK})
            have = {name for name, _ in _day_partitions(s)}
            for n in range(days):
                day = first_day + timedelta(days=n)
                name = f"telemetry_windows_p{day:%Y%m%d}"
                if name in have:
                    continue
                bounds = {"lo": day, "hi": day + timedelta(days=1)}
                table = f'{PARTITION_SCHEMA}."{name}"'
                s.execute(text(f"CREATE TABLE {table} (LIKE telemetry_windows INCLUDING DEFAULTS)"))
                s.execute(text(f"WITH moved AS (DELETE FROM {PARTITION_SCHEMA}.telemetry_windows_default "
                               f'WHERE "end" >= :lo AND "end" < :hi RETURNING *) INSERT INTO {table} '
                               "SELECT * FROM moved"), bounds)
                s.execute(text(f"ALTER TABLE telemetry_windows ATTACH PARTITION {table} FOR VALUES FROM "
                               f"('{day.isoformat()}') TO ('{(day + timedelta(days=1)).isoformat()}')"))
                made.append(name)
        return made

    def telemetry_partitions(self) -> list[tuple[str, datetime]]:
        """PostgreSQL: the day partitions of `telemetry_windows`, (name, UTC day) in order; SQLite: none."""
        if self._dialect != "postgresql":
            return []
        with self._tx() as s:
            return _day_partitions(s)


def _weaker(a: Any, b: Any) -> Any:
    """`_label_of` for two labels (an hour's and the windows added to it)."""
    return case((or_(a == "estimated", b == "estimated"), "estimated"),
                (or_(a == "measured", b == "measured"), "measured"), else_="none")


def _set_counter(store: Any, s: Session, name: str, value: int) -> None:
    s.execute(store._insert(Counter).values(name=name, value=value).on_conflict_do_update(
        index_elements=[Counter.name], set_={"value": value}))


def _day_partitions(s: Session) -> list[tuple[str, datetime]]:
    names = s.scalars(text(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE i.inhparent = 'telemetry_windows'::regclass AND n.nspname = :schema"), {"schema": PARTITION_SCHEMA})
    out = []
    for name in names:
        if match := _PARTITION_RE.fullmatch(name):
            out.append((name, datetime.strptime(match[1], "%Y%m%d").replace(tzinfo=timezone.utc)))
    return sorted(out, key=lambda item: item[1])
