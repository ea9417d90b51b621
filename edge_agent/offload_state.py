"""What the offload policy observes, kept as plain state objects that every update is handed an explicit `now`.

Theory: offload_policy.decide is pure, so whatever it needs to know about the past lives here, in objects that are
pure too: no clock reads, no threads, no I/O (the router holds one lock around them and passes monotonic seconds).
Each estimator is the standard one for its job:
- `LatencyWindow`: p95 by nearest rank over the last `size` local latencies no older than `max_age_s`. Kept sorted
  on insert (bisect), so the per-request read is O(1); the age bound makes an offloaded model's stale figures
  fade, so local probes decide whether it comes back.
- `RttEstimator`: the cloud's round trip as TCP estimates it (RFC 6298: SRTT and RTTVAR, gains 1/8 and 1/4); the
  policy uses SRTT + 2 RTTVAR, a high-side estimate, so a jittery link is not promised to a deadline.
- `Ewma`: the server-reported service time and local mJ per inference.
- `CircuitBreaker`: closed -> open after `failures` consecutive failures; open for `open_s` (doubling after each
  failed probe, up to `max_open_s`); then half-open: one probe at a time (a probe that never reports back frees
  its slot after `probe_timeout_s`); its success closes the breaker.
- `EnergyWindow`: joules of local inference over the trailing `window_s` (60: the budget is J/min), in buckets.
- hysteresis memory per model (`ModelState.offloaded`, `switched_at`), moved by the policy's decisions
  (`offload_policy.ENTERS_OFFLOAD` / `LEAVES_OFFLOAD`).
"""

from __future__ import annotations

import bisect
import math
from collections import deque

from edgefleet.edge_agent.offload_policy import (
    CLOSED,
    CLOUD,
    CLOUD_PROBE,
    ENTERS_OFFLOAD,
    HALF_OPEN,
    LEAVES_OFFLOAD,
    OPEN,
    Decision,
    Observations,
)

_NEVER = float("-inf")


class LatencyWindow:
    __slots__ = ("size", "max_age_s", "min_samples", "_order", "_sorted")

    def __init__(self, size: int = 64, max_age_s: float = 10.0, min_samples: int = 3) -> None:
        if size < 1 or max_age_s <= 0 or not 1 <= min_samples <= size:
            raise ValueError(f"need size >= 1, max_age_s > 0, 1 <= min_samples <= size; got {size}, {max_age_s}, "
                             f"{min_samples}")
        self.size, self.max_age_s, self.min_samples = size, max_age_s, min_samples
        self._order: deque[tuple[float, float]] = deque()  # (time, ms), oldest first
        self._sorted: list[float] = []

    def _drop_oldest(self) -> None:
        _, ms = self._order.popleft()
        del self._sorted[bisect.bisect_left(self._sorted, ms)]

    def _expire(self, now: float) -> None:
        horizon = now - self.max_age_s
        while self._order and self._order[0][0] < horizon:
            self._drop_oldest()

    def add(self, ms: float, now: float) -> None:
        if not 0 <= ms < math.inf:
            return  # a clock step or a broken meter (NaN fails too): no sample rather than a wild one
        order, ranked = self._order, self._sorted
        if order and order[0][0] < now - self.max_age_s:
            self._expire(now)
        if len(order) >= self.size:  # inlined _drop_oldest: this runs on every local request
            del ranked[bisect.bisect_left(ranked, order.popleft()[1])]
        order.append((now, ms))
        bisect.insort(ranked, ms)

    def p95(self, now: float) -> float | None:
        if self._order and self._order[0][0] < now - self.max_age_s:
            self._expire(now)
        n = len(self._sorted)
        if n < self.min_samples:
            return None
        return self._sorted[max(1, math.ceil(0.95 * n)) - 1]

    def __len__(self) -> int:
        return len(self._order)


class Ewma:
    __slots__ = ("alpha", "value")

    def __init__(self, alpha: float = 0.2) -> None:
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.alpha = alpha
        self.value: float | None = None

    def add(self, x: float) -> None:
        if not math.isfinite(x):
            return
        self.value = x if self.value is None else self.value + self.alpha * (x - self.value)


class RttEstimator:
    """RFC 6298's SRTT/RTTVAR; `estimate` = SRTT + k x RTTVAR (k = 2 here, not the RTO's 4: a latency guess, not
    a retransmission timer)."""

    __slots__ = ("srtt", "rttvar", "k")

    def __init__(self, k: float = 2.0) -> None:
        self.srtt: float | None = None
        self.rttvar = 0.0
        self.k = k

    def add(self, ms: float) -> None:
        if not math.isfinite(ms) or ms < 0:
            return
        if self.srtt is None:
            self.srtt, self.rttvar = ms, ms / 2
        else:
            self.rttvar += 0.25 * (abs(self.srtt - ms) - self.rttvar)
            self.srtt += 0.125 * (ms - self.srtt)

    @property
    def estimate(self) -> float | None:
        return None if self.srtt is None else self.srtt + self.k * self.rttvar


