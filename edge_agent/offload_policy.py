"""The offload policy, a pure core: `decide(request, observations, budgets, now) -> Decision(where, reason)`.

Theory: the question "local or cloud?" is asked on every inference, so it is one function of plain values: what
the app asked (`Request`: deadline, tier), what the agent has seen (`Observations`: local p95 over a sliding window,
mJ per inference, energy spent in the last minute, the cloud's round-trip estimate, the circuit breaker, the
hysteresis memory) and what the model must keep (`Budgets`). No sockets, files, threads or clock reads: `now` is an
argument (monotonic seconds), the state that feeds `Observations` lives in offload_state.py, and the router
(offload.py) is the I/O shell that applies the answer. So every rule is one row of a table test, and a decision
costs a few microseconds (tuples, no allocation: each Decision is a preallocated constant).

The rules, first match wins (docs/offload.md has the table of reasons):
 1. offload off (no url, or disabled) -> local, OFFLOAD_DISABLED. A model not on the device -> cloud,
    NOT_INSTALLED_LOCALLY; the cloud said it lacks the model -> local, CLOUD_LACKS_MODEL.
 2. While offloaded, one request every `local_probe_s` runs locally (LOCAL_PROBE) so the local figures stay fresh
    and the device can come back.
 3. A deadline the local estimate cannot meet -> cloud (DEADLINE_LOCAL_TOO_SLOW), or, when the cloud's estimate
    cannot meet it either, the faster side (DEADLINE_UNMEETABLE_FASTER_LOCAL / _CLOUD). The local estimate is the
    device's run time (p95) times the runs queued ahead (`local_inflight` / `local_parallel`, plus this one): so
    an overloaded device keeps what it can finish in time and spills the rest, request by request.
 4. The budgets: energy spent this minute at the J/min budget -> cloud; background tier -> local; mJ per inference
    or p95 over budget -> cloud (unless the cloud is slower than the local p95: OVER_BUDGET_CLOUD_SLOWER); else
    local. Hysteresis: once
    offloaded, the device comes back only when p95 and mJ are below budget x (1 - hysteresis) AND `min_dwell_s`
    passed since the switch (HYSTERESIS_HOLD meanwhile), so routing does not flap on noise.
 5. A budget rule that picked the cloud for a request whose deadline the cloud's estimate misses while local meets
    it -> local, DEADLINE_CLOUD_TOO_SLOW: the app's own deadline outranks a fleet budget.
 6. Cloud health filters every cloud choice: breaker closed -> as chosen; half-open with the probe slot free ->
    cloud, CLOUD_PROBE; else local, CLOUD_UNREACHABLE (a model only the cloud has: CLOUD_BREAKER_OPEN, which the
    router answers at once with CloudUnavailable instead of waiting on a dead server).
A local choice made because the cloud's estimate is the slower side (OVER_BUDGET_CLOUD_SLOWER,
DEADLINE_UNMEETABLE_FASTER_LOCAL) is made on a figure that nothing refreshes while no request goes there: one
cold start or one congested minute would keep work local for good. So, with the breaker closed, one such request
every `cloud_recheck_s` goes to the cloud instead (CLOUD_RECHECK), as the local probe does the other way; never
one whose deadline local would meet and the cloud's estimate would miss.
After a local run, `escalate` is the cascade's rule: confidence below the threshold -> cloud, LOW_CONFIDENCE, when
the cloud is usable and its estimate fits what is left of the deadline; else the local answer stands
(LOW_CONFIDENCE_KEPT_LOCAL). CLOUD_FAILED_FALLBACK is the router's: a cloud call failed and local answered.
"""

from __future__ import annotations

from typing import NamedTuple

LOCAL, CLOUD = "local", "cloud"
TIERS = ("realtime", "background")
CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"

