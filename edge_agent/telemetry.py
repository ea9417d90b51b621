"""Telemetry: per-(model, version) windows of latency and energy, and a disk outbox drained only on acknowledgement.

Theory of operation:
- `Telemetry.record(...)` adds one request (latency, energy, ok or error, and its `rows`: the batch size, the
  leading dimension of its input) to the open window of its (model, version, where). A request of 1,200 rows is
  1,200 inferences: the window counts requests and rows apart. Windows are aligned to multiples of `window_s` since
  the epoch, so every device's windows line up in the cloud. No clock is read here: the caller passes `now`.
- `Telemetry.flush(now)` closes every window whose end is at or before `now` into `TelemetryWindow`s (requests,
  errors, rows; per request p50/p95/p99 latency by nearest rank and the means of latency and energy; per row the
  busy time and energy over the rows; energy source, meter, method and sample rate) and hands them to the outbox
  as one or more `TelemetryBatch`es.
- Energy comes one of two ways (edge_agent/meters). A per-request meter (modelled) gives each request's joules to
  `record`; the window sums them, and its net figure is the sum less idle watts x the same busy time. A window
  meter (RAPL, NVML, INA3221, the Pi 5 PMIC; `attach_meter`) is read once per flush, never per request: its
  cumulative joules go into an `EnergyLedger`, and a closed window's energy is the difference at its edges, shared
  among the local windows of the same period by busy time (`meters.attribution.attribute`), gross and net of the
  idle watts. A failed read costs the figure of the windows it would have bounded, labelled "none", never a crash.
- Idle watts: configured (`energy.idle_watts`), else measured: a whole period with no local request is the device
  idling, and its mean power over the window meter is one sample; the median of the last IDLE_SAMPLES is what the
  net figure subtracts (`idle_w` on the window says which value). Until one idle period was seen, no net figure.
- The batches wait on disk in the `Outbox` (edge_agent/outbox.py) until the cloud confirms it stored them.
"""

from __future__ import annotations

import logging
import math
import statistics
import threading
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from math import floor
from random import random as _random
from typing import Any

from edgefleet.edge_agent.meters.attribution import Attributed, EnergyLedger, Share, attribute
from edgefleet.edge_agent.meters.base import MeterReadError, is_window_meter
from edgefleet.edge_agent.outbox import Outbox
from edgefleet.protos.limits import MAX_ENERGY_MJ, MAX_LATENCY_MS, MAX_ROWS_PER_S, MAX_WINDOWS_PER_BATCH
from edgefleet.protos.messages import TelemetryBatch, TelemetryWindow

log = logging.getLogger(__name__)

# Latency samples kept per window for percentiles; beyond this a reservoir keeps a uniform sample.
MAX_SAMPLES_PER_WINDOW = 10_000
# Idle periods (a whole telemetry window with no local request) whose mean power makes the measured idle figure.
IDLE_SAMPLES = 9
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of already sorted values."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def _within(value: float, ceiling: float) -> float:
    """A sample clamped into the contract's [0, ceiling] (NaN as 0): one wild reading (a clock step, a meter
    glitch) must not make the whole window unsendable, since the cloud refuses figures outside the contract."""
    return min(max(value, 0.0), ceiling) if value == value else 0.0