class CircuitBreaker:
    __slots__ = ("failures", "open_s", "max_open_s", "probe_timeout_s", "_failed", "_open_until", "_current_open_s",
                 "_probe_at", "_tripped")

    def __init__(self, failures: int = 3, open_s: float = 5.0, max_open_s: float = 60.0,
                 probe_timeout_s: float = 10.0) -> None:
        if failures < 1 or open_s <= 0 or max_open_s < open_s or probe_timeout_s <= 0:
            raise ValueError(f"need failures >= 1, 0 < open_s <= max_open_s, probe_timeout_s > 0; got {failures}, "
                             f"{open_s}, {max_open_s}, {probe_timeout_s}")
        self.failures, self.open_s, self.max_open_s, self.probe_timeout_s = failures, open_s, max_open_s, \
            probe_timeout_s
        self._failed = 0  # consecutive failures while closed
        self._tripped = False
        self._open_until = _NEVER
        self._current_open_s = open_s
        self._probe_at: float | None = None  # monotonic s the half-open probe left; None: slot free

    def state(self, now: float) -> str:
        if not self._tripped:
            return CLOSED
        return OPEN if now < self._open_until else HALF_OPEN

    def probe_available(self, now: float) -> bool:
        return self.state(now) == HALF_OPEN and (self._probe_at is None
                                                 or now - self._probe_at >= self.probe_timeout_s)

    def begin_probe(self, now: float) -> bool:
        """Take the half-open probe slot; False when it is not free (another request probes)."""
        if not self.probe_available(now):
            return False
        self._probe_at = now
        return True

    def success(self, now: float) -> None:
        self._failed, self._tripped, self._probe_at = 0, False, None
        self._current_open_s = self.open_s

    def failure(self, now: float) -> None:
        if self._tripped:  # a failed probe (or a straggler from before the trip): open again, for longer
            if self.state(now) == HALF_OPEN:
                self._current_open_s = min(self.max_open_s, self._current_open_s * 2)
                self._open_until = now + self._current_open_s
            self._probe_at = None
            return
        self._failed += 1
        if self._failed >= self.failures:
            self._tripped, self._open_until, self._probe_at = True, now + self._current_open_s, None


class EnergyWindow:
    """Joules over the trailing `window_s`, in `buckets` equal buckets (the oldest one partly out of the window
    counts whole: over-counting errs on the device's side)."""

    __slots__ = ("window_s", "width_s", "_buckets", "_total")

    def __init__(self, window_s: float = 60.0, buckets: int = 12) -> None:
        if window_s <= 0 or buckets < 1:
            raise ValueError(f"need window_s > 0 and buckets >= 1, got {window_s}, {buckets}")
        self.window_s, self.width_s = window_s, window_s / buckets
        self._buckets: deque[list[float]] = deque()  # [bucket index, joules], oldest first
        self._total = 0.0  # the buckets' sum, kept as they come and go (read on every request)

    def _prune(self, now: float) -> None:
        oldest = (now - self.window_s) // self.width_s
        buckets = self._buckets
        while buckets and buckets[0][0] < oldest:
            self._total -= buckets.popleft()[1]
        if not buckets:
            self._total = 0.0  # no float drift left behind

    def add(self, joules: float, now: float) -> None:
        if not math.isfinite(joules) or joules <= 0:
            return
        index = now // self.width_s
        if self._buckets and self._buckets[-1][0] == index:
            self._buckets[-1][1] += joules
        else:
            self._buckets.append([index, joules])
        self._total += joules
        self._prune(now)

    def total(self, now: float) -> float:
        if self._buckets:
            self._prune(now)
        return max(0.0, self._total)


class ModelState:
    __slots__ = ("latency", "busy", "local_mj", "rtt", "service_ms", "offloaded", "switched_at", "last_local_at",
                 "last_cloud_at", "cloud_missing_until", "cloud_answered")

    def __init__(self, window: int, window_s: float) -> None:
        self.latency = LatencyWindow(window, window_s)  # what callers waited
        self.busy = LatencyWindow(window, window_s)  # the runs alone (the service's metered busy time)
        self.local_mj = Ewma()
        self.rtt = RttEstimator()
        self.service_ms = Ewma()  # what the server says it spent (parameters.latency_ms), when it says
        self.offloaded = False
        self.switched_at = _NEVER
        self.last_local_at = _NEVER
        self.last_cloud_at = _NEVER  # when the last cloud call left (the re-check's clock)
        self.cloud_missing_until = _NEVER
        self.cloud_answered = False  # the first answer warms (see cloud_done), it does not count


