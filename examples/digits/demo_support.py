"""What the demo's steps share: free ports, bounded waits, the children it starts (stopped by PID) and agent configs."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(cond, timeout_s: float, what: str, interval_s: float = 0.1):
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            value = cond()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - keep polling until the bound
            last = exc
        time.sleep(interval_s)
    raise SystemExit(f"demo: timed out after {timeout_s:.0f} s waiting for {what}" + (f" ({last})" if last else ""))


class Processes:
    """Every child the demo starts, stopped by its own PID in reverse order."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(self.logdir / f"{name}.log", "wb")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                start_new_session=True)
        self.procs.append((name, proc))
        return proc

    def check_alive(self) -> None:
        for name, proc in self.procs:
            if proc.poll() is not None:
                tail = (self.logdir / f"{name}.log").read_text(errors="replace").splitlines()[-15:]
                raise SystemExit(f"demo: {name} exited with {proc.returncode}; last lines:\n" + "\n".join(tail))

    def stop_all(self) -> None:
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for _, proc in reversed(self.procs):
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def agent_config(work: Path, device_id: str, device_class: str, labels: dict[str, str], cloud_url: str,
                 token: str, extra: str = "", *, transport: str = "mqtt") -> Path:
    """An agent's TOML: its own data dir under `work`, the local API on a free port and a unix socket, 1 s
    telemetry windows, `transport` ("grpc": the cloud's agent channel, found through the cloud); `extra`: more
    sections (e.g. [offload])."""
    data = work / "agents" / device_id
    data.mkdir(parents=True)
    label_lines = "\n".join(f'{k} = "{v}"' for k, v in labels.items())
    path = data / "agent.toml"
    path.write_text(
        f'device_id = "{device_id}"\n'
        f'device_class = "{device_class}"\n'
        f'cloud_url = "{cloud_url}"\n'
        f'enrollment_token = "{token}"\n'
        f'data_dir = "{data}"\n'
        f'transport = "{transport}"\n\n'
        f"[labels]\n{label_lines}\n\n"
        "[api]\nhttp_host = \"127.0.0.1\"\nhttp_port = 0\n"
        f'unix_socket = "{data / "agent.sock"}"\n\n'
        "[telemetry]\nwindow_s = 1.0\n\n"
        "[retry]\nretry_initial_s = 0.5\nretry_max_s = 5.0\n"
        + extra
    )
    return path
