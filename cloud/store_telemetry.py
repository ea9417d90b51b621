"""Telemetry in SQL: windows stored once per batch and rolled up per device and model version; a part of `Store`
(mixed into it), kept in its own file.

Theory: a batch is claimed by its (device_id, epoch, seq) primary key with `INSERT ... ON CONFLICT DO NOTHING
RETURNING`, so an outbox replay stores nothing twice, on SQLite and PostgreSQL alike. A window counts requests (`count`,
`errors`) and the rows, inferences, in them (`rows`) apart, with per-request and per-row figures
(protos/telemetry.py); roll-ups are one SQL aggregate: per-request figures weighted by requests, per-row ones by
rows, so a window of batched requests weighs as the inferences it served. `min_rows` leaves out windows too small to
learn from (the calibration refit's minimum, cloud/services_distill.py).

At fleet scale (issue 9) a call stores many batches with a fixed number of statements: one multi-row claim, then
the windows of the batches claimed by binary `COPY` on PostgreSQL (psycopg 3, on the session's own connection, in
its transaction) or one executemany on SQLite, then one counter upsert. Raw windows roll up to hourly sums
(`telemetry_hourly`, by an id watermark), which summaries read for whole hours; retention drops rolled-up windows
(on PostgreSQL whole day partitions of `telemetry_windows`, schema `telemetry_partitions`), old hours and old
batch claims: those live in store_telemetry_upkeep.py; cloud/telemetry_rollup.py decides when and how far.
"""

from __future__ import annotations

from collections import Counter as CounterDict
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from operator import itemgetter
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    BigInteger,
    Float,
    Integer,
    String,
    case,
    cast,
    func,
    insert,
    or_,
    select,
    union_all,
)

from edgefleet.cloud.db.models import (
    Counter,
    Device,
    TelemetryBatchRow,
    TelemetryHourlyRow,
    TelemetryReasonRow,
    TelemetryWindowRow,
    UTCDateTime,
)
from edgefleet.cloud.errors import Conflict, Unavailable
from edgefleet.protos.limits import MAX_ENERGY_MJ, MAX_LATENCY_MS

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    from sqlalchemy.orm import Session


# What `add_telemetry_many` did with each batch.
STORED, REPLAYED, UNKNOWN_DEVICE = "stored", "replayed", "unknown_device"


# The roll-up's watermarks, kept as counters: windows with ids up to THROUGH are in telemetry_hourly; SEEN is the
# highest id the previous roll-up saw, how far the next one may go (`telemetry_rollup`).
ROLLUP_THROUGH, ROLLUP_SEEN = "telemetry_rollup_through_id", "telemetry_rollup_seen_id"
# The weighted figures and their weights: per request by requests, per row by rows.
_WEIGHTED = ("p50_ms", "p95_ms", "mean_ms", "mean_mj", "row_ms", "row_mj")
_BY_ROWS = frozenset({"row_ms", "row_mj"})

# The columns of a stored window in COPY order: the batch's identity, then the window's own, with the defaults the
# ORM gives a column a window dict leaves out (windows of tests and of older code paths omit the newer fields).
_IDENTITY = ("device_id", "epoch", "seq")
_WINDOW_DEFAULTS: tuple[tuple[str, Any], ...] = tuple(
    (c.name, c.default.arg if c.default is not None else None)
    for c in TelemetryWindowRow.__table__.columns if c.name not in ("id", *_IDENTITY))
_WINDOW_KEYS = frozenset(name for name, _ in _WINDOW_DEFAULTS)
_STORED_KEYS = _WINDOW_KEYS | {"reasons"}  # `reasons` go to telemetry_reasons (`reason_rows`)
_ALL_FIELDS = itemgetter(*(name for name, _ in _WINDOW_DEFAULTS))
_ROW_COLUMNS = (*_IDENTITY, *(name for name, _ in _WINDOW_DEFAULTS))


