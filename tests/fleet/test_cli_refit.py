"""`fleet classes refit NAME [--accept]`, `fleet classes show` and `fleet status` through typer's CliRunner against
the real cloud (tests/cloud_server.py), fed by telemetry over the devices' own endpoint: a refit that moves a class
too far is shown and held until --accept, and the views give figures per inference (a batched request is one
inference per row) beside the per-request ones."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace

import pytest

from edgefleet.protos.messages import ModelStatus, ReportedState, TelemetryBatch, TelemetryWindow
from tests.cloud_server import enroll_device, tiny_onnx


def post(cloud, device_id: str, token: str, channel: str, msg) -> None:
    with cloud.client(token=token) as http:
        r = http.post(f"/api/v1/devices/{device_id}/{channel}", content=msg.to_wire(),
                      headers={"Content-Type": "application/json"})
        assert r.status_code < 300, r.text


def batched_window(model: str, version: int, end: datetime) -> TelemetryWindow:
    """10 requests of 1,200 rows, 110 ms and 708 mJ each: the issue's rpi4 window, as an agent now reports it."""
    return TelemetryWindow(model=model, version=version, start=end - timedelta(seconds=60), end=end, count=10,
                           errors=0, rows=12_000, p50_ms=110.0, p95_ms=110.0, p99_ms=110.0, mean_ms=110.0,
                           row_ms=110.0 / 1200, mean_mj=708.0, row_mj=708.0 / 1200, energy_source="estimated",
                           energy_meter="modelled")


def test_a_refit_that_moves_the_class_too_far_is_shown_and_held_until_accept(cli, cloud):
    onnx = tiny_onnx()
    v = SimpleNamespace(precision="fp32", runtime="onnxruntime", fmt="onnx", data=onnx)
    version = cloud.fleet.register_variant("tiny", v, onnx, device_class="rpi4", job_id=None, macs=400_000,
                                           predicted_p95_ms=0.38, predicted_mj=1.36).version
    now = datetime.now(timezone.utc)
    # An agent older than row counts: each 1,200-row request read as one inference of 110 ms.
    old = TelemetryWindow.model_validate({
        "model": "tiny", "version": version, "start": (now - timedelta(seconds=60)).isoformat(),
        "end": now.isoformat(), "count": 100, "errors": 0, "p50_ms": 110.0, "p95_ms": 110.0, "p99_ms": 110.0,
        "mean_mj": 708.0, "energy_source": "estimated", "energy_meter": "modelled"})
    with cloud.client() as c:
        token = enroll_device(c, "pi-cli-1", "rpi4").device_token
    post(cloud, "pi-cli-1", token, "telemetry", TelemetryBatch(device_id="pi-cli-1", seq=1, sent_at=now,
                                                               windows=[old]))

    held = cli.ok("classes", "refit", "rpi4")
    assert "held, not applied" in held.stdout and "fleet classes refit rpi4 --accept" in held.stdout
    assert "fp32 throughput 3 -> " in held.stdout and "slower, more than 3x" in held.stdout
    assert "warning: refit of rpi4 held, not applied: fp16 throughput" in held.stderr
    view = json.loads(cli.ok("classes", "refit", "rpi4", "--json").stdout)
    assert view["applied"] is False and view["held"] and view["proposed"]["source"] == "fleet (1 windows)"
    assert "assumed" in cli.ok("classes", "show", "rpi4").stdout  # nothing changed

    accepted = cli.ok("classes", "refit", "rpi4", "--accept")
    assert "applied (accepted past the hold)" in accepted.stdout and "warning:" not in accepted.stderr
    detail = json.loads(cli.ok("classes", "show", "rpi4", "--json").stdout)
    assert detail["calibration"]["source"] == "fleet (1 windows)"


def test_classes_show_and_status_give_figures_per_inference(cli, cloud, tmp_path: Path):
    onnx = tiny_onnx()
    v = SimpleNamespace(precision="fp32", runtime="onnxruntime", fmt="onnx", data=onnx)
    version = cloud.fleet.register_variant("tiny", v, onnx, device_class="rpi4", job_id=None, macs=400_000,
                                           predicted_p95_ms=0.38, predicted_mj=1.36).version
    with cloud.client() as c:
        token = enroll_device(c, "pi-cli-2", "rpi4").device_token
    cli.ok("deploy", "tiny", "--version", str(version), "--device", "pi-cli-2")
    now = datetime.now(timezone.utc)
    desired = json.loads(cli.ok("devices", "show", "pi-cli-2", "--json").stdout)["desired_generation"]
    post(cloud, "pi-cli-2", token, "reported", ReportedState(
        device_id="pi-cli-2", generation=desired, reported_at=now,
        models=[ModelStatus(name="tiny", active_version=version, target_version=version, state="active")]))
    post(cloud, "pi-cli-2", token, "telemetry", TelemetryBatch(device_id="pi-cli-2", seq=1, sent_at=now,
                                                               windows=[batched_window("tiny", version, now)]))

    [row] = [r for r in json.loads(cli.ok("status", "--json").stdout) if r["device_id"] == "pi-cli-2"]
    assert (row["requests"], row["rows"], row["p95_ms"], row["mean_mj"]) == (10, 12_000, 110.0, 708.0)
    assert row["row_mj"] == pytest.approx(0.59) and row["row_ms"] == pytest.approx(110.0 / 1200)
    table = cli.ok("status").stdout
    assert "mJ/inf" in table and "inf/req" in table and "0.590" in table and "1200.0" in table
    assert "708" not in table  # the per-request energy is in --json, never shown as "mJ/inf"
    shown = cli.ok("devices", "show", "pi-cli-2").stdout
    assert "12000" in shown and "0.590" in shown

    detail = json.loads(cli.ok("classes", "show", "rpi4", "--json").stdout)
    [measured] = detail["variants"]
    assert (measured["inferences"], measured["requests"], measured["batch"]) == (12_000, 10, 1200.0)
    assert measured["measured_mj"] == pytest.approx(0.59) and measured["measured_p95_ms"] == 110.0
    table = cli.ok("classes", "show", "rpi4").stdout
    assert "mJ/inf meas." in table and "0.590" in table and "1200.0" in table
