"""A real `edgefleet-agent run` process for end-to-end tests: its own config and data dir, stopped by its PID; and
`Downlink`, a test's way to put a desired state (hostile or not) in front of an agent on either transport."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from tests.cloud_server import CloudServer, MqttProbe, push_desired, target_of
from tests.harness import wait_for

AGENT = [sys.executable, "-m", "edgefleet.edge_agent.main"]
TRANSPORTS = ("mqtt", "grpc")  # the agents' links to the cloud (config `transport`)


class AgentProcess:
    def __init__(self, root: Path, device_id: str, device_class: str, cloud_url: str, enrollment_token: str,
                 *, labels: dict[str, str] | None = None, extra: str = "", transport: str = "mqtt",
                 grpc_target: str | None = None) -> None:
        """`transport`: "mqtt" (the broker from enrollment) or "grpc" (`grpc_target`, the cloud's agent channel as
        host:port, e.g. `tests.cloud_server.target_of(cloud)`); `extra`: more TOML at the end (sections only)."""
        if grpc_target is not None and transport != "grpc":
            raise ValueError("grpc_target is for transport='grpc'")
        self.device_id = device_id
        self.transport = transport
        self.data_dir = root / device_id
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.config = self.data_dir / "agent.toml"
        label_lines = "\n".join(f'{k} = "{v}"' for k, v in (labels or {}).items())
        self.config.write_text(
            (f'transport = "{transport}"\n' if transport != "mqtt" else "")  # MQTT: the default, left unsaid
            + f'device_id = "{device_id}"\ndevice_class = "{device_class}"\ncloud_url = "{cloud_url}"\n'
            f'enrollment_token = "{enrollment_token}"\ndata_dir = "{self.data_dir}"\n'
            f"[labels]\n{label_lines}\n"
            f'[api]\nhttp_port = 0\nunix_socket = "{self.data_dir / "api.sock"}"\n'
            "[telemetry]\nwindow_s = 0.5\n"
            "[retry]\nretry_initial_s = 0.2\nretry_max_s = 1.0\nfailed_retry_initial_s = 60.0\n"
            + (f'[grpc]\ntarget = "{grpc_target}"\n' if grpc_target else "")
            + extra
        )
        self.proc: subprocess.Popen | None = None
        self.log = self.data_dir / "agent.log"

    def start(self) -> AgentProcess:
        (self.data_dir / "api.json").unlink(missing_ok=True)
        out = open(self.log, "ab")
        self.proc = subprocess.Popen([*AGENT, "run", "--config", str(self.config)], stdout=out, stderr=out,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        wait_for(lambda: self.alive() and (self.data_dir / "api.json").exists(), 20,
                 what=f"agent {self.device_id} local API")
        return self

    def alive(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise AssertionError(f"agent {self.device_id} is not running; log:\n{self.log_text()[-3000:]}")
        return True

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    @property
    def api_url(self) -> str:
        return json.loads((self.data_dir / "api.json").read_text())["url"]

    def infer(self, model: str, data: list[float], shape: list[int], *, unix: bool = False,
              input_name: str = "x") -> dict:
        body = {"inputs": [{"name": input_name, "shape": shape, "datatype": "FP32", "data": data}]}
        if unix:
            transport = httpx.HTTPTransport(uds=str(self.data_dir / "api.sock"))
            with httpx.Client(transport=transport, base_url="http://agent") as c:
                resp = c.post(f"/v2/models/{model}/infer", json=body)
        else:
            resp = httpx.post(f"{self.api_url}/v2/models/{model}/infer", json=body, timeout=10)
        resp.raise_for_status()
        return resp.json()

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        code = self.proc.returncode
        self.proc = None
        return code


def agent_on(transport: str, cloud: CloudServer, root: Path, device_id: str, device_class: str,
             enrollment_token: str, **kw: Any) -> AgentProcess:
    """An AgentProcess (not started) for `cloud` over `transport`: on "grpc" its `[grpc] target` is the cloud's
    agent channel, unless `grpc_target` is given (a channel not up yet)."""
    if transport == "grpc":
        kw.setdefault("grpc_target", target_of(cloud) if cloud.runtime.agent_channel is not None else None)
    return AgentProcess(root, device_id, device_class, cloud.base_url, enrollment_token, transport=transport, **kw)


class Downlink:
    """A desired state put in front of a device's agent as the cloud's transport would carry it, bypassing the
    cloud's own checks: on "mqtt" published on the device's desired topic (a test client of the broker), on "grpc"
    pushed down the device's agent-channel stream (`tests.cloud_server.push_desired`). What the agent does with it
    (accept, refuse and name it in last_error) is the same code on both.

    `send(device_id, raw, retain=False)`: `retain` (MQTT only) leaves it on the broker, handed to the agent again
    on every subscribe; a stream keeps nothing. `send_after_restart(device_id, raw)`: once the agent is back: on
    MQTT the retained copy is already on its way (so publish it retained now), on gRPC a push down the new stream
    (not the one before the restart). `stop()` clears the retained copies and disconnects."""

    def __init__(self, cloud: CloudServer, transport: str) -> None:
        self.cloud = cloud
        self.transport = transport
        self._probe: MqttProbe | None = None
        self._retained: set[str] = set()
        self._streams: dict[str, Any] = {}
        if transport == "mqtt":
            assert cloud.mqtt_host is not None and cloud.mqtt_port is not None, "an MQTT downlink needs the broker"
            self._probe = MqttProbe(cloud.mqtt_host, cloud.mqtt_port)

    def _topic(self, device_id: str) -> str:
        from edgefleet.protos.topics import device_topics

        return device_topics(self.cloud.settings.mqtt_topic_prefix, device_id).desired

    def send(self, device_id: str, raw: bytes, *, retain: bool = False) -> None:
        if self._probe is not None:
            self._probe.publish(self._topic(device_id), raw, retain=retain)
            if retain:
                self._retained.add(device_id)
        else:
            self._streams[device_id] = push_desired(self.cloud, device_id, raw)

    def send_after_restart(self, device_id: str, raw: bytes) -> None:
        if self._probe is not None:
            self.send(device_id, raw, retain=True)
        else:
            self._streams[device_id] = push_desired(self.cloud, device_id, raw, stream=self._streams.get(device_id),
                                                    timeout_s=20)

    def stop(self) -> None:
        if self._probe is not None:
            for device_id in self._retained:
                self._probe.publish(self._topic(device_id), b"", retain=True)
            self._probe.stop()
