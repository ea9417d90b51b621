"""Efficiency over real HTTP (the cloud under uvicorn, tests/cloud_server.py) on SQLite and PostgreSQL:
`GET /api/v1/efficiency` per device, class and model version from telemetry the store holds,
`GET /api/v1/models/{name}/efficiency` against a distillation report, and the figures in `/status` and `/stats`.

`seed_distilled`, `enroll`, `window` and `send` are shared with tests/fleet/test_cli_efficiency.py and
tests/cloud/test_metrics.py.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace
from typing import Any

import pytest

from edgefleet.protos.api import EfficiencyView, ErrorBody, ModelEfficiencyView, StatsView
from edgefleet.protos.distill import CandidateFigures, ClassResult, DistillReport, ModelFigures
from edgefleet.protos.messages import Budgets, TelemetryWindow
from tests.cloud_server import cloud_server, tiny_onnx

_seq = iter(range(1, 1_000_000))


def enroll(fleet: Any, device_id: str, device_class: str) -> None:
    now = datetime.now(timezone.utc)
    fleet.store.enroll_device(device_id, device_class, {}, "test", hashlib.sha256(device_id.encode()).hexdigest(),
                              now)


def window(model: str, version: int, rows: int, mj: float | None, source: str = "estimated", *,
           where: str = "local", ms: float = 2.0, p95: float = 5.0, net: float | None = None,
           age_s: float = 30.0) -> dict[str, Any]:
    """One window of `rows` single-row requests of `mj` mJ each, ended `age_s` ago, as the store takes it."""
    end = datetime.now(timezone.utc) - timedelta(seconds=age_s)
    return TelemetryWindow(
        model=model, version=version, start=end - timedelta(seconds=60), end=end, count=rows, errors=0, rows=rows,
        p50_ms=ms, p95_ms=p95, p99_ms=p95, mean_ms=ms, row_ms=ms, mean_mj=mj, row_mj=mj,
        energy_source=source if mj is not None else "none", energy_meter="rapl" if source == "measured" else "modelled",
        row_net_mj=net, where=where).model_dump()


def send(fleet: Any, device_id: str, *windows: dict[str, Any]) -> None:
    assert fleet.store.add_telemetry(device_id, next(_seq), list(windows), 0, datetime.now(timezone.utc))


def _candidate(name: str, family: str, score: float, mj: float, p95: float, precision: str = "int8"):
    return CandidateFigures(candidate=name, family=family, width_mult=1.0, depth=1, precision=precision,
                            runtime="onnxruntime", accuracy=score, agreement=score, score=score, params=1000,
                            macs=1000, size_bytes=4000, predicted_p95_ms=p95, predicted_mj=mj, fits=True)


def seed_distilled(fleet: Any, model: str = "kws") -> int:
    """A succeeded distill job of `model` for rpi4 (a student, 2 mJ and 4 ms predicted; the teacher 40 mJ, 60 ms)
    and jetson-nano (no candidate fits; teacher 10 mJ, 12 ms), its rpi4 variant registered; the variant's version."""
    now = datetime.now(timezone.utc)
    student = _candidate("mlp-w0.5-d1", "mlp", 0.95, mj=2.0, p95=4.0)
    teacher_rpi = _candidate("teacher", "teacher", 0.97, mj=40.0, p95=60.0, precision="fp32")
    teacher_jetson = _candidate("teacher", "teacher", 0.97, mj=10.0, p95=12.0, precision="fp16")
    report = DistillReport(
        model_name=model, task="classification", teacher=ModelFigures(size_bytes=400_000, accuracy=0.97),
        teacher_output_kind="logits", metric="accuracy against the labels on held-out rows", n_samples=1000,
        n_train=700, n_val=150, n_heldout=150, has_labels=True, temperature=4.0, alpha=0.7, seed=0, created_at=now,
        classes={
            "rpi4": ClassResult(device_class="rpi4", budgets=Budgets(mj_per_inference=5.0), chosen=student,
                                reason="best", calibration_source="assumed", candidates=[student, teacher_rpi],
                                teacher_variant=teacher_rpi, teacher_predicted_mj=40.0,
                                teacher_predicted_p95_ms=60.0),
            "jetson-nano": ClassResult(device_class="jetson-nano", budgets=Budgets(mj_per_inference=1.0),
                                       chosen=None, reason="energy over the budget", candidates=[teacher_jetson],
                                       teacher_variant=teacher_jetson),
        })
    store = fleet.store
    job = store.enqueue_job("distill", spec={"name": model}, inputs={}, max_attempts=1, now=now)
    claimed = store.claim_job("test-worker", kinds=["distill"], lease_s=60, now=now)
    assert claimed is not None and claimed.id == job.id
    onnx = tiny_onnx()
    variant = SimpleNamespace(precision="int8", runtime="onnxruntime", fmt="onnx", data=onnx)
    row = fleet.register_variant(model, variant, onnx, device_class="rpi4", job_id=job.id, predicted_p95_ms=4.0,
                                 predicted_mj=2.0, macs=1000)
    assert store.finish_job(job.id, "test-worker", claimed.attempts, state="succeeded", error=None, now=now,
                            result={"report": report.to_dict(), "versions": []})
    return row.version


