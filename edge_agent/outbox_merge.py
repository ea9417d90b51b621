"""Merging telemetry windows into coarser ones: the pure core of the outbox's full-disk policy (edge_agent/outbox.py
says when it applies and why it is safe).

Theory of operation: windows of the same (model, version, where) and compatible energy labels fold into one window
spanning at most MAX_WINDOW_S, validated by the contract as it is built. Counts, errors and rows are summed exactly;
mean figures are weighted as each is defined (per successful request, per row of the successful ones); p50 and p95
take the successful-request-weighted mean and p99 the max, since percentiles of windows cannot be merged exactly.
A window that joins none comes back as it was.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from pydantic import ValidationError

from edgefleet.protos.limits import INT32_MAX, MAX_ENERGY_MJ, MAX_LATENCY_MS, MAX_WINDOW_S
from edgefleet.protos.messages import TelemetryWindow


@dataclass(frozen=True)
class _Coarse:
    """Sums of one coarse window in the making; `window` is what they give, already validated."""

    first: TelemetryWindow
    window: TelemetryWindow
    n: int
    count: int
    errors: int
    rows: int
    busy_ms: float  # sum of latency of the successful requests
    ok_lat: int  # successful requests of the windows with latency figures
    ok_rows: float  # their rows
    p50: tuple[float, int]  # (weighted sum, weight) of p50; same for p95
    p95: tuple[float, int]
    p99: float | None
    energy_mj: float
    ok_e: int  # successful (metered) requests of the windows with energy figures
    e_rows: float  # their rows
    net_mj: float  # row_net_mj x e_rows summed
    net: bool  # the energy windows give row_net_mj (all of them, or none: see _compatible)
    sources: frozenset[str]
    labels: tuple[frozenset[Any], ...]  # energy_meter, energy_method, energy_hz, idle_w seen on energy windows
    reasons: dict[str, int]  # the offload policy's decisions, summed: each request's one decision stays counted


def _weights(w: TelemetryWindow) -> tuple[int, float, float, float]:
    """(ok, busy_ms, ok_rows, metered rows) of a window, recovered from its figures; see the module docstring."""
    ok = w.count - w.errors
    most = w.rows - w.errors  # every failed request carried at least one row
    if ok <= 0:
        return 0, 0.0, 0.0, 0.0
    busy = w.mean_ms * ok if w.mean_ms is not None else 0.0
    if w.errors == 0:
        ok_rows = float(w.rows)
    elif w.row_ms:
        ok_rows = busy / w.row_ms
    elif w.mean_mj and w.row_mj:
        ok_rows = ok * w.mean_mj / w.row_mj
    else:  # every figure zero: the rows cannot be told apart; failed requests taken as one row each
        ok_rows = float(most)
    ok_rows = min(max(ok_rows, float(ok)), float(most))
    e_rows = ok_rows
    if w.errors and w.mean_mj and w.row_mj:
        e_rows = min(max(ok * w.mean_mj / w.row_mj, float(ok)), float(most))
    return ok, busy, ok_rows, e_rows


def _start(w: TelemetryWindow) -> _Coarse:
    ok, busy, ok_rows, e_rows = _weights(w)
    lat = ok if (w.mean_ms is not None and ok) else 0
    energy = ok if (w.mean_mj is not None and ok) else 0
    labels = (frozenset({w.energy_meter}), frozenset({w.energy_method}), frozenset({w.energy_hz}),
              frozenset({w.idle_w})) if energy else (frozenset(),) * 4
    return _Coarse(
        first=w, window=w, n=1, count=w.count, errors=w.errors, rows=w.rows, busy_ms=busy, ok_lat=lat,
        ok_rows=ok_rows if lat else 0.0,
        p50=(w.p50_ms * ok, ok) if w.p50_ms is not None and ok else (0.0, 0),
        p95=(w.p95_ms * ok, ok) if w.p95_ms is not None and ok else (0.0, 0), p99=w.p99_ms,
        energy_mj=w.mean_mj * ok if energy else 0.0, ok_e=energy, e_rows=e_rows if energy else 0.0,
        net_mj=w.row_net_mj * e_rows if energy and w.row_net_mj is not None else 0.0,
        net=bool(energy and w.row_net_mj is not None),
        sources=frozenset({w.energy_source}) if energy else frozenset(), labels=labels, reasons=dict(w.reasons))


def _compatible(acc: _Coarse, w: TelemetryWindow) -> bool:
    f = acc.first
    if (f.model, f.version, f.where) != (w.model, w.version, w.where):
        return False
    if (max(acc.window.end, w.end) - min(acc.window.start, w.start)).total_seconds() > MAX_WINDOW_S:
        return False
    if acc.count + w.count > INT32_MAX:
        return False
    if acc.count > acc.errors and w.count > w.errors:
        # A window with energy figures next to one without: the merged mean_mj would need how many requests were
        # metered, which no window says. Kept apart, every merged window stays "all metered or none".
        if (acc.ok_e > 0) != (w.mean_mj is not None):
            return False
        if acc.ok_e and acc.net != (w.row_net_mj is not None):
            return False
    return True


def _label(seen: frozenset[Any], unknown: Any) -> Any:
    return next(iter(seen)) if len(seen) == 1 else unknown


def _build(c: _Coarse) -> TelemetryWindow:
    f = c.first
    mean_ms = min(c.busy_ms / c.ok_lat, MAX_LATENCY_MS) if c.ok_lat else None
    row_ms = min(c.busy_ms / c.ok_rows, MAX_LATENCY_MS) if c.ok_lat else None
    p50 = c.p50[0] / c.p50[1] if c.p50[1] else None
    p95 = c.p95[0] / c.p95[1] if c.p95[1] else None
    # Weighted means of ordered figures are ordered; max() only absorbs a last-bit rounding of the division.
    if p50 is not None and p95 is not None:
        p95 = max(p95, p50)
    p99 = max((p for p in (c.p99, p95, p50) if p is not None), default=None)
    if p99 is not None:
        p99 = min(p99, MAX_LATENCY_MS)
    mean_mj = row_mj = net = None
    if c.ok_e:
        mean_mj = min(c.energy_mj / c.ok_e, MAX_ENERGY_MJ)
        row_mj = min(c.energy_mj / c.e_rows, mean_mj)
        net = min(c.net_mj / c.e_rows, row_mj) if c.net else None
        source = "estimated" if c.sources - {"measured"} else "measured"
        meter, method, hz, idle = (_label(c.labels[0], ""), _label(c.labels[1], ""), _label(c.labels[2], None),
                                   _label(c.labels[3], None))
    else:
        source, meter, method, hz, idle = f.energy_source, f.energy_meter, f.energy_method, f.energy_hz, f.idle_w
    return TelemetryWindow(
        model=f.model, version=f.version, where=f.where, start=c.window.start, end=c.window.end, count=c.count,
        errors=c.errors, rows=c.rows, p50_ms=p50, p95_ms=p95, p99_ms=p99, mean_ms=mean_ms, row_ms=row_ms,
        mean_mj=mean_mj, row_mj=row_mj, row_net_mj=net, energy_source=source, energy_meter=meter,
        energy_method=method, energy_hz=hz, idle_w=idle, reasons=c.reasons)


def _absorb(acc: _Coarse, w: TelemetryWindow) -> _Coarse | None:
    """`acc` with `w` added, or None when the result would break the contract or lose what a figure means."""
    if not _compatible(acc, w):
        return None
    o = _start(w)
    win = acc.window
    # `window` is refreshed by _build below; these give it its span.
    span = win.model_copy(update={"start": min(win.start, w.start), "end": max(win.end, w.end)})
    merged = replace(
        acc, window=span, n=acc.n + 1, count=acc.count + o.count, errors=acc.errors + o.errors,
        rows=acc.rows + o.rows, busy_ms=acc.busy_ms + o.busy_ms, ok_lat=acc.ok_lat + o.ok_lat,
        ok_rows=acc.ok_rows + o.ok_rows, p50=(acc.p50[0] + o.p50[0], acc.p50[1] + o.p50[1]),
        p95=(acc.p95[0] + o.p95[0], acc.p95[1] + o.p95[1]),
        p99=max((p for p in (acc.p99, o.p99) if p is not None), default=None),
        energy_mj=acc.energy_mj + o.energy_mj, ok_e=acc.ok_e + o.ok_e, e_rows=acc.e_rows + o.e_rows,
        net_mj=acc.net_mj + o.net_mj, net=acc.net or o.net, sources=acc.sources | o.sources,
        labels=tuple(a | b for a, b in zip(acc.labels, o.labels)),
        reasons={k: acc.reasons.get(k, 0) + o.reasons.get(k, 0) for k in acc.reasons.keys() | o.reasons.keys()})
    try:
        return replace(merged, window=_build(merged))
    except ValidationError:  # e.g. overlapping windows holding more than their span admits: keep them apart
        return None


@dataclass
class Merger:
    """Greedy per (model, version, where): each window joins its key's open coarse window or starts the next."""

    closed: list[TelemetryWindow] = field(default_factory=list)
    open: dict[tuple[str, int, str], _Coarse] = field(default_factory=dict)

    def feed(self, windows: Iterable[TelemetryWindow]) -> None:
        for w in windows:
            key = (w.model, w.version, w.where)
            acc = self.open.get(key)
            grown = _absorb(acc, w) if acc is not None else None
            if grown is None:
                if acc is not None:
                    self.closed.append(acc.window)
                grown = _start(w)
            self.open[key] = grown

    def size(self) -> int:
        return len(self.closed) + len(self.open)

    def windows(self) -> list[TelemetryWindow]:
        out = self.closed + [acc.window for acc in self.open.values()]
        return sorted(out, key=lambda w: (w.start, w.model, w.version, w.where))


def merge_windows(windows: Iterable[TelemetryWindow]) -> list[TelemetryWindow]:
    """Coarser windows with the same sums (see the module docstring); a window that joins none comes back as is."""
    merger = Merger()
    merger.feed(windows)
    return merger.windows()



@dataclass(frozen=True)
class Tally:
    """What a set of windows counted: requests (failed ones included), errors, rows (inferences)."""

    requests: int = 0
    errors: int = 0
    rows: int = 0

    def __add__(self, other: Tally) -> Tally:
        return Tally(self.requests + other.requests, self.errors + other.errors, self.rows + other.rows)

    @classmethod
    def of(cls, windows: Iterable[TelemetryWindow]) -> Tally:
        windows = list(windows)
        return cls(sum(w.count for w in windows), sum(w.errors for w in windows), sum(w.rows for w in windows))


__all__ = ["Merger", "Tally", "merge_windows"]
