"""The calibration refit against the real cloud (tests/cloud_server.py), fed over the devices' own telemetry endpoint:
per inference (a batched request is one inference per row), only from windows of enough rows, and a refit that
would move a class by more than the stated factor held until the operator accepts it (REST; the CLI is in
tests/fleet/test_cli_refit.py). The automatic refit before a distillation is the same call without `accept`. On
SQLite and PostgreSQL (the `db_url` fixture)."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace

import pytest

from edgefleet.cloud.catalog import builtin_catalog
from edgefleet.cloud.distill import costmodel as cm
from edgefleet.cloud.services_distill import REFIT_MIN_ROWS
from edgefleet.protos.jobs import ClassDetailView, RefitView
from edgefleet.protos.messages import TelemetryBatch, TelemetryWindow
from tests.cloud_server import cloud_server, enroll_device, tiny_onnx

RPI4 = cm.default_calibration(builtin_catalog()["rpi4"])
# The devices as they really are: within 3x of the assumed rpi4 figures (fp32 3 GMAC/s, 0.08 ms per call).
TRUTH = replace(RPI4, gmacs_per_s={"fp32": 2.5, "fp16": 2.0, "int8": 5.0}, overhead_ms=0.1)
MACS = (100_000, 400_000)


@pytest.fixture
def server(tmp_path: Path, db_url: str):
    with cloud_server(tmp_path / "cloud", db_url=db_url) as s:
        yield s


def variant(fleet, macs: int) -> int:
    """A distilled fp32 variant built for rpi4 (a new version of "tiny"), as a distillation registers it."""
    onnx = tiny_onnx()
    v = SimpleNamespace(precision="fp32", runtime="onnxruntime", fmt="onnx", data=onnx)
    predicted = cm.latency_ms(macs, RPI4, "fp32")
    row = fleet.register_variant("tiny", v, onnx, device_class="rpi4", job_id=None, macs=macs,
                                 predicted_p95_ms=predicted * RPI4.p95_factor,
                                 predicted_mj=RPI4.active_watts * predicted)
    return row.version


def window(version: int, macs: int, *, requests: int, batch: int, end: datetime, device=TRUTH) -> TelemetryWindow:
    """What an agent on `device` reports for requests of `batch` rows each (the modelled meter: watts x busy)."""
    request_ms = cm.latency_ms(macs * batch, device, "fp32")
    return TelemetryWindow(model="tiny", version=version, start=end - timedelta(seconds=60), end=end,
                           count=requests, errors=0, rows=requests * batch, p50_ms=request_ms, p95_ms=request_ms,
                           p99_ms=request_ms, mean_ms=request_ms, row_ms=request_ms / batch,
                           mean_mj=device.active_watts * request_ms, row_mj=device.active_watts * request_ms / batch,
                           energy_source="estimated", energy_meter="modelled")


def send(server, device_id: str, token: str, seq: int, windows: list) -> None:
    """Over the devices' own HTTP telemetry endpoint: parsed and checked by the contract, stored by the store."""
    batch = TelemetryBatch(device_id=device_id, seq=seq, sent_at=datetime.now(timezone.utc), windows=windows)
    with server.client(token=token) as http:
        r = http.post(f"/api/v1/devices/{device_id}/telemetry", content=batch.to_wire(),
                      headers={"Content-Type": "application/json"})
        assert r.status_code < 300, r.text


def refit(client, accept: bool = False) -> RefitView:
    r = client.post("/api/v1/classes/rpi4/refit", params={"accept": "true"} if accept else None)
    assert r.status_code == 200, r.text
    return RefitView.model_validate(r.json())


def test_a_batched_window_no_longer_skews_the_refit(server):
    """The issue's rpi4: one variant served in requests of 1,200 rows (about 190 ms and 1,230 mJ each). Counted per
    row it fits the device as it is, so the refit applies and predicts what the devices do."""
    v1, v2 = (variant(server.fleet, m) for m in MACS)
    now = datetime.now(timezone.utc)
    with server.client() as c:
        device = enroll_device(c, "pi-1", "rpi4")
        send(server, "pi-1", device.device_token, 1, [window(v1, MACS[0], requests=200, batch=1, end=now),
                                                      window(v2, MACS[1], requests=10, batch=1200, end=now)])
        view = refit(c)
        assert view.applied and not view.held and (view.windows, view.inferences) == (2, 200 + 12_000)
        fitted = view.proposed.values
        assert fitted["gmacs_per_s"]["fp32"] == pytest.approx(2.5, rel=1e-3)
        assert fitted["overhead_ms"] == pytest.approx(0.1, rel=1e-2)
        assert fitted["active_watts"] == pytest.approx(RPI4.active_watts, rel=1e-6)  # watts x busy, per row
        detail = ClassDetailView.model_validate(c.get("/api/v1/classes/rpi4").json())
        assert detail.calibration.source == "fleet (2 windows)"  # the next distillation predicts with it
        batched = next(v for v in detail.variants if v.version == v2)
        assert (batched.inferences, batched.requests, batched.batch) == (12_000, 10, 1200.0)
        # Per inference, the batched variant costs about what the model predicts for one row, not 1,200x it.
        assert batched.measured_mj == pytest.approx(TRUTH.active_watts * cm.latency_ms(1200 * MACS[1], TRUTH,
                                                                                         "fp32") / 1200)
        assert batched.measured_mj < 2 * batched.predicted_mj