def _pg_type(column: Any) -> str:
    # Binary COPY needs each column's exact wire type (an int4 is 4 bytes, an int8 8).
    kind = column.type
    if isinstance(kind, UTCDateTime):
        return "timestamptz"
    if isinstance(kind, BigInteger):
        return "int8"
    if isinstance(kind, Integer):
        return "int4"
    if isinstance(kind, String):
        return "text"
    if isinstance(kind, Float):
        return "float8"
    raise TypeError(f"telemetry_windows.{column.name}: no COPY type for {kind!r}; add it to _pg_type")


_COPY_TYPES = [_pg_type(TelemetryWindowRow.__table__.c[name]) for name in _ROW_COLUMNS]
_QUOTED = ", ".join(f'"{c}"' for c in _ROW_COLUMNS)  # "end" and "where" are SQL keywords
_COPY_PG = f"COPY telemetry_windows ({_QUOTED}) FROM STDIN (FORMAT BINARY)"
_CLAIM_PG = (
    "INSERT INTO telemetry_batches (device_id, epoch, seq, windows, dropped_windows, merged_windows, received_at) "
    "SELECT d, e, q, w, dw, mw, %(now)s FROM unnest(%(d)s::varchar[], %(e)s::int8[], %(q)s::int8[], "
    "%(w)s::int4[], %(dw)s::int4[], %(mw)s::int4[]) AS t(d, e, q, w, dw, mw) "
    "ON CONFLICT (device_id, epoch, seq) DO NOTHING RETURNING device_id, epoch, seq")


# A stored window's own columns in COPY order (after the batch's identity): the order of `BatchIn.rows`.
WINDOW_COLUMNS = tuple(name for name, _ in _WINDOW_DEFAULTS)


@dataclass(frozen=True)
class BatchIn:
    """One telemetry batch to store: its identity (device_id, epoch, seq) and its windows, in one of two forms.

    `windows`: column dicts (`TelemetryWindow.model_dump()`'s keys, or fewer: the store fills in column defaults and
    refuses keys it has no column for). Or, from a decoder that has checked every rule already
    (cloud/telemetry_decode.py's fast path), `rows`: one tuple per window in `WINDOW_COLUMNS` order, with
    `reason_rows` the telemetry_reasons rows of their `reasons`, and `windows` left empty; the store writes those as
    they are, with no per-window work in Python (tests/cloud/test_telemetry_decode.py proves them equal to the rows
    the dict form gives)."""

    device_id: str
    epoch: int
    seq: int
    windows: list[dict[str, Any]]
    dropped_windows: int = 0
    merged_windows: int = 0
    rows: list[tuple[Any, ...]] | None = None
    reason_rows: list[dict[str, Any]] | None = None

    @property
    def size(self) -> int:
        """How many windows the batch holds, in either form."""
        return len(self.rows) if self.rows is not None else len(self.windows)


