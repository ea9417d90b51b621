"""Building the data plane: `build_data_plane(fleet)` for the cloud's app, `StandaloneInference` for its own process.

Theory: offload traffic grows with the fleet's apps, the control plane with its devices; `edgefleet-cloud infer`
runs the data plane alone so each scales on its own machines. The process needs only what answers a request: the
database (tokens, model versions, job rows) and the blob store, through `Fleet.from_settings` (which migrates the
database, as every cloud process does); no MQTT, no refresher, no admin token made. Any number of such processes
may share one database and blob store, behind a load balancer.

The gRPC server (cloud/inference/grpc_server.py) serves the same pool: `StandaloneInference.start()` is where it
is started when `grpc_port` is set, so REST and gRPC share the sessions of one process.

`--workers N` runs N uvicorn worker processes on one socket (uvicorn's supervisor), each with its own Fleet and
pool, built by `worker_app` from the settings the parent passes in `WORKER_SETTINGS_ENV`. One Python process tops
out near one core (the GIL); measured on the 2-core box with 16 client connections, binary requests went from
5.6k/s with one worker to 8.0k/s with two. Each worker loads its own sessions (memory times N).
"""

from __future__ import annotations

import json
import logging
import os
from typing import TYPE_CHECKING, Any

from edgefleet.cloud.inference.auth import TokenCache
from edgefleet.cloud.inference.pool import ModelPool
from edgefleet.cloud.inference.rest import DataPlane
from edgefleet.cloud.inference.variants import VariantResolver

if TYPE_CHECKING:
    from edgefleet.cloud.services import Fleet
    from edgefleet.cloud.settings import Settings

log = logging.getLogger(__name__)
# The parent's settings overrides (JSON) for `worker_app` in each uvicorn worker process.
WORKER_SETTINGS_ENV = "EDGEFLEET_INFER_WORKER_SETTINGS"


def build_pool(fleet: Fleet) -> ModelPool:
    s = fleet.settings
    return ModelPool(VariantResolver(fleet, s.offload_serves), intra_op_threads=s.infer_intra_op_threads,
                     batch_max_delay_us=s.infer_batch_max_delay_us, batch_max_size=s.infer_batch_max_size,
                     max_loaded=s.infer_max_loaded, max_input_bytes=s.infer_max_body_bytes)


def build_data_plane(fleet: Fleet, pool: ModelPool | None = None) -> DataPlane:
    """The /v2 ASGI app over `fleet`'s registry and tokens (a new pool unless one is given)."""
    return DataPlane(pool or build_pool(fleet), TokenCache(fleet.authenticate),
                     max_body_bytes=fleet.settings.infer_max_body_bytes)


class StandaloneInference:
    """`edgefleet-cloud infer`'s moving parts: the Fleet, the data plane, and (with grpc_port) the gRPC server."""

    def __init__(self, settings: Settings, *, grpc: bool = True) -> None:
        self.settings = settings
        self.with_grpc = grpc
        self.fleet: Fleet | None = None
        self.app: DataPlane | None = None
        self.grpc: Any = None

    def start(self) -> StandaloneInference:
        from edgefleet.cloud.services import Fleet

        try:
            self.fleet = Fleet.from_settings(self.settings)
            self.app = build_data_plane(self.fleet)
            if self.with_grpc and self.settings.grpc_port is not None:
                # cloud/inference/grpc_server.py, sharing this process's sessions and token cache.
                self.grpc = self._start_grpc(self.app)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_grpc(self, plane: DataPlane) -> Any:
        from edgefleet.cloud.inference.grpc_server import start_grpc_server

        s = self.settings
        # The TokenCache itself: REST and gRPC share one cache of token lookups.
        return start_grpc_server(plane.pool, plane.tokens, host=s.grpc_host, port=s.grpc_port,
                                 max_message_mb=s.infer_max_body_mb, tls_cert=s.grpc_tls_cert,
                                 tls_key=s.grpc_tls_key)

    def stop(self) -> None:
        if self.grpc is not None:
            self.grpc.stop(1.0)  # GrpcHandle: health NOT_SERVING, then 1 s for calls in flight
            self.grpc = None
        if self.app is not None:
            self.app.close()
            self.app = None
        if self.fleet is not None:
            self.fleet.close()
            self.fleet = None


class _WorkerApp:
    """A worker process's data plane; closes its Fleet when uvicorn's lifespan says the worker stops."""

    def __init__(self, runtime: StandaloneInference) -> None:
        self.runtime = runtime
        assert runtime.app is not None
        self.plane = runtime.app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    self.runtime.stop()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        await self.plane(scope, receive, send)


def worker_app() -> _WorkerApp:
    """uvicorn's app factory in each worker process of `edgefleet-cloud infer --workers N` (no gRPC: the parent
    serves it, so N workers do not fight over its port)."""
    from edgefleet.cloud.settings import Settings

    overrides = json.loads(os.environ.get(WORKER_SETTINGS_ENV) or "{}")
    config = overrides.pop("config_file", None)
    return _WorkerApp(StandaloneInference(Settings(config_file=config, **overrides), grpc=False).start())


__all__ = ["WORKER_SETTINGS_ENV", "StandaloneInference", "build_data_plane", "build_pool", "worker_app"]
