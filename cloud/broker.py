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

With a `BrokerAuth` (settings `mqtt_auth` other than "none") neither broker is open: the embedded one checks
logins and topics in-process (cloud/broker_auth.py), and the Mosquitto one runs the dynamic security plugin with the
cloud's login as its first admin (`mosquitto_ctrl dynsec init`), so the cloud provisions device accounts over MQTT
(cloud/dynsec.py) exactly as it does on an operator's Mosquitto. Without one (the class defaults, which the broker
tests use) both are anonymous, as before.
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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

if TYPE_CHECKING:
    from edgefleet.cloud.broker_auth import EmbeddedAuthority
    from edgefleet.cloud.mqtt_accounts import CloudLogin
    from edgefleet.cloud.store import Store

log = logging.getLogger(__name__)

BrokerPlan = Literal["none", "embedded", "mosquitto"]
_START_TIMEOUT_S = 10.0  # amqtt binds in milliseconds; Mosquitto in well under a second on a Pi
# Where Debian/Ubuntu (multiarch), Fedora, Alpine and a source install put the dynamic security plugin.
_DYNSEC_PLUGIN_GLOBS = ("/usr/lib/*/mosquitto_dynamic_security.so", "/usr/lib/mosquitto_dynamic_security.so",
                        "/usr/lib64/mosquitto_dynamic_security.so", "/usr/lib/mosquitto/mosquitto_dynamic_security.so",
                        "/usr/local/lib/mosquitto_dynamic_security.so")


@dataclass(frozen=True)
class BrokerAuth:
    """What a broker the cloud runs needs to enforce per-device logins: the cloud's own, the topic prefix, the
    database the embedded broker checks devices against, and (optional) where the dynsec plugin is."""

    login: CloudLogin
    prefix: str
    store: Store
    dynsec_plugin: Path | None = None


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


def dynsec_plugin(configured: Path | None = None) -> Path | None:
    """The dynamic security plugin: `configured` when it exists, else the first of the usual places."""
    if configured is not None:
        return configured if Path(configured).exists() else None
    import glob

    for pattern in _DYNSEC_PLUGIN_GLOBS:
        found = sorted(glob.glob(pattern))
        if found:
            return Path(found[0])
    return None


def mosquitto_ctrl_binary() -> str | None:
    return shutil.which("mosquitto_ctrl") or ("/usr/bin/mosquitto_ctrl" if Path("/usr/bin/mosquitto_ctrl").exists()
                                              else None)


def plan_broker(mode: str, host: str, port: int, *, dynsec: bool = False,
                plugin: Path | None = None) -> BrokerPlan:
    """What `start_broker` will run for `embedded_broker = mode`; see the module docstring. With `dynsec`, "auto"
    runs Mosquitto only where it can secure it (the plugin and mosquitto_ctrl exist), else the embedded broker."""
    if mode == "never":
        return "none"
    if mode == "always":
        return "embedded"
    if mode != "auto":
        raise ValueError(f"embedded_broker must be auto, always or never, not {mode!r}")
    if port_open(host, port):
        return "none"
    if not mosquitto_binary():
        return "embedded"
    if dynsec and (dynsec_plugin(plugin) is None or mosquitto_ctrl_binary() is None):
        log.warning("mosquitto is installed but its dynamic security plugin or mosquitto_ctrl is not: running the "
                    "embedded broker, which checks device logins itself")
        return "embedded"
    return "mosquitto"


class EmbeddedBroker:
    """amqtt in a thread with its own asyncio loop. TCP only, no $SYS chatter; anonymous unless `authority`
    is given, then only the cloud's and the devices' logins, each on its own topics (cloud/broker_auth.py)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 1883, *,
                 authority: EmbeddedAuthority | None = None) -> None:
        self.host = host
        self.port = port
        self.authority = authority
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._broker = None

    def _config(self) -> dict:
        if self.authority is not None:
            from edgefleet.cloud.broker_auth import plugin_config

            plugins = plugin_config(self.authority)
        else:
            # Only anonymous auth: the default plugin set also logs every packet and publishes $SYS every 20 s.
            plugins = {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}}
        return {"listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}}, "plugins": plugins}

    def kick(self, username: str) -> int:
        """Drop `username`'s live connections (a rotated or revoked login); thread-safe; how many."""
        loop, broker = self._loop, self._broker
        if loop is None or broker is None or loop.is_closed() or not hasattr(broker, "kick"):
            return 0
        return asyncio.run_coroutine_threadsafe(broker.kick(username), loop).result(_START_TIMEOUT_S)

    def start(self) -> EmbeddedBroker:
        # The cloud extra has amqtt; imported late so `--help` stays fast.
        if self.authority is not None:
            from edgefleet.cloud.broker_auth import GuardedBroker as Broker

            self.authority.open()
        else:
            from amqtt.broker import Broker

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
        if self.authority is not None:
            self.authority.close()