@dataclass(slots=True)
class _Window:
    model: str
    version: int
    where: str
    start: datetime
    end: datetime
    count: int = 0  # requests
    errors: int = 0  # failed requests
    rows: int = 0  # rows in all requests
    ok_rows: int = 0  # rows in the successful ones: the per-row figures' denominator
    busy_ms: float = 0.0  # summed latency of the successful requests
    latencies_ms: list[float] = field(default_factory=list)
    energy_mj_sum: float = 0.0
    energy_n: int = 0  # requests with an energy figure
    energy_rows: int = 0  # their rows
    energy_busy_ms: float = 0.0  # busy time of the metered requests: the modelled net figure subtracts idle over it
    energy_source: str = "none"
    energy_meter: str = ""
    _seen: int = 0
    reasons: dict[str, int] = field(default_factory=dict)  # the offload policy's decisions (count_reason)
    reasoned: int = 0  # their sum: at most `count`, one per request

    def add(self, latency_ms: float, ok: bool, energy_mj: float | None, source: str, meter: str,
            rows: int = 1) -> None:
        # On every request (Telemetry.record_at), so written out: no calls but the reservoir's random(); the
        # clamps are `_within`'s, inlined.
        if type(rows) is not int:
            rows = int(rows)
        if rows < 1:
            rows = 1  # a request of zero rows still paid for a call: it counts as one
        self.count += 1
        self.rows += rows
        if not ok:
            self.errors += 1
            return
        self._seen += 1
        self.ok_rows += rows
        latency_ms = (latency_ms if latency_ms < MAX_LATENCY_MS else MAX_LATENCY_MS) if latency_ms > 0.0 else 0.0
        self.busy_ms += latency_ms
        latencies = self.latencies_ms
        if len(latencies) < MAX_SAMPLES_PER_WINDOW:
            latencies.append(latency_ms)
        else:  # reservoir sampling (Algorithm R): memory stays bounded under a flood, percentiles stay unbiased
            # int(random() * n), not randrange(n) (0.5 us): uniform to within n / 2**53 for any window's count.
            slot = int(_random() * self._seen)
            if slot < MAX_SAMPLES_PER_WINDOW:
                latencies[slot] = latency_ms
        if energy_mj is not None:
            self.energy_mj_sum += (energy_mj if energy_mj < MAX_ENERGY_MJ else MAX_ENERGY_MJ) if energy_mj > 0.0 \
                else 0.0
            self.energy_n += 1
            self.energy_rows += rows
            self.energy_busy_ms += latency_ms
            if self.energy_meter != meter or self.energy_source != source:
                self.energy_source, self.energy_meter = source, meter

    def share(self) -> Share:
        """This window's work, for sharing a window meter's energy by busy time."""
        return Share(busy_s=self.busy_ms / 1000.0, requests=self.count - self.errors, rows=self.ok_rows)

    def close(self, measured: Attributed | None = None, labels: _Labels | None = None) -> TelemetryWindow:
        """The contract window. `measured`: this window's share of a window meter's energy (with its `labels`);
        None: the per-request figures recorded, if any."""
        lat = sorted(self.latencies_ms)
        ok = self.count - self.errors
        energy = self.energy_mj_sum
        if measured is not None and labels is not None and ok:
            mean_mj, row_mj = min(measured.mean_mj, MAX_ENERGY_MJ), min(measured.row_mj, MAX_ENERGY_MJ)
            net = None if measured.row_net_mj is None else min(measured.row_net_mj, row_mj)
            return self._window(lat, ok, mean_mj=mean_mj, row_mj=min(row_mj, mean_mj), row_net_mj=net,
                                source=labels.source, meter=labels.meter, method=labels.method, hz=labels.hz,
                                idle_w=labels.idle_w if net is not None else None)
        metered = self.energy_n > 0
        mean_mj = min(energy / self.energy_n, MAX_ENERGY_MJ) if metered else None
        row_mj = min(energy / self.energy_rows, MAX_ENERGY_MJ) if metered else None
        idle_w = labels.idle_w if labels is not None and labels.meter == self.energy_meter else None
        net = None
        if metered and idle_w is not None and row_mj is not None:
            # W x ms = mJ: the modelled meter's (active - idle) x busy, over the same requests' rows.
            net = min(max(0.0, energy - idle_w * self.energy_busy_ms) / self.energy_rows, row_mj)
        method = labels.method if labels is not None and labels.meter == self.energy_meter else (
            "modelled" if self.energy_meter == "modelled" else "")
        return self._window(lat, ok, mean_mj=mean_mj, row_mj=row_mj, row_net_mj=net,
                            source=self.energy_source if metered else "none", meter=self.energy_meter,
                            method=method if metered else "", hz=None, idle_w=idle_w if net is not None else None)

    def _window(self, lat: list[float], ok: int, *, mean_mj: float | None, row_mj: float | None,
                row_net_mj: float | None, source: str, meter: str, method: str, hz: float | None,
                idle_w: float | None) -> TelemetryWindow:
        # Per row <= per request by construction: the same sum over at least as many rows (IEEE division is
        # monotonic). Rows are capped at what the contract admits for the window (a hostile [2**40, 0] input
        # has that many "rows" of nothing), so the window stays sendable.
        capacity = int(max((self.end - self.start).total_seconds(), 1.0) * MAX_ROWS_PER_S)
        return TelemetryWindow(
            model=self.model, version=self.version, start=self.start, end=self.end, count=self.count,
            errors=self.errors, rows=min(self.rows, capacity), p50_ms=percentile(lat, 50),
            p95_ms=percentile(lat, 95), p99_ms=percentile(lat, 99),
            mean_ms=min(self.busy_ms / ok, MAX_LATENCY_MS) if ok else None,
            row_ms=min(self.busy_ms / self.ok_rows, MAX_LATENCY_MS) if ok else None,
            mean_mj=mean_mj, row_mj=row_mj, row_net_mj=row_net_mj, energy_source=source, energy_meter=meter,
            energy_method=method, energy_hz=hz if method == "sampled" else None, idle_w=idle_w, where=self.where,
            reasons=dict(self.reasons),
        )


