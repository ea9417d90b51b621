"""protos/telemetry.py: a window counts requests and the rows (inferences) in them, with figures per request and per
row; an older agent's window, without rows, reads as batch 1. (The refusals of inconsistent or out-of-range row
figures are in test_limits.py's table.)"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from edgefleet.protos.messages import MessageError, TelemetryBatch, TelemetryWindow, parse_message

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=timezone.utc)
OLD = {"model": "digits", "version": 3, "start": (NOW - timedelta(seconds=60)).isoformat(), "end": NOW.isoformat(),
       "count": 1200, "errors": 2, "p50_ms": 0.41, "p95_ms": 0.73, "p99_ms": 1.12, "mean_mj": 1.85,
       "energy_source": "estimated", "energy_meter": "modelled", "where": "local"}


def batch(*windows: dict[str, Any]) -> bytes:
    return json.dumps({"schema_version": 1, "kind": "telemetry", "device_id": "pi-1", "seq": 1,
                       "windows": list(windows), "sent_at": NOW.isoformat()}).encode()


def test_an_older_agents_window_reads_as_batch_one():
    [w] = parse_message(batch(OLD), TelemetryBatch).windows
    assert (w.count, w.errors, w.rows) == (1200, 2, 1200)
    assert (w.mean_ms, w.row_ms, w.row_mj, w.mean_mj) == (0.41, 0.41, 1.85, 1.85)
    again = parse_message(w.to_wire(), TelemetryWindow)  # stored and served with its row figures
    assert again == w and json.loads(w.to_wire())["rows"] == 1200
    # Without any success there is no figure to stand in: rows still equal requests.
    failed = {**OLD, "errors": 1200, "p50_ms": None, "p95_ms": None, "p99_ms": None, "mean_mj": None}
    [w] = parse_message(batch(failed), TelemetryBatch).windows
    assert (w.rows, w.mean_ms, w.row_ms, w.row_mj) == (1200, None, None, None)
    assert TelemetryWindow(**{**OLD, "start": NOW, "end": NOW}).rows == 1200  # built in code, too


def test_a_batched_window_keeps_requests_rows_and_both_kinds_of_figure():
    # 10 requests of 1,200 rows at 110 ms and 708 mJ each: 12,000 inferences of 0.092 ms and 0.59 mJ.
    doc = {**OLD, "count": 10, "errors": 0, "rows": 12_000, "p50_ms": 110.0, "p95_ms": 110.0, "p99_ms": 110.0,
           "mean_ms": 110.0, "row_ms": 110.0 / 1200, "mean_mj": 708.0, "row_mj": 708.0 / 1200}
    [w] = parse_message(batch(doc), TelemetryBatch).windows
    assert (w.count, w.rows, w.row_mj, w.mean_mj) == (10, 12_000, 0.59, 708.0)
    # A per-row figure equal to the per-request one (every request one row) passes, rounding included.
    one = {**OLD, "rows": 1200, "mean_ms": 0.3, "row_ms": 0.3 * (1 + 1e-12), "row_mj": 1.85}
    assert parse_message(batch(one), TelemetryBatch).windows[0].row_ms == pytest.approx(0.3)


@pytest.mark.parametrize("changes, field", [
    ({"count": None}, "windows.0.count"),
    ({"count": "many"}, "windows.0.count"),
    ({"rows": "many"}, "windows.0.rows"),
    ({"p50_ms": "slow"}, "windows.0.p50_ms"),  # filled into mean_ms and row_ms too: p50 is still named first
])
def test_garbage_around_the_fill_names_the_field_the_device_sent(changes, field):
    with pytest.raises(MessageError) as info:
        parse_message(batch({**OLD, **changes}), TelemetryBatch)
    assert info.value.field == field and info.value.reason == "malformed", str(info.value)
