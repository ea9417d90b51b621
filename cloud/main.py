"""`edgefleet-cloud`: run the cloud service (`serve`) and its job workers (`worker`, see cloud/worker.py).

Theory: `serve` builds a `CloudRuntime` (settings -> `Fleet.from_settings`, which migrates the database -> the admin
token -> the MQTT side (cloud/mqtt_runtime.py: a broker when settings ask for one, who provisions device logins, the
bridge wired as the Fleet's publish) -> with `agent_channel_port`, the gRPC agent channel (cloud/agent_channel.py),
the Fleet's publish then fanning out to the bridge and the channel's streams -> a refresher thread), then runs uvicorn
in the main thread. uvicorn owns SIGINT/SIGTERM: it stops serving, returns, and the runtime stops the agent channel,
the refresher, the bridge, the dynsec client and the broker in that order (the clients before the broker they talk
to).

`infer` runs the offload data plane alone (cloud/inference/standalone.py): the Open Inference Protocol at /v2 over
the same database and blobs, no MQTT, so offload traffic scales on its own machines.

The admin token exists once: made at first start, printed once to stderr with the path of the 0600 file that keeps
it, never printed again. `tests/cloud_server.py` runs the same `CloudRuntime` under uvicorn in a thread, so tests
exercise exactly this wiring.
"""

from __future__ import annotations

import logging
import shlex
import signal
import sys
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import typer

from edgefleet.cloud.errors import CloudError
from edgefleet.cloud.keys_cli import keys_app

if TYPE_CHECKING:
    from fastapi import FastAPI

    from edgefleet.cloud.broker import RunningBroker
    from edgefleet.cloud.mqtt_bridge import MqttBridge
    from edgefleet.cloud.mqtt_runtime import MqttSide
    from edgefleet.cloud.services import Fleet
    from edgefleet.cloud.settings import Settings

log = logging.getLogger("edgefleet.cloud")

app = typer.Typer(help="edgefleet cloud: model registry, signed bundles, desired states, REST API and MQTT bridge.",
                  no_args_is_help=True, add_completion=False)
app.add_typer(keys_app, name="keys")


