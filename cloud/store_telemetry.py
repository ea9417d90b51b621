"""Telemetry in SQL: windows stored once per batch and rolled up per device and model version; a part of `Store`
(mixed into it), kept in its own file.

Theory: a batch is claimed by its (device_id, epoch, seq) primary key with `INSERT ... ON CONFLICT DO NOTHING
RETURNING`, so an outbox replay stores nothing twice, on SQLite and PostgreSQL alike. A window counts requests (`count`,
`errors`) and the rows, inferences, in them (`rows`) apart, with per-request and per-row figures
(protos/telemetry.py); roll-ups are one SQL aggregate: per-request figures weighted by requests, per-row ones by
rows, so a window of batched requests weighs as the inferences it served. `min_rows` leaves out windows too small to
learn from (the calibration refit's minimum, cloud/services_distill.py).
"""

from __future__ import annotations

from collections import Counter as CounterDict
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import Float, case, cast, func, or_, select

from edgefleet.cloud.db.models import Counter, Device, TelemetryBatchRow, TelemetryWindowRow
from edgefleet.protos.limits import MAX_ENERGY_MJ, MAX_LATENCY_MS

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    from sqlalchemy.orm import Session


# What `add_telemetry_many` did with each batch.
STORED, REPLAYED, UNKNOWN_DEVICE = "stored", "replayed", "unknown_device"


@dataclass(frozen=True)
class BatchIn:
    """One telemetry batch to store: its identity (device_id, epoch, seq) and its windows as column dicts."""

    device_id: str
    epoch: int
    seq: int
    windows: list[dict[str, Any]]
    dropped_windows: int = 0
    merged_windows: int = 0


