"""A real `edgefleet-agent run` process for end-to-end tests: its own config and data dir, stopped by its PID."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from tests.harness import wait_for

AGENT = [sys.executable, "-m", "edgefleet.edge_agent.main"]


class AgentProcess:
    def __init__(self, root: Path, device_id: str, device_class: str, cloud_url: str, enrollment_token: str,
                 *, labels: dict[str, str] | None = None, extra: str = "") -> None:
        self.device_id = device_id
        self.data_dir = root / device_id
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.config = self.data_dir / "agent.toml"
        label_lines = "\n".join(f'{k} = "{v}"' for k, v in (labels or {}).items())
        self.config.write_text(
            f'device_id = "{device_id}"\ndevice_class = "{device_class}"\ncloud_url = "{cloud_url}"\n'
            f'enrollment_token = "{enrollment_token}"\ndata_dir = "{self.data_dir}"\n'
            f"[labels]\n{label_lines}\n"
            f'[api]\nhttp_port = 0\nunix_socket = "{self.data_dir / "api.sock"}"\n'
            "[telemetry]\nwindow_s = 0.5\n"
            "[retry]\nretry_initial_s = 0.2\nretry_max_s = 1.0\nfailed_retry_initial_s = 60.0\n"
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
