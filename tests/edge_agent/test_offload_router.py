"""edge_agent/offload.py: the Router over a real InferenceService (the device's student) and a real OIP server (the
"cloud", serving a teacher under the same name), through a real delaying TCP proxy where the cloud must be far.
Policy time is a manual clock, so hysteresis, probes and the breaker move when the test says; run times are real.
The two models differ (softmax(x) vs softmax(5x)), so every answer shows where it ran."""

from __future__ import annotations

import numpy as np
import pytest

from edgefleet.edge_agent import offload_policy as p
from edgefleet.edge_agent.config import OffloadConfig
from edgefleet.edge_agent.errors import CloudUnavailable, InferenceError, ModelNotFound
from edgefleet.edge_agent.local_api import LocalApi
from edgefleet.edge_agent.offload import Router
from edgefleet.edge_agent.offload_client import OffloadClient
from tests.edge_agent import agent_testkit as kit
from tests.edge_agent.test_offload_client import OipServer, X, expected, serve_models
from tests.netproxy import DelayProxy

STUDENT = expected(1.0)
TEACHER = expected(5.0)
SURE = np.array([[0.0, 0.0, 10.0]], dtype=np.float32)  # the student's max prob 0.99995
DOUBTFUL = np.array([[0.0, 0.0, 0.1]], dtype=np.float32)  # the student's max prob 0.35


class Tick:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def world(tmp_path):
    device = serve_models(tmp_path / "device", {"digits": (2, 1.0)})
    cloud_service = serve_models(tmp_path / "cloud", {"digits": (9, 5.0), "big": (4, 5.0)})
    cloud = OipServer(cloud_service)
    try:
        yield device, cloud
    finally:
        cloud.stop()


def router(device, url, tick, **config) -> Router:
    client = OffloadClient(url, timeout_s=2.0) if url else None
    return Router(device, client, OffloadConfig(enabled=url is not None, **config), telemetry=device.telemetry,
                  monotonic=tick)


def cloud_windows(device):
    windows = [w for b in device.telemetry.flush(kit.T0, force=True) for w in b.windows]
    return {(w.model, w.version, w.where): (w.count, w.errors) for w in windows}


def test_local_within_budget_and_the_provenance(world):
    device, cloud = world
    r = router(device, cloud.url, Tick())
    out, params = r.infer_arrays("digits", {"x": X})
    np.testing.assert_array_equal(out["y"], STUDENT)
    assert {k: params[k] for k in ("where", "reason", "model_version", "variant", "escalated", "confidence",
                                   "energy_source")} == {
        "where": "local", "reason": p.LOCAL_WITHIN_BUDGET, "model_version": 2, "variant": "x86-cpu-fp32",
        "escalated": False, "confidence": None, "energy_source": "estimated"}
    assert params["latency_ms"] > 0 and params["energy_mj"] > 0 and "emulated_slowdown" not in params
    assert cloud.server.served == 0


def test_a_model_only_the_cloud_has_goes_there_and_telemetry_says_cloud(world):
    device, cloud = world
    r = router(device, cloud.url, Tick())
    out, params = r.infer_arrays("big", {"x": X})
    np.testing.assert_array_equal(out["y"], TEACHER)
    assert (params["where"], params["reason"], params["model_version"], params["variant"]) == (
        "cloud", p.NOT_INSTALLED_LOCALLY, 4, "x86-cpu-fp32")
    assert params["energy_mj"] is None and params["energy_source"] == "none"
    assert params["cloud_energy_source"] == "estimated" and params["cloud_energy_mj"] > 0
    out, _ = r.infer_arrays("digits", {"x": X}, version="9")  # a version the device does not have
    np.testing.assert_array_equal(out["y"], TEACHER)
    with pytest.raises(ModelNotFound, match="has no model 'nowhere'"):
        r.infer_arrays("nowhere", {"x": X})
    assert cloud_windows(device) == {("big", 4, "cloud"): (1, 0), ("digits", 9, "cloud"): (1, 0)}
    assert r.counts == {("big", p.NOT_INSTALLED_LOCALLY): 1, ("digits", p.NOT_INSTALLED_LOCALLY): 1,
                        ("nowhere", p.NOT_INSTALLED_LOCALLY): 1}


