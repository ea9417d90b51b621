"""Where agents find the gRPC agent channel: `GET /api/v1/agent-channel` names it (public_url's host and the bound
port, or `agent_channel_public_target`), 404 with the fix while the cloud runs none; an agent link with no
configured target asks it and connects, and keeps asking while the cloud names none."""

from __future__ import annotations

import queue
from pathlib import Path

import pytest

from edgefleet.edge_agent.cloud_client import CloudClient
from edgefleet.edge_agent.errors import AgentError
from edgefleet.edge_agent.link_grpc import GrpcLink
from edgefleet.protos.messages import AgentChannelInfo, SignedDesiredState, parse_message
from tests.cloud_server import enroll_device, start_cloud_server
from tests.harness import wait_for


def test_the_cloud_names_its_channel_and_a_link_without_a_target_connects(tmp_path: Path):
    cloud = start_cloud_server(tmp_path / "cloud", agent_channel_port=0)
    try:
        with cloud.client() as admin:
            enrollment = enroll_device(admin, "disc-1")
            r = admin.get("/api/v1/agent-channel")  # the admin may ask too
            assert r.status_code == 200, r.text
        port = cloud.runtime.agent_channel.port
        with cloud.client(token="") as anonymous:
            assert anonymous.get("/api/v1/agent-channel").status_code == 401
        client = CloudClient(cloud.base_url, token=enrollment.device_token)
        info = client.agent_channel()
        assert info == AgentChannelInfo(target=f"127.0.0.1:{port}", tls=False)
        got: queue.Queue[bytes] = queue.Queue()
        connects = []
        link = GrpcLink("", "disc-1", enrollment.device_token, on_desired=got.put,
                        on_connected=lambda: connects.append(1), discover=client.agent_channel,
                        retry_initial_s=0.05, retry_max_s=0.2)
        link.start()
        try:
            doc = parse_message(got.get(timeout=20), SignedDesiredState)
            assert doc.payload.device_id == "disc-1" and link.target == info.target
            wait_for(lambda: connects == [1], 10, what="on_connected")
        finally:
            link.stop(graceful=False)
            client.close()
    finally:
        cloud.stop()


def test_a_cloud_without_the_channel_says_so_and_the_link_keeps_asking(tmp_path: Path):
    cloud = start_cloud_server(tmp_path / "cloud")
    try:
        with cloud.client() as admin:
            enrollment = enroll_device(admin, "disc-2")
        client = CloudClient(cloud.base_url, token=enrollment.device_token)
        with pytest.raises(AgentError, match="names no gRPC agent channel.*--agent-channel-port"):
            client.agent_channel()
        asked = []

        def discover() -> AgentChannelInfo:
            asked.append(1)
            return client.agent_channel()

        link = GrpcLink("", "disc-2", enrollment.device_token, on_desired=lambda raw: None,
                        on_connected=lambda: None, discover=discover, retry_initial_s=0.02, retry_max_s=0.05)
        link.start()
        try:
            wait_for(lambda: len(asked) >= 3, 10, what="the link to ask again")
            assert not link.connected and link.sessions == 0
        finally:
            link.stop(graceful=False)
            client.close()
    finally:
        cloud.stop()


def test_the_advertised_target_can_be_set_for_a_load_balancer(tmp_path: Path):
    cloud = start_cloud_server(tmp_path / "cloud", agent_channel_port=0,
                               agent_channel_public_target="edge-lb.example:443")
    try:
        with cloud.client() as admin:
            r = admin.get("/api/v1/agent-channel")
        assert r.status_code == 200 and r.json() == {"target": "edge-lb.example:443", "tls": False}
    finally:
        cloud.stop()


def test_a_link_needs_a_target_or_a_way_to_find_one():
    from edgefleet.edge_agent.errors import ConfigError

    with pytest.raises(ConfigError, match="needs a target"):
        GrpcLink("", "d", "t", on_desired=lambda raw: None, on_connected=lambda: None)
