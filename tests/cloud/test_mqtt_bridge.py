"""cloud/mqtt_bridge.py against a real Mosquitto: garbage on every subscribed topic is counted and dropped, valid
messages reach the Fleet, desired states are retained for fresh subscribers, and the bridge survives a Fleet that
raises and a broker that restarts.

The Fleet here is a recorder (the bridge's seam to the Fleet is five methods); `test_api.py` runs the bridge
inside the real cloud.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import pytest

from edgefleet.cloud.mqtt_bridge import MqttBridge
from edgefleet.cloud.store_telemetry import BatchIn
from edgefleet.protos.messages import (
    DesiredState,
    DeviceStatus,
    ReportedState,
    Signature,
    SignedDesiredState,
    TelemetryAck,
    TelemetryBatch,
    TelemetryWindow,
)
from tests.cloud_server import MqttProbe, enroll_device, start_cloud_server, tiny_onnx
from tests.harness import Mosquitto, wait_for

NOW = datetime(2025, 1, 1, tzinfo=timezone.utc)
PREFIX = "edgefleet"


@dataclass
class _Device:
    device_id: str


class RecordingFleet:
    def __init__(self, devices: tuple[str, ...] = ()) -> None:
        self.lock = threading.Lock()
        self.recorded: list[object] = []
        self.counters: Counter[str] = Counter()
        self.devices = devices
        self.fail_next = False

    def _record(self, msg: object) -> None:
        with self.lock:
            if self.fail_next:
                self.fail_next = False
                raise RuntimeError("database is down")
            self.recorded.append(msg)

    record_reported = record_status = _record

    def record_telemetry_many(self, msgs: list[object]) -> list[str]:
        with self.lock:
            if self.fail_next:
                self.fail_next = False
                raise RuntimeError("database is down")
            self.recorded.extend(msgs)
        return ["stored"] * len(msgs)

    def count(self, name: str) -> None:
        with self.lock:
            self.counters[name] += 1

    def set_gauge(self, name: str, value: int) -> None:
        with self.lock:
            self.counters[name] = value

    def list_devices(self) -> list[_Device]:
        return [_Device(d) for d in self.devices]

    def desired_state(self, device_id: str) -> SignedDesiredState:
        return signed_doc(device_id, generation=7)


def signed_doc(device_id: str, generation: int) -> SignedDesiredState:
    payload = DesiredState(device_id=device_id, device_class="rpi4", generation=generation, issued_at=NOW,
                           expires_at=NOW + timedelta(days=1))
    return SignedDesiredState(payload=payload, signatures=[Signature(keyid="k", sig="00")])


def valid(channel: str, device_id: str) -> bytes:
    if channel == "reported":
        return ReportedState(device_id=device_id, generation=1, reported_at=NOW).to_wire()
    if channel == "telemetry":
        window = TelemetryWindow(model="digits", version=1, start=NOW, end=NOW, count=3, errors=0)
        return TelemetryBatch(device_id=device_id, seq=1, windows=[window], sent_at=NOW).to_wire()
    return DeviceStatus(device_id=device_id, online=True, at=NOW).to_wire()


@pytest.fixture
def fleet() -> RecordingFleet:
    return RecordingFleet(devices=("dev-a", "dev-b"))


@pytest.fixture
def bridge(fleet, mosquitto):
    b = MqttBridge(fleet, mosquitto.host, mosquitto.port, PREFIX, client_id="cloud-test",
                   reconnect_min_s=1, reconnect_max_s=2).start()
    assert b.wait_connected(10), "bridge did not connect"
    try:
        yield b
    finally:
        b.stop()


def _garbage(channel: str) -> list[tuple[str, bytes]]:
    other = "reported" if channel != "reported" else "status"
    wrong_kind = json.loads(valid(other, "dev-a"))
    return [
        ("not json", b"\x00garbage{{{"),
        ("json array", b"[1, 2, 3]"),
        ("json string", b'"hello"'),
        ("wrong kind", json.dumps(wrong_kind).encode()),
        ("device id mismatch", valid(channel, "dev-b")),
        ("1 MB", b"{" + b" " * (1024 * 1024) + b"}"),
        ("invalid utf-8", b'{"kind": "\xff\xfe"}'),
        ("newer schema", valid(channel, "dev-a").replace(b'"schema_version":1', b'"schema_version":99')),
        ("unknown field", valid(channel, "dev-a")[:-1] + b', "surprise": 1}'),
    ]


@pytest.mark.parametrize("channel", ["reported", "telemetry", "status"])
def test_garbage_is_counted_and_dropped_then_a_valid_message_is_recorded(fleet, bridge, mosquitto, channel):
    topic = f"{PREFIX}/devices/dev-a/{channel}"
    garbage = _garbage(channel)
    device = MqttProbe(mosquitto.host, mosquitto.port)
    try:
        for _what, payload in garbage:
            device.publish(topic, payload)
        device.publish(topic, valid(channel, "dev-a"))
        wait_for(lambda: len(fleet.recorded) == 1, what="the valid message to be recorded")
    finally:
        device.stop()
    assert bridge.connected
    assert fleet.counters["malformed_messages"] == len(garbage)
    assert bridge.counters["malformed_messages"] == len(garbage)
    assert fleet.recorded[0].device_id == "dev-a"
    # Telemetry takes the fast decoder (cloud/telemetry_decode.py), the rest pydantic's models.
    assert {"reported": ReportedState, "telemetry": BatchIn, "status": DeviceStatus}[channel] is type(
        fleet.recorded[0])


def test_retained_clear_is_ignored_not_counted(fleet, bridge, mosquitto):
    device = MqttProbe(mosquitto.host, mosquitto.port)
    device.publish(f"{PREFIX}/devices/dev-a/status", b"", retain=True)
    device.publish(f"{PREFIX}/devices/dev-a/status", valid("status", "dev-a"))
    device.stop()
    wait_for(lambda: fleet.recorded, what="the status to be recorded")
    assert fleet.counters["malformed_messages"] == 0


def test_a_fleet_that_raises_is_retried_counted_and_nothing_is_lost(fleet, bridge, mosquitto):
    fleet.fail_next = True
    device = MqttProbe(mosquitto.host, mosquitto.port)
    device.publish(f"{PREFIX}/devices/dev-a/reported", valid("reported", "dev-a"))
    device.publish(f"{PREFIX}/devices/dev-a/reported", valid("reported", "dev-a"))
    device.stop()
    # The first report failed once (the database was "down"): retried, not dropped.
    wait_for(lambda: len(fleet.recorded) == 2, what="both reports to be recorded")
    assert fleet.counters["ingest_errors"] == 1
    assert bridge.connected


def batch(device_id: str, seq: int, epoch: int = 5) -> bytes:
    window = TelemetryWindow(model="digits", version=1, start=NOW, end=NOW, count=3, errors=0)
    return TelemetryBatch(device_id=device_id, epoch=epoch, seq=seq, windows=[window], sent_at=NOW).to_wire()


def acked(probe: MqttProbe, device_id: str) -> list[int]:
    out: list[int] = []
    for m in probe.received(f"{PREFIX}/devices/{device_id}/ack"):
        ack = TelemetryAck.model_validate_json(m.payload)
        assert ack.device_id == device_id and ack.epoch == 5
        out += ack.seqs
    return sorted(out)


def test_telemetry_is_acked_on_the_device_topic_only_after_it_is_stored(fleet, mosquitto):
    """The agent may drain its outbox only on the cloud's ack, sent after the commit; not on the broker's PUBACK."""
    gate = threading.Event()
    stored_before_ack: list[bool] = []
    real = fleet.record_telemetry_many

    def slow(msgs):
        gate.wait(10)
        return real(msgs)

    fleet.record_telemetry_many = slow
    b = MqttBridge(fleet, mosquitto.host, mosquitto.port, PREFIX, client_id="cloud-ack").start()
    assert b.wait_connected(10)
    device = MqttProbe(mosquitto.host, mosquitto.port, topics=(f"{PREFIX}/devices/dev-a/ack",))
    try:
        for seq in (1, 2, 3):
            device.publish(f"{PREFIX}/devices/dev-a/telemetry", batch("dev-a", seq))
        wait_for(lambda: b.counters["recorded_telemetry"] == 0 and b.backlog() == 0, what="the batches to be taken")
        assert acked(device, "dev-a") == []  # in the broker's hands, not stored: no ack yet
        gate.set()
        wait_for(lambda: acked(device, "dev-a") == [1, 2, 3], what="an ack naming the three batches")
        stored_before_ack.append(len(fleet.recorded) == 3)
        assert stored_before_ack == [True]
    finally:
        gate.set()
        device.stop()
        b.stop()


def test_the_cloud_session_persists_and_what_was_never_stored_is_redelivered(fleet, mosquitto):
    """Batches sent while the cloud is away are queued for its session; one received but not committed before the
    cloud stopped was never acknowledged, so the broker delivers it again to the next session."""
    fleet.record_telemetry_many = lambda msgs: (_ for _ in ()).throw(RuntimeError("database is down"))
    first = MqttBridge(fleet, mosquitto.host, mosquitto.port, PREFIX, client_id="cloud-persist",
                       retry_max_s=0.1).start()
    assert first.wait_connected(10)
    device = MqttProbe(mosquitto.host, mosquitto.port, topics=(f"{PREFIX}/devices/dev-a/ack",))
    try:
        device.publish(f"{PREFIX}/devices/dev-a/telemetry", batch("dev-a", 1))
        wait_for(lambda: first.counters["ingest_errors"] >= 2, what="the failing insert to be retried")
        first.stop()  # killed mid-retry: seq 1 was received and never acknowledged
        for seq in (2, 3):  # sent while the cloud is away
            device.publish(f"{PREFIX}/devices/dev-a/telemetry", batch("dev-a", seq))
        del fleet.record_telemetry_many  # the database is back
        second = MqttBridge(fleet, mosquitto.host, mosquitto.port, PREFIX, client_id="cloud-persist").start()
        try:
            wait_for(lambda: acked(device, "dev-a") == [1, 2, 3], what="all three batches stored and acked")
            assert sorted(m.seq for m in fleet.recorded) == [1, 2, 3]
        finally:
            second.stop()
    finally:
        device.stop()


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_both_protocols_keep_the_session(fleet, mosquitto, protocol):
    first = MqttBridge(fleet, mosquitto.host, mosquitto.port, PREFIX, client_id=f"cloud-{protocol}",
                       protocol=protocol).start()
    assert first.wait_connected(10)
    first.stop()
    device = MqttProbe(mosquitto.host, mosquitto.port)
    device.publish(f"{PREFIX}/devices/dev-b/telemetry", batch("dev-b", 9))
    device.stop()
    second = MqttBridge(fleet, mosquitto.host, mosquitto.port, PREFIX, client_id=f"cloud-{protocol}",
                        protocol=protocol).start()
    try:
        wait_for(lambda: [m.seq for m in fleet.recorded] == [9], what="the batch queued while away")
    finally:
        second.stop()


def test_handle_refuses_topics_that_are_not_device_channels(fleet):
    b = MqttBridge(fleet, "127.0.0.1", 1, PREFIX)  # never started: handle() needs no connection
    assert b.handle(f"{PREFIX}/devices/dev-a/desired", valid("status", "dev-a")) == "malformed"
    assert b.handle(f"{PREFIX}/devices/bad+id/status", valid("status", "dev-a")) == "malformed"
    assert b.handle("elsewhere/devices/dev-a/status", valid("status", "dev-a")) == "malformed"
    assert b.handle(f"{PREFIX}/devices/dev-a/status", valid("status", "dev-a")) == "recorded"
    assert fleet.counters["malformed_messages"] == 3


def test_desired_state_is_retained_for_a_fresh_subscriber(fleet, bridge, mosquitto):
    doc = signed_doc("dev-c", generation=3)
    bridge.publish("dev-c", doc)
    topic = f"{PREFIX}/devices/dev-c/desired"
    # A subscriber that arrives after the publish still gets it: retained, QoS 1.
    wait_for(lambda: bridge.counters["published"] >= 1, what="the publish")
    # `published` counts the hand-over to paho, not the broker's copy: a first probe that sees the message (live
    # or retained) proves the broker has it; only then is a later subscriber's copy necessarily the retained one.
    first = MqttProbe(mosquitto.host, mosquitto.port, topics=(topic,))
    try:
        first.wait_for(topic)
    finally:
        first.stop()
    late = MqttProbe(mosquitto.host, mosquitto.port, topics=(topic,))
    try:
        got = late.wait_for(topic)
    finally:
        late.stop()
    assert got.retain and got.qos == 1
    assert got.payload == doc.to_wire()


def test_reconnect_resubscribes_and_republishes_desired_states(fleet, tmp_path):
    broker = Mosquitto(tmp_path / "mq").start()
    b = MqttBridge(fleet, broker.host, broker.port, PREFIX, reconnect_min_s=1, reconnect_max_s=1).start()
    try:
        assert b.wait_connected(10)
        broker.stop()  # a broker without persistence: every retained message is gone
        wait_for(lambda: not b.connected, what="the bridge to notice the broker is gone")
        broker.start()
        wait_for(lambda: b.counters["connects"] >= 2, 20, what="the bridge to reconnect")
        watcher = MqttProbe(broker.host, broker.port, topics=(f"{PREFIX}/devices/+/desired",))
        got = watcher.wait_for(f"{PREFIX}/devices/dev-b/desired")
        assert json.loads(got.payload)["payload"]["generation"] == 7
        # Subscriptions came back too: a report after the restart is recorded.
        watcher.publish(f"{PREFIX}/devices/dev-a/status", valid("status", "dev-a"))
        wait_for(lambda: fleet.recorded, what="a status after the reconnect")
        watcher.stop()
    finally:
        b.stop()
        broker.stop()


def test_inside_the_real_cloud_desired_goes_out_and_garbage_shows_in_stats(tmp_path, mosquitto):
    cloud = start_cloud_server(tmp_path / "cloud", mqtt=(mosquitto.host, mosquitto.port))
    try:
        admin = cloud.client()
        dev = enroll_device(admin, "dev-m")
        assert admin.post("/api/v1/models", params={"name": "digits"}, content=tiny_onnx()).status_code == 201
        assert admin.post("/api/v1/deployments", json={"model": "digits", "device_id": "dev-m"}).status_code == 201
        over_http = cloud.client(token=dev.device_token).get("/api/v1/devices/dev-m/desired").content

        # A device that connects later gets the same signed bytes, retained. (The deploy hands the document to
        # paho; a first probe seeing it proves the broker has it, so the later one's copy is the retained one.)
        topic = f"{cloud.settings.mqtt_topic_prefix}/devices/dev-m/desired"
        first = MqttProbe(mosquitto.host, mosquitto.port, topics=(topic,))
        try:
            first.wait_for(topic, lambda m: json.loads(m.payload)["payload"]["models"])
        finally:
            first.stop()
        device = MqttProbe(mosquitto.host, mosquitto.port, topics=(topic,))
        got = device.wait_for(topic, lambda m: json.loads(m.payload)["payload"]["models"])
        assert got.retain and got.payload == over_http

        base = f"{cloud.settings.mqtt_topic_prefix}/devices/dev-m"
        for channel in ("reported", "telemetry", "status"):
            device.publish(f"{base}/{channel}", b"\xff not json")
        device.publish(f"{base}/status", valid("status", "dev-m"))
        device.stop()
        wait_for(lambda: admin.get("/api/v1/devices/dev-m").json()["online"], what="the status to land")
        # Telemetry has a worker of its own (a flood never delays a status): wait for its count too.
        wait_for(lambda: admin.get("/api/v1/stats").json()["counters"].get("malformed_messages") == 3,
                 what="the three malformed messages to be counted")
    finally:
        cloud.stop()


def test_a_broker_that_drops_for_a_full_queue_shows_it_in_the_stats(tmp_path):
    """Mosquitto drops what it queued for an absent client past max_queued_messages, after PUBACKing the sender.
    The cloud reads the broker's own drop counter into `fleet stats` (agents resend what was never confirmed)."""
    broker = Mosquitto(tmp_path / "small-queue", extra_config="sys_interval 1\nmax_queued_messages 20\n").start()
    try:
        cloud = start_cloud_server(tmp_path / "cloud", mqtt=(broker.host, broker.port))
        try:
            cloud.runtime.bridge.stop()  # away; its session stays on the broker
            device = MqttProbe(broker.host, broker.port)
            for seq in range(60):
                device.publish(f"{PREFIX}/devices/dev-x/telemetry", batch("dev-x", seq))
            device.stop()
            cloud.runtime.bridge.start()
            wait_for(lambda: cloud.fleet.stats().counters.get("broker_dropped_messages", 0) >= 40, 15,
                     what="the broker's drop count in the stats")
        finally:
            cloud.stop()
    finally:
        broker.stop()
