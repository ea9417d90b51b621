"""Per-device broker logins and the ACL (cloud/mqtt_accounts.py, cloud/dynsec.py, cloud/broker_auth.py), attacked
through the real cloud on three brokers: an operator's Mosquitto with the dynamic security plugin, the Mosquitto
the cloud runs itself (embedded_broker = "auto"), and the embedded amqtt broker.

Device A, with its own valid login, goes after device B: it publishes B's reported state, telemetry and status and
subscribes to B's desired topic, to `+/desired` and to `#`. Mosquitto acknowledges a QoS 1 publish that it then
drops, so nothing here trusts the PUBACK: delivery is checked where it matters, at the cloud (its database) and at
an observer logged in as the cloud, after a positive control (A on its own topic, sent last on the same
connection, so it arrives after anything sent before it) has arrived. Then the takeovers: a client with the cloud's
or a device's client id and a bad, missing or other login must not kick the real one off. Then wrong and rotated
passwords, and revocation, which must cut a connected device off within 5 s.

On the old code (no logins, an anonymous broker) every forged message was stored and shown as B's, and any client
with the cloud's client id kicked the bridge off.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edgefleet.protos.messages import BrokerInfo, DeviceStatus, ReportedState, TelemetryBatch
from edgefleet.protos.topics import cloud_subscriptions, device_client_id, device_topics
from tests.cloud_server import CloudServer, MqttProbe, enroll_device, mqtt_connack, start_cloud_server
from tests.harness import Mosquitto, free_port, wait_for

PREFIX = "edgefleet"


@dataclass
class Device:
    """A device's own MQTT client with its login: records messages, SUBACKs and disconnects; never reconnects."""

    broker: BrokerInfo
    device_id: str
    subscriptions: tuple[str, ...] = ()
    messages: list[tuple[str, bytes]] = field(default_factory=list)
    subacks: list[bool] = field(default_factory=list)  # True: granted
    disconnects: int = 0

    def __post_init__(self) -> None:
        self.lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device_client_id(self.device_id),
                                  protocol=mqtt.MQTTv311, reconnect_on_failure=False)
        self.client.username_pw_set(self.broker.username, self.broker.password)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.on_disconnect = self._on_disconnect
        self.connected = threading.Event()
        self.client.connect(self.broker.host, self.broker.port, keepalive=30)
        self.client.loop_start()
        wait_for(self.connected.is_set, 10, what=f"{self.device_id} to log in")
        if self.subscriptions:
            wait_for(lambda: len(self.subacks) == len(self.subscriptions), 10, what=f"{self.device_id}'s SUBACK")

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if rc.is_failure:
            return
        self.connected.set()
        if self.subscriptions:
            client.subscribe([(t, 1) for t in self.subscriptions])

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, rcs: Any, props: Any) -> None:
        self.subacks.extend(not rc.is_failure for rc in rcs)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.messages.append((msg.topic, bytes(msg.payload)))

    def _on_disconnect(self, *args: Any) -> None:
        self.disconnects += 1
        self.connected.clear()

    def received(self, topic: str) -> list[bytes]:
        with self.lock:
            return [p for t, p in self.messages if t == topic]

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture(params=["operator-mosquitto", "own-mosquitto", "embedded"])
def cloud(request, tmp_path: Path):
    broker = None
    if request.param == "operator-mosquitto":
        broker = Mosquitto(tmp_path / "mq", dynsec=True).start()
        server = start_cloud_server(tmp_path / "cloud", mqtt=(broker.host, broker.port), **broker.cloud_settings())
    elif request.param == "own-mosquitto":
        server = start_cloud_server(tmp_path / "cloud", mqtt=("127.0.0.1", free_port()), embedded_broker="auto",
                                    mqtt_auth="auto")
        assert type(server.runtime.broker).__name__ == "MosquittoProcess"
    else:
        server = start_cloud_server(tmp_path / "cloud", mqtt="embedded")
    try:
        yield server
    finally:
        server.stop()
        if broker is not None:
            broker.stop()


def _observer(cloud: CloudServer) -> MqttProbe:
    login = cloud.mqtt_login
    return MqttProbe(cloud.mqtt_host, cloud.mqtt_port, topics=tuple(cloud_subscriptions(PREFIX)),
                     client_id=f"{login.client_id}-observer", username=login.username, password=login.password)


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _report(device_id: str, note: str) -> bytes:
    return ReportedState(device_id=device_id, generation=0, models=[], agent_version=note,
                         reported_at=_now()).to_wire()


