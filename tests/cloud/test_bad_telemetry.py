"""Bad telemetry cannot move an aggregate or a calibration refit: each kind of garbage is refused (or, for a replay,
stored once) by a stated rule, counted in the stats, and the status rows, the roll-ups and the refit's inputs and
proposal are exactly what they were before it. Both ingest paths of the real cloud: the MQTT bridge's checks into
the real `Fleet`, and the HTTP fallback route over a socket. On SQLite and PostgreSQL (`db_url`).

The rules (protos/limits.py, protos/telemetry.py, cloud/ratelimit.py): a missing field or a wrong type is
malformed; a negative, non-finite or out-of-range figure (a latency in years) is refused as `out_of_range` or
`not_finite`; errors above count or rows below count as `inconsistent`; a batch's (device, epoch, seq) is stored
once, so a replay, in order or not and whatever it now says, changes nothing (`telemetry_replayed`); a device past
its rate is refused as `rate_limited`.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from edgefleet.cloud.mqtt_bridge import MqttBridge
from edgefleet.protos.messages import TelemetryBatch
from tests.cloud.test_refit import MACS, refit, variant, window
from tests.cloud_server import cloud_server, enroll_device

PREFIX = "edgefleet"


@pytest.fixture
def server(tmp_path: Path, db_url: str):
    with cloud_server(tmp_path / "cloud", db_url=db_url) as s:
        yield s


def snapshot(server, client) -> dict[str, Any]:
    """Everything garbage must not move: status rows, the roll-ups, and the refit's proposal and inputs."""
    fleet = server.fleet
    since = datetime.now(timezone.utc) - timedelta(days=1)
    view = refit(client)
    return {"status": [r.model_dump(exclude={"last_seen", "online"}) for r in fleet.status()],
            "summary": fleet.store.telemetry_summary(since),
            "refit": (view.proposed.model_dump(), view.windows, view.inferences, view.windows_ignored)}


def good_batch(version: int, seq: int, end: datetime) -> dict[str, Any]:
    batch = TelemetryBatch(device_id="pi-1", seq=seq, sent_at=end,
                           windows=[window(version, MACS[0], requests=200, batch=1, end=end)])
    return json.loads(batch.to_wire())


def spoil(doc: dict[str, Any], **changes: Any) -> dict[str, Any]:
    w = {**doc["windows"][0], **changes}
    for key in [k for k, v in changes.items() if v is _DROP]:
        del w[key]
    return {**doc, "seq": doc["seq"] + 1000, "windows": [w]}


_DROP = object()
# (what, changes to the good window, what the bridge answers, the counter it moves)
GARBAGE = [
    ("missing field", {"count": _DROP}, "malformed", "malformed_messages"),
    ("wrong type", {"count": "many"}, "malformed", "malformed_messages"),
    ("negative energy", {"mean_mj": -5.0, "row_mj": -5.0}, "refused", "refused_telemetry_out_of_range"),
    ("latency in years", {"p50_ms": 1e12, "p95_ms": 1e12, "p99_ms": 1e12}, "refused",
     "refused_telemetry_out_of_range"),
    ("NaN", {"p95_ms": float("nan")}, "refused", "refused_telemetry_not_finite"),
    ("infinity", {"mean_mj": float("inf")}, "refused", "refused_telemetry_not_finite"),
    ("errors above count", {"errors": 10_000}, "refused", "refused_telemetry_inconsistent"),
    ("rows below count", {"rows": 3}, "refused", "refused_telemetry_inconsistent"),
]


