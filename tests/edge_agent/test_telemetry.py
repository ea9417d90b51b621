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
    # The provenance rounds each latency to 0.1 us (4 decimals of a ms): at most 3 x 0.05 us off in all.
    assert w.row_ms == pytest.approx(sum(p["latency_ms"] for p in provenance) / 1208, rel=1e-3, abs=3 * 5e-5 / 1208)
    assert batch_rows({"x": np.zeros((5, 3))}) == 5 and batch_rows({"x": np.float32(1.0)}) == 1
    assert batch_rows({"a": np.zeros((2, 1)), "b": np.zeros((9, 1))}, ["b", "a"]) == 9  # the model's first input
    assert batch_rows({"x": np.zeros((0, 3))}) == 1 and batch_rows({}) == 1


# -- measured energy: window meters read at the edges, shared by busy time ----------------------------------------


def _rapl_tree(tmp_path):
    import shutil

    from tests.edge_agent.meters.conftest import FIXTURES

    shutil.copytree(FIXTURES / "intel-x86-rapl", tmp_path / "rapl", symlinks=True)
    return tmp_path / "rapl" / "sys", tmp_path / "rapl" / "sys" / "class" / "powercap" / "intel-rapl:0" / "energy_uj"


def test_a_counter_meter_gives_windows_gross_and_net_energy_shared_by_busy_time(tmp_path):
    from edgefleet.edge_agent.meters.rapl import RaplMeter

    root, energy_uj = _rapl_tree(tmp_path)
    base = int(energy_uj.read_text())
    meter = RaplMeter(root, "package")
    tel = make(tmp_path)
    tel.attach_meter(meter, T0 - timedelta(seconds=1), idle_w=0.5)  # read at attach: the window is covered from here
    energy_uj.write_text(str(base + 1_000_000))  # 1 J by T0 (the edge is interpolated: 1 s before, 1 J)
    tel.flush(T0)
    # Window [T0, T0+60): model a 300 ms busy over 30 rows in 3 requests, model b 100 ms over 10 single rows.
    for _ in range(3):
        tel.record("a", 1, 100.0, T0 + timedelta(seconds=5), energy_source="measured", energy_meter="rapl", rows=10)
    for _ in range(10):
        tel.record("b", 2, 10.0, T0 + timedelta(seconds=6), energy_source="measured", energy_meter="rapl")
    tel.record("b", 2, 5.0, T0 + timedelta(seconds=7), ok=False)  # failed: no share
    energy_uj.write_text(str(base + 1_000_000 + 40_000_000))  # 40 J over the 60 s window
    assert tel.flush(T0 + timedelta(seconds=59)) == []
    [batch] = tel.flush(T0 + timedelta(seconds=60))
    a, b = parse_message(batch.to_wire(), TelemetryBatch).windows  # the contract accepts them
    # 40 J: a has 0.3 / 0.4 of the busy time (30 J), b 0.1 / 0.4 (10 J). Net: 40 - 0.5 W x 60 s = 10 J.
    assert a.row_mj == pytest.approx(30_000 / 30) and a.mean_mj == pytest.approx(30_000 / 3)
    assert b.row_mj == pytest.approx(10_000 / 10) and b.mean_mj == pytest.approx(10_000 / 10)
    assert a.row_net_mj == pytest.approx(7_500 / 30) and b.row_net_mj == pytest.approx(2_500 / 10)
    for w in (a, b):
        assert (w.energy_source, w.energy_meter, w.energy_method, w.energy_hz, w.idle_w) == (
            "measured", "rapl", "counter", None, 0.5)


def test_a_sampled_meter_labels_its_rate_and_a_failed_read_costs_only_those_windows(tmp_path):
    from edgefleet.edge_agent.meters import CumulativeMeter, MeterReadError

    class Scripted(CumulativeMeter):
        """A window meter whose cumulative joules a test sets; `None` fails the next read."""

        name, method, scope, hz = "ina3221", "sampled", "board", 10.0

        def __init__(self) -> None:
            super().__init__()
            self.joules: float | None = 0.0

        def _read_j(self) -> float:
            if self.joules is None:
                raise MeterReadError("ina3221: sensor gone")
            return self.joules

    meter = Scripted()
    tel = make(tmp_path)
    tel.attach_meter(meter, T0)  # no idle watts known: no net figure
    tel.record("m", 1, 20.0, T0 + timedelta(seconds=1), energy_source="measured", energy_meter="ina3221", rows=4)
    meter.joules = 12.0
    [batch] = tel.flush(T0 + timedelta(seconds=60))
    [w] = parse_message(batch.to_wire(), TelemetryBatch).windows
    assert (w.energy_method, w.energy_hz, w.row_mj, w.mean_mj, w.row_net_mj, w.idle_w) == (
        "sampled", 10.0, pytest.approx(3_000.0), pytest.approx(12_000.0), None, None)
    tel.record("m", 1, 20.0, T0 + timedelta(seconds=61), energy_source="measured", energy_meter="ina3221")
    meter.joules = None  # the closing read fails: that window has no figure, labelled "none", and still goes out
    [batch] = tel.flush(T0 + timedelta(seconds=120))
    [w] = parse_message(batch.to_wire(), TelemetryBatch).windows
    assert (w.count, w.energy_source, w.mean_mj, w.row_mj, w.energy_method) == (1, "none", None, None, "")
    assert tel.meter_read_errors == 1