def test_a_device_reaches_only_its_own_topics(cloud):
    with cloud.client() as admin:
        a = enroll_device(admin, "dev-a")
        enroll_device(admin, "dev-b")
    assert a.broker.username == "dev-a" and a.broker.password
    ta, tb = device_topics(PREFIX, "dev-a"), device_topics(PREFIX, "dev-b")
    observer = _observer(cloud)
    # Its own desired topic last: its retained copy then arrives after anything the others could have let through.
    dev_a = Device(a.broker, "dev-a", subscriptions=(tb.desired, f"{PREFIX}/devices/+/desired", "#", ta.desired))
    try:
        assert dev_a.subacks == [False, False, False, True]
        forged = {
            tb.reported: _report("dev-b", "forged"),
            tb.telemetry: TelemetryBatch(device_id="dev-b", seq=1, windows=[], sent_at=_now()).to_wire(),
            tb.status: DeviceStatus(device_id="dev-b", online=True, at=_now()).to_wire(),
        }
        for topic, payload in forged.items():
            dev_a.publish(topic, payload, retain=topic != tb.telemetry)
        dev_a.publish(ta.reported, _report("dev-a", "control"), retain=True)  # the positive control, sent last

        observer.wait_for(ta.reported)
        wait_for(lambda: cloud.fleet.store.get_device("dev-a").reported_doc, 10, what="A's own report recorded")
        for topic in forged:
            assert observer.received(topic) == [], f"the broker delivered A's forgery on {topic}"
        b = cloud.fleet.get_device("dev-b")
        assert b.reported_generation is None and not b.online and b.telemetry == []
        assert cloud.fleet.store.get_device("dev-b").reported_doc is None

        dev_a.client.subscribe(ta.desired, qos=1)  # again: the broker resends its retained copy
        wait_for(lambda: len(dev_a.received(ta.desired)) >= 1, 10, what="A's own desired state")
        assert all(t == ta.desired for t, _ in dev_a.messages), "A received another device's messages"
    finally:
        dev_a.stop()
        observer.stop()


def test_a_last_will_on_another_devices_topic_is_never_delivered(cloud):
    with cloud.client() as admin:
        a = enroll_device(admin, "dev-a")
        enroll_device(admin, "dev-b")
    ta, tb = device_topics(PREFIX, "dev-a"), device_topics(PREFIX, "dev-b")
    observer = _observer(cloud)
    forger = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device_client_id("dev-a"), protocol=mqtt.MQTTv311,
                         reconnect_on_failure=False)
    forger.username_pw_set("dev-a", a.broker.password)
    forger.will_set(tb.status, DeviceStatus(device_id="dev-b", online=False, at=None).to_wire(), qos=1, retain=True)
    answers: list[Any] = []
    forger.on_connect = lambda c, u, f, rc, p: answers.append(rc)
    forger.connect(cloud.mqtt_host, cloud.mqtt_port, keepalive=30)
    forger.loop_start()
    try:
        wait_for(lambda: answers, 10, what="the forger's CONNACK")
        # Mosquitto lets it in and drops the will when it would publish it; the embedded broker refuses the login.
        sock = forger.socket()
        forger.loop_stop()
        if sock is not None:
            sock.close()  # vanish without DISCONNECT: the broker's cue to publish the will
        # A's real login, same client id: once it is in, the broker has dealt with the forger's will.
        dev_a = Device(a.broker, "dev-a")
        dev_a.publish(ta.reported, _report("dev-a", "control"), retain=True)
        observer.wait_for(ta.reported)
        assert observer.received(tb.status) == []
        dev_a.stop()
    finally:
        observer.stop()