# -- the closed set of reasons (docs/offload.md describes each) ------------------------------------------------------
OFFLOAD_DISABLED = "offload_disabled"
NOT_INSTALLED_LOCALLY = "not_installed_locally"
CLOUD_LACKS_MODEL = "cloud_lacks_model"
LOCAL_PROBE = "local_probe"
DEADLINE_LOCAL_TOO_SLOW = "deadline_local_too_slow"
DEADLINE_CLOUD_TOO_SLOW = "deadline_cloud_too_slow"
DEADLINE_UNMEETABLE_FASTER_LOCAL = "deadline_unmeetable_faster_local"
DEADLINE_UNMEETABLE_FASTER_CLOUD = "deadline_unmeetable_faster_cloud"
ENERGY_WINDOW_EXHAUSTED = "energy_window_exhausted"
BACKGROUND_TIER_LOCAL = "background_tier_local"
LOCAL_ENERGY_OVER_BUDGET = "local_energy_over_budget"
LOCAL_P95_OVER_BUDGET = "local_p95_over_budget"
OVER_BUDGET_CLOUD_SLOWER = "over_budget_cloud_slower"
HYSTERESIS_HOLD = "hysteresis_hold"
LOCAL_WITHIN_BUDGET = "local_within_budget"
CLOUD_PROBE = "cloud_probe"
CLOUD_RECHECK = "cloud_recheck"
CLOUD_UNREACHABLE = "cloud_unreachable"
CLOUD_BREAKER_OPEN = "cloud_breaker_open"
LOW_CONFIDENCE = "low_confidence"
LOW_CONFIDENCE_KEPT_LOCAL = "low_confidence_kept_local"
CLOUD_FAILED_FALLBACK = "cloud_failed_fallback"

# reason -> where it sends the request
REASONS: dict[str, str] = {
    OFFLOAD_DISABLED: LOCAL, NOT_INSTALLED_LOCALLY: CLOUD, CLOUD_LACKS_MODEL: LOCAL, LOCAL_PROBE: LOCAL,
    DEADLINE_LOCAL_TOO_SLOW: CLOUD, DEADLINE_CLOUD_TOO_SLOW: LOCAL, DEADLINE_UNMEETABLE_FASTER_LOCAL: LOCAL,
    DEADLINE_UNMEETABLE_FASTER_CLOUD: CLOUD, ENERGY_WINDOW_EXHAUSTED: CLOUD, BACKGROUND_TIER_LOCAL: LOCAL,
    LOCAL_ENERGY_OVER_BUDGET: CLOUD, LOCAL_P95_OVER_BUDGET: CLOUD, OVER_BUDGET_CLOUD_SLOWER: LOCAL,
    HYSTERESIS_HOLD: CLOUD, LOCAL_WITHIN_BUDGET: LOCAL, CLOUD_PROBE: CLOUD, CLOUD_UNREACHABLE: LOCAL,
    CLOUD_BREAKER_OPEN: CLOUD, CLOUD_RECHECK: CLOUD, LOW_CONFIDENCE: CLOUD, LOW_CONFIDENCE_KEPT_LOCAL: LOCAL,
    CLOUD_FAILED_FALLBACK: LOCAL,
}
# Decisions that move the hysteresis memory: into "offloaded" (the device cannot keep a budget) and out of it (a
# realtime request found the device within budget after the hold). Deadline decisions do not: they follow the
# device's queue request by request (a queue drains in milliseconds; a budget mode holds for seconds). Probes,
# fallbacks, background requests and breaker outcomes leave it where it is too.
ENTERS_OFFLOAD = frozenset({LOCAL_ENERGY_OVER_BUDGET, LOCAL_P95_OVER_BUDGET})
LEAVES_OFFLOAD = frozenset({LOCAL_WITHIN_BUDGET})


class Decision(NamedTuple):
    where: str  # "local" | "cloud"
    reason: str  # one of REASONS


class Request(NamedTuple):
    model: str
    deadline_ms: float | None = None
    tier: str = "realtime"


class Observations(NamedTuple):
    """What the agent knows when a request arrives (built by offload_state.OffloadState.observe)."""

    local_available: bool  # the model serves on this device (in the version asked for)
    cloud_enabled: bool = True  # an offload target is configured
    cloud_has_model: bool = True  # False: the cloud answered 404 for this model recently
    breaker: str = CLOSED  # "closed" | "open" | "half_open"
    probe_available: bool = False  # half-open and no probe in flight
    local_p95_ms: float | None = None  # what callers waited, over the sliding window; None: too few samples
    local_service_ms: float | None = None  # p95 of the device's own run time (no queueing), same window
    local_inflight: int = 0  # local requests running or waiting on the device right now
    local_mj: float | None = None  # recent mJ per inference (per row) locally; None: unmetered
    cloud_ms: float | None = None  # the cloud's round-trip estimate; None: never measured
    energy_spent_j: float = 0.0  # local inference energy over the last minute
    offloaded: bool = False  # hysteresis memory: the model is routed to the cloud for its budgets
    switched_at: float = float("-inf")  # monotonic s of the last switch of `offloaded`
    last_local_at: float = float("-inf")  # monotonic s of the last local run of the model
    last_cloud_at: float = float("-inf")  # monotonic s the last cloud call for the model left


