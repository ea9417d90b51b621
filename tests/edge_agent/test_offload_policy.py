"""edge_agent/offload_policy.py: every rule of decide() and escalate(), one table row each; and the core stays pure."""

from __future__ import annotations

import pytest

from edgefleet.edge_agent import offload_policy as p
from edgefleet.edge_agent.offload_policy import Budgets, Observations, Request, decide, escalate
from tests.edge_agent.test_purity import clock_reads, forbidden
from tests.import_graph import ROOT, closure

NOW = 1000.0
B = Budgets(p95_ms=20.0, mj_per_inference=5.0, energy_j_per_min=30.0, hysteresis=0.2, min_dwell_s=5.0,
            local_probe_s=1.0)
OK = Observations(local_available=True, local_p95_ms=10.0, local_mj=2.0, cloud_ms=15.0, energy_spent_j=1.0,
                  last_local_at=NOW - 0.01, last_cloud_at=NOW - 0.01)
OFF = OK._replace(offloaded=True, switched_at=NOW - 60.0)  # offloaded a minute ago, probed just now
RT = Request("digits")


def req(deadline_ms=None, tier="realtime"):
    return Request("digits", deadline_ms, tier)


TABLE = [
    # id, request, observations, budgets, where, reason
    ("offload off", RT, OK._replace(cloud_enabled=False), B, "local", p.OFFLOAD_DISABLED),
    ("offload off, model absent: the local error answers", RT,
     OK._replace(cloud_enabled=False, local_available=False), B, "local", p.OFFLOAD_DISABLED),
    ("not installed", RT, OK._replace(local_available=False), B, "cloud", p.NOT_INSTALLED_LOCALLY),
    ("not installed, breaker open", RT, OK._replace(local_available=False, breaker=p.OPEN), B, "cloud",
     p.CLOUD_BREAKER_OPEN),
    ("not installed, half-open, probe slot taken", RT,
     OK._replace(local_available=False, breaker=p.HALF_OPEN, probe_available=False), B, "cloud",
     p.CLOUD_BREAKER_OPEN),
    ("not installed, half-open probe", RT,
     OK._replace(local_available=False, breaker=p.HALF_OPEN, probe_available=True), B, "cloud", p.CLOUD_PROBE),
    ("cloud lacks the model", RT, OK._replace(cloud_has_model=False, local_p95_ms=99.0), B, "local",
     p.CLOUD_LACKS_MODEL),
    ("within budget", RT, OK, B, "local", p.LOCAL_WITHIN_BUDGET),
    ("nothing measured yet", RT, Observations(local_available=True), B, "local", p.LOCAL_WITHIN_BUDGET),
    ("no budgets at all", RT, OK._replace(local_p95_ms=500.0, local_mj=900.0), Budgets(), "local",
     p.LOCAL_WITHIN_BUDGET),
    ("p95 over budget", RT, OK._replace(local_p95_ms=25.0), B, "cloud", p.LOCAL_P95_OVER_BUDGET),
    ("p95 over budget, cloud never measured", RT, OK._replace(local_p95_ms=25.0, cloud_ms=None), B, "cloud",
     p.LOCAL_P95_OVER_BUDGET),
    ("p95 over budget but the cloud is slower", RT, OK._replace(local_p95_ms=25.0, cloud_ms=30.0), B, "local",
     p.OVER_BUDGET_CLOUD_SLOWER),
    ("the cloud slower on an estimate cloud_recheck_s old: this request re-checks it", RT,
     OK._replace(local_p95_ms=25.0, cloud_ms=30.0, last_cloud_at=NOW - 5.0), B, "cloud", p.CLOUD_RECHECK),
    ("an old estimate, breaker open: no re-check", RT,
     OK._replace(local_p95_ms=25.0, cloud_ms=30.0, last_cloud_at=NOW - 50.0, breaker=p.OPEN), B, "local",
     p.OVER_BUDGET_CLOUD_SLOWER),
    ("an old estimate, half-open: the breaker's probe does that job", RT,
     OK._replace(local_p95_ms=25.0, cloud_ms=30.0, last_cloud_at=NOW - 50.0, breaker=p.HALF_OPEN,
                 probe_available=True), B, "local", p.OVER_BUDGET_CLOUD_SLOWER),
    ("an old estimate, a deadline local meets and the cloud's misses: never a re-check", req(30.0),
     OK._replace(local_p95_ms=25.0, cloud_ms=40.0, last_cloud_at=NOW - 50.0), B, "local",
     p.OVER_BUDGET_CLOUD_SLOWER),
    ("mJ over budget", RT, OK._replace(local_mj=6.0), B, "cloud", p.LOCAL_ENERGY_OVER_BUDGET),
    ("energy window exhausted", RT, OK._replace(energy_spent_j=30.0), B, "cloud", p.ENERGY_WINDOW_EXHAUSTED),
    ("energy window exhausted, background too", req(tier="background"), OK._replace(energy_spent_j=31.0), B,
     "cloud", p.ENERGY_WINDOW_EXHAUSTED),
    ("background tier stays local over budget", req(tier="background"), OK._replace(local_p95_ms=90.0), B,
     "local", p.BACKGROUND_TIER_LOCAL),
    ("deadline: local too slow", req(8.0), OK._replace(cloud_ms=6.0), B, "cloud", p.DEADLINE_LOCAL_TOO_SLOW),
    ("deadline: local too slow, cloud never measured", req(8.0), OK._replace(cloud_ms=None), B, "cloud",
     p.DEADLINE_LOCAL_TOO_SLOW),
    ("deadline: the queue ahead makes local too slow", req(30.0),
     OK._replace(local_service_ms=8.0, local_inflight=3, local_p95_ms=9.0, cloud_ms=20.0), B, "cloud",
     p.DEADLINE_LOCAL_TOO_SLOW),
    ("deadline: a short queue still fits", req(30.0),
     OK._replace(local_service_ms=8.0, local_inflight=2, local_p95_ms=19.0, cloud_ms=20.0), B, "local",
     p.LOCAL_WITHIN_BUDGET),
    ("deadline: two runs at once at full speed", req(30.0),
     OK._replace(local_service_ms=8.0, local_inflight=3, cloud_ms=20.0), B._replace(local_parallel=2), "local",
     p.LOCAL_WITHIN_BUDGET),
    ("deadline: neither meets, local faster", req(5.0), OK._replace(cloud_ms=15.0), B, "local",
     p.DEADLINE_UNMEETABLE_FASTER_LOCAL),
    ("deadline: neither meets, local faster on an old estimate: re-check", req(5.0),
     OK._replace(cloud_ms=15.0, last_cloud_at=NOW - 5.0), B, "cloud", p.CLOUD_RECHECK),
    ("deadline: neither meets, cloud faster", req(5.0), OK._replace(local_p95_ms=18.0, cloud_ms=8.0), B, "cloud",
     p.DEADLINE_UNMEETABLE_FASTER_CLOUD),
    ("deadline: neither meets, cloud faster, breaker open", req(5.0),
     OK._replace(local_p95_ms=18.0, cloud_ms=8.0, breaker=p.OPEN), B, "local", p.CLOUD_UNREACHABLE),
    ("deadline met locally, budget says cloud, cloud misses the deadline", req(30.0),
     OK._replace(local_mj=6.0, cloud_ms=40.0), B, "local", p.DEADLINE_CLOUD_TOO_SLOW),
    ("deadline met by both: the budgets decide", req(100.0), OK._replace(local_p95_ms=25.0), B, "cloud",
     p.LOCAL_P95_OVER_BUDGET),
    ("deadline, local unknown yet: the budgets decide", req(5.0), OK._replace(local_p95_ms=None), B, "local",
     p.LOCAL_WITHIN_BUDGET),
    ("cloud unreachable: local always", req(8.0), OK._replace(cloud_ms=6.0, breaker=p.OPEN), B, "local",
     p.CLOUD_UNREACHABLE),
    ("cloud unreachable, over budget: local", RT, OK._replace(local_p95_ms=99.0, breaker=p.OPEN), B, "local",
     p.CLOUD_UNREACHABLE),
    ("half-open, probe slot free: a cloud choice probes", RT,
     OK._replace(local_p95_ms=99.0, breaker=p.HALF_OPEN, probe_available=True), B, "cloud", p.CLOUD_PROBE),
    ("half-open, probe in flight: local", RT,
     OK._replace(local_p95_ms=99.0, breaker=p.HALF_OPEN, probe_available=False), B, "local", p.CLOUD_UNREACHABLE),
    ("half-open, local within budget: no probe needed", RT,
     OK._replace(breaker=p.HALF_OPEN, probe_available=True), B, "local", p.LOCAL_WITHIN_BUDGET),
    # hysteresis: offloaded, p95 17 is under the budget 20 but not under 20 x 0.8 = 16
    ("hysteresis: under budget but inside the margin", RT, OFF._replace(local_p95_ms=17.0), B, "cloud",
     p.HYSTERESIS_HOLD),
    ("hysteresis: under the margin but dwell not over", RT,
     OFF._replace(local_p95_ms=10.0, switched_at=NOW - 2.0), B, "cloud", p.HYSTERESIS_HOLD),
    ("hysteresis: local p95 expired: hold", RT, OFF._replace(local_p95_ms=None), B, "cloud", p.HYSTERESIS_HOLD),
    ("hysteresis: mJ inside the margin", RT, OFF._replace(local_mj=4.5), B, "cloud", p.HYSTERESIS_HOLD),
    ("hysteresis: back when under the margin and dwell is over", RT, OFF._replace(local_p95_ms=15.9), B,
     "local", p.LOCAL_WITHIN_BUDGET),
    ("hysteresis: still over budget says so", RT, OFF._replace(local_p95_ms=21.0), B, "cloud",
     p.LOCAL_P95_OVER_BUDGET),
    ("hysteresis hold, half-open: probe", RT,
     OFF._replace(local_p95_ms=17.0, breaker=p.HALF_OPEN, probe_available=True), B, "cloud", p.CLOUD_PROBE),
    ("hysteresis on a deadline: 11 < 12 but not < 12 x 0.8", req(12.0),
     OFF._replace(local_p95_ms=11.0, cloud_ms=8.0), B, "cloud", p.DEADLINE_LOCAL_TOO_SLOW),
    ("hysteresis on a deadline: 9 < 12 x 0.8 is back", req(12.0), OFF._replace(local_p95_ms=9.0, cloud_ms=8.0),
     B, "local", p.LOCAL_WITHIN_BUDGET),
    ("offloaded: a local probe is due", RT, OFF._replace(last_local_at=NOW - 1.0, local_p95_ms=50.0), B, "local",
     p.LOCAL_PROBE),
    ("offloaded: probe due even with a deadline", req(12.0), OFF._replace(last_local_at=NOW - 5.0,
                                                                           local_p95_ms=50.0), B, "local",
     p.LOCAL_PROBE),
    ("offloaded, energy exhausted: no probe", RT, OFF._replace(last_local_at=NOW - 5.0, energy_spent_j=40.0), B,
     "cloud", p.ENERGY_WINDOW_EXHAUSTED),
    ("not offloaded: no probe", RT, OK._replace(last_local_at=NOW - 50.0), B, "local", p.LOCAL_WITHIN_BUDGET),
]