@pytest.fixture
def cloud(tmp_path, db_url):
    with cloud_server(tmp_path / "cloud", db_url=db_url, energy_price_per_kwh=0.5,
                      offload_price_per_million=2.0) as server:
        yield server


def test_efficiency_per_device_class_and_version_with_labels_and_costs(cloud):
    fleet = cloud.fleet
    enroll(fleet, "pi-1", "rpi4")
    enroll(fleet, "pi-2", "rpi4")
    enroll(fleet, "x86-1", "x86-cpu")
    send(fleet, "pi-1", window("m", 1, 300, 1.0, "measured", net=0.6), window("m", 1, 100, 1.0, "measured",
                                                                              where="cloud"))
    send(fleet, "pi-2", window("m", 1, 600, 4.0, "estimated"))
    send(fleet, "x86-1", window("m", 2, 1000, 9.0, "estimated"), window("m", 2, 50, None))
    send(fleet, "x86-1", window("m", 2, 999, 1.0, age_s=7200))  # before the look-back: not counted

    with cloud.client() as http:
        r = http.get("/api/v1/efficiency")
        assert r.status_code == 200, r.text
        view = EfficiencyView.model_validate_json(r.content)
        assert view.prices.energy_price_per_kwh == 0.5 and view.window_s == 3600

        pi1 = next(x.figures for x in view.by_device if x.device_id == "pi-1")
        assert (pi1.inferences, pi1.offloaded, pi1.offload_share) == (400, 100, 0.25)
        assert pi1.energy_source == "measured" and pi1.mj_per_inference == pytest.approx(1.0)
        assert pi1.net_mj_per_inference == pytest.approx(0.6)
        assert pi1.cost_per_million == pytest.approx(1.0 * 1e6 / 3.6e9 * 0.5 + 0.25 * 2.0)

        [rpi4] = [x for x in view.by_class if x.device_class == "rpi4"]
        mj = (400 * 1.0 + 600 * 4.0) / 1000
        assert rpi4.figures.inferences == 1000 and rpi4.figures.mj_per_inference == pytest.approx(mj)
        assert rpi4.figures.energy_source == "mixed" and rpi4.figures.measured_share == pytest.approx(0.4)
        assert rpi4.figures.inferences_per_kwh == pytest.approx(3.6e9 / mj)

        [v2] = [x for x in view.by_version if x.version == 2]
        assert (v2.figures.inferences, v2.figures.metered_inferences) == (1050, 1000)
        assert v2.figures.energy_source == "estimated" and v2.figures.mj_per_inference == pytest.approx(9.0)

        total = view.total
        assert total.inferences == 2050 and total.offloaded == 100
        assert total.energy_kwh == pytest.approx((400 * 1.0 + 600 * 4.0 + 1000 * 9.0) / 3.6e9)
        assert total.total_cost == pytest.approx(total.energy_kwh * 0.5 + 100 / 1e6 * 2.0)

        narrowed = EfficiencyView.model_validate_json(http.get("/api/v1/efficiency", params={
            "device_class": "rpi4", "model": "m"}).content)
        assert {x.device_id for x in narrowed.by_device} == {"pi-1", "pi-2"} and narrowed.total.inferences == 1000
        assert EfficiencyView.model_validate_json(http.get("/api/v1/efficiency", params={
            "window_s": 3 * 3600}).content).total.inferences == 2050 + 999

        bad = http.get("/api/v1/efficiency", params={"window_s": 1})
        assert bad.status_code == 422 and "window_s" in bad.text

    with cloud.client(token="") as anon:
        r = anon.get("/api/v1/efficiency")
        assert r.status_code == 401 and ErrorBody.model_validate_json(r.content).error == "unauthorized"


