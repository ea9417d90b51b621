"""MqttLink against a real Mosquitto: desired delivery, last will, PUBACK-gated publish, broker down at start."""

from __future__ import annotations

import random
import threading
from datetime import datetime, timezone

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edgefleet.edge_agent.link_mqtt import MqttLink
from edgefleet.protos.messages import (
    BrokerInfo,
    DeviceStatus,
    ReportedState,
    TelemetryAck,
    TelemetryBatch,
    parse_message,
)
from edgefleet.protos.topics import device_topics
from tests.harness import Mosquitto, free_port, wait_for


class Watcher:
    """A plain paho client that records what it sees on a topic filter."""

    def __init__(self, broker, topic: str, client_id: str = "watcher"):
        self.messages: list[tuple[str, bytes, bool]] = []
        self.lock = threading.Lock()
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
        c.on_message = self._on_message
        c.connect(broker.host, broker.port)
        c.subscribe(topic, qos=1)
        c.loop_start()
        self.client = c

    def _on_message(self, client, userdata, msg):
        with self.lock:
            self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))

    def stop(self):
        self.client.disconnect()
        self.client.loop_stop()


class CloudStandIn(Watcher):
    """Plays the cloud's part of the telemetry protocol: an ack for every batch it sees, while `answer`."""

    def __init__(self, broker, topics):
        self.answer = True
        self.topics = topics
        super().__init__(broker, topics.telemetry, client_id="cloud-stand-in")

    def _on_message(self, client, userdata, msg):
        batch = parse_message(bytes(msg.payload), TelemetryBatch)
        if self.answer:
            ack = TelemetryAck(device_id=batch.device_id, epoch=batch.epoch, seqs=[batch.seq])
            client.publish(self.topics.ack, ack.to_wire(), qos=1)


def _link(broker, received, connects, device="dev-1"):
    info = BrokerInfo(host=broker.host, port=broker.port, topic_prefix="t", keepalive_s=5)
    return MqttLink(info, device, on_desired=received.append, on_connected=lambda: connects.append(1),
                    retry_initial_s=1, retry_max_s=2)


def test_desired_delivery_status_and_puback(mosquitto):
    topics = device_topics("t", "dev-1")
    watcher = Watcher(mosquitto, "t/devices/dev-1/#")
    received: list[bytes] = []
    connects: list[int] = []
    link = _link(mosquitto, received, connects)
    link.start()
    try:
        wait_for(lambda: link.connected, 10, what="link connected")
        wait_for(lambda: connects, 5, what="on_connected called")
        watcher.client.publish(topics.desired, b'{"kind":"x"}', qos=1)
        watcher.client.publish(topics.desired, b"", qos=1)  # a clear: not handed on
        wait_for(lambda: received == [b'{"kind":"x"}'], 5, what="desired payload")
        batch = TelemetryBatch(device_id="dev-1", seq=1, windows=[], sent_at=datetime.now(timezone.utc))
        wait_for(lambda: link._acks_ok, 5, what="the ack subscription")
        # The broker has it (PUBACK) but no cloud confirmed storing it: not acknowledged, it stays in the outbox.
        assert link.publish_telemetry(batch, 0.5) is False
        wait_for(lambda: any(t == topics.telemetry for t, _, _ in watcher.messages), 5, what="telemetry seen")
        # The cloud stores it later (it was away) and says so: the confirmation is kept for the outbox.
        ack = TelemetryAck(device_id="dev-1", epoch=0, seqs=[1])
        watcher.client.publish(topics.ack, ack.to_wire(), qos=1)
        wait_for(lambda: link.take_acked() == [(0, 1)], 5, what="the late ack")
        assert link.take_acked() == []  # each once
        # A cloud that answers: True only on its ack, and only for this (epoch, seq).
        cloud = CloudStandIn(mosquitto, topics)
        try:
            assert link.publish_telemetry(batch.model_copy(update={"seq": 2}), 10) is True
            other_device = TelemetryAck(device_id="dev-9", epoch=0, seqs=[3]).to_wire()
            watcher.client.publish(topics.ack, other_device, qos=1)  # not ours (cannot happen through the ACL)
            for garbage in (b"\xff{", b"[]", b'{"kind": "telemetry_ack", "device_id": "dev-1", "seqs": [-1]}'):
                watcher.client.publish(topics.ack, garbage, qos=1)  # logged and ignored; the link goes on
            cloud.answer = False
            assert link.publish_telemetry(batch.model_copy(update={"seq": 3}), 0.5) is False
            assert link.take_acked() == [] and link.connected  # neither the stranger's ack nor garbage counted
        finally:
            cloud.stop()
        report = ReportedState(device_id="dev-1", generation=3, reported_at=datetime.now(timezone.utc))
        assert link.publish_reported(report, 10) is True  # the link picks the topic and retains it
        later = Watcher(mosquitto, topics.reported, client_id="late-watcher")
        try:
            wait_for(lambda: later.messages, 5, what="retained reported state")
            assert later.messages[0][2] is True and parse_message(later.messages[0][1], ReportedState) == report
        finally:
            later.stop()
        status = [parse_message(p, DeviceStatus) for t, p, _ in watcher.messages if t == topics.status]
        assert status and status[-1].online is True
    finally:
        link.stop()
        watcher.stop()