@dataclass(frozen=True)
class DynsecSetup:
    """Run Mosquitto with the dynamic security plugin; `admin` is the first dynsec admin (the cloud's login)."""

    plugin: Path
    admin_username: str
    admin_password: str


class MosquittoProcess:
    """A Mosquitto subprocess with its own config and persistence folder, stopped by its PID. Anonymous unless
    `dynsec` is given: then no anonymous client, and logins and ACLs come from the dynamic security plugin."""

    def __init__(self, workdir: Path, host: str = "127.0.0.1", port: int = 1883, *, persistence: bool = True,
                 dynsec: DynsecSetup | None = None) -> None:
        self.workdir = Path(workdir)
        self.host = host
        self.port = port
        self.persistence = persistence
        self.dynsec = dynsec
        self.proc: subprocess.Popen | None = None

    @property
    def dynsec_file(self) -> Path:
        return self.workdir / "dynamic-security.json"

    def _init_dynsec(self, setup: DynsecSetup) -> None:
        """First start only: a dynsec config whose one client is the cloud's login, an admin (mosquitto_ctrl)."""
        if self.dynsec_file.exists():
            return  # devices' accounts live here: never remade
        ctrl = mosquitto_ctrl_binary()
        if ctrl is None:
            raise RuntimeError("mosquitto_ctrl is not installed (it comes with mosquitto 2): install it, or set "
                               "embedded_broker=always")
        # The password goes in on stdin (asked twice), never on a command line that `ps` shows.
        password = setup.admin_password + "\n"
        done = subprocess.run([ctrl, "dynsec", "init", str(self.dynsec_file), setup.admin_username],
                              input=password * 2, capture_output=True, text=True, timeout=_START_TIMEOUT_S)
        if done.returncode != 0 or not self.dynsec_file.exists():
            raise RuntimeError(f"mosquitto_ctrl dynsec init failed ({done.returncode}): "
                               f"{(done.stderr or done.stdout).strip()[:200]}")
        self.dynsec_file.chmod(0o600)

    def start(self) -> MosquittoProcess:
        binary = mosquitto_binary()
        if binary is None:
            raise RuntimeError("mosquitto is not installed: apt-get install mosquitto, or set embedded_broker=always")
        self.workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
        conf = self.workdir / "mosquitto.conf"
        lines = [f"listener {self.port} {self.host}", "log_dest stderr", "log_type error", "log_type warning",
                 # The cloud's session queues what devices send while the cloud is away; 1,000 (the default) is
                 # under a minute of a busy fleet. Past this the broker drops, and agents resend what the cloud
                 # never confirmed: no loss, only traffic. max_queued_bytes bounds the memory it may take.
                 "max_queued_messages 100000", "max_queued_bytes 268435456"]
        if self.dynsec is None:
            lines.append("allow_anonymous true")
        else:
            self._init_dynsec(self.dynsec)
            # The plugin authenticates before Mosquitto drops an older session of the same client id, and binds
            # each device login to its client id, so no one takes over the cloud's or an agent's connection.
            lines += ["allow_anonymous false", f"plugin {self.dynsec.plugin}",
                      f"plugin_opt_config_file {self.dynsec_file}"]
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


def start_broker(mode: str, host: str, port: int, data_dir: Path, *,
                 auth: BrokerAuth | None = None) -> RunningBroker | None:
    """Start what `plan_broker` decides; None when an outside broker is expected. With `auth`, the broker started
    refuses anonymous clients and enforces per-device logins and topics."""
    plugin = dynsec_plugin(auth.dynsec_plugin) if auth is not None else None
    plan = plan_broker(mode, host, port, dynsec=auth is not None, plugin=auth.dynsec_plugin if auth else None)
    if plan == "embedded":
        authority = None
        if auth is not None:
            from edgefleet.cloud.broker_auth import EmbeddedAuthority

            authority = EmbeddedAuthority(auth.store, auth.prefix, auth.login)
        return EmbeddedBroker(host, port, authority=authority).start()
    if plan == "mosquitto":
        setup = None
        if auth is not None:
            if plugin is None:
                raise RuntimeError("Mosquitto's dynamic security plugin was not found: set mosquitto_dynsec_plugin "
                                   "to mosquitto_dynamic_security.so, or embedded_broker=always")
            setup = DynsecSetup(plugin, auth.login.username, auth.login.password)
        return MosquittoProcess(Path(data_dir) / "mosquitto", host, port, dynsec=setup).start()
    return None
