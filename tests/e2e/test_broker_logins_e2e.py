"""End to end with per-device broker logins: real `edgefleet-agent` processes enroll, receive their own MQTT login,
and work over a Mosquitto that refuses anonymous clients (dynamic security plugin, provisioned by the cloud); a
revoked agent is cut off the broker and goes on over HTTP. On the old code the agents connected anonymously, which
this broker refuses: they would never come online.

MQTT only: broker logins are what is under test, and a gRPC agent has none (its stream is authenticated by the
device token, whose refusal and revocation tests/edge_agent/test_link_grpc.py covers)."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgefleet.protos.topics import device_client_id
from tests.cloud_server import mqtt_connack, start_cloud_server
from tests.e2e.test_agents_e2e import X4, device, push, start_agent, wait_in_sync
from tests.harness import Mosquitto, wait_for


@pytest.fixture
def secured(tmp_path: Path):
    broker = Mosquitto(tmp_path / "mosquitto", dynsec=True).start()
    server = start_cloud_server(tmp_path / "cloud", mqtt=(broker.host, broker.port), **broker.cloud_settings())
    try:
        yield broker, server
    finally:
        server.stop()
        broker.stop()


def test_agents_work_with_their_own_logins_on_a_broker_that_refuses_anonymous_clients(tmp_path, secured, agents):
    broker, cloud = secured
    assert mqtt_connack(broker.host, broker.port, client_id="anonymous").is_failure
    with cloud.client() as admin:
        pi = start_agent(agents, tmp_path, cloud, admin, "pi-1", "rpi4")
        start_agent(agents, tmp_path, cloud, admin, "pi-2", "rpi4")
        # `online` reaches the cloud only as an MQTT status message: each agent logged in with its own login.
        for device_id in ("pi-1", "pi-2"):
            wait_for(lambda d=device_id: admin.get(f"/api/v1/devices/{d}").status_code == 200
                     and device(admin, d)["online"], 30, what=f"{device_id} online over MQTT")
        version = push(admin)
        admin.post("/api/v1/deployments", json={"model": "tiny", "device_class": "rpi4"}).raise_for_status()
        wait_in_sync(admin, "pi-1", version)
        wait_in_sync(admin, "pi-2", version)
        for _ in range(5):
            pi.infer("tiny", X4, [1, 4])
        wait_for(lambda: device(admin, "pi-1")["telemetry"], 20, what="telemetry from pi-1")
        assert cloud.bridge.counters["recorded_reported"] > 0 and cloud.bridge.counters["recorded_status"] > 0

        # Revoked: the broker drops pi-2 and refuses its login; the cloud marks it offline.
        cloud.fleet.revoke_device("pi-2")
        wait_for(lambda: not device(admin, "pi-2")["online"], 10, what="pi-2 offline after revocation")
        wait_for(lambda: "MQTT connect refused" in agents[1].log_text(), 20, what="pi-2's link refused by the broker")
        assert device(admin, "pi-1")["online"]  # the other agent is untouched
        assert mqtt_connack(broker.host, broker.port, client_id=device_client_id("pi-1")).is_failure