class CloudRuntime:
    """The cloud's moving parts besides the HTTP server. `start()` then `stop()`; safe to stop a partial start."""

    def __init__(self, settings: Settings, *, mqtt: bool = True) -> None:
        self.settings = settings
        self.mqtt = mqtt
        self.fleet: Fleet | None = None
        self.admin_token: str | None = None  # set only at the first start of a data dir
        self.broker: RunningBroker | None = None
        self.bridge: MqttBridge | None = None
        self.mqtt_side: MqttSide | None = None
        self.app: FastAPI | None = None
        self._stop_refresh = threading.Event()
        self._refresher: threading.Thread | None = None
        self._maintainer: threading.Thread | None = None
        self.grpc: Any = None  # cloud/inference/grpc_server.py GrpcHandle when grpc_port is set
        self.agent_channel: Any = None  # cloud/agent_channel.py AgentChannelHandle when agent_channel_port is set

    def start(self) -> CloudRuntime:
        from edgefleet.cloud.api import create_app
        from edgefleet.cloud.mqtt_runtime import start_mqtt
        from edgefleet.cloud.services import Fleet

        s = self.settings
        try:
            self.fleet = Fleet.from_settings(s)
            self.admin_token = self.fleet.ensure_admin_token()
            if self.mqtt:
                # Broker, device logins (cloud/mqtt_accounts.py) and bridge, wired in cloud/mqtt_runtime.py.
                self.mqtt_side = start_mqtt(s, self.fleet)
                self.broker, self.bridge = self.mqtt_side.broker, self.mqtt_side.bridge
                self.fleet.publish = self.bridge.publish
                self.fleet.broker_accounts = self.mqtt_side.accounts
            if s.agent_channel_port is not None:
                self._start_agent_channel()
            self._refresher = threading.Thread(target=self._refresh_loop, name="edgefleet-refresh", daemon=True)
            self._refresher.start()
            self._maintainer = threading.Thread(target=self._maintain_loop, name="edgefleet-telemetry-upkeep",
                                                daemon=True)
            self._maintainer.start()
            self.app = create_app(self.fleet)
            if s.grpc_port is not None:
                from edgefleet.cloud.api.app import data_plane
                from edgefleet.cloud.inference.grpc_server import start_grpc_server

                plane = data_plane(self.app)  # the /v2 pool and token cache: REST and gRPC share sessions
                self.grpc = start_grpc_server(plane.pool, plane.tokens, host=s.grpc_host, port=s.grpc_port,
                                              max_message_mb=s.infer_max_body_mb, tls_cert=s.grpc_tls_cert,
                                              tls_key=s.grpc_tls_key)
                log.info("OIP over gRPC on %s:%d", s.grpc_host, self.grpc.port)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_agent_channel(self) -> None:
        """The gRPC agent channel; desired states then go out on MQTT (when on) and on the agents' streams."""
        from edgefleet.cloud.agent_channel import FanOut, start_agent_channel
        from edgefleet.protos.messages import AgentChannelInfo

        assert self.fleet is not None
        s = self.settings
        host = s.agent_channel_host or s.host
        self.agent_channel = start_agent_channel(
            self.fleet, host=host, port=s.agent_channel_port or 0, max_message_kb=s.agent_channel_max_message_kb,
            keepalive_s=s.agent_channel_keepalive_s, keepalive_timeout_s=s.agent_channel_keepalive_timeout_s,
            min_ping_s=s.agent_channel_min_ping_s, max_streams=s.agent_channel_max_streams,
            tls_cert=s.agent_channel_tls_cert, tls_key=s.agent_channel_tls_key,
            ingest_batch=s.mqtt_ingest_batch, ingest_wait_s=s.mqtt_ingest_wait_s)
        publishers = [p for p in (self.fleet.publish, self.agent_channel.hub.publish) if p is not None]
        self.fleet.publish = FanOut(*publishers)
        advertised = s.agent_channel_public_target or \
            f"{urlsplit(s.public_url or '').hostname or host}:{self.agent_channel.port}"
        self.fleet.agent_channel = AgentChannelInfo(target=advertised, tls=s.agent_channel_tls_cert is not None)
        log.info("agent channel (gRPC) on %s:%d, advertised to agents as %s", host, self.agent_channel.port,
                 advertised)

    def _refresh_loop(self) -> None:
        """Re-sign desired states past half their life and the TUF timestamp before it expires."""
        assert self.fleet is not None
        while not self._stop_refresh.wait(self.settings.refresh_interval_s):
            for what, call in (("desired states", self.fleet.refresh_expiring),
                               ("TUF timestamp", self.fleet.tuf.refresh_timestamp)):
                try:
                    call()
                except Exception:
                    log.exception("refreshing %s failed; retrying in %ss", what, self.settings.refresh_interval_s)

    def _maintain_loop(self) -> None:
        """Telemetry upkeep (cloud/telemetry_rollup.py): raw windows rolled up hourly, partitions made ahead, old data
        dropped by the retention settings. At start, then every telemetry_maintenance_interval_s; a failed run is
        logged and the next one catches up (nothing is lost: the roll-up works from a watermark)."""
        from edgefleet.cloud.telemetry_rollup import maintain_telemetry

        assert self.fleet is not None
        interval = self.settings.telemetry_maintenance_interval_s
        while True:
            try:
                maintain_telemetry(self.fleet.store, self.settings, datetime.now(timezone.utc))
            except Exception:
                log.exception("telemetry upkeep failed; retrying in %ss", interval)
            if self._stop_refresh.wait(interval):
                return

    def stop(self) -> None:
        if self.agent_channel is not None:
            self.agent_channel.stop(1.0)  # streams closed: agents reconnect with backoff
            self.agent_channel = None
            if self.fleet is not None:
                self.fleet.agent_channel = None
        if self.grpc is not None:
            self.grpc.stop(1.0)  # health NOT_SERVING, then 1 s for calls in flight
            self.grpc = None
        plane = getattr(self.app.state, "inference", None) if self.app is not None else None
        if plane is not None:
            plane.close()  # its sessions and thread pool, before the Fleet they read through
        self._stop_refresh.set()
        if self._refresher is not None:
            self._refresher.join(5)
        if self._maintainer is not None:
            self._maintainer.join(5)
        if self.fleet is not None:
            self.fleet.publish = None
            self.fleet.broker_accounts = None
        if self.mqtt_side is not None:
            self.mqtt_side.stop()  # the bridge, the dynsec control client, then the broker
            self.mqtt_side = None
        self.bridge = self.broker = None
        if self.fleet is not None:
            self.fleet.close()  # last: the bridge and the refresher above may still write until they stop


