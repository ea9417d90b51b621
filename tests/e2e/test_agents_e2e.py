"""End to end: the real cloud (uvicorn on a real port) and real `edgefleet-agent` processes, every case on both
transports: "mqtt" (a real Mosquitto) and "grpc" (the cloud's agent channel on a real port, no broker at all).

A model travels from the cloud to agents, is verified through TUF, smoke-tested, activated, serves inferences on
localhost and a unix socket, and its telemetry comes back. Then the hostile cases: replayed, foreign and garbage
desired states on the device's topic or down its stream (also after a restart), a signed desired state that names a
bundle that does not exist, the link down when the agent starts (the broker; on gRPC the agent channel), and a
restart with no network at all.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from edgefleet.protos.messages import DesiredModel, DesiredState
from tests.cloud_server import start_cloud_server, tiny_onnx
from tests.e2e.agent_process import TRANSPORTS, AgentProcess, agent_on
from tests.harness import Mosquitto, free_port, wait_for

pytestmark = pytest.mark.parametrize("transport", TRANSPORTS)

X4 = [0.5, -1.0, 2.0, 0.25]


def enrollment_token(admin) -> str:
    resp = admin.post("/api/v1/enrollment-tokens", json={"note": "e2e"})
    resp.raise_for_status()
    return resp.json()["token"]


def start_agent(agents, tmp_path, cloud, admin, device_id, device_class, transport="mqtt", **kw) -> AgentProcess:
    agent = agent_on(transport, cloud, tmp_path / "agents", device_id, device_class, enrollment_token(admin), **kw)
    agents.append(agent.start())
    return agent


def push(admin, name="tiny", seed_scale=1) -> int:
    resp = admin.post(f"/api/v1/models?name={name}", content=tiny_onnx(),
                      headers={"Content-Type": "application/octet-stream"})
    resp.raise_for_status()
    return resp.json()["version"]


def device(admin, device_id) -> dict:
    resp = admin.get(f"/api/v1/devices/{device_id}")
    resp.raise_for_status()
    return resp.json()


def status_of(admin, device_id) -> list[dict]:
    return [r for r in admin.get("/api/v1/status").json() if r["device_id"] == device_id]


def wait_in_sync(admin, device_id, version, timeout_s=30):
    def ok():
        rows = status_of(admin, device_id)
        return rows and rows[0]["state"] == "in_sync" and rows[0]["active_version"] == version
    wait_for(ok, timeout_s, what=f"{device_id} in sync at v{version}")


def wait_enrolled(admin, device_id):
    wait_for(lambda: admin.get(f"/api/v1/devices/{device_id}").status_code == 200, 20, what=f"{device_id} enrolled")


def test_model_travels_to_agents_runs_and_reports(tmp_path, cloud, admin, agents, transport):
    pi = start_agent(agents, tmp_path, cloud, admin, "pi-1", "rpi4", transport, labels={"site": "lab"})
    gw = start_agent(agents, tmp_path, cloud, admin, "gw-1", "x86-cpu", transport)
    wait_enrolled(admin, "pi-1")
    wait_enrolled(admin, "gw-1")
    wait_for(lambda: device(admin, "pi-1")["online"] and device(admin, "gw-1")["online"], 20,
             what=f"both agents online over {transport}")
    v1 = push(admin)
    admin.post("/api/v1/deployments", json={"model": "tiny", "device_class": "rpi4"}).raise_for_status()
    wait_in_sync(admin, "pi-1", v1)
    assert status_of(admin, "gw-1")[0]["state"] == "no_model"  # another class: untouched

    out = pi.infer("tiny", X4, [1, 4])
    assert out["model_name"] == "tiny" and out["outputs"][0]["shape"] == [1, 2]
    assert out["parameters"]["where"] == "local" and out["parameters"]["energy_source"] == "estimated"
    out_unix = pi.infer("tiny", X4, [1, 4], unix=True)
    assert out_unix["outputs"][0]["data"] == out["outputs"][0]["data"]
    for _ in range(20):
        pi.infer("tiny", X4, [1, 4])

    def telemetry_in():
        t = device(admin, "pi-1")["telemetry"]
        return t and sum(w["count"] for w in t) >= 22 and t[0]["mean_mj"] and t[0]["p95_ms"]
    wait_for(telemetry_in, 20, what="telemetry from pi-1 in the cloud")
    row = status_of(admin, "pi-1")[0]
    assert row["p50_ms"] > 0 and row["mean_mj"] > 0 and row["energy_source"] == "estimated"

    # A new version by label; the previous one stays on disk for roll back.
    v2 = push(admin)
    admin.post("/api/v1/deployments", json={"model": "tiny", "label": "site=lab"}).raise_for_status()
    wait_in_sync(admin, "pi-1", v2)
    # It came over the test's transport: with the link up the agent polls no HTTP (only v1 could have raced the
    # desired-state fetch an agent makes when its link connects).
    assert re.search(rf"accepted desired state generation \d+ from {transport}: tiny v{v2}\b", pi.log_text())
    models = pi.data_dir / "models" / "tiny"
    assert (models / str(v1)).is_dir() and (models / str(v2)).is_dir()
    assert Path(models / "current").resolve().name == str(v2)
    # And by device id to the gateway.
    admin.post("/api/v1/deployments", json={"model": "tiny", "version": v1, "device_id": "gw-1"}).raise_for_status()
    wait_in_sync(admin, "gw-1", v1)
    assert gw.infer("tiny", X4, [1, 4])["model_version"] == str(v1)


def test_hostile_desired_states_are_refused_also_after_restart(tmp_path, cloud, admin, agents, downlink, transport):
    """On MQTT the hostile documents are published on the device's topic (the replay retained, so the broker hands
    it over again after the restart); on gRPC they are pushed down the device's stream (the replay pushed again
    down the stream the restarted agent opens)."""
    pi = start_agent(agents, tmp_path, cloud, admin, "pi-2", "rpi4", transport)
    start_agent(agents, tmp_path, cloud, admin, "other-1", "rpi4", transport)
    wait_enrolled(admin, "pi-2")
    wait_enrolled(admin, "other-1")
    v1 = push(admin)
    admin.post("/api/v1/deployments", json={"model": "tiny", "device_class": "rpi4"}).raise_for_status()
    wait_in_sync(admin, "pi-2", v1)
    old_doc = admin.get("/api/v1/devices/pi-2/desired").content  # generation N, validly signed
    foreign_doc = admin.get("/api/v1/devices/other-1/desired").content
    v2 = push(admin)
    admin.post("/api/v1/deployments", json={"model": "tiny", "device_id": "pi-2"}).raise_for_status()
    wait_in_sync(admin, "pi-2", v2)

    def refused(text):
        return lambda: text in (device(admin, "pi-2")["last_error"] or "")

    downlink.send("pi-2", old_doc, retain=True)  # a replay: older generation, valid signature
    wait_for(refused(f"refused desired state from {transport}"), 15, what="replayed desired state refused")
    assert "not newer" in device(admin, "pi-2")["last_error"]
    downlink.send("pi-2", foreign_doc, retain=True)  # another device's document
    wait_for(refused("device"), 15, what="foreign desired state refused")
    for garbage in (b"\x00\xff garbage", b"[]", b'{"kind":"signed_desired_state"}', b"{" * 10000):
        downlink.send("pi-2", garbage)
    wait_for(lambda: pi.log_text().count(f"refused desired state from {transport}") >= 6, 15,
             what="every garbage document refused")
    # The agent is alive and still serves v2 after the garbage.
    assert pi.infer("tiny", X4, [1, 4])["model_version"] == str(v2)

    # Restart: the highest generation is on disk, so the replay is refused again.
    pi.stop()
    pi.start()
    downlink.send_after_restart("pi-2", old_doc)
    wait_for(lambda: f"refused desired state from {transport}" in pi.log_text().split("agent stopped")[-1], 15,
             what="replay refused after restart")
    assert pi.infer("tiny", X4, [1, 4])["model_version"] == str(v2)
    assert Path(pi.data_dir / "models" / "tiny" / "current").resolve().name == str(v2)


def test_signed_desired_state_naming_a_missing_bundle_fails_with_a_reason(tmp_path, cloud, admin, agents, downlink,
                                                                          transport):
    pi = start_agent(agents, tmp_path, cloud, admin, "pi-3", "rpi4", transport)
    wait_enrolled(admin, "pi-3")
    v1 = push(admin)
    admin.post("/api/v1/deployments", json={"model": "tiny", "device_id": "pi-3"}).raise_for_status()
    wait_in_sync(admin, "pi-3", v1)
    now = datetime.now(timezone.utc)
    signed = []

    def make_doc(generation):
        signed.append(cloud.fleet.signer.sign(DesiredState(
            device_id="pi-3", device_class="rpi4", generation=generation, issued_at=now,
            expires_at=now + timedelta(hours=1),
            models=[DesiredModel(name="tiny", version=99, bundle_target="bundles/tiny/v99/rpi4.tar.gz")])))
        return signed[-1].to_dict(), now + timedelta(hours=1)

    # Issued through the store, as the cloud issues every generation: the cloud refuses a report of a generation
    # it never issued (a forged report must not freeze the device's picture).
    store = cloud.fleet.store
    store.commit_desired("pi-3", rules_mark=store.deployment_rules()[1], device_class="rpi4",
                         labels=store.get_device("pi-3").labels, make_doc=make_doc)
    forged = signed[-1]
    downlink.send("pi-3", forged.to_wire())

    def failed():
        models = device(admin, "pi-3")["models"]
        return [m for m in models if m["name"] == "tiny" and m["state"] == "failed" and m["target_version"] == 99]
    (status,) = wait_for(failed, 20, what="install of a missing bundle reported as failed")
    assert "not a trusted target" in status["error"] or "does not exist" in status["error"]
    assert f"accepted desired state generation {forged.payload.generation} from {transport}" in pi.log_text()
    # The last good model keeps serving.
    assert pi.infer("tiny", X4, [1, 4])["model_version"] == str(v1)


def test_link_down_at_start_then_up_and_no_network_restart(tmp_path, agents, transport):
    """The agent starts while its link cannot connect: on MQTT the broker is not running; on gRPC the cloud runs
    without its agent channel, and is then restarted (same data, same HTTP port) with the channel on the port the
    agent was told. Meanwhile the agent works over HTTP alone; once the link is up it is online. Then, with all of
    it gone, a restarted agent serves its last active model before any network."""
    port = free_port()
    broker = Mosquitto(tmp_path / "late-broker", port=port) if transport == "mqtt" else None  # not started yet
    if broker is not None:
        server = start_cloud_server(tmp_path / "cloud", mqtt=("127.0.0.1", port), wait_mqtt=False)
    else:
        server = start_cloud_server(tmp_path / "cloud")  # no agent channel yet
    try:
        with server.client() as admin:
            pi = start_agent(agents, tmp_path, server, admin, "pi-4", "rpi4", transport,
                             **({"grpc_target": f"127.0.0.1:{port}"} if broker is None else {}))
            wait_enrolled(admin, "pi-4")
            v1 = push(admin)
            admin.post("/api/v1/deployments", json={"model": "tiny", "device_id": "pi-4"}).raise_for_status()
            # No link: the agent polls the desired state over HTTP while it is away.
            wait_in_sync(admin, "pi-4", v1)  # reported over the HTTP fallback
            assert device(admin, "pi-4")["online"] is False  # never seen on the link
        if broker is not None:
            broker.start()
        else:
            server.stop()
            server = start_cloud_server(tmp_path / "cloud", http_port=int(server.base_url.rsplit(":", 1)[1]),
                                        agent_channel_port=port)
        with server.client() as admin:
            wait_for(lambda: device(admin, "pi-4")["online"] is True, 30,
                     what=f"agent online once the {'broker' if broker else 'agent channel'} is up")
            # And the link carries deployments: the second one (the first may race the desired-state fetch the agent
            # makes when its link connects).
            for _ in range(2):
                latest = push(admin)
                admin.post("/api/v1/deployments", json={"model": "tiny", "device_id": "pi-4"}).raise_for_status()
                wait_in_sync(admin, "pi-4", latest)
            assert re.search(rf"accepted desired state generation \d+ from {transport}: tiny v{latest}\b",
                             pi.log_text())
    finally:
        server.stop()
        if broker is not None:
            broker.stop()
    # Cloud and link gone: a restarted agent serves its last active model before any network.
    pi.stop()
    pi.start()
    assert pi.infer("tiny", X4, [1, 4])["model_version"] == str(latest)
