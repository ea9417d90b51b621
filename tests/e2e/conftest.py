"""What most end-to-end tests stand on: the real cloud (uvicorn on a free port) over the test's own Mosquitto, an
admin client on it, and the agent processes a test starts, each stopped by its PID when the test ends. A module
that needs the cloud set up otherwise (test_key_rotation_e2e.py) defines its own `cloud`.

The agents' transport is the `transport` fixture: "mqtt" unless a test or module parametrises it with
`@pytest.mark.parametrize("transport", TRANSPORTS)` (tests/e2e/agent_process.py; direct parametrisation overrides
the fixture, and `cloud` and `downlink` follow it; `agent_on` builds an agent for it). On "grpc" the cloud serves
the agent channel on a free port and runs no MQTT at all (no broker is started): a site with no broker, the case
the gRPC channel is for."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cloud_server import CloudServer, start_cloud_server
from tests.e2e.agent_process import AgentProcess, Downlink


@pytest.fixture
def transport() -> str:
    return "mqtt"


@pytest.fixture
def cloud(request: pytest.FixtureRequest, tmp_path: Path, transport: str) -> Iterator[CloudServer]:
    if transport == "grpc":
        server = start_cloud_server(tmp_path / "cloud", agent_channel_port=0)
    else:
        mosquitto = request.getfixturevalue("mosquitto")
        server = start_cloud_server(tmp_path / "cloud", mqtt=(mosquitto.host, mosquitto.port))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def admin(cloud):
    with cloud.client() as c:
        yield c


@pytest.fixture
def agents():
    started: list[AgentProcess] = []
    yield started
    for a in started:
        a.stop()


@pytest.fixture
def downlink(cloud: CloudServer, transport: str) -> Iterator[Downlink]:
    """Desired states put in front of an agent on the test's transport (tests/e2e/agent_process.py `Downlink`)."""
    link = Downlink(cloud, transport)
    try:
        yield link
    finally:
        link.stop()