class Budgets(NamedTuple):
    """What the policy holds a model to (None: no limit) and how firmly (hysteresis, dwell, probes)."""

    p95_ms: float | None = None
    mj_per_inference: float | None = None
    energy_j_per_min: float | None = None
    hysteresis: float = 0.2  # back to local only below budget x (1 - hysteresis)
    min_dwell_s: float = 5.0  # and no sooner than this after switching to the cloud
    local_probe_s: float = 1.0  # while offloaded, one local run this often keeps the local figures fresh
    local_parallel: int = 1  # local runs the device serves at once at full speed (1: a run uses every core)
    cloud_recheck_s: float = 5.0  # kept local as the slower cloud's: one request this often refreshes its estimate


_D = {reason: Decision(where, reason) for reason, where in REASONS.items()}


def _through_breaker(choice: Decision, obs: Observations) -> Decision:
    """A cloud choice as the cloud's health allows it (rule 6)."""
    if obs.breaker == CLOSED:
        return choice
    if obs.breaker == HALF_OPEN and obs.probe_available:
        return _D[CLOUD_PROBE]
    return _D[CLOUD_UNREACHABLE]


def _recheck(choice: Decision, obs: Observations, b: Budgets, now: float) -> Decision:
    """A local choice made on the cloud's estimate, or one CLOUD_RECHECK every `cloud_recheck_s` to renew it."""
    if obs.breaker == CLOSED and now - obs.last_cloud_at >= b.cloud_recheck_s:
        return _D[CLOUD_RECHECK]
    return choice


def _budgets(request: Request, obs: Observations, b: Budgets, now: float) -> Decision:
    """Rule 4: energy window, tier, mJ and p95 budgets, with hysteresis."""
    if b.energy_j_per_min is not None and obs.energy_spent_j >= b.energy_j_per_min:
        return _D[ENERGY_WINDOW_EXHAUSTED]
    if request.tier == "background":
        return _D[BACKGROUND_TIER_LOCAL]
    p95, mj, cloud = obs.local_p95_ms, obs.local_mj, obs.cloud_ms
    mj_over = b.mj_per_inference is not None and mj is not None and mj > b.mj_per_inference
    p95_over = b.p95_ms is not None and p95 is not None and p95 > b.p95_ms
    if mj_over:
        return _D[LOCAL_ENERGY_OVER_BUDGET]
    if p95_over:
        # Offloading for latency only helps when the cloud answers sooner.
        assert p95 is not None
        return _D[OVER_BUDGET_CLOUD_SLOWER] if cloud is not None and cloud >= p95 else _D[LOCAL_P95_OVER_BUDGET]
    if obs.offloaded:
        keep = 1.0 - b.hysteresis
        clear = now - obs.switched_at >= b.min_dwell_s
        if clear and b.p95_ms is not None:
            clear = p95 is not None and p95 < b.p95_ms * keep
        if clear and b.mj_per_inference is not None:
            clear = mj is None or mj < b.mj_per_inference * keep
        if not clear:
            return _D[HYSTERESIS_HOLD]
    return _D[LOCAL_WITHIN_BUDGET]