def login_command(url: str, token: str) -> str:
    """The `fleet login` that works as printed, with the cloud's own URL (a token is URL-safe base64: no quoting)."""
    return f"fleet login --url {shlex.quote(url)} --token {shlex.quote(token)}"


def announce_admin_token(token: str, token_file: Path, url: str) -> None:
    """Shown once, at the first start: to stderr so that stdout stays clean for scripts. `url`: the cloud's base URL
    (`Settings.public_url`: http://{host}:{port}, 127.0.0.1 for a wildcard host, unless set)."""
    typer.echo(
        "\n".join([
            "",
            "edgefleet: created the admin token (shown only this once):",
            f"    {token}",
            f"It is also kept in {token_file} (mode 0600). Log the fleet CLI in with:",
            f"    {login_command(url, token)}",
            "",
        ]),
        err=True,
    )


def _after_uvicorn(signum: int, frame: object) -> None:
    log.info("stopping on signal %d", signum)


@app.command()
def serve(
    host: str | None = typer.Option(None, help="Interface to listen on (default from settings: 127.0.0.1)."),
    port: int | None = typer.Option(None, help="HTTP port (default from settings: 8080)."),
    data_dir: Path | None = typer.Option(None, "--data-dir", help="Database, blobs, TUF repo, keys, admin token."),
    config: Path | None = typer.Option(None, "--config", help="TOML settings file (or EDGEFLEET_CONFIG)."),
    grpc_port: int | None = typer.Option(None, "--grpc-port", help="Also serve the Open Inference Protocol over "
                                         "gRPC (inference.GRPCInferenceService) on this port; 0: a free one."),
    agent_channel_port: int | None = typer.Option(None, "--agent-channel-port", help="Also serve the gRPC agent "
                                                  "channel (edgefleet.v1.AgentChannel) on this port, for agents "
                                                  "with transport = \"grpc\"; 0: a free one."),
    log_level: str = typer.Option("info", help="debug, info, warning or error."),
) -> None:
    """Run the REST API (with the offload inference server at /v2), the TUF repository, the MQTT bridge and (when
    needed) an embedded broker; with --agent-channel-port, the gRPC agent channel too."""
    import uvicorn

    from edgefleet.cloud.settings import Settings

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)  # one line per plugin at every start
    overrides: dict[str, Any] = {k: v for k, v in (("host", host), ("port", port), ("data_dir", data_dir),
                                                   ("grpc_port", grpc_port),
                                                   ("agent_channel_port", agent_channel_port)) if v is not None}
    try:
        settings = Settings(config_file=config, **overrides)
        runtime = CloudRuntime(settings).start()
    except CloudError as exc:
        typer.echo(f"edgefleet-cloud: {exc.message}", err=True)
        raise typer.Exit(2) from None
    except RuntimeError as exc:  # a broker that cannot start, said in one line by broker.py
        typer.echo(f"edgefleet-cloud: {exc}", err=True)
        raise typer.Exit(2) from None
    if runtime.admin_token:
        announce_admin_token(runtime.admin_token, settings.admin_token_file, str(settings.public_url))
    server = uvicorn.Server(uvicorn.Config(runtime.app, host=settings.host, port=settings.port,
                                           log_level=log_level.lower(), lifespan="off"))
    # uvicorn catches SIGINT/SIGTERM, shuts down gracefully, then re-raises the signal to the handler it found
    # installed. With the defaults that would kill the process (or raise KeyboardInterrupt) before the bridge and
    # broker stop; these no-op handlers let `run()` return so the runtime stops in order and we exit 0.
    previous = {sig: signal.signal(sig, _after_uvicorn) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run()  # returns after SIGINT/SIGTERM
    finally:
        runtime.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not server.started:
        typer.echo(f"edgefleet-cloud: could not listen on {settings.host}:{settings.port}", err=True)
        raise typer.Exit(1)


@app.command()
def worker(
    data_dir: Path | None = typer.Option(None, "--data-dir", help="The cloud's data dir (blobs, database)."),
    config: Path | None = typer.Option(None, "--config", help="TOML settings file (or EDGEFLEET_CONFIG)."),
    worker_id: str | None = typer.Option(None, "--id", help="Name in job rows and logs (default host:pid)."),
    once: bool = typer.Option(False, "--once", help="Run queued jobs until none is left, then exit."),
    plugin: list[str] = typer.Option([], "--plugin", hidden=True, help="Import a module that registers job kinds."),
    log_level: str = typer.Option("info", help="debug, info, warning or error."),
) -> None:
    """Run queued jobs (distillations). Start any number, on any machine sharing the database and the blobs."""
    from edgefleet.cloud.services import Fleet
    from edgefleet.cloud.settings import Settings
    from edgefleet.cloud.worker import Worker, import_plugins

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = Settings(config_file=config, **({"data_dir": data_dir} if data_dir else {}))
        import_plugins(plugin)
        fleet = Fleet.from_settings(settings)
    except CloudError as exc:
        typer.echo(f"edgefleet-cloud: {exc.message}", err=True)
        raise typer.Exit(2) from None
    runner = Worker.from_fleet(fleet, worker_id)
    # SIGTERM/SIGINT: stop claiming; the running job is released to the queue at its next progress report.
    previous = {sig: signal.signal(sig, lambda *_: runner.stopping.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    log.info("worker %s: running %s jobs", runner.config.worker_id, ", ".join(runner.config.kinds))
    try:
        runner.run_forever(once=once)
    finally:
        fleet.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# Per-request work uvicorn need not do for the data plane: an access log line, X-Forwarded-* rewriting (the data
# plane reads no client address), a Server header.
_INFER_UVICORN: dict[str, Any] = {"access_log": False, "proxy_headers": False, "server_header": False}


@app.command()
def infer(
    host: str | None = typer.Option(None, help="Interface to listen on (default from settings: 127.0.0.1)."),
    port: int | None = typer.Option(None, help="HTTP port (default from settings: infer_port, 8081)."),
    data_dir: Path | None = typer.Option(None, "--data-dir", help="The cloud's data dir (database, blobs)."),
    config: Path | None = typer.Option(None, "--config", help="TOML settings file (or EDGEFLEET_CONFIG)."),
    workers: int = typer.Option(1, min=1, help="Server processes on the one port (one core each at most)."),
    grpc_port: int | None = typer.Option(None, "--grpc-port", help="Also serve the Open Inference Protocol over "
                                         "gRPC on this port; 0: a free one."),
    log_level: str = typer.Option("info", help="debug, info, warning or error."),
) -> None:
    """Run the offload inference server (Open Inference Protocol at /v2) alone, apart from the control plane."""
    import json
    import os

    import uvicorn

    from edgefleet.cloud.inference.standalone import WORKER_SETTINGS_ENV, StandaloneInference
    from edgefleet.cloud.settings import Settings

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    overrides: dict[str, Any] = {k: v for k, v in (("host", host), ("data_dir", data_dir), ("grpc_port", grpc_port))
                                 if v is not None}
    try:
        settings = Settings(config_file=config, **overrides)
        # One process: REST and (with grpc_port) gRPC share its pool. Several: the workers serve REST, this process
        # only gRPC (StandaloneInference.start is the hook either way).
        runtime = StandaloneInference(settings).start() if workers == 1 or settings.grpc_port is not None else None
    except CloudError as exc:
        typer.echo(f"edgefleet-cloud: {exc.message}", err=True)
        raise typer.Exit(2) from None
    listen = port if port is not None else settings.infer_port
    if workers > 1:
        passed = {k: str(v) for k, v in overrides.items()} | ({"config_file": str(config)} if config else {})
        os.environ[WORKER_SETTINGS_ENV] = json.dumps(passed)
        try:
            uvicorn.run("edgefleet.cloud.inference.standalone:worker_app", factory=True, workers=workers,
                        host=settings.host, port=listen, log_level=log_level.lower(), **_INFER_UVICORN)
        finally:
            if runtime is not None:
                runtime.stop()
        return
    assert runtime is not None
    server = uvicorn.Server(uvicorn.Config(runtime.app, host=settings.host, port=listen, log_level=log_level.lower(),
                                           lifespan="off", **_INFER_UVICORN))
    previous = {sig: signal.signal(sig, _after_uvicorn) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run()  # returns after SIGINT/SIGTERM
    finally:
        runtime.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not server.started:
        typer.echo(f"edgefleet-cloud: could not listen on {settings.host}:{listen}", err=True)
        raise typer.Exit(1)


@app.command()
def version() -> None:
    """Print the installed edgefleet version."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as pkg_version

    try:
        typer.echo(pkg_version("edgefleet"))
    except PackageNotFoundError:
        typer.echo("unknown (not installed)")


def main() -> None:
    app(prog_name="edgefleet-cloud")


if __name__ == "__main__":
    sys.exit(main())
