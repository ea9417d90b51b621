"""Telemetry: per-(model, version) windows of latency and energy, and a disk outbox drained only on acknowledgement.

Theory of operation:
- `Telemetry.record(...)` adds one request (latency, energy, ok or error, and its `rows`: the batch size, the
  leading dimension of its input) to the open window of its (model, version, where). A request of 1,200 rows is
  1,200 inferences: the window counts requests and rows apart. Windows are aligned to multiples of `window_s` since
  the epoch, so every device's windows line up in the cloud. No clock is read here: the caller passes `now`.
- `Telemetry.flush(now)` closes every window whose end is at or before `now` into `TelemetryWindow`s (requests,
  errors, rows; per request p50/p95/p99 latency by nearest rank and the means of latency and energy; per row the
  busy time and energy over the rows; energy source and meter) and hands them to the outbox as one or more
  `TelemetryBatch`es.
- The batches wait on disk in the `Outbox` (edge_agent/outbox.py) until the cloud confirms it stored them.
"""

from __future__ import annotations

import math
import random
import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from edgefleet.edge_agent.outbox import Outbox
from edgefleet.protos.limits import MAX_ENERGY_MJ, MAX_LATENCY_MS, MAX_ROWS_PER_S, MAX_WINDOWS_PER_BATCH
from edgefleet.protos.messages import TelemetryBatch, TelemetryWindow

# Latency samples kept per window for percentiles; beyond this a reservoir keeps a uniform sample.
MAX_SAMPLES_PER_WINDOW = 10_000
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


@dataclass
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
    energy_source: str = "none"
    energy_meter: str = ""
    _seen: int = 0

    def add(self, latency_ms: float, ok: bool, energy_mj: float | None, source: str, meter: str,
            rows: int = 1) -> None:
        rows = max(1, int(rows))  # a request of zero rows still paid for a call: it counts as one
        self.count += 1
        self.rows += rows
        if not ok:
            self.errors += 1
            return
        self._seen += 1
        self.ok_rows += rows
        latency_ms = _within(latency_ms, MAX_LATENCY_MS)
        self.busy_ms += latency_ms
        if len(self.latencies_ms) < MAX_SAMPLES_PER_WINDOW:
            self.latencies_ms.append(latency_ms)
        else:  # reservoir sampling (Algorithm R): memory stays bounded under a flood, percentiles stay unbiased
            slot = random.randrange(self._seen)
            if slot < MAX_SAMPLES_PER_WINDOW:
                self.latencies_ms[slot] = latency_ms
        if energy_mj is not None:
            self.energy_mj_sum += _within(energy_mj, MAX_ENERGY_MJ)
            self.energy_n += 1
            self.energy_rows += rows
            self.energy_source, self.energy_meter = source, meter

    def close(self) -> TelemetryWindow:
        lat = sorted(self.latencies_ms)
        ok = self.count - self.errors
        energy = self.energy_mj_sum
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
            mean_mj=min(energy / self.energy_n, MAX_ENERGY_MJ) if self.energy_n else None,
            row_mj=min(energy / self.energy_rows, MAX_ENERGY_MJ) if self.energy_n else None,
            energy_source=self.energy_source if self.energy_n else "none", energy_meter=self.energy_meter,
            where=self.where,
        )


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
        start, end = self._bounds(now)
        key = (model, version, where, start)
        with self._lock:
            window = self._open.get(key)
            if window is None:
                window = self._open[key] = _Window(model, version, where, start, end)
            window.add(latency_ms, ok, energy_mj, energy_source, energy_meter, rows)

    def flush(self, now: datetime, *, force: bool = False) -> list[TelemetryBatch]:
        """Close windows that ended by `now` (all of them with `force`, e.g. at shutdown) into outbox batches."""
        with self._lock:
            done = [k for k, w in self._open.items() if force or w.end <= now]
            windows = [self._open.pop(k).close() for k in sorted(done, key=lambda k: (k[3], k[0], k[1], k[2]))]
        batches = []
        for i in range(0, len(windows), MAX_WINDOWS_PER_BATCH):
            batches.append(self.outbox.add(self.device_id, windows[i:i + MAX_WINDOWS_PER_BATCH], now))
        if not windows and self.outbox.dropped_pending and force:
            batches.append(self.outbox.add(self.device_id, [], now))  # report drops even with nothing new
        return batches

    def open_windows(self) -> int:
        with self._lock:
            return len(self._open)