def test_no_login_can_take_the_clouds_or_a_devices_client_id(cloud):
    with cloud.client() as admin:
        a = enroll_device(admin, "dev-a")
        b = enroll_device(admin, "dev-b")
    login = cloud.mqtt_login
    dev_a = Device(a.broker, "dev-a")
    connects = cloud.bridge.counters["connects"]
    try:
        host, port = cloud.mqtt_host, cloud.mqtt_port
        attempts = [
            (device_client_id("dev-a"), None, None),
            (device_client_id("dev-a"), "dev-b", b.broker.password),
            (device_client_id("dev-a"), "dev-a", "not-the-password"),
            (login.client_id, None, None),
            (login.client_id, "dev-b", b.broker.password),
            (login.client_id, login.username, "not-the-password"),
        ]
        for client_id, username, password in attempts:
            rc = mqtt_connack(host, port, client_id=client_id, username=username, password=password)
            assert rc.is_failure, f"{username!r} got in with client id {client_id!r}"
        # A device login is good only with its own client id (not another device's, not the cloud's).
        assert mqtt_connack(host, port, client_id=device_client_id("dev-b"), username="dev-a",
                            password=a.broker.password).is_failure
        assert dev_a.disconnects == 0 and dev_a.connected.is_set()
        assert cloud.bridge.connected and cloud.bridge.counters["connects"] == connects
        # Still working, not just still connected: A's report reaches the cloud.
        dev_a.publish(device_topics(PREFIX, "dev-a").reported, _report("dev-a", "after"), retain=True)
        wait_for(lambda: cloud.fleet.store.get_device("dev-a").reported_doc, 10, what="A's report after the attacks")
    finally:
        dev_a.stop()


def test_wrong_and_rotated_passwords_are_refused(cloud):
    with cloud.client() as admin:
        first = enroll_device(admin, "dev-a")
        host, port, cid = cloud.mqtt_host, cloud.mqtt_port, device_client_id("dev-a")
        assert not mqtt_connack(host, port, client_id=cid, username="dev-a", password=first.broker.password).is_failure
        assert mqtt_connack(host, port, client_id=cid, username="dev-a", password="wrong").is_failure
        assert mqtt_connack(host, port, client_id="anonymous-tool").is_failure  # no anonymous clients at all
        cloud.fleet.reset_device("dev-a")  # the operator's word; the next enrollment is admitted and rotates
        second = enroll_device(admin, "dev-a")
    assert second.broker.password != first.broker.password
    assert mqtt_connack(host, port, client_id=cid, username="dev-a", password=first.broker.password).is_failure
    assert not mqtt_connack(host, port, client_id=cid, username="dev-a", password=second.broker.password).is_failure
    # The database holds a salted hash only, never the password.
    row = cloud.fleet.store.get_mqtt_credential("dev-a")
    assert row.password_hash.startswith("scrypt$") and second.broker.password not in row.password_hash


def test_revoking_a_device_cuts_it_off_within_5_s(cloud):
    with cloud.client() as admin:
        a = enroll_device(admin, "dev-a")
        b = enroll_device(admin, "dev-b")
    dev_a, dev_b = Device(a.broker, "dev-a"), Device(b.broker, "dev-b")
    try:
        cloud.fleet.revoke_device("dev-a")
        wait_for(lambda: dev_a.disconnects > 0, 5, what="the broker to drop the revoked device")
        assert mqtt_connack(cloud.mqtt_host, cloud.mqtt_port, client_id=device_client_id("dev-a"), username="dev-a",
                            password=a.broker.password).is_failure
        assert dev_b.connected.is_set() and dev_b.disconnects == 0  # only the revoked one
    finally:
        dev_a.stop()
        dev_b.stop()


def test_the_clouds_own_login_cannot_be_enrolled_as_a_device(cloud):
    with cloud.client() as admin:
        r = admin.post("/api/v1/enrollment-tokens", json={"note": "t"})
        token = r.json()["token"]
        r = admin.post("/api/v1/enroll", headers={"Authorization": f"Bearer {token}"},
                       json={"device_id": cloud.mqtt_login.username, "device_class": "rpi4"})
    assert r.status_code == 409, r.text
    assert "cloud's own MQTT login" in r.json()["message"]


def test_a_broker_without_dynamic_security_fails_enrollment_with_503_saying_why(tmp_path, mosquitto):
    # mqtt_auth = "dynsec" against an open Mosquitto (no plugin): nobody answers the commands.
    with start_cloud_server(tmp_path / "cloud", mqtt=(mosquitto.host, mosquitto.port), mqtt_auth="dynsec",
                            mqtt_command_timeout_s=1.0) as cloud, cloud.client() as admin:
        token = admin.post("/api/v1/enrollment-tokens", json={"note": "t"}).json()["token"]
        r = admin.post("/api/v1/enroll", headers={"Authorization": f"Bearer {token}"},
                       json={"device_id": "dev-a", "device_class": "rpi4"})
    assert r.status_code == 503, r.text
    assert "dynamic security plugin" in r.json()["message"] and 'mqtt_auth = "none"' in r.json()["message"]
