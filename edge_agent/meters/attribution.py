"""Window energy shared among inferences by busy time: the pure core of measured energy.

Theory of operation (MLPerf Power's rule: energy is measured over the same window as the work). A window meter's
cumulative joules are read at every telemetry flush (`EnergyLedger.add`); a closed window [start, end) takes the
difference at its edges, each edge interpolated linearly between the readings around it (the daemon flushes every
`reconcile.tick_s`, 1 s, so an edge is at most a tick from a reading). Then, for a window of length T with energy E,
idle power P_idle and per-(model, version) busy time B_m (the summed latency of its successful local requests) out
of the window's total busy time B:

    gross per row  = E * (B_m / B) / rows_m
    net per row    = max(0, E - P_idle * T) * (B_m / B) / rows_m

and the same over requests instead of rows for the per-request mean. Gross charges inferences with everything the
meter saw (idle included: the device was on to serve them); net charges only what serving added over idling. The
shares add up to E (gross) and to max(0, E - P_idle*T) (net) exactly. Nothing here reads a clock, a file or a
sensor: telemetry hands readings in and windows out.

Short windows: interpolation is exact while power is steady between two readings; at worst an edge is off by the
power's swing over one tick (counter meters) or one sample period (sampled meters). Relative to the window's
energy that is at most 2 * tick / T times the swing over the mean power: 3% for a 60 s window at 1 s ticks under a
load that swings by its own mean, 40% for a 5 s one. Below `MIN_MEASURED_WINDOW_S` the agent warns once (daemon
`_set_meter`) and still reports, labelled as always.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

# Windows shorter than this give edge errors above roughly a fifth of the figure (see the docstring): warned.
MIN_MEASURED_WINDOW_S = 5.0


@dataclass(frozen=True)
class Share:
    """One (model, version) window's work: busy seconds, successful requests and their rows."""

    busy_s: float
    requests: int
    rows: int


@dataclass(frozen=True)
class Attributed:
    """One share's energy in millijoules: gross per request and per row, and net (idle-subtracted) per row."""

    mean_mj: float
    row_mj: float
    row_net_mj: float | None  # None when no idle power is known


def attribute(energy_j: float, window_s: float, idle_w: float | None, shares: Sequence[Share]) -> list[
        Attributed | None]:
    """Split `energy_j` measured over a window of `window_s` seconds among `shares` by busy time.

    Returns one entry per share, None for a share without successful requests (no figure to give). With no busy
    time at all (every latency rounded to 0) the energy is shared by rows instead. `idle_w` None: no net figure.
    """
    energy_j = max(0.0, energy_j)
    net_j = None if idle_w is None else max(0.0, energy_j - max(0.0, idle_w) * max(0.0, window_s))
    working = [s for s in shares if s.requests > 0 and s.rows > 0]
    total_busy = sum(max(0.0, s.busy_s) for s in working)
    total_rows = sum(s.rows for s in working)
    out: list[Attributed | None] = []
    for s in shares:
        if s.requests <= 0 or s.rows <= 0:
            out.append(None)
            continue
        weight = max(0.0, s.busy_s) / total_busy if total_busy > 0 else s.rows / total_rows
        gross_mj = energy_j * weight * 1000.0
        net = None if net_j is None else net_j * weight * 1000.0 / s.rows
        out.append(Attributed(mean_mj=gross_mj / s.requests, row_mj=gross_mj / s.rows, row_net_mj=net))
    return out


class EnergyLedger:
    """Readings (time, cumulative joules) of one window meter, kept only as far back as an open window needs."""

    def __init__(self) -> None:
        self._times: list[float] = []  # seconds since the epoch, rising
        self._joules: list[float] = []

    def __len__(self) -> int:
        return len(self._times)

    def add(self, at: datetime, joules: float) -> None:
        t = at.timestamp()
        if self._times and t <= self._times[-1]:
            return  # a clock step backwards or a second read at the same instant: the first one stands
        if self._joules and joules < self._joules[-1]:
            joules = self._joules[-1]  # cumulative by contract; a meter glitch must not make energy negative
        self._times.append(t)
        self._joules.append(joules)

    def _at(self, t: float) -> float:
        i = bisect.bisect_left(self._times, t)
        if i < len(self._times) and self._times[i] == t:
            return self._joules[i]
        t0, t1, j0, j1 = self._times[i - 1], self._times[i], self._joules[i - 1], self._joules[i]
        return j0 + (j1 - j0) * (t - t0) / (t1 - t0)

    def between(self, start: datetime, end: datetime) -> tuple[float, float] | None:
        """(joules, seconds covered) over [start, end] clipped to the readings; None when no reading covers any
        of it. A window that began before the meter's first reading (the agent started inside it) is measured
        from that reading on, over the seconds it covers, and so is one force-closed before its end."""
        if len(self._times) < 2:
            return None
        lo = max(start.timestamp(), self._times[0])
        hi = min(end.timestamp(), self._times[-1])
        if hi <= lo:
            return None
        return self._at(hi) - self._at(lo), hi - lo

    def prune(self, keep_from: datetime | None) -> None:
        """Forget readings before the last one at or before `keep_from` (the oldest open window's start); None:
        keep only the latest reading."""
        if not self._times:
            return
        if keep_from is None:
            cut = len(self._times) - 1
        else:
            cut = max(0, bisect.bisect_right(self._times, keep_from.timestamp()) - 1)
        if cut:
            del self._times[:cut], self._joules[:cut]
