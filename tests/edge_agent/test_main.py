"""edge_agent/main.py: `edgefleet-agent` as a real process. A local API port that another program holds is one line
naming the port and the config key, and a non-zero exit (no traceback); every command takes `--config FILE`, and the
older `check-config FILE` still works with a note; an enrollment the cloud refuses for an unknown class says to fix
device_class, not the enrollment token."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.agent_process import AgentProcess
from tests.harness import wait_for

AGENT = [sys.executable, "-m", "edgefleet.edge_agent.main"]


def write_config(tmp_path: Path, *, http_port: int = 0, cloud_url: str = "http://127.0.0.1:9") -> Path:
    config = tmp_path / "agent.toml"
    config.write_text(
        f'device_id = "pi-1"\ndevice_class = "rpi4"\ncloud_url = "{cloud_url}"\nenrollment_token = "tok"\n'
        f'data_dir = "{tmp_path / "data"}"\n[api]\nhttp_port = {http_port}\n'
    )
    return config


def agent(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*AGENT, *args], capture_output=True, text=True, timeout=timeout_s)


def test_a_taken_local_api_port_is_one_line_naming_port_and_key(tmp_path):
    with socket.socket() as holder:  # a real listener holds the port for the whole run
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        done = agent("run", "--config", str(write_config(tmp_path, http_port=port)))
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    (line,) = [ln for ln in done.stderr.splitlines() if ln.startswith("edgefleet-agent:")]
    assert f"127.0.0.1:{port}" in line and "already in use" in line and "api.http_port" in line, line
    assert len(done.stderr.strip().splitlines()) <= 3, done.stderr  # the error, and at most a log line or two


def test_check_config_takes_config_like_run_and_status(tmp_path):
    config = write_config(tmp_path)
    done = agent("check-config", "--config", str(config))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["device_id"] == "pi-1" and done.stderr == ""
    assert json.loads(agent("check-config", "-c", str(config)).stdout)["device_class"] == "rpi4"


def test_the_older_positional_form_still_works_with_a_note(tmp_path):
    config = write_config(tmp_path)
    done = agent("check-config", str(config))
    assert done.returncode == 0 and json.loads(done.stdout)["device_id"] == "pi-1"
    assert "deprecated" in done.stderr and f"check-config --config {config}" in done.stderr


@pytest.mark.parametrize("args,expected", [
    (("check-config",), "required: --config"),
    (("check-config", "a.toml", "--config", "b.toml"), "give the file once"),
])
def test_check_config_without_a_file_or_with_two_is_a_usage_error(args, expected):
    done = agent(*args)
    assert done.returncode == 2 and expected in done.stderr, done.stderr


def test_a_bad_config_is_one_line_and_exit_2(tmp_path):
    config = tmp_path / "agent.toml"
    config.write_text('device_id = "pi-1"\n[api]\nhttp_port = 70000\n')
    done = agent("check-config", "--config", str(config))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_help_says_every_command_takes_config(tmp_path):
    assert "--config FILE" in agent("--help").stdout
    for command in ("run", "check-config", "status"):
        assert "--config FILE" in agent(command, "--help").stdout, command


def test_an_unknown_class_refusal_says_to_fix_device_class(tmp_path):
    from tests.cloud_server import start_cloud_server

    cloud = start_cloud_server(tmp_path / "cloud")
    try:
        with cloud.client() as http:
            token = http.post("/api/v1/enrollment-tokens", json={"note": "test"}).json()["token"]
        proc = AgentProcess(tmp_path / "agents", "pi-odd", "no-such-class", cloud.base_url, token).start()
        try:
            line = wait_for(lambda: next((ln for ln in proc.log_text().splitlines()
                                          if "enrollment refused" in ln), None), 30, what="the refusal logged")
        finally:
            proc.stop()
    finally:
        cloud.stop()
    assert "unknown device class 'no-such-class'" in line and "fix device_class in the agent config" in line
    assert "enrollment_token" not in line and "fleet classes add" not in line
