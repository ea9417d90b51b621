"""Efficiency sums in SQL: the telemetry windows summed per (device, class, model, version, where, energy_source).

Theory: one GROUP BY over `telemetry_windows` joined to `devices` (for the class), returning sums only, so that
cloud/efficiency.py can regroup them any way (device, class, model version, fleet) and label each figure by the
sources it mixes; `Store.telemetry_summary` cannot serve this, as it folds `where` and `energy_source` together.
A plain function over `Store._tx()`, like a method of the store: the only SQL here, with the same admission rules
as the summary (a row outside the contract, stored before it had limits, is left out, never summed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import Float, and_, case, cast, func, or_, select

from edgefleet.cloud.db.models import Device, TelemetryReasonRow, TelemetryWindowRow
from edgefleet.cloud.efficiency import Slice
from edgefleet.protos.limits import MAX_ENERGY_MJ, MAX_LATENCY_MS

if TYPE_CHECKING:
    from edgefleet.cloud.store import Store


def _admitted(figure: Any, ceiling: float) -> Any:
    # NaN sorts above every number on PostgreSQL and is NULL on SQLite, so BETWEEN leaves it out too.
    return or_(figure.is_(None), figure.between(0, ceiling))


def efficiency_slices(store: Store, since: datetime, *, model: str | None = None, device_id: str | None = None,
                      device_class: str | None = None, version: int | None = None) -> list[Slice]:
    """Sums of the windows that ended at or after `since`, of devices the cloud has, optionally narrowed."""
    w, d = TelemetryWindowRow, Device
    rows, count = cast(w.rows, Float), cast(w.count, Float)
    energy = and_(w.row_mj.is_not(None), w.energy_source.in_(("measured", "estimated")))
    net = and_(energy, w.row_net_mj.is_not(None))

    def rows_where(cond: Any) -> Any:
        return func.sum(case((cond, w.rows), else_=0))

    def sum_where(cond: Any, figure: Any, weight: Any = rows) -> Any:
        return func.sum(case((cond, figure * weight), else_=0.0))

    query = (
        select(w.device_id, d.device_class, w.model, w.version, w.where, w.energy_source,
               func.sum(w.count).label("requests"), func.sum(w.rows).label("rows"),
               rows_where(energy).label("energy_rows"), sum_where(energy, w.row_mj).label("energy_mj"),
               rows_where(net).label("net_rows"), sum_where(net, w.row_net_mj).label("net_mj"),
               rows_where(w.row_ms.is_not(None)).label("latency_rows"),
               sum_where(w.row_ms.is_not(None), w.row_ms).label("latency_ms"),
               func.sum(case((w.p95_ms.is_not(None), w.count), else_=0)).label("p95_requests"),
               sum_where(w.p95_ms.is_not(None), w.p95_ms, count).label("p95_ms"))
        .join(d, d.device_id == w.device_id)
        .where(w.end >= since, w.count >= 0, w.errors.between(0, w.count), w.rows >= w.count,
               _admitted(w.p95_ms, MAX_LATENCY_MS), _admitted(w.row_ms, MAX_LATENCY_MS),
               _admitted(w.row_mj, MAX_ENERGY_MJ), _admitted(w.row_net_mj, MAX_ENERGY_MJ))
        .group_by(w.device_id, d.device_class, w.model, w.version, w.where, w.energy_source)
        .order_by(w.device_id, w.model, w.version, w.where, w.energy_source)
    )
    for column, value in ((w.model, model), (w.device_id, device_id), (d.device_class, device_class),
                          (w.version, version)):
        if value is not None:
            query = query.where(column == value)
    with store._tx() as s:
        return [Slice(device_id=r.device_id, device_class=r.device_class, model=r.model, version=int(r.version),
                      where=r.where, energy_source=r.energy_source, requests=int(r.requests or 0),
                      rows=int(r.rows or 0), energy_rows=int(r.energy_rows or 0),
                      energy_mj=float(r.energy_mj or 0.0), net_rows=int(r.net_rows or 0),
                      net_mj=float(r.net_mj or 0.0), latency_rows=int(r.latency_rows or 0),
                      latency_ms=float(r.latency_ms or 0.0), p95_requests=int(r.p95_requests or 0),
                      p95_ms=float(r.p95_ms or 0.0))
                for r in s.execute(query)]


@dataclass
class OffloadMix:
    """Where one device's model ran over the look-back: inferences (rows) on the device and in the cloud, and the
    offload policy's decisions per reason (empty from an agent without a policy)."""

    local_rows: int = 0
    cloud_rows: int = 0
    reasons: dict[str, int] = field(default_factory=dict)

    @property
    def share(self) -> float | None:
        """The share of inferences offloaded, None with no inference."""
        total = self.local_rows + self.cloud_rows
        return self.cloud_rows / total if total else None


def offload_mix(store: Store, since: datetime, *, device_id: str | None = None) -> dict[tuple[str, str], OffloadMix]:
    """Per (device, model), the windows and decisions that ended at or after `since` (raw windows only: the
    look-back of a status is far inside their retention)."""
    w, r = TelemetryWindowRow, TelemetryReasonRow
    rows = (select(w.device_id, w.model, w.where, func.sum(w.rows).label("rows"))
            .where(w.end >= since, w.rows >= 0).group_by(w.device_id, w.model, w.where))
    reasons = (select(r.device_id, r.model, r.reason, func.sum(r.count).label("n"))
               .where(r.end >= since, r.count > 0).group_by(r.device_id, r.model, r.reason))
    if device_id is not None:
        rows, reasons = rows.where(w.device_id == device_id), reasons.where(r.device_id == device_id)
    out: dict[tuple[str, str], OffloadMix] = {}
    with store._tx() as s:
        for row in s.execute(rows):
            mix = out.setdefault((row.device_id, row.model), OffloadMix())
            if row.where == "cloud":
                mix.cloud_rows += int(row.rows or 0)
            else:
                mix.local_rows += int(row.rows or 0)
        for row in s.execute(reasons):
            out.setdefault((row.device_id, row.model), OffloadMix()).reasons[row.reason] = int(row.n or 0)
    return out


__all__ = ["OffloadMix", "efficiency_slices", "offload_mix"]