def test_energy_budget_offloads_and_local_probes_keep_the_figures_fresh(world):
    device, cloud = world
    tick = Tick()
    r = router(device, cloud.url, tick, mj_per_inference=1e-6, local_probe_s=1.0)
    reasons = []
    for dt in (0.0, 0.1, 0.5, 0.5, 0.1):
        tick.t += dt
        out, params = r.infer_arrays("digits", {"x": X})
        reasons.append(params["reason"])
        np.testing.assert_array_equal(out["y"], STUDENT if params["where"] == "local" else TEACHER)
    assert reasons == [p.LOCAL_WITHIN_BUDGET, p.LOCAL_ENERGY_OVER_BUDGET, p.LOCAL_ENERGY_OVER_BUDGET,
                       p.LOCAL_PROBE, p.LOCAL_ENERGY_OVER_BUDGET]
    assert r.snapshot()["models"]["digits"]["offloaded"] is True
    # background work stays on the device, over budget or not
    assert r.infer_arrays("digits", {"x": X}, tier="background")[1]["reason"] == p.BACKGROUND_TIER_LOCAL


def test_deadlines_against_a_far_cloud(world):
    device, cloud = world
    proxy = DelayProxy(cloud.port, delay_s=0.04)  # every round trip >= 40 ms
    tick = Tick()
    try:
        r = router(device, proxy.url, tick, mj_per_inference=1e-6, local_probe_s=1.0)
        for _ in range(3):  # background work runs locally whatever the budget: three samples, the p95 is known
            assert r.infer_arrays("digits", {"x": X}, tier="background")[1]["reason"] == p.BACKGROUND_TIER_LOCAL
        steps = [(0.001, p.DEADLINE_LOCAL_TOO_SLOW, "cloud"),  # the cloud is unmeasured: try it
                 (0.001, p.DEADLINE_LOCAL_TOO_SLOW, "cloud"),  # the first answer only warmed: still unmeasured
                 (0.001, p.DEADLINE_UNMEETABLE_FASTER_LOCAL, "local"),  # now known >= 40 ms: local is faster
                 (35.0, p.DEADLINE_CLOUD_TOO_SLOW, "local"),  # the mJ budget says cloud; the cloud misses 35 ms
                 (None, p.LOCAL_ENERGY_OVER_BUDGET, "cloud"),  # no deadline: the budget decides (offloaded now)
                 (35.0, p.DEADLINE_CLOUD_TOO_SLOW, "local")]
        for deadline, reason, where in steps:
            out, params = r.infer_arrays("digits", {"x": X}, deadline_ms=deadline)
            assert (params["reason"], params["where"]) == (reason, where)
            np.testing.assert_array_equal(out["y"], STUDENT if where == "local" else TEACHER)
        snap = r.snapshot()
        assert snap["models"]["digits"]["cloud_ms"] >= 40.0 and snap["models"]["digits"]["offloaded"] is True
        assert snap["local_inflight"] == 0
        tick.t += 1.0
        assert r.infer_arrays("digits", {"x": X})[1]["reason"] == p.LOCAL_PROBE
        assert r.infer_arrays("digits", {"x": X})[1]["reason"] == p.LOCAL_ENERGY_OVER_BUDGET
    finally:
        proxy.stop()


def test_the_cloud_killed_mid_run_every_request_still_answers(world, tmp_path):
    device, cloud = world
    tick = Tick()
    r = router(device, cloud.url, tick, mj_per_inference=1e-6, breaker_failures=2, breaker_open_s=5.0,
               local_probe_s=1000.0)
    assert r.infer_arrays("digits", {"x": X})[1]["reason"] == p.LOCAL_WITHIN_BUDGET
    assert r.infer_arrays("digits", {"x": X})[1]["reason"] == p.LOCAL_ENERGY_OVER_BUDGET
    port = cloud.port
    cloud.stop()
    got = []
    for _ in range(3):
        out, params = r.infer_arrays("digits", {"x": X})
        np.testing.assert_array_equal(out["y"], STUDENT)
        got.append((params["where"], params["reason"]))
    # two failures open the breaker; then the device answers without trying the network
    assert got == [("local", p.CLOUD_FAILED_FALLBACK)] * 2 + [("local", p.CLOUD_UNREACHABLE)]
    assert r.snapshot()["breaker"] == p.OPEN
    with pytest.raises(CloudUnavailable, match="not on this device and the offload server is unreachable"):
        r.infer_arrays("big", {"x": X})
    tick.t += 5.0  # half-open: the next cloud choice is a probe; the cloud is still down
    assert r.infer_arrays("digits", {"x": X})[1]["reason"] == p.CLOUD_FAILED_FALLBACK
    assert r.snapshot()["breaker"] == p.OPEN
    revived = OipServer(serve_models(tmp_path / "revived", {"digits": (9, 5.0)}),
                        port=port)
    try:
        tick.t += 10.0  # the open period doubled after the failed probe
        out, params = r.infer_arrays("digits", {"x": X})
        assert (params["where"], params["reason"]) == ("cloud", p.CLOUD_PROBE)
        np.testing.assert_array_equal(out["y"], TEACHER)
        assert r.snapshot()["breaker"] == p.CLOSED
        assert r.infer_arrays("digits", {"x": X})[1]["reason"] == p.LOCAL_ENERGY_OVER_BUDGET
    finally:
        revived.stop()
    # Under the device's version 2, whichever version answered: three answers and the three failed attempts.
    assert cloud_windows(device)[("digits", 2, "cloud")] == (6, 3)
    assert r.counts[("digits", p.CLOUD_FAILED_FALLBACK)] == 3 and r.counts[("big", p.CLOUD_BREAKER_OPEN)] == 1