def test_a_retained_desired_state_on_subscribe_goes_to_on_retained_a_live_one_to_on_desired(mosquitto):
    """The daemon tells the broker's kept copy (which may lag the cloud's database) from a live publish: MQTT
    3.1.1 sets RETAIN on delivery only for a message sent because of a new subscription."""
    topics = device_topics("t", "dev-r")
    watcher = Watcher(mosquitto, "t/devices/dev-r/#", client_id="retainer")
    watcher.client.publish(topics.desired, b'{"kept":1}', qos=1, retain=True).wait_for_publish(5)
    live: list[bytes] = []
    kept: list[bytes] = []
    info = BrokerInfo(host=mosquitto.host, port=mosquitto.port, topic_prefix="t", keepalive_s=5)
    link = MqttLink(info, "dev-r", on_desired=live.append, on_retained=kept.append, on_connected=lambda: None,
                    retry_initial_s=1, retry_max_s=2)
    link.start()
    try:
        wait_for(lambda: kept == [b'{"kept":1}'], 10, what="the retained copy on subscribe")
        watcher.client.publish(topics.desired, b'{"live":2}', qos=1, retain=True)  # retained, but to a subscriber
        wait_for(lambda: live == [b'{"live":2}'], 5, what="the live publish")
        assert kept == [b'{"kept":1}']
    finally:
        link.stop()
        watcher.client.publish(topics.desired, b"", qos=1, retain=True).wait_for_publish(5)
        watcher.stop()


def test_last_will_marks_offline_when_the_agent_dies(mosquitto):
    topics = device_topics("t", "dev-2")
    received: list[bytes] = []
    link = _link(mosquitto, received, [], device="dev-2")
    link.start()
    wait_for(lambda: link.connected, 10, what="link connected")
    # Kill the socket without DISCONNECT, as a crash or power loss would.
    link._client.socket().close()
    watcher = Watcher(mosquitto, topics.status)
    try:
        def offline():
            with watcher.lock:
                return [parse_message(p, DeviceStatus) for _, p, _ in watcher.messages][-1:] and \
                    parse_message(watcher.messages[-1][1], DeviceStatus).online is False
        wait_for(offline, 15, what="last will 'offline' published by the broker")
    finally:
        link.stop(graceful=False)
        watcher.stop()


def test_broker_down_at_start_then_up(tmp_path):
    port = free_port()
    broker = Mosquitto(tmp_path / "late", port=port)
    received: list[bytes] = []
    connects: list[int] = []
    info = BrokerInfo(host="127.0.0.1", port=port, topic_prefix="t", keepalive_s=5)
    link = MqttLink(info, "dev-3", on_desired=received.append, on_connected=lambda: connects.append(1),
                    retry_initial_s=1, retry_max_s=1)
    link.start()  # must not raise while the broker is down
    try:
        assert not link.connected
        assert link.publish_status(DeviceStatus(device_id="dev-3", online=True), 1) is False
        broker.start()
        wait_for(lambda: link.connected, 20, what="link connected after the broker came up")
        # broker restart: the link reconnects and calls on_connected again
        broker.stop()
        wait_for(lambda: not link.connected, 10, what="disconnect noticed")
        broker.start()
        wait_for(lambda: len(connects) >= 2, 20, what="reconnect")
    finally:
        link.stop()
        broker.stop()


def test_reconnect_delays_are_full_jitter_not_whole_seconds():
    # Issue 7: the old link rounded its one jittered delay to whole seconds (always 1 at the default 1 s), and paho
    # doubled it from there: every agent of a fleet waited 1, 2, 4 ... s after a broker restart, in lockstep.
    info = BrokerInfo(host="127.0.0.1", port=free_port(), topic_prefix="t", keepalive_s=5)  # nothing listens
    links = [MqttLink(info, f"dev-j{i}", on_desired=lambda raw: None, on_connected=lambda: None,
                      retry_initial_s=0.05, retry_max_s=0.4, rand=random.Random(i)) for i in range(3)]
    for link in links:
        link.start()
    try:
        wait_for(lambda: all(len(link._client.waits) >= 4 for link in links), 20, what="four waits per link")
    finally:
        for link in links:
            link.stop()
    waits = [link._client.waits[:4] for link in links]
    for per_link in waits:
        assert all(0 <= w < min(0.4, 0.05 * 2**k) for k, w in enumerate(per_link))  # inside each window
    assert len({tuple(w) for w in waits}) == 3  # three agents, three different schedules


def test_the_link_logs_in_with_its_device_login_and_client_id(tmp_path):
    broker = Mosquitto(tmp_path / "secure", dynsec=True).start()
    try:
        from edgefleet.cloud.dynsec import DynsecAccounts
        from edgefleet.cloud.mqtt_accounts import CloudLogin

        login = CloudLogin(broker.admin_username, broker.admin_password, "test-admin")
        accounts = DynsecAccounts(broker.host, broker.port, login, "t").start()
        try:
            assert accounts.wait_ready(10)
            accounts.issue("dev-4", "pw-dev-4")
        finally:
            accounts.stop()
        received: list[bytes] = []
        good = BrokerInfo(host=broker.host, port=broker.port, topic_prefix="t", keepalive_s=5, username="dev-4",
                          password="pw-dev-4")
        link = MqttLink(good, "dev-4", on_desired=received.append, on_connected=lambda: None)
        link.start()
        try:
            wait_for(lambda: link.connected, 10, what="the link logged in")
            report = ReportedState(device_id="dev-4", generation=0, models=[], agent_version="t",
                                   reported_at=datetime.now(timezone.utc))
            assert link.publish_reported(report, 5) is True
        finally:
            link.stop()
        bad = good.model_copy(update={"password": "wrong"})
        refused = MqttLink(bad, "dev-4", on_desired=received.append, on_connected=lambda: None,
                           retry_initial_s=0.05, retry_max_s=0.2)
        refused.start()
        try:
            wait_for(lambda: len(refused._client.waits) >= 2, 10, what="the refused link backing off")
            assert not refused.connected
        finally:
            refused.stop()
    finally:
        broker.stop()