def test_status_and_stats_carry_efficiency(cloud):
    fleet = cloud.fleet
    enroll(fleet, "pi-1", "rpi4")
    send(fleet, "pi-1", window("m", 1, 1000, 0.72, "measured"), window("m", 1, 1000, 0.0, "measured",
                                                                      where="cloud"))
    with cloud.client() as http:
        stats = StatsView.model_validate_json(http.get("/api/v1/stats").content)
    assert stats.counters["telemetry_windows"] == 2 and stats.window_s == 3600
    assert stats.prices is not None and stats.prices.offload_price_per_million == 2.0
    e = stats.efficiency
    assert e is not None and (e.inferences, e.offloaded) == (2000, 1000)
    assert e.energy_kwh == pytest.approx(720 / 3.6e9) and e.offload_cost == pytest.approx(1000 / 1e6 * 2.0)


def test_model_efficiency_compares_the_teacher_with_what_ships_per_class(cloud):
    fleet = cloud.fleet
    version = seed_distilled(fleet)
    enroll(fleet, "pi-1", "rpi4")
    with cloud.client() as http:
        # Before telemetry: the student's side is the report's estimate.
        before = ModelEfficiencyView.model_validate_json(http.get("/api/v1/models/kws/efficiency").content)
        rpi4 = next(c for c in before.classes if c.device_class == "rpi4")
        assert rpi4.version == version and rpi4.inferences == 0
        assert (rpi4.edgefleet.mj_per_inference.value, rpi4.edgefleet.mj_per_inference.source) == (2.0, "estimated")
        assert rpi4.times_better["mj_per_inference"] == pytest.approx(20.0)
        assert any("fleet deploy kws" in n for n in rpi4.notes)

        # 900 local inferences measured at 1.5 mJ, p95 3 ms; 100 offloaded drawing 0.5 mJ on the device.
        send(fleet, "pi-1", window("kws", version, 900, 1.5, "measured", p95=3.0),
             window("kws", version, 100, 0.5, "measured", where="cloud", p95=90.0))
        r = http.get("/api/v1/models/kws/efficiency")
        assert r.status_code == 200, r.text
        view = ModelEfficiencyView.model_validate_json(r.content)
    assert view.model == "kws" and view.prices.energy_price_per_kwh == 0.5
    assert [c.device_class for c in view.classes] == ["jetson-nano", "rpi4"]
    rpi4 = next(c for c in view.classes if c.device_class == "rpi4")
    t, e = rpi4.teacher, rpi4.edgefleet
    assert (t.mj_per_inference.value, t.mj_per_inference.source) == (40.0, "estimated")
    assert t.inferences_per_kwh.value == pytest.approx(3.6e9 / 40.0) and t.p95_ms.value == 60.0
    assert t.cost_per_million.value == pytest.approx(40.0 * 1e6 / 3.6e9 * 0.5)
    mj = (900 * 1.5 + 100 * 0.5) / 1000  # 1.4
    assert (e.mj_per_inference.value, e.mj_per_inference.source) == (pytest.approx(mj), "measured")
    assert (e.offload_share.value, e.offload_share.source) == (pytest.approx(0.1), "measured")
    assert e.cost_per_million.value == pytest.approx(mj * 1e6 / 3.6e9 * 0.5 + 0.1 * 2.0)
    assert (e.p95_ms.value, e.p95_ms.source) == (pytest.approx(3.0), "measured")
    assert (e.accuracy.value, t.accuracy.value) == (0.95, 0.97) and rpi4.accuracy_delta_points == pytest.approx(-2.0)
    assert rpi4.times_better["mj_per_inference"] == pytest.approx(40.0 / mj)
    assert rpi4.times_better["inferences_per_kwh"] == pytest.approx(40.0 / mj)
    assert rpi4.times_better["p95_ms"] == pytest.approx(20.0)
    assert (rpi4.inferences, rpi4.devices, rpi4.candidate, rpi4.precision) == (1000, 1, "mlp-w0.5-d1", "int8")

    jetson = next(c for c in view.classes if c.device_class == "jetson-nano")
    assert jetson.version is None and jetson.teacher.mj_per_inference.value == 10.0
    assert jetson.edgefleet.mj_per_inference.value is None and jetson.edgefleet.mj_per_inference.source == "none"
    assert any("no candidate fits" in n for n in jetson.notes)


def test_model_efficiency_errors_say_what_to_do(cloud):
    with cloud.client() as http:
        r = http.get("/api/v1/models/nope/efficiency")
        assert r.status_code == 404 and "fleet distill" in ErrorBody.model_validate_json(r.content).message
        assert http.post("/api/v1/models", params={"name": "pushed"}, content=tiny_onnx(),
                         headers={"Content-Type": "application/octet-stream"}).status_code == 201
        body = ErrorBody.model_validate_json(http.get("/api/v1/models/pushed/efficiency").content)
    assert "no distilled versions" in body.message and "fleet distill" in body.message
