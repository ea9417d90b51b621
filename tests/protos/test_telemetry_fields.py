"""The cloud stores a window's field dict (`w.__dict__`) as its columns, for speed: it must equal `model_dump()`,
for a window with every field given and for one that takes the defaults and the older-agent reading."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from edgefleet.protos.messages import TelemetryBatch, TelemetryWindow, parse_message

T = datetime(2026, 12, 1, tzinfo=timezone.utc)


def test_a_windows_field_dict_is_its_model_dump():
    full = TelemetryWindow(model="m", version=3, start=T, end=T + timedelta(seconds=60), count=10, errors=1,
                           rows=40, p50_ms=1.0, p95_ms=2.0, p99_ms=3.0, mean_ms=1.5, row_ms=0.4, mean_mj=8.0,
                           row_mj=2.0, energy_source="measured", energy_meter="rapl", energy_method="counter",
                           row_net_mj=1.0, idle_w=0.5, where="cloud")
    older = parse_message(TelemetryBatch(device_id="d", seq=1, sent_at=T, windows=[full]).to_wire().replace(
        b'"rows":40,', b""), TelemetryBatch).windows[0]  # no rows: read as batch 1
    sparse = TelemetryWindow(model="m", version=1, start=T, end=T, count=0, errors=0)
    for w in (full, older, sparse):
        assert w.__dict__ == w.model_dump()
        assert list(w.__dict__) == list(TelemetryWindow.model_fields)


def test_offload_reasons_are_bounded_named_and_at_most_one_per_request():
    import pytest

    from edgefleet.protos.messages import MessageError

    def wire(reasons) -> bytes:
        w = TelemetryWindow(model="m", version=1, start=T, end=T + timedelta(seconds=60), count=10, errors=0)
        doc = TelemetryBatch(device_id="d", seq=1, sent_at=T, windows=[w]).to_dict()
        doc["windows"][0]["reasons"] = reasons
        import json
        return json.dumps(doc).encode()

    assert parse_message(wire({"local_within_budget": 7, "low_confidence": 3}), TelemetryBatch).windows[0].reasons \
        == {"local_within_budget": 7, "low_confidence": 3}
    for bad, words in (({"a": 6, "b": 5}, "reasons add up to 11, more than the 10 requests"),
                       ({"Bad Name": 1}, "reasons"), ({"a": -1}, "reasons"),
                       ({f"r{i}": 0 for i in range(33)}, "reasons")):
        with pytest.raises(MessageError) as err:
            parse_message(wire(bad), TelemetryBatch)
        assert words in str(err.value)
