"""edge_agent/offload_state.py: each estimator against hand-computed values, driven by an explicit `now`."""

from __future__ import annotations

import pytest

from edgefleet.edge_agent import offload_policy as p
from edgefleet.edge_agent.offload_policy import Decision
from edgefleet.edge_agent.offload_state import (
    CircuitBreaker,
    EnergyWindow,
    Ewma,
    LatencyWindow,
    OffloadState,
    RttEstimator,
)


def test_latency_window_p95_by_nearest_rank():
    w = LatencyWindow(size=100, max_age_s=60, min_samples=3)
    w.add(5.0, 0.0)
    w.add(1.0, 0.0)
    assert w.p95(0.0) is None  # fewer than min_samples
    for ms in range(3, 21):  # 1, 3..20, 5 again: 20 samples
        w.add(float(ms), 0.0)
    assert len(w) == 20
    assert w.p95(0.0) == 19.0  # rank ceil(0.95 x 20) = 19 of [1, 3, 4, 5, 5, 6, ..., 20]


def test_latency_window_slides_by_count_and_age():
    w = LatencyWindow(size=4, max_age_s=10, min_samples=1)
    for t, ms in enumerate([100.0, 1.0, 2.0, 3.0, 4.0]):
        w.add(ms, float(t))
    assert len(w) == 4 and w.p95(4.0) == 4.0  # the 100 fell out by count
    assert w.p95(12.5) == 4.0  # samples of t=1, 2 expired (older than 10 s); 3.0 and 4.0 remain
    assert len(w) == 2
    assert w.p95(100.0) is None and len(w) == 0
    w.add(float("nan"), 100.0)
    w.add(-1.0, 100.0)
    assert len(w) == 0  # garbage is no sample


def test_ewma_and_rtt_estimator():
    e = Ewma(alpha=0.5)
    assert e.value is None
    for x in (10.0, 20.0, 20.0):
        e.add(x)
    assert e.value == 17.5
    r = RttEstimator()
    assert r.estimate is None
    r.add(20.0)  # RFC 6298: SRTT = R, RTTVAR = R/2
    assert (r.srtt, r.rttvar, r.estimate) == (20.0, 10.0, 40.0)
    r.add(28.0)  # RTTVAR = 3/4 x 10 + 1/4 x |20 - 28| = 9.5; SRTT = 7/8 x 20 + 1/8 x 28 = 21
    assert (r.srtt, r.rttvar, r.estimate) == (21.0, 9.5, 40.0)


def test_breaker_opens_after_consecutive_failures_and_probes_half_open():
    b = CircuitBreaker(failures=3, open_s=5.0, max_open_s=12.0, probe_timeout_s=2.0)
    b.failure(0.0)
    b.failure(0.1)
    b.success(0.2)  # not consecutive: the count starts again
    b.failure(1.0)
    b.failure(1.1)
    assert b.state(1.1) == p.CLOSED
    b.failure(1.2)
    assert b.state(1.2) == p.OPEN and b.state(6.19) == p.OPEN and not b.probe_available(6.0)
    assert b.state(6.2) == p.HALF_OPEN and b.probe_available(6.2)
    assert b.begin_probe(6.2) and not b.begin_probe(6.3)  # one probe at a time
    b.failure(6.5)  # the probe failed: open again for twice as long
    assert b.state(16.49) == p.OPEN and b.state(16.5) == p.HALF_OPEN
    assert b.begin_probe(16.5)
    b.failure(17.0)  # 20 s would exceed max_open_s: 12
    assert b.state(28.99) == p.OPEN and b.state(29.0) == p.HALF_OPEN
    assert b.begin_probe(29.0)
    assert not b.probe_available(30.9) and b.probe_available(31.0)  # a probe lost for probe_timeout_s
    b.success(31.5)
    assert b.state(31.5) == p.CLOSED
    for t in (40.0, 40.1, 40.2):  # back to the first open period after a success
        b.failure(t)
    assert b.state(45.19) == p.OPEN and b.state(45.2) == p.HALF_OPEN


@pytest.mark.parametrize("args", [(0, 5.0, 60.0, 1.0), (3, 0.0, 60.0, 1.0), (3, 10.0, 5.0, 1.0),
                                  (3, 5.0, 60.0, 0.0)])
def test_breaker_refuses_bad_settings(args):
    with pytest.raises(ValueError, match="failures >= 1"):
        CircuitBreaker(*args)


def test_energy_window_sums_the_trailing_minute():
    e = EnergyWindow(window_s=60.0, buckets=12)  # 5 s buckets
    e.add(1.0, 0.0)
    e.add(2.0, 4.9)
    e.add(4.0, 30.0)
    e.add(0.0, 30.0)
    e.add(-3.0, 30.0)
    assert e.total(30.0) == 7.0
    assert e.total(64.9) == 7.0  # bucket [0, 5) still inside (its start is the window's edge)
    assert e.total(65.0) == 4.0
    assert e.total(95.0) == 0.0


