"""Real servers for tests: Mosquitto on a free port with its own config, a throwaway PostgreSQL database,
and helpers to wait on conditions with a bound instead of sleeping.

`Mosquitto(workdir)` is an open broker (anonymous clients welcome), as most tests need; `Mosquitto(workdir,
dynsec=True)` refuses anonymous clients and runs the dynamic security plugin with one admin, `admin_username` /
`admin_password`, which a test hands to the cloud as its login (`start_cloud_server(..., mqtt_auth="dynsec",
mqtt_username=..., mqtt_password=...)`, or `Mosquitto.cloud_settings()`).

Every process a test starts is stopped by its own PID.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PG_ADMIN_URL = os.environ.get("EDGEFLEET_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


@contextlib.contextmanager
def http_server(handler: Any) -> Iterator[str]:
    """A real HTTP server on a free port, run by `handler` (a BaseHTTPRequestHandler class) in a thread; yields its
    base URL and shuts it down afterwards."""
    from http.server import ThreadingHTTPServer

    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(cond: Callable[[], Any], timeout_s: float = 10.0, interval_s: float = 0.05,
             what: str = "condition") -> Any:
    """Poll `cond` until it returns something truthy; fail with `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    last_exc: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = cond()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - the condition may raise until it holds
            last_exc = exc
        time.sleep(interval_s)
    last = f" (last error: {last_exc!r})" if last_exc else ""
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}{last}")


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def mosquitto_binary() -> str | None:
    return shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)


@dataclass
class Mosquitto:
    """A Mosquitto broker of the test's own: own config, own port, own persistence folder."""

    workdir: Path
    port: int = field(default_factory=free_port)
    host: str = "127.0.0.1"
    proc: subprocess.Popen | None = None
    dynsec: bool = False
    admin_username: str = "edgefleet-cloud"
    admin_password: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    extra_config: str = ""  # more mosquitto.conf lines (e.g. "sys_interval 1\n")

    def cloud_settings(self) -> dict[str, Any]:
        """The `start_cloud_server` settings that make the cloud this broker's dynsec admin."""
        return {"mqtt_auth": "dynsec", "mqtt_username": self.admin_username, "mqtt_password": self.admin_password}

    def _dynsec_lines(self) -> str:
        from edgefleet.cloud.broker import dynsec_plugin, mosquitto_ctrl_binary

        plugin, ctrl = dynsec_plugin(), mosquitto_ctrl_binary()
        if plugin is None or ctrl is None:
            raise RuntimeError("mosquitto's dynamic security plugin or mosquitto_ctrl is missing")
        config = self.workdir / "dynamic-security.json"
        if not config.exists():  # a restart keeps the accounts made so far
            subprocess.run([ctrl, "dynsec", "init", str(config), self.admin_username],
                           input=f"{self.admin_password}\n" * 2, text=True, check=True, capture_output=True,
                           timeout=10)
        # Stay who we are: started as root, Mosquitto would drop to "mosquitto", which cannot save the accounts here.
        user = pwd.getpwuid(os.geteuid()).pw_name
        return f"allow_anonymous false\nplugin {plugin}\nplugin_opt_config_file {config}\nuser {user}\n"

    def start(self) -> Mosquitto:
        binary = mosquitto_binary()
        if binary is None:
            raise RuntimeError("mosquitto is not installed: apt-get install mosquitto (.ci/run does this)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} {self.host}\n"
            + (self._dynsec_lines() if self.dynsec else "allow_anonymous true\n")
            + "persistence false\n"
            "log_dest stderr\n"
            "log_type error\n"
            "log_type warning\n"
            + self.extra_config
        )
        log = open(self.workdir / "mosquitto.log", "ab")
        self.proc = subprocess.Popen([binary, "-c", str(conf)], stdout=log, stderr=log)
        wait_for(lambda: port_open(self.host, self.port), 10, what=f"mosquitto on port {self.port}")
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


class PostgresDatabase:
    """A database of the test's own on the local PostgreSQL (trust auth), dropped afterwards."""

    def __init__(self) -> None:
        self.name = "edgefleet_test_" + uuid.uuid4().hex[:12]
        base = PG_ADMIN_URL.rsplit("/", 1)[0]
        self.url = f"{base}/{self.name}".replace("postgresql://", "postgresql+psycopg://", 1)

    def _admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5) as conn:
            conn.execute(sql)

    def create(self) -> PostgresDatabase:
        self._admin(f'CREATE DATABASE "{self.name}"')
        return self

    def drop(self) -> None:
        self._admin(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
