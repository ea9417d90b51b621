"""What most end-to-end tests stand on: the real cloud (uvicorn on a free port) over the test's own Mosquitto, an
admin client on it, and the agent processes a test starts, each stopped by its PID when the test ends. A module
that needs the cloud set up otherwise (test_key_rotation_e2e.py) defines its own `cloud`."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cloud_server import start_cloud_server
from tests.e2e.agent_process import AgentProcess


@pytest.fixture
def cloud(tmp_path: Path, mosquitto):
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