def test_cascade_escalates_doubtful_answers_and_says_so(world):
    device, cloud = world
    tick = Tick()
    r = router(device, cloud.url, tick, cascade_metric="max_prob", cascade_threshold=0.8, breaker_failures=1)
    out, params = r.infer_arrays("digits", {"x": SURE})
    np.testing.assert_array_equal(out["y"], expected(1.0, SURE))
    assert (params["where"], params["reason"], params["escalated"]) == ("local", p.LOCAL_WITHIN_BUDGET, False)
    assert params["confidence"] == pytest.approx(float(expected(1.0, SURE).max()), abs=1e-6)
    out, params = r.infer_arrays("digits", {"x": DOUBTFUL}, outputs=["y"])
    np.testing.assert_array_equal(out["y"], expected(5.0, DOUBTFUL))
    assert (params["where"], params["reason"], params["escalated"], params["model_version"]) == (
        "cloud", p.LOW_CONFIDENCE, True, 9)
    assert params["confidence"] == pytest.approx(float(expected(1.0, DOUBTFUL).max()), abs=1e-6)
    assert params["energy_source"] == "estimated" and params["energy_mj"] > 0  # the device's run still cost
    cloud.stop()
    out, params = r.infer_arrays("digits", {"x": DOUBTFUL})
    np.testing.assert_array_equal(out["y"], expected(1.0, DOUBTFUL))
    assert (params["where"], params["reason"], params["escalated"]) == ("local", p.CLOUD_FAILED_FALLBACK, False)
    out, params = r.infer_arrays("digits", {"x": DOUBTFUL})  # breaker open now: not even tried
    assert (params["where"], params["reason"]) == ("local", p.LOW_CONFIDENCE_KEPT_LOCAL)


def test_typed_errors_and_no_cloud_configured(world):
    device, cloud = world
    r = router(device, cloud.url, Tick())
    with pytest.raises(InferenceError, match="tier must be one of realtime, background"):
        r.infer_arrays("digits", {"x": X}, tier="urgent")
    with pytest.raises(InferenceError, match="deadline_ms must be"):
        r.infer_arrays("digits", {"x": X}, deadline_ms=0)
    with pytest.raises(InferenceError, match=r"the model takes x FP32 \[-1, 3\]"):
        r.infer_arrays("digits", {"x": np.zeros((1, 4), np.float32)})
    alone = router(device, None, Tick())
    assert alone.infer_arrays("digits", {"x": X})[1]["reason"] == p.OFFLOAD_DISABLED
    with pytest.raises(ModelNotFound, match="not on this device"):
        alone.infer_arrays("big", {"x": X})
    assert cloud.server.served == 0


def test_emulated_slowdown_is_labelled(world):
    device, cloud = world
    r = router(device, cloud.url, Tick(), slowdown_factor=8.0)
    assert r.infer_arrays("digits", {"x": X})[1]["emulated_slowdown"] == 8.0
    assert r.infer_arrays("big", {"x": X})[1]["emulated_slowdown"] == 8.0


@pytest.mark.parametrize("binary", [True, False])
def test_an_app_through_the_agents_local_api(world, binary):
    """App -> the device's local API (with the router) -> the device or the cloud, provenance in the reply."""
    device, cloud = world
    r = router(device, cloud.url, Tick())
    with LocalApi(device, router=r) as api:
        app = OffloadClient(api.url, binary=binary)
        local = app.infer("digits", {"x": X}, parameters={"deadline_ms": 500.0, "tier": "realtime"})
        np.testing.assert_array_equal(local.outputs["y"], STUDENT)
        assert (local.parameters["where"], local.parameters["reason"]) == ("local", p.LOCAL_WITHIN_BUDGET)
        remote = app.infer("big", {"x": X})
        np.testing.assert_array_equal(remote.outputs["y"], TEACHER)
        assert (remote.model_version, remote.parameters["where"], remote.parameters["reason"]) == (
            "4", "cloud", p.NOT_INSTALLED_LOCALLY)
        with pytest.raises(InferenceError, match="tier must be one of realtime, background"):
            app.infer("digits", {"x": X}, parameters={"tier": "urgent"})
    assert r.counts == {("digits", p.LOCAL_WITHIN_BUDGET): 1, ("big", p.NOT_INSTALLED_LOCALLY): 1}


