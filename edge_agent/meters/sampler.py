"""A power sensor turned into an energy counter: ONE background thread samples watts and integrates them.

Theory of operation: INA3221 rails and the Pi 5 PMIC give instantaneous power, not energy. `SampledMeter` starts
one daemon thread that calls `read_w()` every 1/hz seconds on a fixed schedule (deadlines, not sleeps, so the
rate does not drift by the read's own cost) and adds the trapezoid (p0 + p1) / 2 * (t1 - t0) of each interval to a
cumulative joule count, which `read_j()` returns: to telemetry it is a counter like RAPL's. Inference threads
never touch the sensor. A read that fails is counted and skipped: the next good sample's trapezoid spans the gap.
A reader slower than the period (vcgencmd runs a process per sample) lowers the rate instead of queueing; `hz`
reports the rate achieved so far, which is what the telemetry window's `energy_hz` says.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from edgefleet.edge_agent.meters.base import CumulativeMeter, EnergyMethod, MeterScope

log = logging.getLogger(__name__)

# 50 failed reads in a row (5 s at 10 Hz): the sensor is gone rather than glitching; said once per run of failures.
FAILURES_TO_WARN = 50


class SampledMeter(CumulativeMeter):
    method: EnergyMethod = "sampled"

    def __init__(self, name: str, read_w: Callable[[], float], hz: float, *, scope: MeterScope = "board",
                 label: str = "", clock: Callable[[], float] = time.monotonic, start: bool = True) -> None:
        super().__init__()
        if not 0 < hz <= 10_000:
            raise ValueError(f"sample rate must be in (0, 10000] Hz, got {hz}")
        self.name, self.scope, self.label = name, scope, label
        self.target_hz = float(hz)
        self._read_w = read_w
        self._clock = clock
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._joules = 0.0
        self._samples = 0
        self.failures = 0
        self._first_t: float | None = None
        self._last: tuple[float, float] | None = None  # (t, watts) of the last good sample
        self._thread: threading.Thread | None = None
        if start:
            self.start_sampling()

    @property
    def hz(self) -> float:  # type: ignore[override]
        """The rate achieved so far (samples over the time they span); the target until two samples exist."""
        with self._lock:
            if self._samples < 2 or self._last is None or self._first_t is None:
                return self.target_hz
            span = self._last[0] - self._first_t
            return (self._samples - 1) / span if span > 0 else self.target_hz

    def sample_once(self) -> bool:
        """Take one sample now and integrate it; False when the read failed. The thread's step, public for tests."""
        try:
            watts = float(self._read_w())
        except Exception as exc:  # noqa: BLE001 - any sensor failure is one lost sample, never a dead thread
            self.failures += 1
            if self.failures % FAILURES_TO_WARN == 1 or self.failures == FAILURES_TO_WARN:
                log.warning("%s: power read failed (%s); %d failures so far", self.name, exc, self.failures)
            return False
        t = self._clock()
        watts = watts if watts == watts and watts >= 0 else 0.0  # NaN or negative: a glitch, not power
        with self._lock:
            if self._last is not None:
                t0, w0 = self._last
                if t > t0:
                    self._joules += (w0 + watts) / 2.0 * (t - t0)
            else:
                self._first_t = t
            self._last = (t, watts)
            self._samples += 1
        return True

    @property
    def samples(self) -> int:
        with self._lock:
            return self._samples

    def _read_j(self) -> float:
        with self._lock:
            return self._joules

    def start_sampling(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name=f"meter-{self.name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        period = 1.0 / self.target_hz
        deadline = time.monotonic()
        while not self._stop.is_set():
            self.sample_once()
            deadline += period
            delay = deadline - time.monotonic()
            if delay < 0:  # the read took longer than a period: go on from now, no burst to catch up
                deadline, delay = time.monotonic(), 0.0
            if self._stop.wait(delay):
                break

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None