def test_windows_below_the_minimum_rows_are_left_out(server):
    v1, v2 = (variant(server.fleet, m) for m in MACS)
    now = datetime.now(timezone.utc)
    # Ten times slower than the truth, in windows too small to learn from: a cold start, say.
    cold = replace(TRUTH, gmacs_per_s={k: g / 10 for k, g in TRUTH.gmacs_per_s.items()}, overhead_ms=1.0)
    small = REFIT_MIN_ROWS - 1
    with server.client() as c:
        device = enroll_device(c, "pi-2", "rpi4")
        token = device.device_token
        send(server, "pi-2", token, 1, [window(v, m, requests=small, batch=1, end=now - timedelta(minutes=5),
                                               device=cold) for v, m in zip((v1, v2), MACS)])
        r = c.post("/api/v1/classes/rpi4/refit")
        assert r.status_code == 422 and f"2 window(s) had fewer than {REFIT_MIN_ROWS} rows" in r.json()["message"]
        send(server, "pi-2", token, 2, [window(v, m, requests=REFIT_MIN_ROWS, batch=1, end=now)
                                        for v, m in zip((v1, v2), MACS)])
        view = refit(c)
        assert view.applied and (view.windows, view.windows_ignored, view.min_rows) == (2, 2, REFIT_MIN_ROWS)
        assert view.proposed.values["gmacs_per_s"]["fp32"] == pytest.approx(2.5, rel=1e-3)  # the cold ones: out
        assert view.proposed.values["overhead_ms"] == pytest.approx(0.1, rel=1e-2)
        # One request of 50 rows is a window large enough: it is inferences that count, not requests. Mixed with
        # single-row windows of the same variant it still fits the same device (a request's cost is linear in rows).
        send(server, "pi-2", token, 3, [window(v1, MACS[0], requests=1, batch=REFIT_MIN_ROWS,
                                               end=now - timedelta(minutes=1))])
        view = refit(c)
        assert (view.windows, view.windows_ignored) == (3, 2)
        assert view.proposed.values["gmacs_per_s"]["fp32"] == pytest.approx(2.5, rel=1e-3)


def test_a_refit_past_the_factor_is_held_until_accepted(server):
    """The old reading of the issue's telemetry (an agent that did not count rows: each 1,200-row request one
    inference of 190 ms) makes rpi4 hundreds of times slower: shown and held, applied only with accept=true."""
    v1 = variant(server.fleet, MACS[0])
    now = datetime.now(timezone.utc)
    request_ms = cm.latency_ms(MACS[0] * 1200, TRUTH, "fp32")
    old_agent = TelemetryWindow.model_validate({  # no rows: read as batch 1
        "model": "tiny", "version": v1, "start": (now - timedelta(seconds=60)).isoformat(), "end": now.isoformat(),
        "count": 100, "errors": 0, "p50_ms": request_ms, "p95_ms": request_ms, "p99_ms": request_ms,
        "mean_mj": TRUTH.active_watts * request_ms, "energy_source": "estimated", "energy_meter": "modelled"})
    assert (old_agent.rows, old_agent.row_ms) == (100, request_ms)
    fleet = server.fleet
    with server.client() as c:
        device = enroll_device(c, "pi-3", "rpi4")
        send(server, "pi-3", device.device_token, 1, [old_agent])
        before = ClassDetailView.model_validate(c.get("/api/v1/classes/rpi4").json()).calibration
        view = refit(c)
        assert not view.applied and not view.accepted and view.max_factor == cm.MAX_REFIT_FACTOR
        assert any(line.startswith("fp32 throughput 3 -> ") and "slower, more than 3x" in line for line in view.held)
        assert view.current == before and view.proposed.values["gmacs_per_s"]["fp32"] < 3.0 / 100
        assert ClassDetailView.model_validate(c.get("/api/v1/classes/rpi4").json()).calibration == before
        # The automatic refit before each distillation is this same call without accept: it never applies it.
        assert fleet.refit_calibration("rpi4").applied is False
        assert fleet.calibration("rpi4") == RPI4
        assert fleet.stats().counters["calibrations_refit_held"] == 2
        accepted = refit(c, accept=True)
        assert accepted.applied and accepted.accepted and accepted.held == view.held
        after = ClassDetailView.model_validate(c.get("/api/v1/classes/rpi4").json()).calibration
        assert after.source == "fleet (1 windows)" and after.values == accepted.proposed.values
        assert fleet.calibration("rpi4").gmacs_per_s["fp32"] == pytest.approx(
            accepted.proposed.values["gmacs_per_s"]["fp32"])
        # From the accepted figures, the same telemetry is no longer a move: a refit now applies without asking.
        assert refit(c).applied
