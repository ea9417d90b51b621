"""End to end: every signing key rotated while a real `edgefleet-agent` process runs against the real cloud
(uvicorn, real Mosquitto), with `edgefleet-cloud keys` run on the cloud's data dir beside the serving process.

The agent pinned TUF root 1 and desired-state key v0 at enrollment; after the TUF rotations it installs a new
version through root 2..N, after the desired-state rotation it accepts documents signed by the new key alone (having
looked the key lists up through TUF), and a document signed by the revoked key is refused, also after a restart.
On both transports: on MQTT the forged document is published on the device's topic, on gRPC pushed down its stream.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgefleet.cloud.main import app
from edgefleet.cloud.trust.desired import canonical_bytes
from edgefleet.cloud.trust.keys import load_signer
from edgefleet.protos.messages import DesiredState, Signature, SignedDesiredState
from tests.cloud_server import start_cloud_server
from tests.e2e.agent_process import TRANSPORTS, AgentProcess, agent_on
from tests.e2e.test_agents_e2e import X4, device, enrollment_token, push, wait_enrolled, wait_in_sync
from tests.harness import wait_for

pytestmark = pytest.mark.parametrize("transport", TRANSPORTS)


@pytest.fixture
def cloud(request: pytest.FixtureRequest, tmp_path: Path, transport: str):
    # 0.3 s: the serve loop re-signs every document soon after the desired-state keys change
    if transport == "grpc":
        server = start_cloud_server(tmp_path / "cloud", agent_channel_port=0, refresh_interval_s=0.3)
    else:
        mosquitto = request.getfixturevalue("mosquitto")
        server = start_cloud_server(tmp_path / "cloud", mqtt=(mosquitto.host, mosquitto.port),
                                    refresh_interval_s=0.3)
    try:
        yield server
    finally:
        server.stop()


def keys(cloud, *args: str) -> str:
    result = CliRunner().invoke(app, ["keys", *args, "--data-dir", str(cloud.data_dir)])
    assert result.exit_code == 0, result.output
    return result.output


def accepted(agent: AgentProcess) -> int:
    """The highest desired generation the agent accepted (its state.json)."""
    return json.loads((agent.data_dir / "state.json").read_text())["highest_generation"] or 0


def test_every_key_rotated_under_a_running_agent(tmp_path: Path, cloud, downlink, transport):
    with cloud.client() as admin:
        agent = agent_on(transport, cloud, tmp_path / "agents", "pi-k", "rpi4", enrollment_token(admin)).start()
        try:
            wait_enrolled(admin, "pi-k")
            v1 = push(admin)
            admin.post("/api/v1/deployments", json={"model": "tiny", "device_class": "rpi4"}).raise_for_status()
            wait_in_sync(admin, "pi-k", v1)

            for role in ("targets", "snapshot", "timestamp", "root"):
                keys(cloud, "rotate", "--role", role)
            v2 = push(admin)
            admin.post("/api/v1/deployments", json={"model": "tiny", "device_id": "pi-k"}).raise_for_status()
            wait_in_sync(admin, "pi-k", v2)  # verified through roots 2..5
            roots = sorted(p.name for p in (agent.data_dir / "tuf" / "root_history").glob("*.root.json"))
            assert roots == [f"{n}.root.json" for n in range(1, 6)]

            old = load_signer(cloud.settings.keys_dir / "desired_state.pem")
            generation = accepted(agent)
            keys(cloud, "rotate", "--role", "desired")
            wait_for(lambda: accepted(agent) > generation, 20, what="the document signed by both keys accepted")
            keys(cloud, "rotate", "--role", "desired", "--finish")
            saved = agent.data_dir / "desired_keys.json"
            wait_for(lambda: saved.exists() and json.loads(saved.read_text())["revoked"] == [old.public_key.keyid],
                     20, what="the agent learned the rotation through TUF")
            new_only = json.loads(admin.get("/api/v1/devices/pi-k/desired").content)
            assert [s["keyid"] for s in new_only["signatures"]] != [old.public_key.keyid]
            wait_for(lambda: accepted(agent) == new_only["payload"]["generation"], 20,
                     what="the document signed by the new key alone accepted")

            # The revoked key (say, stolen) signs a newer generation: refused, now and after a restart.
            payload = {**new_only["payload"], "generation": new_only["payload"]["generation"] + 100}
            sig = old.sign(canonical_bytes(payload))
            forged = SignedDesiredState(payload=DesiredState.model_validate(payload),
                                        signatures=[Signature(keyid=sig.keyid, sig=sig.signature)]).to_wire()
            downlink.send("pi-k", forged)
            wait_for(lambda: "revoked" in (device(admin, "pi-k")["last_error"] or ""), 15,
                     what="the revoked key refused")
            agent.stop()
            agent.start()

            def refused_after_restart() -> bool:
                # Sent again until seen: a copy published before the restarted agent has subscribed (or pushed down
                # the stream it had before the restart) reaches no one.
                downlink.send("pi-k", forged)
                return agent.log_text().split("agent stopped")[-1].count("revoked key") >= 1

            wait_for(refused_after_restart, 30, interval_s=0.5, what="the revoked key refused after a restart")
            assert f"refused desired state from {transport}" in agent.log_text().split("agent stopped")[-1]
            assert agent.infer("tiny", X4, [1, 4])["model_version"] == str(v2)
        finally:
            agent.stop()