def test_budgets_come_from_the_config_over_the_deployment_over_the_manifest(world):
    device, cloud = world
    loaded = device._models["digits"]
    manifest = loaded.manifest.budgets
    r = router(device, cloud.url, Tick())
    assert (r.budgets("digits", loaded).p95_ms, r.budgets("digits", loaded).mj_per_inference) == (
        manifest.p95_latency_ms, manifest.mj_per_inference)
    r.set_deployment_budgets({"digits": (7.5, None)})
    assert (r.budgets("digits", loaded).p95_ms, r.budgets("digits", loaded).mj_per_inference) == (
        7.5, manifest.mj_per_inference)
    # A deployment's tight energy budget offloads; the same router follows the next desired state back.
    r.set_deployment_budgets({"digits": (None, 1e-6)})
    reasons = [r.infer_arrays("digits", {"x": X})[1]["reason"] for _ in range(3)]
    assert reasons[-1] == p.LOCAL_ENERGY_OVER_BUDGET, reasons
    r.set_deployment_budgets({})
    assert r.budgets("digits", loaded).mj_per_inference == manifest.mj_per_inference
    pinned = router(device, cloud.url, Tick(), p95_ms=3.0)
    pinned.set_deployment_budgets({"digits": (7.5, None)})
    assert pinned.budgets("digits", loaded).p95_ms == 3.0  # the device's own config wins


def test_every_decision_is_counted_in_the_window_that_holds_its_request(world):
    device, cloud = world
    tick = Tick()
    r = router(device, cloud.url, tick, mj_per_inference=1e-6, local_probe_s=1.0)
    for _ in range(6):
        r.infer_arrays("digits", {"x": X})
        tick.t += 0.3
    r.infer_arrays("big", {"x": X})
    windows = [w for b in device.telemetry.flush(kit.T0, force=True) for w in b.windows]
    by_key = {(w.model, w.where): w for w in windows}
    counted: dict[tuple[str, str], int] = {}
    for (model, where), w in by_key.items():
        assert sum(w.reasons.values()) == w.count  # every request once, no more
        for reason, n in w.reasons.items():
            assert p.REASONS[reason] == where or reason == p.CLOUD_FAILED_FALLBACK
            counted[(model, reason)] = counted.get((model, reason), 0) + n
    assert counted == r.counts
    assert by_key[("big", "cloud")].reasons == {p.NOT_INSTALLED_LOCALLY: 1}
    assert device.telemetry.reasons_unplaced == 0
    # Once the windows are gone, a late reason is counted, not lost.
    device.telemetry.count_reason("digits", "local", p.LOCAL_PROBE, 2)
    assert device.telemetry.reasons_unplaced == 1


def test_offload_off_counts_no_reasons(world):
    device, _ = world
    r = router(device, None, Tick())
    r.infer_arrays("digits", {"x": X})
    [w] = [w for b in device.telemetry.flush(kit.T0, force=True) for w in b.windows]
    assert (w.count, w.reasons) == (1, {})


def test_an_offloaded_request_counts_under_the_version_this_device_runs(world):
    """The cloud answers with its own version (9 here); the device runs 2. Unless the app asked for a version, the
    request is this device's model served elsewhere: its window, its reason and so a version's offload share go
    under 2, and the answer still says what served it."""
    device, cloud = world
    r = router(device, cloud.url, Tick(), mj_per_inference=1e-6)
    reasons = []
    for _ in range(3):
        out, params = r.infer_arrays("digits", {"x": X})
        reasons.append((params["where"], params["model_version"]))
    assert reasons[-1] == ("cloud", 9), reasons  # offloaded (energy over budget): the cloud's own version answered
    asked_out, asked = r.infer_arrays("digits", {"x": X}, version="9")  # asked for, and not on this device
    assert (asked["where"], asked["model_version"]) == ("cloud", 9)
    _, big = r.infer_arrays("big", {"x": X})  # not on this device at all: the cloud's version
    windows = [w for b in device.telemetry.flush(kit.T0, force=True) for w in b.windows]
    by_key = {(w.model, w.version, w.where): w for w in windows}
    cloud_v2 = by_key[("digits", 2, "cloud")]
    assert cloud_v2.count == sum(1 for where, _ in reasons if where == "cloud") and sum(cloud_v2.reasons.values()) \
        == cloud_v2.count
    assert by_key[("digits", 9, "cloud")].count == 1 and by_key[("big", 4, "cloud")].count == 1
    assert device.telemetry.reasons_unplaced == 0