class OffloadState:
    """All of it for one agent: per-model estimates and hysteresis, one breaker and one energy window (the cloud
    and the battery are shared by every model)."""

    def __init__(self, *, breaker: CircuitBreaker | None = None, energy: EnergyWindow | None = None,
                 window: int = 64, window_s: float = 10.0, missing_model_s: float = 60.0) -> None:
        self.breaker = breaker or CircuitBreaker()
        self.energy = energy or EnergyWindow()
        self.window, self.window_s, self.missing_model_s = window, window_s, missing_model_s
        self.models: dict[str, ModelState] = {}
        self.inflight = 0  # local runs started and not finished, all models: they share the device

    def model(self, name: str) -> ModelState:
        state = self.models.get(name)
        if state is None:
            state = self.models[name] = ModelState(self.window, self.window_s)
        return state

    def observe(self, name: str, local_available: bool, cloud_enabled: bool, now: float, *,
                energy: bool = True) -> Observations:
        """What `decide` needs now; `energy=False` skips the energy window (no J/min budget to hold it to)."""
        m = self.models.get(name) or self.model(name)
        breaker = self.breaker.state(now)
        return Observations(local_available, cloud_enabled, now >= m.cloud_missing_until, breaker,
                            breaker == HALF_OPEN and self.breaker.probe_available(now), m.latency.p95(now),
                            m.busy.p95(now), self.inflight, m.local_mj.value, m.rtt.estimate,
                            self.energy.total(now) if energy else 0.0, m.offloaded, m.switched_at, m.last_local_at,
                            m.last_cloud_at)

    def note_decision(self, name: str, decision: Decision, now: float) -> bool:
        """Move the hysteresis memory; claim the breaker's probe slot for a CLOUD_PROBE (False: it was taken
        meanwhile, so the request must not go)."""
        m = self.model(name)
        if decision.reason in ENTERS_OFFLOAD and not m.offloaded:
            m.offloaded, m.switched_at = True, now
        elif decision.reason in LEAVES_OFFLOAD and m.offloaded:
            m.offloaded, m.switched_at = False, now
        if decision.where == CLOUD:
            m.last_cloud_at = now  # at the decision, so that concurrent requests do not all re-check
        if decision.reason == CLOUD_PROBE:
            return self.breaker.begin_probe(now)
        return True

    def local_started(self) -> None:
        self.inflight += 1

    def local_done(self, name: str, latency_ms: float, busy_ms: float | None, energy_mj: float | None, rows: int,
                   now: float, *, track_energy: bool = True) -> None:
        """One local run finished (started with `local_started`): the caller waited `latency_ms`, the device ran
        `busy_ms` (None: it failed); `track_energy=False` leaves the J/min window alone (no budget reads it)."""
        self.inflight = max(0, self.inflight - 1)
        if busy_ms is None:
            return
        m = self.models.get(name) or self.model(name)
        m.latency.add(latency_ms, now)
        m.busy.add(busy_ms, now)
        m.last_local_at = now
        if energy_mj is not None:
            m.local_mj.add(energy_mj / rows if rows > 1 else energy_mj)
            if track_energy:
                self.energy.add(energy_mj / 1000.0, now)

    def cloud_done(self, name: str, rtt_ms: float, service_ms: float | None, now: float) -> None:
        """A cloud answer came back after `rtt_ms`. The first one per model is not a round trip to plan by: it
        paid for the connection and, on the server, often for loading the model on first use (measured here: ~100
        ms for the first digits request to `edgefleet-cloud infer`, ~1 ms after), which as the estimator's first
        sample (SRTT = R, RTTVAR = R/2) would make the cloud look 200 ms away until a re-check. The next answer is
        the first sample."""
        m = self.model(name)
        if m.cloud_answered:
            m.rtt.add(rtt_ms)
        else:
            m.cloud_answered = True
        if service_ms is not None:
            m.service_ms.add(service_ms)
        self.breaker.success(now)

    def cloud_failed(self, now: float) -> None:
        self.breaker.failure(now)

    def cloud_lacks(self, name: str, now: float) -> None:
        """The cloud answered 404 for this model: stop asking it for `missing_model_s` (a rollout may add it)."""
        self.model(name).cloud_missing_until = now + self.missing_model_s
        self.breaker.success(now)  # it answered: the server is up
