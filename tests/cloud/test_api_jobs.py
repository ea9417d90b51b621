"""cloud/api/routes_jobs.py against the real cloud (tests/cloud_server.py): submit-time validation (422/413/401),
the job views, logs, cancel, report and plot refusals before success, class details with the calibration in use, a
refit from telemetry of deployed variants; and a whole distillation run by a real worker process whose versions
deploy to their class only."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from edgefleet.protos.jobs import ClassDetailView, JobLogView, JobView
from edgefleet.protos.messages import TelemetryBatch, TelemetryWindow
from tests.cloud_server import cloud_server, enroll_device
from tests.harness import wait_for
from tests.job_kinds import tiny_teacher, tiny_transfer

ROOT = Path(__file__).resolve().parents[2]  # the repo root: `tests.job_kinds` imports from it


@pytest.fixture
def server(tmp_path: Path, db_url: str):
    with cloud_server(tmp_path / "cloud", db_url=db_url, max_transfer_mb=1) as s:
        yield s


@pytest.fixture(scope="module")
def checking_server(tmp_path_factory):
    """One SQLite cloud for the refusals: they happen before the database is written, so one server serves all."""
    with cloud_server(tmp_path_factory.mktemp("checking"), max_transfer_mb=1) as s:
        yield s


def post_distill(client, spec: dict, teacher: bytes | None = None, data: bytes | None = None):
    files = {"teacher": ("teacher.onnx", tiny_teacher() if teacher is None else teacher),
             "data": ("transfer.npz", tiny_transfer() if data is None else data)}
    return client.post("/api/v1/distill", files=files, data={"spec": json.dumps(spec)})


SPEC = {"name": "tiny", "classes": ["x86-cpu"], "max_epochs": 3}


@pytest.mark.parametrize("spec, teacher, data, status, words", [
    ({**SPEC, "classes": ["nope"]}, None, None, 422, "unknown device class 'nope'"),
    ({**SPEC, "max_epoch": 3}, None, None, 422, "spec.max_epoch: unknown field"),
    ({**SPEC, "name": "Bad Name"}, None, None, 422, "spec.name"),
    ({**SPEC, "task": "ranking"}, None, None, 422, "spec.task"),
    (SPEC, b"not onnx", None, 422, ""),
    (SPEC, None, b"not an npz", 422, ""),
    (SPEC, None, tiny_transfer(n_in=5), 422, ""),  # shape mismatch against the teacher's [N, 8]
    (SPEC, None, b"", 422, "the transfer set is empty"),
    (SPEC, None, tiny_transfer(rows=40_000), 413, "max_transfer_mb"),
])
def test_submit_refuses_bad_input_before_queueing(checking_server, spec, teacher, data, status, words):
    with checking_server.client() as c:
        r = post_distill(c, spec, teacher, data)
        assert r.status_code == status, r.text
        assert words in r.json()["message"]
        assert c.get("/api/v1/jobs").json() == []  # nothing was queued


def test_submit_needs_the_admin_token_and_a_spec(checking_server):
    with checking_server.client(token="") as anon:
        assert post_distill(anon, SPEC).status_code == 401
    with checking_server.client() as c:
        r = c.post("/api/v1/distill", files={"teacher": ("t.onnx", tiny_teacher())})
        assert r.status_code == 422 and r.json()["error"] == "invalid"
        r = c.post("/api/v1/distill", files={"teacher": ("t", tiny_teacher()), "data": ("d", tiny_transfer())},
                   data={"spec": "{not json"})
        assert r.status_code == 422 and "spec is not valid JSON" in r.json()["message"]


def test_queued_job_views_logs_and_cancel(server):
    with server.client() as c:
        r = post_distill(c, SPEC)
        assert r.status_code == 201, r.text
        job = JobView.model_validate(r.json())
        assert (job.state, job.stage, job.attempts, job.spec["name"]) == ("queued", "queued", 0, "tiny")
        assert job.spec["distill"]["classes"] == ["x86-cpu"] and job.spec["distill"]["max_epochs"] == 3
        assert [j["id"] for j in c.get("/api/v1/jobs").json()] == [job.id]
        assert c.get("/api/v1/jobs", params={"state": "running"}).json() == []
        assert c.get(f"/api/v1/jobs/{job.id}").json()["id"] == job.id
        logs = JobLogView.model_validate(c.get(f"/api/v1/jobs/{job.id}/logs").json())
        assert [x.line for x in logs.lines] == ["queued (distill)"] and logs.next == 1
        assert c.get(f"/api/v1/jobs/{job.id}/logs", params={"since": 1}).json()["lines"] == []
        for path in ("report", "plot.svg"):
            r = c.get(f"/api/v1/jobs/{job.id}/{path}")
            assert r.status_code == 404 and "queued" in r.json()["message"]
        r = c.post(f"/api/v1/jobs/{job.id}/cancel")
        assert r.status_code == 200 and r.json()["state"] == "cancelled"
        assert c.get("/api/v1/jobs/999").status_code == 404
        assert c.post("/api/v1/jobs/999/cancel").status_code == 404


def _variant(fleet, name: str, device_class: str, precision: str, macs: int, p95: float, mj: float):
    from types import SimpleNamespace

    from tests.cloud_server import tiny_onnx

    onnx = tiny_onnx()
    v = SimpleNamespace(precision=precision, runtime="onnxruntime", fmt="onnx", data=onnx)
    return fleet.register_variant(name, v, onnx, device_class=device_class, job_id=None, predicted_p95_ms=p95,
                                  predicted_mj=mj, macs=macs)


def test_class_detail_and_refit_from_telemetry(server):
    fleet = server.fleet
    v1 = _variant(fleet, "tiny", "rpi4", "fp32", 100_000, 1.0, 2.0)
    v2 = _variant(fleet, "tiny", "rpi4", "fp32", 400_000, 3.0, 6.0)
    with server.client() as c:
        detail = ClassDetailView.model_validate(c.get("/api/v1/classes/rpi4").json())
        assert detail.info.name == "rpi4" and detail.calibration.source.startswith("assumed")
        assert [(v.version, v.predicted_p95_ms, v.measured_p95_ms) for v in detail.variants] == [(1, 1.0, None),
                                                                                                (2, 3.0, None)]
        r = c.post("/api/v1/classes/rpi4/refit")
        assert r.status_code == 422 and "no telemetry" in r.json()["message"]
        assert c.get("/api/v1/classes/nope").status_code == 422  # unknown_class
        enroll_device(c, "pi-1", "rpi4")
        now = datetime.now(timezone.utc)
        windows = [TelemetryWindow(model="tiny", version=v.version, start=now - timedelta(seconds=60), end=now,
                                   count=100, errors=0, p50_ms=p95 / 2, p95_ms=p95, p99_ms=p95, mean_mj=mj)
                   for v, p95, mj in ((v1, 2.0, 3.0), (v2, 5.0, 9.0))]
        fleet.record_telemetry(TelemetryBatch(device_id="pi-1", seq=1, sent_at=now, windows=windows))
        r = c.post("/api/v1/classes/rpi4/refit")  # about 10x slower than assumed: held for the operator
        assert r.status_code == 200 and r.json()["applied"] is False and r.json()["held"], r.text
        r = c.post("/api/v1/classes/rpi4/refit", params={"accept": "true"})
        assert r.status_code == 200 and r.json()["applied"], r.text
        assert r.json()["proposed"]["samples"] == 2 and r.json()["proposed"]["source"] == "fleet (2 windows)"
        detail = ClassDetailView.model_validate(c.get("/api/v1/classes/rpi4").json())
        assert detail.calibration.source == "fleet (2 windows)"  # the next distillation predicts with this
        assert [(v.measured_p95_ms, v.measured_mj, v.inferences, v.devices) for v in detail.variants] == [
            (2.0, 3.0, 100, 1), (5.0, 9.0, 100, 1)]


def test_a_variant_deploys_to_its_class_only(server):
    _variant(server.fleet, "tiny", "rpi4", "int8", 1000, 1.0, 1.0)
    with server.client() as c:
        r = c.post("/api/v1/deployments", json={"model": "tiny", "version": 1, "device_class": "rpi5"})
        assert r.status_code == 422 and "built for class rpi4, not rpi5" in r.json()["message"]
        r = c.post("/api/v1/deployments", json={"model": "tiny", "version": 1, "device_class": "rpi4"})
        assert r.status_code == 201, r.text
        bundle = server.fleet.store.get_bundle("tiny", 1, "rpi4")
        assert (bundle.manifest["precision"], bundle.manifest["runtime"], bundle.manifest["model_file"]) == (
            "int8", "onnxruntime", "model.onnx")
        assert bundle.manifest["smoke_test"]["rtol"] == 5e-2  # int8 tolerances, not fp32's
        model = next(m for m in c.get("/api/v1/models").json() if m["name"] == "tiny")
        assert (model["built_for_class"], model["precision"], model["format"]) == ("rpi4", "int8", "onnx")


# -------------------------------------------------------------------------------------------- a real distillation


def start_worker(server, name: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
    env |= {"EDGEFLEET_DATABASE_URL": server.settings.database_url, "EDGEFLEET_WORKER_POLL_S": "0.1",
            "PYTHONPATH": os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])}
    log = open(server.data_dir.parent / f"{name}.log", "ab")
    return subprocess.Popen([sys.executable, "-m", "edgefleet.cloud.main", "worker", "--data-dir",
                             str(server.data_dir), "--id", name], stdout=log, stderr=log, env=env)


def test_distillation_end_to_end_with_a_worker_process(server):
    worker = start_worker(server, "w1")
    try:
        with server.client() as c:
            r = post_distill(c, {"name": "tiny", "classes": ["x86-cpu", "rpi4"], "max_epochs": 4,
                                 "max_candidates": 2, "budgets": {"rpi4": {"p95_latency_ms": 50}}})
            assert r.status_code == 201, r.text
            job_id = r.json()["id"]
            job = wait_for(lambda: (j := JobView.model_validate(c.get(f"/api/v1/jobs/{job_id}").json())).finished
                           and j, 120, what="the distillation to finish")
            assert job.state == "succeeded", job.error
            assert {v.device_class for v in job.versions} == {"x86-cpu", "rpi4"}
            report = c.get(f"/api/v1/jobs/{job_id}/report").json()
            assert report["kind"] == "distill_report" and set(report["classes"]) == {"x86-cpu", "rpi4"}
            r = c.get(f"/api/v1/jobs/{job_id}/plot.svg")
            assert r.headers["content-type"].startswith("image/svg+xml") and b"<svg" in r.content
            lines = [x["line"] for x in c.get(f"/api/v1/jobs/{job_id}/logs").json()["lines"]]
            assert "attempt 1/3 claimed by w1" in lines and lines[-1] == "succeeded"
            built = {v.device_class: v for v in job.versions}
            r = c.post("/api/v1/deployments", json={"model": "tiny", "version": built["rpi4"].version,
                                                    "device_class": "rpi4"})
            assert r.status_code == 201, r.text
            r = c.post("/api/v1/deployments", json={"model": "tiny", "version": built["rpi4"].version,
                                                    "device_class": "x86-cpu"})
            assert r.status_code == 422
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(20)


def test_a_build_refits_its_classes_from_fleet_telemetry_first(server):
    """The next build fits the devices as they are: telemetry of deployed rpi4 variants refits rpi4's calibration
    before the worker predicts with it (the job's log names the calibration it used)."""
    fleet = server.fleet
    v1 = _variant(fleet, "old", "rpi4", "fp32", 100_000, 1.0, 2.0)
    v2 = _variant(fleet, "old", "rpi4", "fp32", 400_000, 3.0, 6.0)
    worker = start_worker(server, "w-refit")
    try:
        with server.client() as c:
            enroll_device(c, "pi-9", "rpi4")
            now = datetime.now(timezone.utc)
            windows = [TelemetryWindow(model="old", version=v.version, start=now - timedelta(seconds=60), end=now,
                                       count=50, errors=0, p50_ms=p95 / 2, p95_ms=p95, p99_ms=p95, mean_mj=mj)
                       # within 3x of the assumed rpi4 figures, so the automatic refit applies it
                       for v, p95, mj in ((v1, 0.4, 1.28), (v2, 0.7, 2.24))]
            fleet.record_telemetry(TelemetryBatch(device_id="pi-9", seq=1, sent_at=now, windows=windows))
            r = post_distill(c, {"name": "tiny", "classes": ["rpi4"], "max_epochs": 2, "max_candidates": 1})
            assert r.status_code == 201, r.text
            job_id = r.json()["id"]
            job = wait_for(lambda: (j := JobView.model_validate(c.get(f"/api/v1/jobs/{job_id}").json())).finished
                           and j, 120, what="the distillation to finish")
            assert job.state == "succeeded", job.error
            lines = [x["line"] for x in c.get(f"/api/v1/jobs/{job_id}/logs").json()["lines"]]
            assert any("rpi4 (fleet (2 windows))" in line for line in lines), lines[:5]
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(20)
