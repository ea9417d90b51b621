"""protos/limits.py as applied by protos/messages.py: every figure a device sends has a range, and a message that
breaks one is refused whole with a reason a receiver can count and the field a person can fix.

Table-driven: one valid message at the contract's extremes is accepted, then each poison found by the attacker test
(and its neighbours) is applied to it alone and must be refused with its reason and field.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from edgefleet.protos.limits import (
    INT32_MAX,
    INT64_MAX,
    MAX_ENERGY_MJ,
    MAX_ERROR_CHARS,
    MAX_LATENCY_MS,
    MAX_MODELS_PER_REPORT,
    MAX_ROWS_PER_S,
    MAX_SHORT_TEXT_CHARS,
    MAX_WINDOW_S,
    MAX_WINDOWS_PER_BATCH,
    clip_text,
)
from edgefleet.protos.messages import (
    DeviceStatus,
    MessageError,
    ReportedState,
    TelemetryBatch,
    parse_message,
)

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=timezone.utc)


def window(**changes: Any) -> dict[str, Any]:
    w: dict[str, Any] = {"model": "digits", "version": 3, "start": (NOW - timedelta(seconds=60)).isoformat(),
                         "end": NOW.isoformat(), "count": 1200, "errors": 2, "p50_ms": 0.41, "p95_ms": 0.73,
                         "p99_ms": 1.12, "mean_mj": 1.85, "energy_source": "estimated", "energy_meter": "modelled",
                         "where": "local"}
    return {**w, **changes}


def batch(*windows: dict[str, Any], **changes: Any) -> dict[str, Any]:
    return {"schema_version": 1, "kind": "telemetry", "device_id": "pi-1", "seq": 118,
            "windows": list(windows) or [window()], "dropped_windows": 0, "sent_at": NOW.isoformat(), **changes}


def report(**changes: Any) -> dict[str, Any]:
    status = {"name": "digits", "active_version": 3, "target_version": 3, "state": "active", "phase": None,
              "error": None}
    return {"schema_version": 1, "kind": "reported_state", "device_id": "pi-1", "generation": 7,
            "models": [status], "last_error": None, "agent_version": "0.1.0", "reported_at": NOW.isoformat(),
            **changes}


def wire(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, allow_nan=True).encode()  # NaN and Infinity as the JSON tokens Python reads back


def refusal(doc: dict[str, Any], model: type) -> MessageError:
    with pytest.raises(MessageError) as info:
        parse_message(wire(doc), model)
    return info.value


def test_the_largest_figures_the_contract_admits_are_accepted():
    long_s = MAX_WINDOW_S  # a full day: capacity far above INT32_MAX
    top = window(start=(NOW - timedelta(seconds=long_s)).isoformat(), count=INT32_MAX, errors=INT32_MAX - 1,
                 p50_ms=MAX_LATENCY_MS, p95_ms=MAX_LATENCY_MS, p99_ms=MAX_LATENCY_MS, mean_mj=MAX_ENERGY_MJ,
                 version=INT32_MAX, energy_meter="m" * MAX_SHORT_TEXT_CHARS, rows=long_s * MAX_ROWS_PER_S,
                 mean_ms=MAX_LATENCY_MS, row_ms=MAX_LATENCY_MS, row_mj=MAX_ENERGY_MJ)
    got = parse_message(wire(batch(*[top] * MAX_WINDOWS_PER_BATCH, seq=INT64_MAX, dropped_windows=INT32_MAX)),
                        TelemetryBatch)
    assert len(got.windows) == MAX_WINDOWS_PER_BATCH and got.windows[0].p95_ms == MAX_LATENCY_MS
    zero = window(count=0, errors=0, p50_ms=None, p95_ms=None, p99_ms=None, mean_mj=None, start=NOW.isoformat())
    assert parse_message(wire(batch(zero)), TelemetryBatch).windows[0].count == 0
    status = {"name": "m", "state": "failed", "error": "e" * MAX_ERROR_CHARS, "phase": "p" * MAX_SHORT_TEXT_CHARS,
              "active_version": INT32_MAX}
    # As a decoded dict: every list and text at its cap at once is past MAX_MESSAGE_BYTES, a limit of its own.
    got = parse_message(report(generation=INT32_MAX, last_error="x" * MAX_ERROR_CHARS,
                               models=[status] * MAX_MODELS_PER_REPORT), ReportedState)
    assert got.generation == INT32_MAX and len(got.models) == MAX_MODELS_PER_REPORT


TELEMETRY_POISONS = [
    ("p95 1e308", window(p95_ms=1e308, p99_ms=1e308), "out_of_range", "windows.0.p95_ms"),
    ("p95 NaN", window(p95_ms=float("nan")), "not_finite", "windows.0.p95_ms"),
    ("p50 infinity", window(p50_ms=float("inf")), "not_finite", "windows.0.p50_ms"),
    ("energy -inf", window(mean_mj=float("-inf")), "not_finite", "windows.0.mean_mj"),
    ("negative latency", window(p50_ms=-0.5), "out_of_range", "windows.0.p50_ms"),
    ("negative energy", window(mean_mj=-1.85), "out_of_range", "windows.0.mean_mj"),
    ("energy past the ceiling", window(mean_mj=MAX_ENERGY_MJ * 2), "out_of_range", "windows.0.mean_mj"),
    ("count past INTEGER", window(start=(NOW - timedelta(days=1)).isoformat(), count=2**31), "out_of_range",
     "windows.0.count"),
    ("count past the window's capacity", window(count=10**8), "out_of_range", "windows.0"),
    ("errors > count", window(errors=1201), "inconsistent", "windows.0"),
    ("negative errors", window(errors=-1), "out_of_range", "windows.0.errors"),
    ("p50 > p95", window(p50_ms=0.9), "inconsistent", "windows.0"),
    ("p95 > p99", window(p95_ms=2.0), "inconsistent", "windows.0"),
    ("latency without a success", window(count=2, errors=2), "inconsistent", "windows.0"),
    ("end before start", window(start=(NOW + timedelta(seconds=1)).isoformat()), "inconsistent", "windows.0"),
    ("window of two days", window(start=(NOW - timedelta(days=2)).isoformat()), "out_of_range", "windows.0"),
    ("version past INTEGER", window(version=2**31), "out_of_range", "windows.0.version"),
    ("version 0", window(version=0), "out_of_range", "windows.0.version"),
    ("meter name past its column", window(energy_meter="m" * 65), "too_long", "windows.0.energy_meter"),
    ("NUL in the meter name", window(energy_meter="rapl\x00"), "bad_text", "windows.0.energy_meter"),
    ("time before the epoch", window(start="1969-12-31T23:59:30Z"), "out_of_range", "windows.0.start"),
    ("time that overflows in UTC", window(start="0001-01-01T00:00:00+14:00"), "out_of_range", "windows.0.start"),
    # Rows (inferences) against requests: a request carries at least one row, per-row figures are at most the
    # per-request ones, and given with them.
    ("fewer rows than requests", window(rows=1199), "inconsistent", "windows.0"),
    ("negative rows", window(rows=-1), "out_of_range", "windows.0.rows"),
    ("rows past BIGINT", window(rows=2**63), "out_of_range", "windows.0.rows"),
    ("rows past the window's capacity", window(rows=61 * MAX_ROWS_PER_S), "out_of_range", "windows.0"),
    ("row energy above the request's", window(rows=2400, row_mj=2.0), "inconsistent", "windows.0"),
    ("row latency above the request's", window(rows=2400, mean_ms=0.5, row_ms=0.6), "inconsistent", "windows.0"),
    ("row energy without request energy", window(rows=2400, mean_mj=None, row_mj=0.9), "inconsistent",
     "windows.0"),
    ("request latency without row latency", window(rows=2400, mean_ms=0.5, row_ms=None), "inconsistent",
     "windows.0"),
    ("row figures without a success", window(count=2, errors=2, rows=5, p50_ms=None, p95_ms=None, p99_ms=None,
                                             mean_mj=None, row_mj=0.1, mean_ms=None, row_ms=None), "inconsistent",
     "windows.0"),
    ("negative row energy", window(rows=2400, row_mj=-0.1), "out_of_range", "windows.0.row_mj"),
    ("row latency NaN", window(rows=2400, mean_ms=0.5, row_ms=float("nan")), "not_finite", "windows.0.row_ms"),
    ("row energy past the ceiling", window(rows=2400, mean_mj=MAX_ENERGY_MJ, row_mj=MAX_ENERGY_MJ * 2),
     "out_of_range", "windows.0.row_mj"),
]


@pytest.mark.parametrize(("what", "bad", "reason", "field"), TELEMETRY_POISONS, ids=[p[0] for p in TELEMETRY_POISONS])
def test_a_window_outside_the_contract_refuses_the_whole_batch(what, bad, reason, field):
    exc = refusal(batch(window(), bad), TelemetryBatch)
    assert (exc.reason, exc.refused) == (reason, True), str(exc)
    assert exc.field == field.replace("windows.0", "windows.1"), str(exc)
    assert str(exc).startswith("invalid TelemetryBatch: windows.1")


BATCH_POISONS = [
    ("seq past BIGINT", {"seq": 2**63}, "out_of_range", "seq"),
    ("negative seq", {"seq": -1}, "out_of_range", "seq"),
    ("dropped windows past INTEGER", {"dropped_windows": 2**31}, "out_of_range", "dropped_windows"),
    ("too many windows", {"windows": [window()] * (MAX_WINDOWS_PER_BATCH + 1)}, "too_long", "windows"),
]


@pytest.mark.parametrize(("what", "changes", "reason", "field"), BATCH_POISONS, ids=[p[0] for p in BATCH_POISONS])
def test_a_batch_outside_the_contract_is_refused(what, changes, reason, field):
    exc = refusal(batch(**changes), TelemetryBatch)
    assert (exc.reason, exc.field) == (reason, field), str(exc)


REPORT_POISONS = [
    ("generation past INTEGER", {"generation": 2**31}, "out_of_range", "generation"),
    ("generation of a 64-bit forger", {"generation": 2**63 - 1}, "out_of_range", "generation"),
    ("last_error past its cap", {"last_error": "x" * (MAX_ERROR_CHARS + 1)}, "too_long", "last_error"),
    ("lone surrogate in last_error", {"last_error": "bad \ud800"}, "bad_text", "last_error"),
    ("agent_version past its column", {"agent_version": "v" * 65}, "too_long", "agent_version"),
    ("too many models", {"models": [{"name": "m", "state": "active"}] * (MAX_MODELS_PER_REPORT + 1)}, "too_long",
     "models"),
    ("model error past its cap", {"models": [{"name": "m", "state": "failed", "error": "e" * 1001}]}, "too_long",
     "models.0.error"),
    ("model phase past its cap", {"models": [{"name": "m", "state": "installing", "phase": "p" * 65}]},
     "too_long", "models.0.phase"),
    ("active version 0", {"models": [{"name": "m", "state": "active", "active_version": 0}]}, "out_of_range",
     "models.0.active_version"),
    ("target version past INTEGER", {"models": [{"name": "m", "state": "active", "target_version": 2**31}]},
     "out_of_range", "models.0.target_version"),
    ("reported in the year 9999", {"reported_at": "9999-12-31T23:59:59Z"}, "out_of_range", "reported_at"),
]


@pytest.mark.parametrize(("what", "changes", "reason", "field"), REPORT_POISONS, ids=[p[0] for p in REPORT_POISONS])
def test_a_report_outside_the_contract_is_refused(what, changes, reason, field):
    exc = refusal(report(**changes), ReportedState)
    assert (exc.reason, exc.field, exc.refused) == (reason, field, True), str(exc)


@pytest.mark.parametrize("raw", [
    b'{"kind": "telemetry", "seq": ' + b"9" * 5000 + b"}",  # past Python's 4300-digit int parsing limit
    b"[" * 100_000,  # nested past the JSON decoder's recursion limit
    b'{"kind": "status", "device_id": "d", "online": true, "at": "2025-03-01T12:00:00"}',  # no zone
    b'{"kind": "telemetry", "device_id": "d", "seq": 1, "sent_at": "2025-03-01T12:00:00Z", "surprise": NaN}',
])
def test_garbage_is_malformed_not_refused_and_never_another_exception(raw):
    with pytest.raises(MessageError) as info:
        parse_message(raw, TelemetryBatch if b"telemetry" in raw else DeviceStatus)
    assert info.value.reason == "malformed" and not info.value.refused


def test_an_oversize_message_is_too_large():
    with pytest.raises(MessageError) as info:
        parse_message(b" " * (256 * 1024 + 1), TelemetryBatch)
    assert info.value.reason == "too_large"


def test_clip_text_makes_any_exception_text_fit_the_contract():
    assert clip_text(None) is None and clip_text("short") == "short"
    long = clip_text("x" * 5000)
    assert long is not None and len(long) == MAX_ERROR_CHARS and long.endswith("…")
    odd = clip_text("a\x00b\ud800c")
    assert odd is not None and "\x00" not in odd
    status = parse_message(wire(report(last_error=long, models=[{"name": "m", "state": "failed", "error": odd}])),
                           ReportedState)
    assert status.last_error == long