@pytest.mark.parametrize(("what", "changes", "answer", "counter"), GARBAGE, ids=[g[0] for g in GARBAGE])
def test_garbage_moves_no_aggregate_and_no_refit_on_either_path(server, what, changes, answer, counter):
    fleet = server.fleet
    v1 = variant(fleet, MACS[0])
    now = datetime.now(timezone.utc).replace(microsecond=0)
    bridge = MqttBridge(fleet, "127.0.0.1", 1, PREFIX)  # never started: its checks and the Fleet, no broker
    with server.client() as c:
        device = enroll_device(c, "pi-1", "rpi4")
        good = good_batch(v1, 1, now)
        assert bridge.handle(f"{PREFIX}/devices/pi-1/telemetry", json.dumps(good).encode()) == "recorded"
        before = snapshot(server, c)
        counters = fleet.stats().counters
        bad = spoil(good, **changes)
        raw = json.dumps(bad, allow_nan=True).encode()
        assert bridge.handle(f"{PREFIX}/devices/pi-1/telemetry", raw) == answer
        with server.client(token=device.device_token) as http:
            r = http.post("/api/v1/devices/pi-1/telemetry", content=raw, headers={"Content-Type": "application/json"})
        assert r.status_code == 422, r.text
        assert snapshot(server, c) == before
        after = fleet.stats().counters
        assert after.get(counter, 0) == counters.get(counter, 0) + 2  # once per path


def test_a_replay_in_or_out_of_order_is_stored_once_whatever_it_now_says(server):
    fleet = server.fleet
    v1 = variant(fleet, MACS[0])
    now = datetime.now(timezone.utc).replace(microsecond=0)
    bridge = MqttBridge(fleet, "127.0.0.1", 1, PREFIX)
    topic = f"{PREFIX}/devices/pi-1/telemetry"
    with server.client() as c:
        enroll_device(c, "pi-1", "rpi4")
        for seq in (1, 2):
            assert bridge.handle(topic, json.dumps(good_batch(v1, seq, now - timedelta(minutes=seq))).encode())
        before = snapshot(server, c)
        replayed = fleet.stats().counters.get("telemetry_replayed", 0)
        # seq 1 again, after seq 2, with ten times the requests: the first copy stands.
        louder = good_batch(v1, 1, now)
        louder["windows"][0]["count"] = louder["windows"][0]["rows"] = 2000
        assert bridge.handle(topic, json.dumps(louder).encode()) == "recorded"
        assert bridge.handle(topic, json.dumps(good_batch(v1, 2, now)).encode()) == "recorded"
        assert snapshot(server, c) == before
        assert fleet.stats().counters["telemetry_replayed"] == replayed + 2
        # Another epoch (an agent whose outbox state was lost counts seq from 0 again) is new data, not a replay.
        fresh = {**good_batch(v1, 1, now), "epoch": 7}
        assert bridge.handle(topic, json.dumps(fresh).encode()) == "recorded"
        assert snapshot(server, c)["summary"] != before["summary"]


def test_a_flood_from_one_device_is_rate_limited_counted_and_stores_nothing_past_the_limit(tmp_path, db_url):
    with cloud_server(tmp_path / "cloud", db_url=db_url, telemetry_device_windows_per_s=0.001,
                      telemetry_device_burst_s=10_000) as server:  # a bucket of 10 windows, refilled never
        fleet = server.fleet
        now = datetime.now(timezone.utc).replace(microsecond=0)
        bridge = MqttBridge(fleet, "127.0.0.1", 1, PREFIX)
        topic = f"{PREFIX}/devices/pi-1/telemetry"
        with server.client() as c:
            device = enroll_device(c, "pi-1", "rpi4")
            enroll_device(c, "pi-2", "rpi4")
            answers = [bridge.handle(topic, json.dumps(good_batch(1, seq, now)).encode()) for seq in range(25)]
            assert answers == ["recorded"] * 10 + ["refused"] * 15
            assert fleet.stats().counters["refused_telemetry_rate_limited"] == 15
            with server.client(token=device.device_token) as http:
                r = http.post("/api/v1/devices/pi-1/telemetry", content=json.dumps(good_batch(1, 99, now)),
                              headers={"Content-Type": "application/json"})
            assert r.status_code == 429 and "send the batch again later" in r.text
            summary = fleet.store.telemetry_summary(now - timedelta(days=1))
            assert [a.windows for a in summary["pi-1"]] == [10]  # nothing past the limit reached the table
            # Another device has a bucket of its own: the flood did not take its share.
            other = {**good_batch(1, 0, now), "device_id": "pi-2"}
            assert bridge.handle(f"{PREFIX}/devices/pi-2/telemetry", json.dumps(other).encode()) == "recorded"
