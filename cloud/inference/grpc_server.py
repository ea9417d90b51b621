"""`inference.GRPCInferenceService` (the Open Inference Protocol over gRPC) over the shared `ModelPool`.

    handle = start_grpc_server(pool, fleet.authenticate, port=8001)
    handle.port; handle.stop(grace=1.0)

Theory: a thin transport. The six RPCs of KServe's grpc_predict_v2.proto (committed under protos/) call the same
pool as the REST data plane (rest.py), so both answer alike; tensors cross in grpc_codec.py. One server
interceptor does the two things every call needs, once: the bearer token (metadata `authorization: Bearer
<token>`, a device or admin token, through auth.py's `TokenCache`, so the hot path reads a dict, not the database)
and the mapping of the cloud's errors to status codes (the table `_CODES`, walked along the error's class
hierarchy). Nothing a client sends reaches the client as anything but a status with a message: an unexpected
exception is logged and answered INTERNAL, and the server keeps serving. gRPC's own limit on a received message
(`max_message_mb`) answers RESOURCE_EXHAUSTED before a byte of an oversized request is parsed. The standard health
service (grpc.health.v1, from grpcio-health-checking) answers SERVING for "" and the inference service without a
token, as orchestrators probe it, and NOT_SERVING once `stop` begins.

Sync `grpc.server` with a thread pool, not `grpc.aio`, by measurement (bench/offload_grpc.py --server ..., the
digits MLP 64->32->10, one sample, raw contents, 2 cores shared with other work, clients in other processes):

    server                              rps c1      rps c16     p50 latency c1
    sync, thread pool (this module)     1630-1780   1890-2290   540-565 us
    grpc.aio, servicer on the loop      1450        1300        665 us
    grpc.aio, servicer in an executor   1240        2030        770 us

A run of this model is ~18 us and releases the GIL; our Python per call (decode, pool, encode, token) is ~40 us;
the rest is grpcio's own Python. The sync server's C core hands each call straight to a worker thread; grpc.aio
runs every call's Python on its one loop thread, so at concurrency 16 the loop is the bottleneck, and moving
`infer` to an executor from aio adds a thread hop on top of the loop's work.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from edgefleet.cloud.auth import Principal
from edgefleet.cloud.errors import (
    CloudError,
    Conflict,
    Forbidden,
    Invalid,
    NotFound,
    RateLimited,
    TooLarge,
    Unauthorized,
    Unavailable,
)
from edgefleet.cloud.inference.auth import TokenCache
from edgefleet.cloud.inference.grpc_codec import decode_inputs, fill_response, requested_outputs
from edgefleet.protos import grpc_predict_v2_pb2 as pb
from edgefleet.protos import grpc_predict_v2_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE = "inference.GRPCInferenceService"
_HEALTH_PREFIX = "/grpc.health.v1.Health/"
# The cloud's errors as gRPC status codes; a subclass takes its nearest listed ancestor's (ModelInvalid: Invalid's).
_CODES: dict[type[CloudError], grpc.StatusCode] = {
    Invalid: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    TooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    RateLimited: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unauthorized: grpc.StatusCode.UNAUTHENTICATED,
    Forbidden: grpc.StatusCode.PERMISSION_DENIED,
    Conflict: grpc.StatusCode.FAILED_PRECONDITION,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    CloudError: grpc.StatusCode.INTERNAL,
}
# Workers: each call in flight holds one thread; the run itself releases the GIL, the rest of the call does not.
# Measured at c16 on 2 cores (bench/offload_grpc.py --workers, +-25% noise on the shared box): 1 per core
# 2100-3150 rps, 2 per core 2150, 4 per core 1890-2360, 16 per core 2210: more threads only add GIL hand-offs. 2
# per core, not 1, so that one slow call (a session loading, a large teacher) does not stall every other.
_WORKERS_PER_CORE = 2


def status_code(exc: CloudError) -> grpc.StatusCode:
    for cls in type(exc).__mro__:
        code = _CODES.get(cls)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL


@dataclass
class GrpcHandle:
    """A running server: `port` (the bound one, when asked for 0) and `stop(grace)`."""

    port: int
    server: grpc.Server
    health: health.HealthServicer
    tokens: TokenCache
    _stopped: bool = field(default=False, repr=False)

    def stop(self, grace: float | None = 1.0) -> None:
        """Health NOT_SERVING at once, then calls in flight get `grace` seconds to finish before they are cut."""
        if self._stopped:
            return
        self._stopped = True
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()


def start_grpc_server(pool: Any, authenticate: Callable[[str], Principal] | TokenCache, *, host: str = "127.0.0.1",
                      port: int = 0, max_message_mb: float = 64, tls_cert: Path | str | None = None,
                      tls_key: Path | str | None = None, workers: int | None = None,
                      max_elements: int | None = None, server_version: str | None = None) -> GrpcHandle:
    """Serve `inference.GRPCInferenceService` for `pool` (a ModelPool) on host:port (0: a free port).

    `authenticate(token) -> Principal` is the Fleet's (`fleet.authenticate`); pass a `TokenCache` instead to share
    one with the REST data plane. `max_message_mb` bounds a request (and an answer); `max_elements` one tensor's
    element count (default: one per byte of the largest message). TLS when both `tls_cert` and `tls_key` (PEM
    files) are given."""
    if (tls_cert is None) != (tls_key is None):
        raise Invalid("gRPC TLS needs both a certificate and its key (PEM files); give both or neither")
    tokens = authenticate if isinstance(authenticate, TokenCache) else TokenCache(authenticate)
    max_bytes = int(max_message_mb * 1024 * 1024)
    workers = workers or _WORKERS_PER_CORE * _cores()
    options = [("grpc.max_receive_message_length", max_bytes), ("grpc.max_send_message_length", max_bytes),
               # Never share a port with another process's server (SO_REUSEPORT would split calls between them).
               ("grpc.so_reuseport", 0)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="oip-grpc"),
                         interceptors=[_Guard(tokens)], options=options)
    servicer = _Servicer(pool, max_elements=max_elements or max_bytes, version=server_version or _version())
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    for name in ("", SERVICE):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    bound = bind_port(server, host, port, tls_cert, tls_key, what="the gRPC server", option="--grpc-port")
    server.start()
    log.info("OIP gRPC server on %s:%d (%s, %d workers)", host, bound, "TLS" if tls_cert else "plaintext", workers)
    return GrpcHandle(port=bound, server=server, health=health_servicer, tokens=tokens)


def bind_port(server: grpc.Server, host: str, port: int, tls_cert: Path | str | None, tls_key: Path | str | None,
              *, what: str, option: str) -> int:
    """Listen on host:port (TLS when both PEM files are given); the bound port. Unavailable naming `what` and the
    `option` to change when it cannot (the OIP server's and the agent channel's one way to fail at start)."""
    address = f"{host}:{port}"
    try:
        if tls_cert is not None and tls_key is not None:
            creds = grpc.ssl_server_credentials([(Path(tls_key).read_bytes(), Path(tls_cert).read_bytes())])
            bound = server.add_secure_port(address, creds)
        else:
            bound = server.add_insecure_port(address)
    except (OSError, RuntimeError) as exc:
        raise Unavailable(f"{what} cannot listen on {address}: {exc}; free the port or pick another ({option})") \
            from None
    if bound == 0:
        raise Unavailable(f"{what} cannot listen on {address} (in use?); free the port or pick another ({option})")
    return int(bound)


class _Guard(grpc.ServerInterceptor):
    """Token check and error mapping around every inference RPC; the health service passes untouched."""

    def __init__(self, tokens: TokenCache) -> None:
        self._tokens = tokens
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}  # one wrapper per method, made on its first call

    def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        method = details.method
        wrapped = self._wrapped.get(method)
        if wrapped is not None:
            return wrapped
        handler = continuation(details)
        if handler is None or method.startswith(_HEALTH_PREFIX) or handler.unary_unary is None:
            return handler  # unknown methods get UNIMPLEMENTED from grpc itself
        wrapped = grpc.unary_unary_rpc_method_handler(self._guarded(handler.unary_unary),
                                                      request_deserializer=handler.request_deserializer,
                                                      response_serializer=handler.response_serializer)
        self._wrapped[method] = wrapped
        return wrapped

    def _guarded(self, inner: Callable[[Any, grpc.ServicerContext], Any]) -> Callable[..., Any]:
        tokens = self._tokens

        def guarded(request: Any, context: grpc.ServicerContext) -> Any:
            try:
                header = None
                for key, value in context.invocation_metadata():
                    if key == "authorization":  # gRPC lower-cases metadata keys
                        header = value if isinstance(value, str) else None
                        break
                tokens.check(header)
                return inner(request, context)
            except CloudError as exc:
                code, message = status_code(exc), exc.message
            except Exception:  # the last line of defence: a bug answers INTERNAL, and the server lives on
                log.exception("OIP gRPC %s failed", type(request).__name__)
                code = grpc.StatusCode.INTERNAL
                message = "the server failed on this request; its log has the details; retry, or report it"
            context.abort(code, message)

        return guarded


class _Servicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, pool: Any, *, max_elements: int, version: str) -> None:
        self.pool = pool
        self.max_elements = max_elements
        self.version = version

    def ServerLive(self, request: Any, context: Any) -> Any:  # noqa: N802 - the proto's names
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request: Any, context: Any) -> Any:  # noqa: N802
        return pb.ServerReadyResponse(ready=True)

    def ModelReady(self, request: Any, context: Any) -> Any:  # noqa: N802
        return pb.ModelReadyResponse(ready=self.pool.ready(_name(request.name), request.version or None))

    def ServerMetadata(self, request: Any, context: Any) -> Any:  # noqa: N802
        return pb.ServerMetadataResponse(name="edgefleet", version=self.version)

    def ModelMetadata(self, request: Any, context: Any) -> Any:  # noqa: N802
        meta = self.pool.metadata(_name(request.name), request.version or None)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=meta["name"], versions=meta["versions"], platform=meta["platform"],
            inputs=[tensor(name=t["name"], datatype=t["datatype"], shape=t["shape"]) for t in meta["inputs"]],
            outputs=[tensor(name=t["name"], datatype=t["datatype"], shape=t["shape"]) for t in meta["outputs"]])

    def ModelInfer(self, request: Any, context: Any) -> Any:  # noqa: N802
        inputs, raw = decode_inputs(request, max_elements=self.max_elements)
        result = self.pool.infer(_name(request.model_name), request.model_version or None, inputs,
                                 requested_outputs(request))
        response = pb.ModelInferResponse(model_name=result.model_name, model_version=result.model_version,
                                         id=request.id)
        # Which file answered (variants.py): the SDK reports it as provenance, as the REST answers do.
        response.parameters["variant"].string_param = result.variant
        fill_response(response, result.outputs, raw=raw)
        return response


def _name(name: str) -> str:
    if not name:
        raise Invalid("no model name; set model_name (or name) to the model's name, as `fleet models` lists it")
    return name


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the cores this process may use (a container's cpuset), not the host's
    except AttributeError:  # not on every platform
        return os.cpu_count() or 1


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("edgefleet")
    except metadata.PackageNotFoundError:
        return "0+unknown"


__all__ = ["SERVICE", "GrpcHandle", "start_grpc_server", "status_code"]
