"""End to end, with real agent processes: a copied agent config cannot take a device over, and a reinstalled device
enrolls again after an operator's `fleet devices reset` (the cloud side: cloud/enrollment.py; the agent's key:
edge_agent/identity.py).

The attack this stops: a second agent started with an existing device_id and the same enrollment token silently
re-enrolled, revoked the real device's token, and every later deploy to the real device failed with 401.

Every case on both transports (enrollment is HTTP either way; the link, MQTT or gRPC, carries the deploys that show
the real device undisturbed, and on gRPC the device token travels in every stream's metadata, which no log shows).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from tests.e2e.agent_process import TRANSPORTS, agent_on
from tests.e2e.test_agents_e2e import device, enrollment_token, push, wait_enrolled, wait_in_sync
from tests.harness import wait_for

pytestmark = pytest.mark.parametrize("transport", TRANSPORTS)


def token_refusals(log: str) -> list[str]:
    """The log lines where the cloud refused the device's token: an HTTP 401 (httpx's request line, the agent's
    "answered 401") or a gRPC stream ended UNAUTHENTICATED. Not a bare "401": a port such as :40139 has one."""
    return [line for line in log.splitlines() if re.search(r"\b401 Unauthorized|answered 401\b|UNAUTHENTICATED", line)]


def test_a_copied_config_is_refused_and_the_real_device_keeps_working(tmp_path: Path, cloud, admin, agents,
                                                                      transport):
    token = enrollment_token(admin)
    real = agent_on(transport, cloud, tmp_path / "real", "pi-1", "rpi4", token)
    agents.append(real.start())
    wait_enrolled(admin, "pi-1")

    copy = agent_on(transport, cloud, tmp_path / "copy", "pi-1", "rpi4", token)  # same config, own data dir
    agents.append(copy.start())
    wait_for(lambda: device(admin, "pi-1")["enrollments_refused"] >= 1, 20, what="the copy's enrollment refused")
    wait_for(lambda: "fleet devices reset pi-1" in copy.log_text(), 10, what="the copy saying what to do")
    shown = device(admin, "pi-1")
    assert "another device key" in shown["last_refused_reason"]
    assert not (copy.data_dir / "models").exists() or not any((copy.data_dir / "models").iterdir())

    # The real device was not disturbed: a deploy after the attempt reaches it (its token still works).
    version = push(admin)
    admin.post("/api/v1/deployments", json={"model": "tiny", "device_id": "pi-1"}).raise_for_status()
    wait_in_sync(admin, "pi-1", version)
    assert not token_refusals(real.log_text())
    copy.stop()

    # The real agent loses its state.json but keeps its key: it proves who it is and enrolls again by itself.
    real.stop()
    (real.data_dir / "state.json").unlink()
    real.start()
    wait_for(lambda: admin.get("/api/v1/stats").json()["counters"].get("devices_reenrolled", 0) >= 1, 20,
             what="the real device re-enrolled with its key")
    wait_in_sync(admin, "pi-1", version)


def test_a_reinstalled_device_enrolls_after_a_reset(tmp_path: Path, cloud, admin, agents, transport):
    token = enrollment_token(admin)
    first = agent_on(transport, cloud, tmp_path / "sd", "pi-2", "rpi4", token)
    agents.append(first.start())
    wait_enrolled(admin, "pi-2")
    first.stop()
    shutil.rmtree(first.data_dir)  # a new SD card: no state, no key

    again = agent_on(transport, cloud, tmp_path / "sd", "pi-2", "rpi4", token)
    agents.append(again.start())
    wait_for(lambda: device(admin, "pi-2")["enrollments_refused"] >= 1, 20, what="the reinstalled agent refused")
    admin.post("/api/v1/devices/pi-2/reset").raise_for_status()
    # The agent retries by itself (every retry.retry_max_s); its next try registers its new key.
    wait_for(lambda: device(admin, "pi-2")["has_device_key"] and not device(admin, "pi-2")["reset_pending"], 20,
             what="the reinstalled device enrolled with its new key")
    version = push(admin)
    admin.post("/api/v1/deployments", json={"model": "tiny", "device_id": "pi-2"}).raise_for_status()
    wait_in_sync(admin, "pi-2", version)


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_secrets_at_rest_are_private_and_never_logged(tmp_path: Path, cloud, admin, agents, caplog, transport):
    """Keys and tokens are 0600 in 0700 folders on both sides; no token or password reaches a log."""
    import json
    import logging

    caplog.set_level(logging.DEBUG)  # the cloud runs in this process: every logger, every level
    agent = agent_on(transport, cloud, tmp_path / "agents", "pi-3", "rpi4", enrollment_token(admin))
    agents.append(agent.start())
    wait_enrolled(admin, "pi-3")
    wait_for(lambda: json.loads((agent.data_dir / "state.json").read_text()).get("enrollment"), 20,
             what="the agent's enrollment saved")
    enrollment = json.loads((agent.data_dir / "state.json").read_text())["enrollment"]
    # Online: its link is up (on gRPC, a stream opened with the device token in its metadata) before the logs are read.
    wait_for(lambda: device(admin, "pi-3")["online"], 20, what=f"pi-3 online over {transport}")
    secrets = {"admin token": cloud.admin_token, "device token": enrollment["device_token"]}
    if enrollment["broker"].get("password"):
        secrets["broker password"] = enrollment["broker"]["password"]

    # The agent: its data dir, its state (device token, broker login) and its key.
    assert _mode(agent.data_dir) == 0o700
    for name in ("state.json", "device_key.pem"):
        assert _mode(agent.data_dir / name) == 0o600, name
    # The cloud: every key, token and credential file 0600 in a 0700 folder, inside the 0700 data dir.
    data = cloud.data_dir
    assert _mode(data) == 0o700
    private = [p for p in data.rglob("*") if p.is_file() and not p.name.endswith(".pub.pem")  # public halves
               and (p.suffix in (".pem", ".key", ".token") or "password" in p.name or "credential" in p.name)]
    assert any(p.name == "admin.token" for p in private) and any(p.suffix == ".pem" for p in private)
    for path in private:
        assert _mode(path) == 0o600, path
        assert _mode(path.parent) == 0o700, f"{path.parent} holds {path.name}"

    agent.stop()
    logs = {"agent log": agent.log_text(), "cloud log": caplog.text}
    for where, text in logs.items():
        assert text, where
        for what, secret in secrets.items():
            assert secret not in text, f"the {what} appears in the {where}"