class TelemetryStoreMixin:
    """Telemetry writes and roll-ups; needs `_tx()` and `_insert()` from `Store`."""

    if TYPE_CHECKING:
        def _tx(self) -> AbstractContextManager[Session]: ...

        def _insert(self, table: Any) -> Any: ...

    def add_telemetry(self, device_id: str, seq: int, windows: list[dict[str, Any]], dropped_windows: int,
                      now: datetime, *, epoch: int = 0, merged_windows: int = 0) -> bool:
        """Store a batch's windows once; False when (device_id, epoch, seq) was stored before (an outbox replay)."""
        batch = BatchIn(device_id, epoch, seq, windows, dropped_windows, merged_windows)
        return self.add_telemetry_many([batch], now, known_only=False)[0] == STORED

    def add_telemetry_many(self, batches: list[BatchIn], now: datetime, *, known_only: bool = True) -> list[str]:
        """Store many batches in ONE transaction, each once; per batch STORED, REPLAYED (stored before) or
        UNKNOWN_DEVICE (with `known_only`, a device the cloud does not have: nothing stored).

        The counters (`telemetry_batches`, `telemetry_windows`, `telemetry_replayed`, `telemetry_dropped_windows`,
        `telemetry_merged_windows`, `dropped_unknown_device`) move in the same transaction, so they are exact. All
        or nothing: when the transaction fails nothing is stored or counted and the caller must acknowledge none of
        them (the MQTT bridge retries, and the broker redelivers what was never acknowledged)."""
        outcomes: list[str] = []
        tally: CounterDict[str] = CounterDict()
        with self._tx() as s:
            known: set[str] | None = None
            if known_only:
                ids = sorted({b.device_id for b in batches})
                known = set(s.scalars(select(Device.device_id).where(Device.device_id.in_(ids)))) if ids else set()
            for b in batches:
                if known is not None and b.device_id not in known:
                    outcomes.append(UNKNOWN_DEVICE)
                    tally["dropped_unknown_device"] += 1
                    continue
                claim = self._insert(TelemetryBatchRow).values(
                    device_id=b.device_id, epoch=b.epoch, seq=b.seq, windows=len(b.windows),
                    dropped_windows=b.dropped_windows, merged_windows=b.merged_windows, received_at=now,
                ).on_conflict_do_nothing(index_elements=[TelemetryBatchRow.device_id, TelemetryBatchRow.epoch,
                                                         TelemetryBatchRow.seq]).returning(TelemetryBatchRow.seq)
                # RETURNING, not rowcount: rowcount of ON CONFLICT DO NOTHING differs between drivers.
                if s.execute(claim).first() is None:
                    outcomes.append(REPLAYED)
                    tally["telemetry_replayed"] += 1
                    continue
                s.add_all(TelemetryWindowRow(device_id=b.device_id, epoch=b.epoch, seq=b.seq, **w) for w in b.windows)
                outcomes.append(STORED)
                tally["telemetry_batches"] += 1
                tally["telemetry_windows"] += len(b.windows)
                tally["telemetry_dropped_windows"] += b.dropped_windows
                tally["telemetry_merged_windows"] += b.merged_windows
            for name, by in sorted(tally.items()):
                if by:
                    s.execute(self._insert(Counter).values(name=name, value=by).on_conflict_do_update(
                        index_elements=[Counter.name], set_={"value": Counter.value + by}))
        return outcomes

    def telemetry_summary(self, since: datetime, device_id: str | None = None, *,
                          min_rows: int = 0) -> dict[str, list[TelemetryAggregate]]:
        """Per device and (model, version), the windows that ended after `since`, rolled up in SQL; with
        `min_rows`, only windows of at least that many rows (inferences) count.

        Requests (`count`), errors and rows add up exactly. Per-request figures (p50, p95, `mean_ms`, `mean_mj`) are
        count-weighted means of the windows' own, per-row ones (`row_ms`, `row_mj`: per inference) rows-weighted, so
        one window of 1,200-row requests weighs as 1,200 inferences. Percentiles of windows cannot be merged exactly:
        p99 is the worst window's. Good enough to see a device drift; the windows stay in the table for exact
        questions.

        Safe at the contract's extremes: weighted sums are computed in double precision, where weight x figure is
        at most INT32_MAX x MAX_ENERGY_MJ (about 8e19) per window for requests and a day of rows at MAX_ROWS_PER_S x
        MAX_ENERGY_MJ (about 3e24) for rows, nowhere near an overflow for any number of windows. Rows outside the
        contract (stored before it had limits: a p95 of 1e308, NaN, a negative figure, fewer rows than requests)
        are left out, so one of them cannot make PostgreSQL raise on overflow and every listing answer 503.
        """
        w = TelemetryWindowRow
        count, rows = cast(w.count, Float), cast(w.rows, Float)

        def weighted(figure: Any, weight: Any = count) -> Any:
            given = func.sum(case((figure.is_not(None), weight), else_=0.0))
            return (func.sum(figure * weight) / func.nullif(given, 0)).label(figure.key)

        def admitted(figure: Any, ceiling: float) -> Any:
            # NaN sorts above every number on PostgreSQL and is NULL on SQLite, so BETWEEN leaves it out too.
            return or_(figure.is_(None), figure.between(0, ceiling))

        query = (
            select(w.device_id, w.model, w.version, func.sum(w.count).label("count"),
                   func.sum(w.errors).label("errors"), func.sum(w.rows).label("rows"),
                   func.count().label("windows"), weighted(w.p50_ms), weighted(w.p95_ms),
                   func.max(w.p99_ms).label("p99_ms"), weighted(w.mean_ms), weighted(w.mean_mj),
                   weighted(w.row_ms, rows), weighted(w.row_mj, rows),
                   func.max(w.energy_source).label("energy_source"), func.max(w.end).label("window_end"))
            .where(w.end >= since, w.count >= 0, w.errors.between(0, w.count), w.rows >= w.count,
                   admitted(w.p50_ms, MAX_LATENCY_MS), admitted(w.p95_ms, MAX_LATENCY_MS),
                   admitted(w.p99_ms, MAX_LATENCY_MS), admitted(w.mean_ms, MAX_LATENCY_MS),
                   admitted(w.row_ms, MAX_LATENCY_MS), admitted(w.mean_mj, MAX_ENERGY_MJ),
                   admitted(w.row_mj, MAX_ENERGY_MJ))
            .group_by(w.device_id, w.model, w.version)
            .order_by(w.device_id, w.model, w.version)
        )
        if device_id is not None:
            query = query.where(w.device_id == device_id)
        if min_rows > 0:
            query = query.where(w.rows >= min_rows)
        out: dict[str, list[TelemetryAggregate]] = {}
        with self._tx() as s:
            for row in s.execute(query):
                out.setdefault(row.device_id, []).append(TelemetryAggregate(
                    model=row.model, version=row.version, count=int(row.count or 0), errors=int(row.errors or 0),
                    p50_ms=_float(row.p50_ms), p95_ms=_float(row.p95_ms), p99_ms=_float(row.p99_ms),
                    mean_mj=_float(row.mean_mj), energy_source=row.energy_source, end=row.window_end,
                    rows=int(row.rows or 0), windows=int(row.windows or 0), mean_ms=_float(row.mean_ms),
                    row_ms=_float(row.row_ms), row_mj=_float(row.row_mj)))
        return out


@dataclass(frozen=True)
class TelemetryAggregate:
    """One device's (model, version) over the look-back: `count` and `errors` are requests, `rows` inferences;
    `p50_ms`..`p99_ms`, `mean_ms`, `mean_mj` per request, `row_ms` and `row_mj` per row (per inference)."""

    model: str
    version: int
    count: int
    errors: int
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    mean_mj: float | None
    energy_source: str
    end: datetime
    rows: int = 0
    windows: int = 0  # windows rolled up
    mean_ms: float | None = None
    row_ms: float | None = None
    row_mj: float | None = None

    @property
    def batch(self) -> float | None:
        """Mean rows per request, or None with no request."""
        return self.rows / self.count if self.count > 0 else None


def _float(value: Any) -> float | None:
    return None if value is None else float(value)
