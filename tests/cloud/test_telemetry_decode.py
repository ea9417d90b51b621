"""cloud/telemetry_decode.py decides as `TelemetryBatch` does: whatever the fast path accepts, pydantic accepts with
equal fields (hypothesis over windows perturbed at every field's edges: out-of-range numbers, coercible strings and
floats, odd times and offsets, names with a newline, NUL and surrogates, unknown and missing keys), and the batches
a real agent sends take the fast path (so the proof is not vacuous)."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgefleet.cloud.store_telemetry import WINDOW_COLUMNS, BatchIn, reason_rows, window_row
from edgefleet.cloud.telemetry_decode import decode_batch
from edgefleet.edge_agent.outbox import Outbox
from edgefleet.edge_agent.telemetry import Telemetry
from edgefleet.protos.messages import MessageError, TelemetryBatch, parse_message

T = "2026-12-01T10:00:00Z"
T1 = "2026-12-01T10:01:00Z"
BASE_WINDOW: dict[str, Any] = {
    "model": "m", "version": 1, "start": T, "end": T1, "count": 10, "errors": 1, "rows": 40, "p50_ms": 1.0,
    "p95_ms": 2.0, "p99_ms": 3.0, "mean_ms": 1.5, "row_ms": 0.3, "mean_mj": 8.0, "row_mj": 2.0,
    "energy_source": "measured", "energy_meter": "rapl", "energy_method": "counter", "energy_hz": None,
    "row_net_mj": 1.0, "idle_w": 0.5, "where": "local", "reasons": {"local_within_budget": 4}}
BASE_BATCH: dict[str, Any] = {"schema_version": 1, "kind": "telemetry", "device_id": "pi-1", "epoch": 7, "seq": 3,
                              "dropped_windows": 0, "merged_windows": 0, "sent_at": T}

MISSING = object()
INTS = [0, 1, 2, 10, 40, 2**31 - 1, 2**31, 2**63 - 1, 2**63, -1, 10.0, 10.5, "10", True, None, MISSING]
FLOATS = [0, 0.0, -0.0, 0.3, 1.5, 2.0, 3.0, 8.0, 1e-300, -1e-9, 3_600_000.0, 3_600_000.5, 3.6e10, 1e308, "1.0",
          True, None, MISSING, float("nan"), float("inf")]
TIMES = [T, T1, "2026-12-01T10:00:30+02:00", "2026-12-01T10:00:00", "2026-12-01 10:00:00Z", "1969-12-31T23:59:59Z",
         "1970-01-01T00:00:00Z", "8999-12-31T23:59:59Z", "9000-01-01T00:00:00Z", "2026-12-01T10:00:00.123456Z",
         "2026-12-01T10:00:00.1234567Z", "2026-12-02T10:00:00Z", "2026-11-30T10:00:00Z", 1764583200, "", None]
TEXTS = ["", "m", "rapl", "M", "m\n", "a" * 64, "a" * 65, "x\x00", "\ud800", "é", 5, None, MISSING]
CHOICES: dict[str, list[Any]] = {
    "model": TEXTS, "version": INTS, "start": TIMES, "end": TIMES, "count": INTS, "errors": INTS, "rows": INTS,
    "p50_ms": FLOATS, "p95_ms": FLOATS, "p99_ms": FLOATS, "mean_ms": FLOATS, "row_ms": FLOATS, "mean_mj": FLOATS,
    "row_mj": FLOATS, "energy_source": ["measured", "estimated", "none", "other", None, MISSING],
    "energy_meter": TEXTS, "energy_method": ["counter", "sampled", "modelled", "", "x", MISSING],
    "energy_hz": [None, 10.0, 0, -1, 1e6, 1e6 + 1, MISSING], "row_net_mj": FLOATS, "idle_w": FLOATS,
    "where": ["local", "cloud", "edge", MISSING], "surprise": [MISSING, 1],
    "reasons": [{}, {"cloud_probe": 10}, {"a": 5, "b": 6}, {"Bad": 1}, {"x" * 48: 1}, {"x" * 49: 1}, {"ok": -1},
                {"ok": 2**31}, {"ok": 1.0}, {"ok": "1"}, {f"r{i}": 0 for i in range(33)}, [], None, MISSING]}
BATCH_CHOICES: dict[str, list[Any]] = {
    "schema_version": [1, 0, 2, "1", MISSING], "kind": ["telemetry", "reported_state", MISSING],
    "device_id": ["pi-1", "pi/1", "", "p" * 128, "p" * 129, "pi-1\n", MISSING], "epoch": INTS, "seq": INTS,
    "dropped_windows": INTS, "merged_windows": INTS, "sent_at": TIMES, "extra": [MISSING, 0]}


def perturbed(base: dict[str, Any], choices: dict[str, list[Any]]) -> st.SearchStrategy[dict[str, Any]]:
    keys = st.lists(st.sampled_from(sorted(choices)), max_size=3, unique=True)

    def apply(picked: list[str], data: st.DataObject) -> dict[str, Any]:
        out = dict(base)
        for key in picked:
            value = data.draw(st.sampled_from(choices[key]))
            if value is MISSING:
                out.pop(key, None)
            else:
                out[key] = value
        return out

    return st.builds(apply, keys, st.data())


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=perturbed(BASE_BATCH, BATCH_CHOICES),
       windows=st.lists(perturbed(BASE_WINDOW, CHOICES), max_size=3))
def test_what_the_fast_path_accepts_pydantic_accepts_with_equal_fields(batch, windows):
    raw = json.dumps({**batch, "windows": windows}, allow_nan=True).encode("utf-8", "surrogatepass")
    fast = decode_batch(raw)
    if fast is None:
        return  # the slow path decides, as before
    try:
        slow = parse_message(raw, TelemetryBatch)
    except MessageError as exc:
        raise AssertionError(f"the fast path accepted what pydantic refuses ({exc}): {raw!r}") from None
    assert (fast.device_id, fast.epoch, fast.seq, fast.dropped_windows, fast.merged_windows) == (
        slow.device_id, slow.epoch, slow.seq, slow.dropped_windows, slow.merged_windows)
    rows, reasons = store_rows(slow)
    assert fast.size == len(fast.rows) == len(rows) and fast.windows == []
    assert [(fast.device_id, fast.epoch, fast.seq, *r) for r in fast.rows] == rows
    for got, want in zip(fast.rows, rows, strict=True):  # equal, and of the same types (0 vs 0.0)
        for column, a, b in zip(WINDOW_COLUMNS, got, want[3:], strict=True):
            assert type(a) is type(b) or isinstance(b, datetime), (column, a, b)
    assert fast.reason_rows == reasons


def store_rows(batch: TelemetryBatch) -> tuple[list[tuple], list[dict]]:
    """What the store writes for a pydantic-parsed batch: its window rows and its reason rows."""
    b = BatchIn(batch.device_id, batch.epoch, batch.seq, [w.model_dump() for w in batch.windows])
    reasons = [r for w in b.windows if w.get("reasons") for r in reason_rows(b.device_id, w)]
    return [window_row(b, w) for w in b.windows], reasons


def test_the_batches_a_real_agent_sends_take_the_fast_path(tmp_path):
    telemetry = Telemetry("pi-1", 60, Outbox(tmp_path / "outbox", 1 << 20))
    t0 = datetime(2026, 12, 1, 10, tzinfo=timezone.utc)
    for i in range(50):
        telemetry.record(f"m{i % 3}", 1 + i % 2, 1.0 + i, t0 + timedelta(seconds=i), ok=i % 7 != 0,
                         energy_mj=2.0 * i, energy_source="estimated", energy_meter="modelled", rows=1 + i % 4)
    [batch] = telemetry.flush(t0 + timedelta(seconds=60))
    raw = batch.to_wire()
    fast = decode_batch(raw)
    assert fast is not None and fast.size == len(batch.windows) == 6
    rows, reasons = store_rows(parse_message(raw, TelemetryBatch))
    assert [(fast.device_id, fast.epoch, fast.seq, *r) for r in fast.rows] == rows and fast.reason_rows == reasons


def test_a_text_seen_valid_as_a_meter_is_not_thereby_a_valid_name():
    """The fast path remembers valid names and meter texts to match each once; a meter text is no name."""
    def raw(window: dict[str, Any]) -> bytes:
        return json.dumps({**BASE_BATCH, "windows": [{**BASE_WINDOW, **window}]}).encode()

    assert decode_batch(raw({"energy_meter": "ina3221 rail 1"})) is not None
    assert decode_batch(raw({"model": "ina3221 rail 1"})) is None
    try:
        parse_message(raw({"model": "ina3221 rail 1"}), TelemetryBatch)
    except MessageError:
        pass
    else:
        raise AssertionError("pydantic accepted a model name with spaces")


def test_a_time_with_sub_microsecond_digits_goes_the_slow_way_a_float_with_seven_digits_does_not():
    base = json.dumps({**BASE_BATCH, "windows": [BASE_WINDOW]}, separators=(",", ":"))  # as agents send
    assert decode_batch(base.replace('"2026-12-01T10:01:00Z"', '"2026-12-01T10:01:00.1234567Z"').encode()) is None
    seven = base.replace('"p99_ms":3.0', '"p99_ms":12.3456789')  # ":12.3456789" as a time's seconds would read
    assert '":12.3456789' in seven and decode_batch(seven.encode()) is not None
