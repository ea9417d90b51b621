"""cloud/broker.py: the embedded amqtt broker speaks enough MQTT for edgefleet (retained, QoS 1, last will) to a
paho 2.x client, the Mosquitto helper runs a real one, and `plan_broker` picks what the settings ask for."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from edgefleet.cloud.broker import EmbeddedBroker, MosquittoProcess, plan_broker, start_broker
from tests.cloud_server import MqttProbe, mqtt_connack
from tests.harness import free_port, port_open, wait_for


@pytest.fixture
def embedded():
    broker = EmbeddedBroker("127.0.0.1", free_port()).start()
    try:
        yield broker
    finally:
        broker.stop()


def test_embedded_broker_delivers_retained_qos1_to_a_fresh_subscriber(embedded):
    pub = MqttProbe(embedded.host, embedded.port)
    pub.publish("edgefleet/devices/d1/desired", b'{"generation": 1}', retain=True, qos=1)
    pub.publish("edgefleet/devices/d1/desired", b'{"generation": 2}', retain=True, qos=1)
    sub = MqttProbe(embedded.host, embedded.port, topics=("edgefleet/devices/+/desired",))
    try:
        got = sub.wait_for("edgefleet/devices/d1/desired")
        assert got.retain and got.qos == 1
        assert got.payload == b'{"generation": 2}'  # only the latest retained message
    finally:
        pub.stop()
        sub.stop()


def test_embedded_broker_sends_the_last_will_when_a_client_vanishes(embedded):
    watcher = MqttProbe(embedded.host, embedded.port, topics=("edgefleet/devices/+/status",))
    device = MqttProbe(embedded.host, embedded.port, will=("edgefleet/devices/d2/status", b'{"online": false}'))
    try:
        device.drop()
        got = watcher.wait_for("edgefleet/devices/d2/status")
        assert got.payload == b'{"online": false}'
    finally:
        watcher.stop()


def test_embedded_broker_stops_and_frees_its_port():
    port = free_port()
    broker = EmbeddedBroker("127.0.0.1", port).start()
    assert port_open("127.0.0.1", port)
    broker.stop()
    wait_for(lambda: not port_open("127.0.0.1", port), 5, what="the port to close")
    broker.stop()  # idempotent


def test_embedded_broker_on_a_taken_port_says_so():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(RuntimeError, match="could not listen"):
            EmbeddedBroker("127.0.0.1", taken.getsockname()[1]).start()


def test_plan_follows_the_setting(monkeypatch):
    port = free_port()
    assert plan_broker("never", "127.0.0.1", port) == "none"
    assert plan_broker("always", "127.0.0.1", port) == "embedded"
    monkeypatch.setattr("edgefleet.cloud.broker.mosquitto_binary", lambda: None)
    assert plan_broker("auto", "127.0.0.1", port) == "embedded"
    monkeypatch.setattr("edgefleet.cloud.broker.mosquitto_binary", lambda: "/usr/sbin/mosquitto")
    assert plan_broker("auto", "127.0.0.1", port) == "mosquitto"
    with pytest.raises(ValueError, match="auto, always or never"):
        plan_broker("sometimes", "127.0.0.1", port)


def test_auto_uses_a_broker_that_already_listens(mosquitto, tmp_path):
    assert plan_broker("auto", mosquitto.host, mosquitto.port) == "none"
    assert start_broker("auto", mosquitto.host, mosquitto.port, tmp_path) is None


def test_mosquitto_process_keeps_retained_messages_across_a_restart(tmp_path):
    port = free_port()
    broker = MosquittoProcess(tmp_path / "mq", "127.0.0.1", port).start()
    try:
        pub = MqttProbe("127.0.0.1", port)
        pub.publish("edgefleet/devices/d3/desired", b"doc", retain=True)
        pub.stop()
        broker.stop()
        broker.start()
        sub = MqttProbe("127.0.0.1", port, topics=("edgefleet/devices/d3/desired",))
        assert sub.wait_for("edgefleet/devices/d3/desired").payload == b"doc"
        sub.stop()
    finally:
        broker.stop()
    assert not port_open("127.0.0.1", port)


def test_auto_with_logins_runs_mosquitto_only_where_it_can_secure_it(monkeypatch):
    port = free_port()
    monkeypatch.setattr("edgefleet.cloud.broker.mosquitto_binary", lambda: "/usr/sbin/mosquitto")
    monkeypatch.setattr("edgefleet.cloud.broker.mosquitto_ctrl_binary", lambda: "/usr/bin/mosquitto_ctrl")
    monkeypatch.setattr("edgefleet.cloud.broker.dynsec_plugin", lambda configured=None: Path("/x/dynsec.so"))
    assert plan_broker("auto", "127.0.0.1", port, dynsec=True) == "mosquitto"
    monkeypatch.setattr("edgefleet.cloud.broker.dynsec_plugin", lambda configured=None: None)
    assert plan_broker("auto", "127.0.0.1", port, dynsec=True) == "embedded"  # never an open Mosquitto instead
    assert plan_broker("auto", "127.0.0.1", port) == "mosquitto"  # logins off: as before


def test_mosquitto_process_with_dynsec_refuses_anonymous_clients_and_admits_its_admin(tmp_path):
    from edgefleet.cloud.broker import DynsecSetup, dynsec_plugin

    port = free_port()
    setup = DynsecSetup(dynsec_plugin(), "edgefleet-cloud", "admin-pw")
    broker = MosquittoProcess(tmp_path / "mq", "127.0.0.1", port, dynsec=setup).start()
    try:
        assert oct((tmp_path / "mq" / "dynamic-security.json").stat().st_mode & 0o777) == "0o600"
        assert mqtt_connack("127.0.0.1", port, client_id="anonymous").is_failure
        assert not mqtt_connack("127.0.0.1", port, client_id="edgefleet-cloud", username="edgefleet-cloud",
                                password="admin-pw").is_failure
        assert mqtt_connack("127.0.0.1", port, client_id="edgefleet-cloud", username="edgefleet-cloud",
                            password="wrong").is_failure
        broker.stop()
        broker.start()  # the accounts file is kept, not made again
        assert not mqtt_connack("127.0.0.1", port, client_id="edgefleet-cloud", username="edgefleet-cloud",
                                password="admin-pw").is_failure
    finally:
        broker.stop()
