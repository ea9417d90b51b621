"""The MQTT broker the cloud needs, when nobody runs one: embedded amqtt or a Mosquitto of its own.

Theory: devices and the cloud talk through any MQTT broker. A real fleet points `mqtt_host`/`mqtt_port` at one it
runs (Mosquitto, EMQX, ...) and sets `embedded_broker = "never"`. So that the demo needs nothing but Python, the
cloud can run one itself, decided by `plan_broker()`:

    "never"   nothing; the broker is someone else's job
    "always"  embedded amqtt (pure Python) on mqtt_host:mqtt_port
    "auto"    nothing when something already listens on mqtt_host:mqtt_port; else a Mosquitto subprocess with its
              own config under {data_dir}/mosquitto when the binary exists; else embedded amqtt

amqtt's `Broker` binds itself to the running asyncio loop at construction, so `EmbeddedBroker` builds it inside a
loop of its own in a daemon thread and hands start/stop across with `run_coroutine_threadsafe`. Retained messages
live in memory only: the cloud's MQTT bridge republishes desired states on every connect, because the database,
not the broker, is the source of truth.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Literal, Protocol

log = logging.getLogger(__name__)

BrokerPlan = Literal["none", "embedded", "mosquitto"]
_START_TIMEOUT_S = 10.0  # amqtt binds in milliseconds; Mosquitto in well under a second on a Pi


class RunningBroker(Protocol):
    host: str
    port: int

    def stop(self) -> None: ...


def mosquitto_binary() -> str | None:
    """The Mosquitto binary on PATH or in /usr/sbin (Debian installs it there, outside a user's PATH)."""
    return shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)


def port_open(host: str, port: int, timeout_s: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def plan_broker(mode: str, host: str, port: int) -> BrokerPlan:
    """What `start_broker` will run for `embedded_broker = mode`; see the module docstring."""
    if mode == "never":
        return "none"
    if mode == "always":
        return "embedded"
    if mode != "auto":
        raise ValueError(f"embedded_broker must be auto, always or never, not {mode!r}")
    if port_open(host, port):
        return "none"
    return "mosquitto" if mosquitto_binary() else "embedded"


class EmbeddedBroker:
    """amqtt in a thread with its own asyncio loop. Anonymous, TCP only, no $SYS chatter."""

    def __init__(self, host: str = "127.0.0.1", port: int = 1883) -> None:
        self.host = host
        self.port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._broker = None

    def _config(self) -> dict:
        return {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            # Only anonymous auth: the default plugin set also logs every packet and publishes $SYS every 20 s.
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }

    def start(self) -> EmbeddedBroker:
        from amqtt.broker import Broker  # the cloud extra has it; imported late so `--help` stays fast

        # amqtt logs every connection and its state machine (`transitions`) every transition at INFO; unless the
        # operator chose levels for them, keep them to warnings so the cloud's own log stays readable.
        for name in ("amqtt", "transitions"):
            if logging.getLogger(name).level == logging.NOTSET:
                logging.getLogger(name).setLevel(logging.WARNING)

        started = threading.Event()
        failure: list[BaseException] = []
        loop = asyncio.new_event_loop()

        async def boot() -> None:
            self._broker = Broker(self._config(), loop=loop)
            await self._broker.start()

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(boot())
            except BaseException as exc:  # noqa: BLE001 - handed to the starting thread, which raises it
                failure.append(exc)
                started.set()
                loop.close()
                return
            started.set()
            loop.run_forever()
            loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=run, name="edgefleet-amqtt", daemon=True)
        self._thread.start()
        if not started.wait(_START_TIMEOUT_S):
            raise RuntimeError(f"embedded MQTT broker did not start on {self.host}:{self.port} in {_START_TIMEOUT_S}s")
        if failure:
            self._thread.join(1)
            raise RuntimeError(
                f"embedded MQTT broker could not listen on {self.host}:{self.port}: {failure[0]}; "
                "free the port or set mqtt_port to another one"
            ) from failure[0]
        log.info("embedded MQTT broker (amqtt) listening on %s:%d", self.host, self.port)
        return self

    def stop(self) -> None:
        loop, thread, broker = self._loop, self._thread, self._broker
        if loop is None or thread is None:
            return
        if broker is not None and not loop.is_closed():
            fut = asyncio.run_coroutine_threadsafe(broker.shutdown(), loop)
            try:
                fut.result(_START_TIMEOUT_S)
            except Exception:
                log.warning("embedded MQTT broker did not shut down cleanly", exc_info=True)
            loop.call_soon_threadsafe(loop.stop)
        thread.join(_START_TIMEOUT_S)
        self._loop = self._thread = self._broker = None


class MosquittoProcess:
    """A Mosquitto subprocess with its own config and persistence folder, stopped by its PID."""

    def __init__(self, workdir: Path, host: str = "127.0.0.1", port: int = 1883, *, persistence: bool = True) -> None:
        self.workdir = Path(workdir)
        self.host = host
        self.port = port
        self.persistence = persistence
        self.proc: subprocess.Popen | None = None

    def start(self) -> MosquittoProcess:
        binary = mosquitto_binary()
        if binary is None:
            raise RuntimeError("mosquitto is not installed: apt-get install mosquitto, or set embedded_broker=always")
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "mosquitto.conf"
        lines = [f"listener {self.port} {self.host}", "allow_anonymous true", "log_dest stderr",
                 "log_type error", "log_type warning"]
        # Started as root, Mosquitto drops to the user "mosquitto", which cannot write our folder: stay who we are.
        lines.append(f"user {pwd.getpwuid(os.geteuid()).pw_name}")
        if self.persistence:
            # Retained desired states survive a broker restart; the bridge republishes them anyway.
            lines += ["persistence true", f"persistence_location {self.workdir}/"]
        conf.write_text("\n".join(lines) + "\n")
        with open(self.workdir / "mosquitto.log", "ab") as logf:
            self.proc = subprocess.Popen([binary, "-c", str(conf)], stdout=logf, stderr=logf)
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not port_open(self.host, self.port):
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited with {self.proc.returncode}; see {self.workdir}/mosquitto.log")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"mosquitto did not listen on {self.host}:{self.port} in {_START_TIMEOUT_S}s")
            time.sleep(0.05)
        log.info("mosquitto (pid %d) listening on %s:%d", self.proc.pid, self.host, self.port)
        return self

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(_START_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(_START_TIMEOUT_S)


def start_broker(mode: str, host: str, port: int, data_dir: Path) -> RunningBroker | None:
    """Start what `plan_broker` decides; None when an outside broker is expected."""
    plan = plan_broker(mode, host, port)
    if plan == "embedded":
        return EmbeddedBroker(host, port).start()
    if plan == "mosquitto":
        return MosquittoProcess(Path(data_dir) / "mosquitto", host, port).start()
    return None