@pytest.mark.parametrize(("request_", "obs", "budgets", "where", "reason"), [row[1:] for row in TABLE],
                         ids=[row[0] for row in TABLE])
def test_decide(request_, obs, budgets, where, reason):
    assert decide(request_, obs, budgets, NOW) == (where, reason)


def test_every_decide_reason_has_a_row():
    router_only = {p.LOW_CONFIDENCE, p.LOW_CONFIDENCE_KEPT_LOCAL, p.CLOUD_FAILED_FALLBACK}
    assert {row[-1] for row in TABLE} == set(p.REASONS) - router_only
    assert all(p.REASONS[row[-1]] == row[-2] for row in TABLE)  # each reason always means the same side


ESCALATE = [
    ("confident: keep", False, OK, req(), 1.0, None),
    ("doubtful: ask the cloud", True, OK, req(), 1.0, p.LOW_CONFIDENCE),
    ("doubtful, deadline still fits", True, OK, req(20.0), 4.0, p.LOW_CONFIDENCE),
    ("doubtful, deadline does not fit the round trip", True, OK, req(20.0), 6.0, p.LOW_CONFIDENCE_KEPT_LOCAL),
    ("doubtful, breaker open", True, OK._replace(breaker=p.OPEN), req(), 1.0, p.LOW_CONFIDENCE_KEPT_LOCAL),
    ("doubtful, half-open with the slot", True, OK._replace(breaker=p.HALF_OPEN, probe_available=True), req(),
     1.0, p.LOW_CONFIDENCE),
    ("doubtful, half-open without the slot", True, OK._replace(breaker=p.HALF_OPEN), req(), 1.0,
     p.LOW_CONFIDENCE_KEPT_LOCAL),
    ("doubtful, the cloud lacks the model", True, OK._replace(cloud_has_model=False), req(), 1.0,
     p.LOW_CONFIDENCE_KEPT_LOCAL),
    ("doubtful, offload off", True, OK._replace(cloud_enabled=False), req(), 1.0, p.LOW_CONFIDENCE_KEPT_LOCAL),
]


@pytest.mark.parametrize(("low", "obs", "request_", "elapsed", "reason"), [row[1:] for row in ESCALATE],
                         ids=[row[0] for row in ESCALATE])
def test_escalate(low, obs, request_, elapsed, reason):
    got = escalate(request_, obs, low, elapsed)
    assert (got.reason if got is not None else None) == reason
    if got is not None:
        assert got.where == p.REASONS[reason]


@pytest.mark.parametrize("core", ["edgefleet.edge_agent.offload_policy", "edgefleet.edge_agent.offload_state"])
def test_policy_and_state_are_pure(core):
    reached = closure(core)
    assert core in reached
    assert {m: forbidden(i) for m, i in reached.items() if forbidden(i)} == {}
    path = ROOT / core.removeprefix("edgefleet.").replace(".", "/")
    assert clock_reads(path.with_suffix(".py").read_text()) == []
    imported = {i.module for imports in reached.values() for i in imports}
    assert not imported & {"threading", "random", "datetime"}