class TelemetryStoreMixin:
    """Telemetry writes and roll-ups; needs `_tx()`, `_insert()` and `_dialect` from `Store`."""

    if TYPE_CHECKING:
        _dialect: str

        def _tx(self) -> AbstractContextManager[Session]: ...

        def _insert(self, table: Any) -> Any: ...

    def add_telemetry(self, device_id: str, seq: int, windows: list[dict[str, Any]], dropped_windows: int,
                      now: datetime, *, epoch: int = 0, merged_windows: int = 0) -> bool:
        """Store a batch's windows once; False when (device_id, epoch, seq) was stored before (an outbox replay)."""
        batch = BatchIn(device_id, epoch, seq, windows, dropped_windows, merged_windows)
        return self.add_telemetry_many([batch], now, known_only=False)[0] == STORED

    def add_telemetry_many(self, batches: list[BatchIn], now: datetime, *, known_only: bool = True) -> list[str]:
        """Store many batches in ONE transaction, each once; per batch STORED, REPLAYED (stored before, or earlier
        in this same call) or UNKNOWN_DEVICE (with `known_only`, a device the cloud does not have: nothing stored).

        The counters (`telemetry_batches`, `telemetry_windows`, `telemetry_replayed`, `telemetry_dropped_windows`,
        `telemetry_merged_windows`, `dropped_unknown_device`) move in the same transaction, so they are exact. All
        or nothing: when the transaction fails nothing is stored or counted and the caller must acknowledge none of
        them (the MQTT bridge retries, and the broker redelivers what was never acknowledged).

        A fixed number of statements however many batches: one SELECT of the known devices, one multi-row claim
        (`INSERT ... ON CONFLICT DO NOTHING RETURNING` the keys it inserted), the windows of the batches claimed
        now in one binary `COPY` (PostgreSQL) or one executemany (SQLite), and one multi-row counter upsert."""
        outcomes: list[str] = [REPLAYED] * len(batches)
        tally: CounterDict[str] = CounterDict()
        first: dict[tuple[str, int, int], int] = {}  # a key -> the index of its first batch in this call
        with self._tx() as s:
            known: set[str] | None = None
            if known_only:
                ids = sorted({b.device_id for b in batches})
                known = set(s.scalars(select(Device.device_id).where(Device.device_id.in_(ids)))) if ids else set()
            for i, b in enumerate(batches):
                if known is not None and b.device_id not in known:
                    outcomes[i] = UNKNOWN_DEVICE
                    tally["dropped_unknown_device"] += 1
                else:
                    first.setdefault((b.device_id, b.epoch, b.seq), i)
            claimed = self._claim_batches(s, [batches[i] for i in first.values()], now) if first else set()
            rows: list[tuple[Any, ...]] = []
            reasons: list[dict[str, Any]] = []
            for key, i in first.items():
                if key in claimed:
                    b = batches[i]
                    outcomes[i] = STORED
                    tally["telemetry_batches"] += 1
                    tally["telemetry_windows"] += b.size
                    tally["telemetry_dropped_windows"] += b.dropped_windows
                    tally["telemetry_merged_windows"] += b.merged_windows
                    if b.rows is not None:
                        identity = (b.device_id, b.epoch, b.seq)
                        rows.extend([identity + r for r in b.rows])
                        reasons.extend(b.reason_rows or ())
                    for w in b.windows:
                        if w.get("reasons"):
                            reasons.extend(reason_rows(b.device_id, w))
                        rows.append(window_row(b, w))
            # Everything not stored nor unknown is a replay: stored before, or a second copy within this call.
            tally["telemetry_replayed"] += outcomes.count(REPLAYED)
            if rows:
                self._insert_windows(s, rows)
            if reasons:
                s.execute(insert(TelemetryReasonRow), reasons)
            counts = [{"name": name, "value": by} for name, by in sorted(tally.items()) if by]
            if counts:
                upsert = self._insert(Counter).values(counts)
                s.execute(upsert.on_conflict_do_update(index_elements=[Counter.name],
                                                       set_={"value": Counter.value + upsert.excluded.value}))
        return outcomes

    def _claim_batches(self, s: Session, batches: list[BatchIn], now: datetime) -> set[tuple[str, int, int]]:
        """Insert the batches' rows, skipping keys stored before; the keys this statement inserted."""
        t = TelemetryBatchRow
        if self._dialect == "postgresql":
            # One statement over arrays: no per-row bind parameters to render, and a plan PostgreSQL can cache.
            params = {"d": [b.device_id for b in batches], "e": [b.epoch for b in batches],
                      "q": [b.seq for b in batches], "w": [b.size for b in batches],
                      "dw": [b.dropped_windows for b in batches], "mw": [b.merged_windows for b in batches],
                      "now": now}
            raw = _raw(s)
            return {(d, int(e), int(q)) for d, e, q in _guard(lambda: raw.execute(_CLAIM_PG, params).fetchall())}
        claim = (self._insert(t).on_conflict_do_nothing(index_elements=[t.device_id, t.epoch, t.seq])
                 .returning(t.device_id, t.epoch, t.seq))
        # RETURNING, not rowcount: rowcount of ON CONFLICT DO NOTHING differs between drivers.
        params = [{"device_id": b.device_id, "epoch": b.epoch, "seq": b.seq, "windows": b.size,
                   "dropped_windows": b.dropped_windows, "merged_windows": b.merged_windows, "received_at": now}
                  for b in batches]
        return {(d, int(e), int(q)) for d, e, q in s.execute(claim, params)}

    def _insert_windows(self, s: Session, rows: list[tuple[Any, ...]]) -> None:
        if self._dialect == "postgresql":
            raw = _raw(s)

            def copy() -> None:
                with raw.cursor() as cur, cur.copy(_COPY_PG) as out:
                    out.set_types(_COPY_TYPES)
                    for row in rows:
                        out.write_row(row)

            _guard(copy)
            return
        s.execute(insert(TelemetryWindowRow), [dict(zip(_ROW_COLUMNS, row, strict=True)) for row in rows])

    def telemetry_summary(self, since: datetime, device_id: str | None = None, *,
                          min_rows: int = 0) -> dict[str, list[TelemetryAggregate]]:
        """Per device and (model, version), the windows that ended after `since`, rolled up in SQL; with
        `min_rows`, only windows of at least that many rows (inferences) count.

        Requests (`count`), errors and rows add up exactly. Per-request figures (p50, p95, `mean_ms`, `mean_mj`) are
        means of the windows' own weighted by their successful requests (count - errors: what each is a mean over),
        per-row ones (`row_ms`, `row_mj`: per inference) rows-weighted, so one window of 1,200-row requests weighs as
        1,200 inferences. Percentiles of windows cannot be merged exactly: p99 is the worst window's. Good enough to
        see a device drift; the windows stay in the table for exact questions.

        Hours the roll-up has summed (`telemetry_hourly`, `telemetry_rollup`) are read from there for the whole
        hours of the look-back, the raw windows for the rest: the first, partial hour and every window not rolled
        up yet (id above the roll-up's watermark). The two sets are disjoint and together every admitted window
        that ended after `since`, so the figures are the raw windows' (integers exactly, means up to the order of
        float additions), and older than the raw retention only whole hours remain. `min_rows` is a rule on single
        windows: it reads raw windows only, so it sees back as far as their retention.

        Safe at the contract's extremes: weighted sums are computed in double precision, where weight x figure is
        at most INT32_MAX x MAX_ENERGY_MJ (about 8e19) per window for requests and a day of rows at MAX_ROWS_PER_S x
        MAX_ENERGY_MJ (about 3e24) for rows, nowhere near an overflow for any number of windows. Rows outside the
        contract (stored before it had limits: a p95 of 1e308, NaN, a negative figure, fewer rows than requests)
        are left out, so one of them cannot make PostgreSQL raise on overflow and every listing answer 503.
        """
        w, h = TelemetryWindowRow, TelemetryHourlyRow
        whole_hours = _hour_ceiling(since)
        with self._tx() as s:
            raw = _window_sums(w.end >= since, *_admitted(w))
            parts = [raw]
            if min_rows > 0:
                parts = [raw.where(w.rows >= min_rows)]
            else:
                watermark = _counter(s, ROLLUP_THROUGH)
                parts = [raw.where(or_(w.end < whole_hours, w.id > watermark)),
                         select(h.device_id, h.model, h.version, h.windows, h.count, h.errors, h.rows,
                                *(c for f in _WEIGHTED for c in (getattr(h, f"{f}_sum"), getattr(h, f"{f}_weight"))),
                                h.p99_ms, h.energy_source, h.end).where(h.hour >= whole_hours)]
            if device_id is not None:
                parts = [parts[0].where(w.device_id == device_id),
                         *(q.where(h.device_id == device_id) for q in parts[1:])]
            u = union_all(*parts).subquery()
            query = (
                select(u.c.device_id, u.c.model, u.c.version, func.sum(u.c.count).label("count"),
                       func.sum(u.c.errors).label("errors"), func.sum(u.c.rows).label("rows"),
                       func.sum(u.c.windows).label("windows"),
                       *(_mean(func.sum(u.c[f"{f}_sum"]), func.sum(u.c[f"{f}_weight"])).label(f)
                         for f in _WEIGHTED),
                       func.max(u.c.p99_ms).label("p99_ms"), _label_of(u.c.energy_source).label("energy_source"),
                       func.max(u.c.end).label("window_end"))
                .group_by(u.c.device_id, u.c.model, u.c.version)
                .order_by(u.c.device_id, u.c.model, u.c.version)
            )
            out: dict[str, list[TelemetryAggregate]] = {}
            for row in s.execute(query):
                out.setdefault(row.device_id, []).append(TelemetryAggregate(
                    model=row.model, version=row.version, count=int(row.count or 0), errors=int(row.errors or 0),
                    p50_ms=_float(row.p50_ms), p95_ms=_float(row.p95_ms), p99_ms=_float(row.p99_ms),
                    mean_mj=_float(row.mean_mj), energy_source=row.energy_source, end=_aware(row.window_end),
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


def _admitted(w: Any) -> list[Any]:
    """The windows inside the contract (see `telemetry_summary`): what summaries and roll-ups count."""
    def inside(figure: Any, ceiling: float) -> Any:
        # NaN sorts above every number on PostgreSQL and is NULL on SQLite, so BETWEEN leaves it out too.
        return or_(figure.is_(None), figure.between(0, ceiling))

    return [w.count >= 0, w.errors.between(0, w.count), w.rows >= w.count,
            inside(w.p50_ms, MAX_LATENCY_MS), inside(w.p95_ms, MAX_LATENCY_MS), inside(w.p99_ms, MAX_LATENCY_MS),
            inside(w.mean_ms, MAX_LATENCY_MS), inside(w.row_ms, MAX_LATENCY_MS), inside(w.mean_mj, MAX_ENERGY_MJ),
            inside(w.row_mj, MAX_ENERGY_MJ)]


def _window_sums(*where: Any, hour: Any = None) -> Any:
    """Raw windows as additive sums per device and (model, version) (and hour): the columns of telemetry_hourly."""
    w = TelemetryWindowRow
    # Per-request figures are means over the successful requests (protos/telemetry.py), so they weigh by those;
    # per-row ones by rows (the wire does not say how many rows the failed requests had).
    ok, rows = cast(w.count - w.errors, Float), cast(w.rows, Float)
    sums = []
    for name in _WEIGHTED:
        figure, weight = getattr(w, name), rows if name in _BY_ROWS else ok
        sums += [func.sum(figure * weight).label(f"{name}_sum"),
                 func.sum(case((figure.is_not(None), weight), else_=0.0)).label(f"{name}_weight")]
    keys = [w.device_id, w.model, w.version, *([hour.label("hour")] if hour is not None else [])]
    return (select(*keys, func.count().label("windows"), func.sum(w.count).label("count"),
                   func.sum(w.errors).label("errors"), func.sum(w.rows).label("rows"), *sums,
                   func.max(w.p99_ms).label("p99_ms"), _label_of(w.energy_source).label("energy_source"),
                   func.max(w.end).label("end"))
            .where(*where).group_by(*([w.device_id, w.model, w.version] + ([hour] if hour is not None else []))))


# A weighted sum below this is a mean of 0: PostgreSQL raises "value out of range: underflow" where a quotient
# rounds to zero from a non-zero dividend (a subnormal latency such as 5e-324 ms over 3 requests), and Python would
# give 0.0 or a subnormal. Far below any real figure (weights stay under 1e20, so larger sums divide safely).
_TINY_SUM = 1e-300


def _mean(total: Any, weight: Any) -> Any:
    """total / weight in SQL: NULL for no weight, 0.0 for a sum too small to divide (see _TINY_SUM)."""
    return case((func.coalesce(weight, 0) == 0, None), (func.abs(total) < _TINY_SUM, 0.0), else_=total / weight)


def _label_of(source: Any) -> Any:
    """The energy label of windows rolled up: "estimated" when any metered one was, "measured" when all metered ones
    were, "none" when none had energy. Not max(): "none" sorts after "measured" and would relabel a measured row."""
    rank = func.max(case((source == "estimated", 2), (source == "measured", 1), else_=0))
    return case((rank == 2, "estimated"), (rank == 1, "measured"), else_="none")


def _hour_ceiling(t: datetime) -> datetime:
    floor = t.astimezone(timezone.utc).replace(minute=0, second=0, microsecond=0)
    return floor if floor == t else floor + timedelta(hours=1)


def _counter(s: Session, name: str) -> int:
    return int(s.scalar(select(Counter.value).where(Counter.name == name)) or 0)


def _aware(value: Any) -> Any:
    if isinstance(value, str):  # SQLite, through a UNION: the stored text
        value = datetime.fromisoformat(value)
    if isinstance(value, datetime):
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)
    return value


def window_row(b: BatchIn, w: dict[str, Any]) -> tuple[Any, ...]:
    """One window as a row in `_ROW_COLUMNS` order."""
    if not _STORED_KEYS.issuperset(w):
        raise ValueError(f"window of {b.device_id} seq {b.seq} has field(s) {sorted(set(w) - _WINDOW_KEYS)} that "
                         "telemetry_windows has no column for; add a column (and a migration) first")
    for name in ("start", "end"):
        value = w.get(name)
        if value is not None and getattr(value, "tzinfo", None) is None:
            raise ValueError("naive datetime given to the database; use datetime.now(timezone.utc)")
    if len(w) == len(_WINDOW_KEYS) + ("reasons" in w):  # every field, as `TelemetryWindow.model_dump()`: one C call
        return (b.device_id, b.epoch, b.seq, *_ALL_FIELDS(w))
    return (b.device_id, b.epoch, b.seq, *[w.get(name, default) for name, default in _WINDOW_DEFAULTS])


def reason_rows(device_id: str, w: dict[str, Any]) -> list[dict[str, Any]]:
    """A window's `reasons` as telemetry_reasons rows (the window dict is left as it is: a failed transaction is
    retried with the same batches)."""
    return reasons_as_rows(device_id, w["model"], w["version"], w.get("where", "local"), w["end"], w["reasons"])


def reasons_as_rows(device_id: str, model: str, version: int, where: str, end: datetime,
                    reasons: dict[str, int]) -> list[dict[str, Any]]:
    """telemetry_reasons rows: one per reason counted above zero."""
    return [{"device_id": device_id, "model": model, "version": version, "where": where, "end": end,
             "reason": reason, "count": n} for reason, n in reasons.items() if n > 0]


def _raw(s: Session) -> Any:
    """The psycopg 3 connection under the session, inside the session's transaction."""
    return s.connection().connection.driver_connection


def _guard(call: Any) -> Any:
    """`call()` on the raw driver, its errors mapped as `Store._tx` maps SQLAlchemy's."""
    import psycopg

    try:
        return call()
    except psycopg.IntegrityError as exc:
        raise Conflict(f"conflicting write: {str(exc).splitlines()[0] if str(exc) else exc!r}") from None
    except psycopg.Error as exc:
        raise Unavailable(f"database error ({exc.__class__.__name__}): {str(exc).splitlines()[0] if str(exc) else ''}"
                          "; check the database is up") from None


def _float(value: Any) -> float | None:
    return None if value is None else float(value)