def test_state_observes_and_moves_the_hysteresis_memory():
    s = OffloadState(window=8, window_s=10.0)
    for i in range(4):
        s.local_started()
        s.local_done("m", 10.0 + i, 5.0 + i, energy_mj=6.0, rows=2, now=100.0 + i)
    s.local_started()
    s.local_started()
    s.local_done("m", 0.0, None, None, 1, 104.0)  # a run that failed: no sample, no longer in flight
    s.cloud_done("m", 900.0, service_ms=2.0, now=104.0)  # the first answer warms: a cold model, not a round trip
    assert s.observe("m", True, True, 104.0).cloud_ms is None
    s.cloud_done("m", 20.0, service_ms=2.0, now=104.0)
    obs = s.observe("m", True, True, 104.0)
    assert obs.local_p95_ms == 13.0 and obs.local_mj == 3.0 and obs.cloud_ms == 40.0
    assert (obs.local_service_ms, obs.local_inflight) == (8.0, 1)
    assert obs.energy_spent_j == pytest.approx(0.024) and obs.last_local_at == 103.0
    assert (obs.offloaded, obs.breaker, obs.cloud_has_model) == (False, p.CLOSED, True)
    assert s.model("m").service_ms.value == 2.0
    s.note_decision("m", Decision("cloud", p.LOCAL_P95_OVER_BUDGET), 105.0)
    s.note_decision("m", Decision("cloud", p.LOCAL_P95_OVER_BUDGET), 106.0)  # already offloaded: no new switch
    s.note_decision("m", Decision("local", p.LOCAL_PROBE), 107.0)  # a probe does not move it
    obs = s.observe("m", True, True, 107.0)
    assert (obs.offloaded, obs.switched_at) == (True, 105.0)
    assert obs.last_cloud_at == 106.0  # the last cloud decision, when it left: the re-check's clock
    s.note_decision("m", Decision("cloud", p.CLOUD_RECHECK), 108.0)
    assert s.observe("m", True, True, 108.0).last_cloud_at == 108.0
    s.note_decision("m", Decision("local", p.LOCAL_WITHIN_BUDGET), 111.0)
    assert (s.model("m").offloaded, s.model("m").switched_at) == (False, 111.0)


def test_state_breaker_probe_claim_and_missing_model():
    s = OffloadState(breaker=CircuitBreaker(failures=1, open_s=1.0))
    s.cloud_failed(0.0)
    assert s.observe("m", False, True, 0.5).breaker == p.OPEN
    obs = s.observe("m", False, True, 1.0)
    assert (obs.breaker, obs.probe_available) == (p.HALF_OPEN, True)
    assert s.note_decision("m", Decision("cloud", p.CLOUD_PROBE), 1.0) is True
    assert s.note_decision("m", Decision("cloud", p.CLOUD_PROBE), 1.0) is False  # the slot is taken
    assert s.observe("m", False, True, 1.0).probe_available is False
    s.cloud_lacks("m", 2.0)  # a 404 is an answer: the server is up, the model is not there
    obs = s.observe("m", True, True, 2.0)
    assert (obs.breaker, obs.cloud_has_model) == (p.CLOSED, False)
    assert s.observe("m", True, True, 62.0).cloud_has_model is True


def _route(latencies_ms, budgets, *, step_s=0.05, cloud_ms=5.0):
    """The policy and its state over a stream of requests, one every `step_s`, the device's run time for each
    drawn from `latencies_ms` (used when it runs locally); (switches of the offloaded memory, wheres)."""
    s = OffloadState(window=16, window_s=10.0)
    switches, wheres, offloaded = 0, [], False
    for i, ms in enumerate(latencies_ms):
        now = 1000.0 + i * step_s
        decision = p.decide(p.Request("m"), s.observe("m", True, True, now), budgets, now)
        s.note_decision("m", decision, now)
        if decision.where == p.LOCAL:
            s.local_started()
            s.local_done("m", float(ms), float(ms), None, 1, now)
        else:
            s.cloud_done("m", cloud_ms, None, now)
        switches += s.model("m").offloaded != offloaded
        offloaded = s.model("m").offloaded
        wheres.append(decision.where)
    return switches, wheres


def test_hysteresis_holds_routing_steady_under_noise_and_lets_a_fast_device_back():
    """A device whose p95 hovers around its 20 ms budget (run times 16 +- 2.5 ms, seeded noise) for a minute: with no
    hysteresis the route flaps on every crossing; with the defaults (come back below 16 ms, after 5 s) it switches a
    few times at most. Then the device gets fast (10 ms) and comes back within the dwell plus the window's refresh."""
    import numpy as np

    noisy = np.clip(np.random.default_rng(3).normal(16.0, 2.5, 1200), 1.0, None)
    steady = p.Budgets(p95_ms=20.0)  # hysteresis 0.2, min_dwell_s 5, local_probe_s 1
    flappy = steady._replace(hysteresis=0.0, min_dwell_s=0.0)
    flaps, _ = _route(noisy, flappy)
    holds, wheres = _route(noisy, steady)
    assert flaps >= 8 and holds <= 2, (flaps, holds)  # seeded: 9 against 1
    # Offloaded, the device still runs one request a second (the local probe), never more: its figures stay fresh.
    assert 0 < wheres.count(p.LOCAL) <= 1200 * 0.05 / steady.local_probe_s + 20
    fast_again = np.concatenate([noisy[:400], np.full(800, 10.0)])
    _, wheres = _route(fast_again, steady)
    back = next(i for i in range(400, 1200) if wheres[i:i + 40].count(p.LOCAL) == 40)
    assert (back - 400) * 0.05 <= steady.min_dwell_s + 16 * steady.local_probe_s + 1.0, back