def test_the_modelled_meter_keeps_its_per_request_meaning_with_a_net_figure(tmp_path):
    installer = kit.install_direct(tmp_path / "models", version=1, tmp=tmp_path)
    tel = make(tmp_path)
    meter = ModelledMeter(active_watts=4.0, idle_watts=1.0)
    tel.attach_meter(meter, T0, idle_w=meter.idle_watts)
    service = InferenceService(installer, meter=meter, telemetry=tel, clock=lambda: T0)
    service.load_active()
    body = {"inputs": [{"name": "x", "shape": [8, 3], "datatype": "FP32", "data": [0.5] * 24}]}
    latencies = [service.infer("digits", InferRequest.model_validate(body)).parameters["latency_ms"]
                 for _ in range(3)]
    [batch] = tel.flush(T0 + timedelta(seconds=60))
    [w] = parse_message(batch.to_wire(), TelemetryBatch).windows
    busy_ms = sum(latencies)
    # the reply rounds latency_ms to 0.1 us: up to 0.05 us off per request, which on a ~30 us model is more than 1e-3
    rounding_ms = 0.5e-4 * len(latencies)
    assert (w.energy_source, w.energy_meter, w.energy_method, w.idle_w) == ("estimated", "modelled", "modelled", 1.0)
    assert w.row_mj == pytest.approx(4.0 * busy_ms / 24, rel=1e-3, abs=4.0 * rounding_ms / 24)  # W x ms = mJ, 24 rows
    assert w.row_net_mj == pytest.approx((4.0 - 1.0) * busy_ms / 24, rel=1e-3,
                                         abs=(4.0 - 1.0) * rounding_ms / 24)  # (active - idle) x busy


def test_idle_power_is_measured_over_periods_without_requests_when_none_is_configured(tmp_path):
    from edgefleet.edge_agent.meters import CumulativeMeter

    class Counter(CumulativeMeter):
        name, method, scope, hz = "rapl", "counter", "package", None

        def __init__(self) -> None:
            super().__init__()
            self.joules = 0.0

        def _read_j(self) -> float:
            return self.joules

    meter, tel = Counter(), make(tmp_path)
    tel.attach_meter(meter, T0)  # no idle watts configured
    # Busy period [T0, T0+60): 30 J, and no idle figure known yet: gross only.
    tel.record("m", 1, 100.0, T0 + timedelta(seconds=5), energy_source="measured", energy_meter="rapl", rows=10)
    meter.joules = 30.0
    [batch] = tel.flush(T0 + timedelta(seconds=60))
    [w] = batch.windows
    assert (w.row_mj, w.row_net_mj, w.idle_w) == (pytest.approx(3_000.0), None, None)
    # Three idle periods at 0.2, 0.25 and 0.3 W (read every second, as the daemon's tick does): median 0.25 W.
    for period, watts in enumerate((0.2, 0.25, 0.3), start=1):
        for second in range(1, 61):
            meter.joules += watts
            assert tel.flush(T0 + timedelta(seconds=60 * period + second)) == []
    assert tel.measured_idle_w == pytest.approx(0.25)
    # The next busy period: 45 J gross, net of 0.25 W x 60 s = 15 J -> 30 J over 10 rows.
    tel.record("m", 1, 100.0, T0 + timedelta(seconds=245), energy_source="measured", energy_meter="rapl", rows=10)
    meter.joules += 45.0
    [batch] = tel.flush(T0 + timedelta(seconds=300))
    [w] = parse_message(batch.to_wire(), TelemetryBatch).windows
    assert (w.row_mj, w.row_net_mj, w.idle_w) == (pytest.approx(4_500.0), pytest.approx(3_000.0),
                                                  pytest.approx(0.25))
