"""Messages that cannot poison: the attacker test's findings, replayed through both ingest paths of the real cloud
(the MQTT bridge's `handle` into a real `Fleet`, and the HTTP fallback routes under uvicorn) on SQLite and
PostgreSQL. Each poison is refused whole and counted, nothing of it is stored, the views behind GET /devices,
/status and /stats still build, and the real message after it is accepted.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from edgefleet.cloud.mqtt_bridge import MqttBridge
from edgefleet.cloud.services import Fleet
from edgefleet.cloud.settings import Settings
from edgefleet.protos.messages import EnrollRequest
from tests.cloud_server import cloud_server, enroll_device

PREFIX = "edgefleet"
NAN, INF = float("nan"), float("inf")


def now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


def window(**changes: Any) -> dict[str, Any]:
    t = now()
    return {"model": "m", "version": 1, "start": (t - timedelta(seconds=60)).isoformat(), "end": t.isoformat(),
            "count": 100, "errors": 1, "p50_ms": 4.0, "p95_ms": 8.0, "p99_ms": 9.0, "mean_mj": 12.5,
            "energy_source": "estimated", "energy_meter": "modelled", "where": "local", **changes}


def batch(device_id: str, seq: int, *windows: dict[str, Any]) -> dict[str, Any]:
    return {"kind": "telemetry", "device_id": device_id, "seq": seq, "windows": list(windows),
            "sent_at": now().isoformat()}


def report(device_id: str, generation: int, at: datetime | None = None, **changes: Any) -> dict[str, Any]:
    return {"kind": "reported_state", "device_id": device_id, "generation": generation,
            "reported_at": (at or now()).isoformat(), "agent_version": "0.1.0",
            "models": [{"name": "m", "active_version": 1, "target_version": 1, "state": "active"}], **changes}


def wire(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, allow_nan=True).encode()  # NaN and Infinity as JSON tokens, as an attacker sends them


def views(fleet: Fleet) -> tuple[list, list, Any]:
    """The functions behind GET /api/v1/devices, /status and /stats, serialised as the routes answer them."""
    devices, rows, stats = fleet.list_devices(), fleet.status(), fleet.stats()
    for view in (*devices, *rows, stats):
        view.model_dump_json()
    return devices, rows, stats


@pytest.fixture
def fleet(tmp_path, db_url):
    f = Fleet.from_settings(Settings(data_dir=tmp_path / "data", database_url=db_url,
                                     public_url="https://cloud.example:8443"))
    f.enroll(EnrollRequest(device_id="d1", device_class="rpi4"))
    try:
        yield f
    finally:
        f.close()


@pytest.fixture
def bridge(fleet):
    return MqttBridge(fleet, "127.0.0.1", 1, PREFIX)  # never started: handle() needs no broker


def send(bridge: MqttBridge, channel: str, doc: dict[str, Any]) -> str:
    return bridge.handle(f"{PREFIX}/devices/{doc['device_id']}/{channel}", wire(doc))


POISONED_WINDOWS = [
    ("p95 1e308", {"p95_ms": 1e308, "p99_ms": 1e308}, "out_of_range"),
    ("p95 NaN", {"p95_ms": NAN}, "not_finite"),
    ("energy infinity", {"mean_mj": INF}, "not_finite"),
    ("negative latency", {"p50_ms": -4.0}, "out_of_range"),
    ("negative energy", {"mean_mj": -12.5}, "out_of_range"),
]


@pytest.mark.parametrize(("what", "bad", "reason"), POISONED_WINDOWS, ids=[p[0] for p in POISONED_WINDOWS])
def test_a_poisoned_window_is_refused_whole_over_mqtt_and_the_views_still_build(fleet, bridge, what, bad, reason):
    assert send(bridge, "telemetry", batch("d1", 1, window())) == "recorded"
    before = fleet.get_device("d1").telemetry
    # The poisoned window rides with a good one: the whole batch goes, so the good one cannot smuggle it in.
    assert send(bridge, "telemetry", batch("d1", 2, window(p95_ms=6.0), window(**bad))) == "refused"
    _, _, stats = views(fleet)
    assert fleet.get_device("d1").telemetry == before
    assert stats.counters["refused_messages"] == 1 and stats.counters[f"refused_telemetry_{reason}"] == 1
    assert "malformed_messages" not in stats.counters and "ingest_errors" not in stats.counters
    # Nothing was claimed: the same seq, sent again as the agent really produced it, is stored.
    assert send(bridge, "telemetry", batch("d1", 2, window(p95_ms=6.0))) == "recorded"
    [summary] = fleet.get_device("d1").telemetry
    assert (summary.count, summary.p95_ms) == (200, pytest.approx(7.0))


def test_an_oversize_text_is_refused_and_the_stored_report_stays(fleet, bridge):
    gen = fleet.get_device("d1").desired_generation
    assert send(bridge, "reported", report("d1", gen, last_error="first")) == "recorded"
    assert send(bridge, "reported", report("d1", gen, last_error="x" * 5000)) == "refused"
    assert send(bridge, "reported", report("d1", gen, models=[
        {"name": "m", "state": "failed", "target_version": 1, "error": "e" * 100_000}])) == "refused"
    devices, _, stats = views(fleet)
    assert devices[0].last_error == "first"
    assert stats.counters["refused_reported_too_long"] == 2


def test_a_forged_generation_is_refused_and_the_next_real_report_is_accepted(fleet, bridge):
    gen = fleet.get_device("d1").desired_generation
    assert send(bridge, "reported", report("d1", gen)) == "recorded"
    forged = report("d1", 2**31 - 1, models=[{"name": "m", "active_version": 99, "target_version": 99,
                                               "state": "active"}])
    assert send(bridge, "reported", forged) == "refused"
    device = fleet.get_device("d1")
    assert device.reported_generation == gen and [m.active_version for m in device.models] == [1]
    assert fleet.stats().counters["refused_reported_generation_ahead"] == 1
    nxt = report("d1", gen, at=now() + timedelta(seconds=1), models=[
        {"name": "m", "active_version": 1, "target_version": 1, "state": "failed", "error": "smoke test mismatch"}])
    assert send(bridge, "reported", nxt) == "recorded"
    device = fleet.get_device("d1")
    assert device.reported_generation == gen and device.models[0].state == "failed"
    [row] = views(fleet)[1]
    assert row.device_id == "d1"


def test_a_report_dated_far_ahead_cannot_make_the_real_ones_stale(fleet, bridge):
    gen = fleet.get_device("d1").desired_generation
    assert send(bridge, "reported", report("d1", gen, at=datetime(2999, 1, 1, tzinfo=timezone.utc),
                                           last_error="forged")) == "recorded"
    assert send(bridge, "reported", report("d1", gen, at=now() + timedelta(seconds=2), last_error=None)) == "recorded"
    assert fleet.get_device("d1").last_error is None


def test_a_report_stored_under_the_looser_contract_still_lists(fleet):
    # Stored before the limits (an error of 5000 characters, a version 0): the listings must build all the same.
    gen = fleet.get_device("d1").desired_generation
    doc = report("d1", gen, models=[{"name": "m", "state": "failed", "target_version": 1, "error": "e" * 5000},
                                    {"name": "n", "state": "active", "active_version": 0}])
    assert fleet.store.set_reported("d1", doc=doc, generation=gen, last_error=None, reported_at=now(),
                                    now=now()) == "stored"
    devices, rows, _ = views(fleet)
    [model] = devices[0].models
    assert model.name == "m" and len(model.error) == 1000
    assert [r.device_id for r in rows] == ["d1"]


def test_http_refuses_the_same_poisons_with_a_422_naming_the_field(tmp_path, db_url):
    with cloud_server(tmp_path / "cloud", db_url=db_url) as cloud:
        admin = cloud.client()
        dev = enroll_device(admin, "d1")
        mine = cloud.client(token=dev.device_token)

        def post(channel: str, doc: dict[str, Any]):
            return mine.post(f"/api/v1/devices/d1/{channel}", content=wire(doc),
                             headers={"Content-Type": "application/json"})

        gen = admin.get("/api/v1/devices/d1").json()["desired_generation"]
        assert post("telemetry", batch("d1", 1, window())).status_code == 204
        assert post("reported", report("d1", gen)).status_code == 204
        before = admin.get("/api/v1/devices/d1").json()

        refused = [
            ("telemetry", batch("d1", 2, window(), window(p95_ms=1e308, p99_ms=1e308)), "body.windows.1.p95_ms"),
            ("telemetry", batch("d1", 3, window(p95_ms=NAN)), "body.windows.0.p95_ms"),
            ("telemetry", batch("d1", 4, window(p50_ms=-INF)), "body.windows.0.p50_ms"),
            ("telemetry", batch("d1", 5, window(p50_ms=-4.0)), "body.windows.0.p50_ms"),
            ("telemetry", batch("d1", 6, window(mean_mj=-1.0)), "body.windows.0.mean_mj"),
            ("reported", report("d1", gen, last_error="x" * 5000), "body.last_error"),
            ("reported", report("d1", 2**31 - 1), "body.generation"),
        ]
        for channel, doc, field in refused:
            r = post(channel, doc)
            assert r.status_code == 422, (field, r.text)
            body = r.json()
            assert body["error"] == "refused" and body["detail"]["fields"][0]["field"] == field, body
            assert field.removeprefix("body.") in body["message"] or "generation" in body["message"], body

        assert admin.get("/api/v1/devices/d1").json() == before
        assert admin.get("/api/v1/devices").status_code == 200 and admin.get("/api/v1/status").status_code == 200
        counters = admin.get("/api/v1/stats").json()["counters"]
        assert counters["refused_messages"] == len(refused)
        assert counters["refused_telemetry_not_finite"] == 2 and counters["refused_reported_generation_ahead"] == 1
        # Garbage is still malformed, and a body past the message limit is 413.
        assert post("telemetry", {"kind": "telemetry", "surprise": 1}).status_code == 422
        assert mine.post("/api/v1/devices/d1/telemetry", content=b" " * (300 * 1024)).status_code == 413
        assert admin.get("/api/v1/stats").json()["counters"]["malformed_messages"] == 2
        # The real batch after the poisons, at a seq a refused one had used, is stored.
        assert post("telemetry", batch("d1", 2, window(p95_ms=6.0))).status_code == 204
        [summary] = admin.get("/api/v1/devices/d1").json()["telemetry"]
        assert summary["count"] == 200 and summary["p95_ms"] == pytest.approx(7.0)
