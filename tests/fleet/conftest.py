"""Fixtures the fleet CLI tests share: a real cloud (tests/cloud_server.py) and the CLI runner pointed at it with the
admin token (`Cli` in cli_runner.py). A test module that needs another set-up defines its own `cloud` or `cli`."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cloud_server import cloud_server
from tests.fleet.cli_runner import Cli


@pytest.fixture
def cloud(tmp_path: Path):
    with cloud_server(tmp_path / "cloud") as s:
        yield s


@pytest.fixture
def cli(tmp_path: Path, cloud) -> Cli:
    return Cli(tmp_path, cloud.base_url, cloud.admin_token)
