"""edge_agent/telemetry.py and meters: windows, percentiles, energy, the outbox's seq, acks and counted drops, and
requests against rows (a batched request is as many inferences as it has rows, through the real inference service)."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import pytest

from edgefleet.edge_agent.inference import InferenceService, batch_rows
from edgefleet.edge_agent.meters import EnergyMeter, ModelledMeter, NullMeter
from edgefleet.edge_agent.outbox import Outbox
from edgefleet.edge_agent.telemetry import Telemetry, percentile
from edgefleet.protos.limits import MAX_ENERGY_MJ, MAX_LATENCY_MS, MAX_ROWS_PER_S
from edgefleet.protos.messages import TelemetryBatch, parse_message
from edgefleet.protos.oip import InferRequest
from tests.edge_agent import agent_testkit as kit

T0 = kit.T0  # a multiple of 60 s since the epoch


def make(tmp_path, max_bytes=1 << 20, window_s=60) -> Telemetry:
    return Telemetry("dev-1", window_s, Outbox(tmp_path / "outbox", max_bytes))


def test_modelled_meter():
    meter = ModelledMeter(active_watts=5.0, idle_watts=2.0)
    assert isinstance(meter, EnergyMeter) and meter.source == "estimated" and meter.name == "modelled"
    assert meter.joules_for(0.01) == pytest.approx(0.05)
    assert meter.stop(meter.start(), 0.002) == pytest.approx(0.01)
    assert NullMeter().stop(None, 1.0) is None and NullMeter().source == "none"
    with pytest.raises(ValueError):
        ModelledMeter(active_watts=0)


def test_percentile_nearest_rank():
    values = sorted(float(v) for v in range(1, 101))
    assert (percentile(values, 50), percentile(values, 95), percentile(values, 99)) == (50.0, 95.0, 99.0)
    assert percentile([], 50) is None and percentile([7.0], 99) == 7.0


def test_windows_close_on_time_with_stats(tmp_path):
    tel = make(tmp_path)
    for i in range(1, 101):
        tel.record("digits", 2, float(i), T0 + timedelta(seconds=1), energy_mj=10.0 * (i % 2 + 1),
                   energy_source="estimated", energy_meter="modelled")
    tel.record("digits", 2, 999.0, T0 + timedelta(seconds=2), ok=False)
    tel.record("other", 1, 5.0, T0 + timedelta(seconds=61))  # next window
    assert tel.flush(T0 + timedelta(seconds=59)) == []  # not closed yet
    (batch,) = tel.flush(T0 + timedelta(seconds=60))
    (w,) = batch.windows
    assert (w.model, w.version, w.count, w.errors) == ("digits", 2, 101, 1)
    assert (w.p50_ms, w.p95_ms, w.p99_ms) == (50.0, 95.0, 99.0)  # the error's latency is not a sample
    assert w.mean_mj == pytest.approx(15.0) and w.energy_source == "estimated" and w.energy_meter == "modelled"
    assert (w.start, w.end) == (T0, T0 + timedelta(seconds=60))
    assert tel.open_windows() == 1
    (batch2,) = tel.flush(T0 + timedelta(seconds=120))
    assert batch2.seq == batch.seq + 1 and batch2.windows[0].energy_source == "none"


def test_outbox_survives_restart_and_drains_on_ack(tmp_path):
    tel = make(tmp_path)
    for n in range(3):
        tel.record("m", 1, 1.0, T0 + timedelta(seconds=60 * n))
    batches = tel.flush(T0 + timedelta(seconds=60 * 3))
    assert [b.seq for b in batches] == [0]  # one flush, one batch of three windows
    tel.record("m", 1, 1.0, T0 + timedelta(seconds=200))
    tel.flush(T0 + timedelta(seconds=300))
    outbox = Outbox(tmp_path / "outbox", 1 << 20)  # restart
    pending = outbox.pending()
    assert [b.seq for b in pending] == [0, 1] and len(pending[0].windows) == 3
    assert parse_message(pending[0].to_wire(), TelemetryBatch) == pending[0]
    assert outbox.ack(0) and not outbox.ack(0)
    assert [b.seq for b in Outbox(tmp_path / "outbox", 1 << 20).pending()] == [1]
    for seq in (1,):
        outbox.ack(seq)
    # seq keeps rising after everything was acknowledged and the process restarted
    again = Outbox(tmp_path / "outbox", 1 << 20)
    assert again.add("dev-1", [], T0).seq == 2


def test_full_outbox_drops_oldest_and_counts(tmp_path):
    tel = make(tmp_path, max_bytes=1500)
    made = []
    for n in range(8):
        tel.record("m", 1, 1.0, T0 + timedelta(seconds=60 * n))
        tel.record("m", 2, 1.0, T0 + timedelta(seconds=60 * n))
        made += tel.flush(T0 + timedelta(seconds=60 * (n + 1)))
    outbox = tel.outbox
    pending = outbox.pending()
    assert outbox.size_bytes() <= 1500 and 1 <= len(pending) < 8
    assert [b.seq for b in pending] == [b.seq for b in made[-len(pending):]]  # the OLDEST went
    # Nothing dropped silently: every window is pending or counted as dropped...
    assert sum(len(b.windows) for b in pending) + outbox.dropped_total == 16
    # ...and every drop is reported in some batch's dropped_windows, or waits for the next batch.
    assert sum(b.dropped_windows for b in made) + outbox.dropped_pending == outbox.dropped_total
    waiting = outbox.dropped_pending
    assert waiting > 0 and outbox.add("dev-1", [], T0).dropped_windows == waiting
    assert Outbox(tmp_path / "outbox", 1500).dropped_pending == 0  # persisted across a restart


def test_wild_samples_are_clamped_into_the_contract_so_the_window_still_goes_out(tmp_path):
    # A clock step or a meter glitch once: the window must still be one the cloud accepts, not refused whole.
    tel = make(tmp_path)
    for latency, energy in ((2.0, 1.0), (1e12, float("inf")), (-5.0, -3.0), (float("nan"), float("nan"))):
        tel.record("m", 1, latency, T0 + timedelta(seconds=1), energy_mj=energy, energy_source="estimated",
                   energy_meter="modelled")
    [batch] = tel.flush(T0 + timedelta(seconds=60))
    [w] = parse_message(batch.to_wire(), TelemetryBatch).windows
    assert (w.count, w.p50_ms, w.p99_ms) == (4, 0.0, MAX_LATENCY_MS)
    assert w.mean_mj == pytest.approx((1.0 + MAX_ENERGY_MJ) / 4)


# -- batches: a request of N rows is N inferences ---------------------------------------------------------------


def test_a_batched_request_counts_its_rows_with_per_row_figures(tmp_path):
    tel = make(tmp_path)
    # One request of 1,200 rows (110 ms, 708 mJ: the rpi4 window), then 3 single rows of 0.1 ms / 0.6 mJ.
    tel.record("m", 1, 110.0, T0 + timedelta(seconds=1), energy_mj=708.0, energy_source="estimated",
               energy_meter="modelled", rows=1200)
    for _ in range(3):
        tel.record("m", 1, 0.1, T0 + timedelta(seconds=2), energy_mj=0.6, energy_source="estimated",
                   energy_meter="modelled")
    tel.record("m", 1, 50.0, T0 + timedelta(seconds=3), ok=False, rows=40)  # failed: rows counted, no figures
    tel.record("m", 1, 1.0, T0 + timedelta(seconds=4), rows=0)  # zero rows still paid for a call: one row
    [batch] = tel.flush(T0 + timedelta(seconds=60))
    [w] = parse_message(batch.to_wire(), TelemetryBatch).windows
    assert (w.count, w.errors, w.rows) == (6, 1, 1200 + 3 + 40 + 1)
    assert w.mean_ms == pytest.approx((110.0 + 0.3 + 1.0) / 5)  # per successful request
    assert w.row_ms == pytest.approx((110.0 + 0.3 + 1.0) / 1204)  # per row of the successful requests
    assert w.mean_mj == pytest.approx((708.0 + 1.8) / 4)  # the unmetered request has no energy
    assert w.row_mj == pytest.approx((708.0 + 1.8) / 1203)  # about 0.59 mJ per inference, not 177
    assert w.row_ms <= w.mean_ms and w.row_mj <= w.mean_mj


def test_rows_past_what_a_window_admits_are_capped_so_it_still_goes_out(tmp_path):
    tel = make(tmp_path, window_s=1)
    tel.record("m", 1, 1.0, T0, rows=2**62)  # a hostile [2**62, 0] input: that many rows of nothing
    [batch] = tel.flush(T0 + timedelta(seconds=1))
    [w] = parse_message(batch.to_wire(), TelemetryBatch).windows
    assert w.rows == MAX_ROWS_PER_S and w.count == 1


def test_the_inference_service_records_the_leading_dimension_as_rows(tmp_path):
    """Real ONNX Runtime behind the service: an OIP request of [1200, 3] is 1,200 inferences in telemetry."""
    installer = kit.install_direct(tmp_path / "models", version=1, tmp=tmp_path)
    tel = make(tmp_path)
    service = InferenceService(installer, meter=ModelledMeter(active_watts=4.0), telemetry=tel, clock=lambda: T0)
    service.load_active()
    provenance = []
    for n in (1200, 1, 7):
        body = {"inputs": [{"name": "x", "shape": [n, 3], "datatype": "FP32", "data": [0.5] * (3 * n)}]}
        response = service.infer("digits", InferRequest.model_validate(body))
        assert response.outputs[0].shape == [n, 3]
        provenance.append(response.parameters)
    [batch] = tel.flush(T0 + timedelta(seconds=60))
    [w] = batch.windows
    assert (w.count, w.errors, w.rows) == (3, 0, 1208)
    energy = sum(p["energy_mj"] for p in provenance)  # the meter's figure per request, as the app saw it
    assert w.mean_mj == pytest.approx(energy / 3, rel=1e-4) and w.row_mj == pytest.approx(energy / 1208, rel=1e-4)
    assert w.row_ms == pytest.approx(sum(p["latency_ms"] for p in provenance) / 1208, rel=1e-3)
    assert batch_rows({"x": np.zeros((5, 3))}) == 5 and batch_rows({"x": np.float32(1.0)}) == 1
    assert batch_rows({"a": np.zeros((2, 1)), "b": np.zeros((9, 1))}, ["b", "a"]) == 9  # the model's first input
    assert batch_rows({"x": np.zeros((0, 3))}) == 1 and batch_rows({}) == 1