@dataclass(frozen=True)
class _Labels:
    """What a window says about its energy figure: which meter, how, at what rate, less which idle watts."""

    source: str
    meter: str
    method: str
    hz: float | None
    idle_w: float | None


class Telemetry:
    """Open windows in memory; closed ones go to the outbox. `record` is called from inference threads."""

    def __init__(self, device_id: str, window_s: float, outbox: Outbox) -> None:
        if window_s <= 0:
            raise ValueError("window_s must be > 0")
        self.device_id = device_id
        self.window_s = float(window_s)
        self.outbox = outbox
        self._open: dict[tuple[str, int, str, datetime], _Window] = {}
        self._lock = threading.Lock()
        self._meter: Any = None
        self._labels: _Labels | None = None
        self._ledger = EnergyLedger()
        self.meter_read_errors = 0
        # Measured idle power: a whole period with no local request, over a window meter, is the device idling.
        # The median of the last IDLE_SAMPLES such periods is subtracted when no idle_w was configured.
        self._busy_periods: set[datetime] = set()
        self._idle_checked: datetime | None = None
        self._idle_samples: deque[float] = deque(maxlen=IDLE_SAMPLES)
        # Since start, per (model, version, where), for the agent's /metrics: requests, errors, rows, busy ms as
        # they happen; the successful requests' energy (mJ) and its label as each window closes.
        self._totals: dict[tuple[str, int, str], list[float]] = {}
        self._totals_source: dict[tuple[str, int, str], str] = {}
        # record_at's cache: (model, version, where) -> (period, its open window, its totals); emptied by flush.
        self._hot: dict[tuple[str, int, str], tuple[int, _Window, list[float]]] = {}
        self.reasons_unplaced = 0  # count_reason found no window for a reason (counted, never silent)

    def attach_meter(self, meter: Any, now: datetime, *, idle_w: float | None = None) -> None:
        """Use `meter`'s labels (and, for a window meter, its energy at every flush) from now on; `idle_w` is the
        idle power subtracted for the net figure (None: none given). A window meter is read now, so the window
        in progress is measured from here."""
        labels = _Labels(source=meter.source, meter=meter.name, method=getattr(meter, "method", ""),
                         hz=None, idle_w=idle_w)
        with self._lock:
            self._meter, self._labels, self._ledger = meter, labels, EnergyLedger()
        self._read_meter(now)

    def _read_meter(self, now: datetime) -> None:
        meter = self._meter
        if meter is None or not is_window_meter(meter):
            return
        try:
            joules = meter.read_j()
        except MeterReadError as exc:
            self.meter_read_errors += 1
            if self.meter_read_errors in (1, 10, 100) or self.meter_read_errors % 1000 == 0:
                log.warning("%s (%d failed reads so far)", exc, self.meter_read_errors)
            return
        with self._lock:
            if meter is self._meter:
                self._ledger.add(now, joules)

    @property
    def measured_idle_w(self) -> float | None:
        """The device's idle power as the window meter saw it (the median of recent idle periods), or None."""
        return statistics.median(self._idle_samples) if self._idle_samples else None

    def _sample_idle(self, now: datetime) -> None:
        """Under the lock, before pruning: the period that just ended, if no local request fell in it and the meter
        covered at least 90% of it, gives one idle-power sample (joules / seconds)."""
        current = self._bounds(now)[0]
        previous = current - timedelta(seconds=self.window_s)
        if self._idle_checked == previous:
            return
        self._idle_checked = previous
        if previous not in self._busy_periods:
            span = self._ledger.between(previous, current)
            if span is not None and span[1] >= 0.9 * self.window_s:
                self._idle_samples.append(span[0] / span[1])
        self._busy_periods = {p for p in self._busy_periods if p >= previous}

    def _measured(self, closed: list[_Window], idle_w: float | None) -> dict[int, Attributed]:
        """A window meter's energy per closed local window (by id), shared per period by busy time."""
        by_period: dict[tuple[datetime, datetime], list[_Window]] = {}
        for w in closed:
            if w.where == "local":
                by_period.setdefault((w.start, w.end), []).append(w)
        out: dict[int, Attributed] = {}
        for (start, end), windows in by_period.items():
            span = self._ledger.between(start, end)
            if span is None:
                continue
            joules, seconds = span
            for w, got in zip(windows, attribute(joules, seconds, idle_w, [w.share() for w in windows])):
                if got is not None:
                    out[id(w)] = got
        return out

    @classmethod
    def from_config(cls, config) -> Telemetry:
        outbox = Outbox(config.outbox_dir, int(config.telemetry.outbox_max_mb * 1024 * 1024))
        return cls(config.device_id, config.telemetry.window_s, outbox)

    def _bounds(self, now: datetime) -> tuple[datetime, datetime]:
        elapsed = (now - _EPOCH).total_seconds()
        start = _EPOCH + timedelta(seconds=math.floor(elapsed / self.window_s) * self.window_s)
        return start, start + timedelta(seconds=self.window_s)

    def record(self, model: str, version: int, latency_ms: float, now: datetime, *, ok: bool = True,
               energy_mj: float | None = None, energy_source: str = "none", energy_meter: str = "",
               where: str = "local", rows: int = 1) -> None:
        """One request of `rows` rows (its batch size) that took `latency_ms` and, metered, `energy_mj` in all."""
        self.record_at(model, version, latency_ms, (now - _EPOCH).total_seconds(), ok=ok, energy_mj=energy_mj,
                       energy_source=energy_source, energy_meter=energy_meter, where=where, rows=rows)

    def record_at(self, model: str, version: int, latency_ms: float, now_s: float, ok: bool = True,
                  energy_mj: float | None = None, energy_source: str = "none", energy_meter: str = "",
                  where: str = "local", rows: int = 1) -> None:
        """`record` with `now` as seconds since the epoch (time.time()): the inference hot path's form, whose
        arguments may go by position (cheaper than by keyword on every request).

        The hot path reads no datetime: the period is an integer (floor(now_s / window_s), the same arithmetic as
        `_bounds`), and `_hot` keeps, per (model, version, where), the period last seen with its window and totals,
        so a request in the same period costs a dict lookup. `flush` empties `_hot` whenever it closes windows."""
        period = floor(now_s / self.window_s)
        with self._lock:
            hot = self._hot.get((model, version, where))
            if hot is None or hot[0] != period:
                hot = self._enter((model, version, where), period)
            hot[1].add(latency_ms, ok, energy_mj, energy_source, energy_meter, rows)
            total = hot[2]
            total[0] += 1
            total[2] += rows if type(rows) is int and rows > 0 else max(1, int(rows))
            if ok:
                total[3] += (latency_ms if latency_ms < MAX_LATENCY_MS else MAX_LATENCY_MS) if latency_ms > 0.0 \
                    else 0.0
            else:
                total[1] += 1

    def count_reason(self, model: str, where: str, reason: str, version: int | None = None) -> None:
        """The offload policy's reason for a request just recorded (edge_agent/offload.py), counted in the open
        window of (model, version, where) that holds that request: the newest one with a request not yet given a
        reason, so a window's reasons never add up to more than its requests. None such (the window was flushed
        in between, a rare race at a window's edge): counted in `reasons_unplaced`, shown on /metrics."""
        with self._lock:
            window = None
            if version is not None:
                hot = self._hot.get((model, version, where))
                if hot is not None and hot[1].count > hot[1].reasoned:
                    window = hot[1]
            if window is None:
                for (m, v, w, _), open_window in self._open.items():
                    if m == model and w == where and (version is None or v == version) and \
                            open_window.count > open_window.reasoned and \
                            (window is None or open_window.start > window.start):
                        window = open_window
            if window is None:
                self.reasons_unplaced += 1
                return
            window.reasons[reason] = window.reasons.get(reason, 0) + 1
            window.reasoned += 1

    def _enter(self, hot_key: tuple[str, int, str], period: int) -> tuple[int, _Window, list[float]]:
        """Under the lock: the open window and totals of `hot_key` in `period` (created when new), cached."""
        model, version, where = hot_key
        start = _EPOCH + timedelta(seconds=period * self.window_s)
        key = (model, version, where, start)
        if where == "local":
            self._busy_periods.add(start)
        window = self._open.get(key)
        if window is None:
            window = self._open[key] = _Window(model, version, where, start, start + timedelta(seconds=self.window_s))
        total = self._totals.get(hot_key)
        if total is None:
            total = self._totals[hot_key] = [0, 0, 0, 0.0, 0.0]
        hot = self._hot[hot_key] = (period, window, total)
        return hot

    def flush(self, now: datetime, *, force: bool = False) -> list[TelemetryBatch]:
        """Close windows that ended by `now` (all of them with `force`, e.g. at shutdown) into outbox batches.
        A window meter is read first, so `now` is an edge reading whether or not a window closes."""
        self._read_meter(now)
        with self._lock:
            self._hot.clear()  # it may point at a window closed here, or at a busy period pruned here
            done = [k for k, w in self._open.items() if force or w.end <= now]
            closed = [self._open.pop(k) for k in sorted(done, key=lambda k: (k[3], k[0], k[1], k[2]))]
            measured: dict[int, Attributed] = {}
            labels = self._labels
            if self._meter is not None and is_window_meter(self._meter) and labels is not None:
                self._sample_idle(now)
                idle_w = labels.idle_w if labels.idle_w is not None else self.measured_idle_w
                labels = _Labels(labels.source, labels.meter, labels.method, self._meter.hz, idle_w)
                measured = self._measured(closed, idle_w)
                # Keep readings back to the oldest open window's start, or the current period's.
                starts = [w.start for w in self._open.values()] + [self._bounds(now)[0]]
                self._ledger.prune(min(starts))
            windows = [w.close(measured.get(id(w)), labels) for w in closed]
            for w in windows:
                if w.mean_mj is not None:
                    self._totals.setdefault((w.model, w.version, w.where), [0, 0, 0, 0.0, 0.0])[4] += (
                        w.mean_mj * (w.count - w.errors))
                    self._totals_source[(w.model, w.version, w.where)] = w.energy_source
        batches = []
        for i in range(0, len(windows), MAX_WINDOWS_PER_BATCH):
            batches.append(self.outbox.add(self.device_id, windows[i:i + MAX_WINDOWS_PER_BATCH], now))
        if not windows and self.outbox.dropped_pending and force:
            batches.append(self.outbox.add(self.device_id, [], now))  # report drops even with nothing new
        return batches

    def totals(self) -> list[tuple[str, int, str, int, int, int, float, float, str]]:
        """Since start, per (model, version, where): requests, errors, rows, busy ms, energy mJ (of closed windows)
        and that energy's label."""
        with self._lock:
            return [(m, v, w, int(t[0]), int(t[1]), int(t[2]), t[3], t[4], self._totals_source.get((m, v, w), "none"))
                    for (m, v, w), t in sorted(self._totals.items())]

    def open_windows(self) -> int:
        with self._lock:
            return len(self._open)