def decide(request: Request, obs: Observations, budgets: Budgets, now: float) -> Decision:
    """Where this request runs and why; `now` in monotonic seconds, the clock `obs`'s times are on."""
    if not obs.cloud_enabled:
        return _D[OFFLOAD_DISABLED]
    if not obs.local_available:
        if obs.breaker == CLOSED:
            return _D[NOT_INSTALLED_LOCALLY]
        return _D[CLOUD_PROBE] if obs.breaker == HALF_OPEN and obs.probe_available else _D[CLOUD_BREAKER_OPEN]
    if not obs.cloud_has_model:
        return _D[CLOUD_LACKS_MODEL]
    energy_left = budgets.energy_j_per_min is None or obs.energy_spent_j < budgets.energy_j_per_min
    if obs.offloaded and energy_left and now - obs.last_local_at >= budgets.local_probe_s:
        return _D[LOCAL_PROBE]
    deadline, cloud = request.deadline_ms, obs.cloud_ms
    cloud_misses = deadline is not None and cloud is not None and cloud > deadline
    # What this request would wait locally: the run time behind everything already queued on the device (it
    # follows the queue at once, where the window's p95 lags by a window); the callers' p95 until runs are known.
    service = obs.local_service_ms
    p95 = obs.local_p95_ms if service is None else service * (1 + obs.local_inflight // budgets.local_parallel)
    if deadline is not None and p95 is not None:
        # Hysteresis on the way back: once offloaded, local must beat the deadline with the margin to spare.
        local_misses = p95 >= deadline * (1.0 - budgets.hysteresis) if obs.offloaded else p95 > deadline
        if local_misses:
            if not cloud_misses:
                return _through_breaker(_D[DEADLINE_LOCAL_TOO_SLOW], obs)
            assert cloud is not None
            if p95 <= cloud:
                return _recheck(_D[DEADLINE_UNMEETABLE_FASTER_LOCAL], obs, budgets, now)
            return _through_breaker(_D[DEADLINE_UNMEETABLE_FASTER_CLOUD], obs)
    choice = _budgets(request, obs, budgets, now)
    if choice.where == LOCAL:
        return _recheck(choice, obs, budgets, now) if choice is _D[OVER_BUDGET_CLOUD_SLOWER] and not cloud_misses \
            else choice
    if cloud_misses:  # and local meets it, or its latency is unknown yet
        return _D[DEADLINE_CLOUD_TOO_SLOW]
    return _through_breaker(choice, obs)


def escalate(request: Request, obs: Observations, low_confidence: bool, elapsed_ms: float) -> Decision | None:
    """The cascade, after a local run: None keeps the local answer as decided; else LOW_CONFIDENCE (ask the cloud)
    or LOW_CONFIDENCE_KEPT_LOCAL (it should go, but the cloud cannot take it: breaker, model missing there, or its
    estimate does not fit the `elapsed_ms` already spent against the deadline)."""
    if not low_confidence:
        return None
    if not obs.cloud_enabled or not obs.cloud_has_model:
        return _D[LOW_CONFIDENCE_KEPT_LOCAL]
    if obs.breaker != CLOSED and not (obs.breaker == HALF_OPEN and obs.probe_available):
        return _D[LOW_CONFIDENCE_KEPT_LOCAL]
    if request.deadline_ms is not None and obs.cloud_ms is not None and \
            elapsed_ms + obs.cloud_ms > request.deadline_ms:
        return _D[LOW_CONFIDENCE_KEPT_LOCAL]
    return _D[LOW_CONFIDENCE]


__all__ = ["BACKGROUND_TIER_LOCAL", "CLOUD", "CLOUD_BREAKER_OPEN", "CLOUD_FAILED_FALLBACK", "CLOUD_LACKS_MODEL",
           "CLOUD_PROBE", "CLOUD_RECHECK", "CLOUD_UNREACHABLE", "DEADLINE_CLOUD_TOO_SLOW", "DEADLINE_LOCAL_TOO_SLOW",
           "DEADLINE_UNMEETABLE_FASTER_CLOUD", "DEADLINE_UNMEETABLE_FASTER_LOCAL", "ENERGY_WINDOW_EXHAUSTED",
           "ENTERS_OFFLOAD", "HYSTERESIS_HOLD", "LEAVES_OFFLOAD", "LOCAL", "LOCAL_ENERGY_OVER_BUDGET",
           "LOCAL_P95_OVER_BUDGET", "LOCAL_PROBE", "LOCAL_WITHIN_BUDGET", "LOW_CONFIDENCE",
           "LOW_CONFIDENCE_KEPT_LOCAL", "NOT_INSTALLED_LOCALLY", "OFFLOAD_DISABLED", "OVER_BUDGET_CLOUD_SLOWER",
           "REASONS", "TIERS", "Budgets", "Decision", "Observations", "Request", "decide", "escalate"]
