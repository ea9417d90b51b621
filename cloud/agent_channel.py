"""`edgefleet.v1.AgentChannel` (protos/agent_channel.proto): the cloud's gRPC server for agents that speak gRPC.

    handle = start_agent_channel(fleet, port=0, keepalive_s=30, ...)
    fleet.publish = FanOut(bridge.publish, handle.hub.publish)
    handle.port; handle.hub; handle.stop(grace_s=1.0)

Theory of operation. A thin transport over the same contract and the same code paths as MQTT: the hub
(cloud/agent_channel_hub.py) keeps the connected streams, pushes desired states, and checks, stores and answers
what the agents send. This module is the server around it:

- Auth, once per call, in one interceptor (`_Guard`): metadata `authorization: Bearer <device token>` through
  `Fleet.authenticate`; `Connect` takes a device token only (UNAUTHENTICATED for none, a wrong or expired one;
  PERMISSION_DENIED for an admin or enrollment token, or an `edgefleet-device-id` header naming another device: a
  device may speak only as itself). `FetchArtifact` takes a device or admin token, as the HTTP targets route does.
  The cloud's errors become status codes there too (grpc_server.py's table, plus OUT_OF_RANGE for an offset past
  the end); an unexpected exception is logged and answered INTERNAL, and the server keeps serving.
- `Connect`: the stream is attached to the hub (closing the device's older stream), the device's current signed
  desired state from the database is its first message, and a reader thread hands each AgentMessage to the hub.
  Bytes that do not decode as an AgentMessage reach the hub as None and are counted, not fatal: the request
  deserializer never fails (it answers a marker, not None, which grpc would take as a failure and end the call).
  A message over `max_message_kb` is refused by gRPC itself (RESOURCE_EXHAUSTED, the stream ends); one over the
  contract's MAX_MESSAGE_BYTES but under that is refused and counted by the checks, and the stream carries on: so
  `max_message_kb` stays above the contract's limit (checked by settings).
- Keepalive: the server pings every `keepalive_s` and drops a connection whose ping goes unanswered for
  `keepalive_timeout_s` (a stalled network, a frozen agent), which ends the stream and marks the device offline;
  it lets agents ping as often as every `min_ping_s` while a stream is open (any faster is a GOAWAY).
- `FetchArtifact`: the bundle a TUF target path names (`TufRepository.get_target`, as the HTTP route does), from
  the blob store, from `offset`, in chunks of `CHUNK_BYTES`, each naming its offset and the bundle's size.
- Threads: sync `grpc.server`, as the OIP server (cloud/inference/grpc_server.py says why). Each open stream holds
  one of the server's `max_streams` workers (its outbound messages) and a reader thread; past `max_streams` calls
  a connect is refused RESOURCE_EXHAUSTED and the agent backs off. `stop` closes every stream first, so no worker
  waits on a queue past shutdown.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from edgefleet.cloud.agent_channel_hub import AgentHub, DeviceStream, FanOut
from edgefleet.cloud.auth import Principal
from edgefleet.cloud.errors import CloudError, Conflict, Forbidden, Invalid, NotFound, Unauthorized, Unavailable
from edgefleet.cloud.inference.grpc_server import bind_port, status_code
from edgefleet.protos import agent_channel_pb2 as pb
from edgefleet.protos import agent_channel_pb2_grpc as pb_grpc
from edgefleet.protos.messages import MAX_MESSAGE_BYTES

if TYPE_CHECKING:
    from edgefleet.cloud.services import Fleet

log = logging.getLogger(__name__)

SERVICE = "edgefleet.v1.AgentChannel"
DEVICE_ID_HEADER = "edgefleet-device-id"
# 64 KiB: a bundle of a few MB in tens of messages, each far below any message limit on the way.
CHUNK_BYTES = 64 * 1024
# Workers beyond max_streams: FetchArtifact calls, and a connect that is refused, still get a thread.
_SPARE_WORKERS = 16


class OutOfRange(Invalid):
    """An artifact offset past the bundle's end."""


class Superseded(Conflict):
    """The device connected again; this older stream is closed."""


# Beyond grpc_server.py's table: the two codes only this service answers.
_OWN_CODES: dict[type[CloudError], grpc.StatusCode] = {OutOfRange: grpc.StatusCode.OUT_OF_RANGE,
                                                       Superseded: grpc.StatusCode.ABORTED}


@dataclass
class AgentChannelHandle:
    """A running server: `port` (the bound one, when asked for 0), `hub`, and `stop(grace_s)`."""

    port: int
    server: grpc.Server
    hub: AgentHub
    _stopped: bool = field(default=False, repr=False)

    def stop(self, grace_s: float | None = 1.0) -> None:
        """Close every stream (agents reconnect elsewhere or later), then give other calls `grace_s` to finish."""
        if self._stopped:
            return
        self._stopped = True
        self.hub.stop()
        self.server.stop(grace_s).wait()


def start_agent_channel(fleet: Fleet, *, host: str = "127.0.0.1", port: int = 0, max_message_kb: int = 1024,
                        keepalive_s: float = 30.0, keepalive_timeout_s: float = 10.0, min_ping_s: float = 10.0,
                        max_streams: int = 1000, tls_cert: Path | str | None = None,
                        tls_key: Path | str | None = None, ingest_batch: int = 500,
                        ingest_wait_s: float = 0.05) -> AgentChannelHandle:
    """Serve the agent channel for `fleet` on host:port (0: a free port). TLS when both `tls_cert` and `tls_key`
    (PEM files) are given. The caller wires `handle.hub.publish` into the Fleet's publish (`FanOut`)."""
    if (tls_cert is None) != (tls_key is None):
        raise Invalid("the agent channel's TLS needs both a certificate and its key (PEM files); give both or "
                      "neither (agent_channel_tls_cert, agent_channel_tls_key)")
    max_bytes = max_message_kb * 1024
    if max_bytes <= MAX_MESSAGE_BYTES:
        raise Invalid(f"agent_channel_max_message_kb must be above the contract's {MAX_MESSAGE_BYTES // 1024} KiB "
                      "limit, so an oversized payload is refused and counted instead of ending the stream")
    hub = AgentHub(fleet, ingest_batch=ingest_batch, ingest_wait_s=ingest_wait_s).start()
    options = [
        ("grpc.max_receive_message_length", max_bytes), ("grpc.max_send_message_length", max_bytes),
        ("grpc.keepalive_time_ms", int(keepalive_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(keepalive_timeout_s * 1000)),
        # grpcio 1.85 times an unanswered ping out by this; keepalive_timeout_ms alone let a stall go 40 s+.
        ("grpc.http2.ping_timeout_ms", int(keepalive_timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", int(min_ping_s * 1000)),
        ("grpc.http2.min_ping_interval_without_data_ms", int(keepalive_s * 1000)),
        ("grpc.so_reuseport", 0),  # never share a port with another process's server
    ]
    servicer = _Servicer(fleet, hub)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_streams + _SPARE_WORKERS,
                                                    thread_name_prefix="agent-grpc"),
                         interceptors=[_Guard(fleet.authenticate, servicer)], options=options,
                         maximum_concurrent_rpcs=max_streams + _SPARE_WORKERS)
    pb_grpc.add_AgentChannelServicer_to_server(servicer, server)
    try:
        bound = bind_port(server, host, port, tls_cert, tls_key, what="the agent channel",
                          option="--agent-channel-port")
    except Unavailable:
        hub.stop()
        raise
    server.start()
    log.info("agent channel (gRPC) on %s:%d (%s)", host, bound, "TLS" if tls_cert else "plaintext")
    return AgentChannelHandle(port=bound, server=server, hub=hub)


class _Unreadable:
    """Bytes that are not an AgentMessage (not None: grpc aborts the whole call on a deserializer's None)."""


_UNREADABLE = _Unreadable()


def _decode_agent_message(raw: bytes) -> Any:
    """The request deserializer: never raises, so garbage is counted by the hub instead of ending the stream."""
    try:
        return pb.AgentMessage.FromString(raw)
    except Exception:  # noqa: BLE001 - protobuf's DecodeError, or worse: garbage either way
        return _UNREADABLE


class _Guard(grpc.ServerInterceptor):
    """The token check and the error mapping around both RPCs, once per call."""

    def __init__(self, authenticate: Callable[[str | None], Principal], servicer: _Servicer) -> None:
        self._authenticate = authenticate
        self._servicer = servicer
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        method = details.method
        if method in self._wrapped:
            return self._wrapped[method]
        handler = continuation(details)
        if handler is None or not method.startswith(f"/{SERVICE}/"):
            return handler  # unknown methods get UNIMPLEMENTED from grpc itself
        name = method.rsplit("/", 1)[1]
        if name == "Connect":
            wrapped = grpc.stream_stream_rpc_method_handler(
                self._guarded(self._servicer.connect, device_only=True),
                request_deserializer=_decode_agent_message, response_serializer=handler.response_serializer)
        elif name == "FetchArtifact":
            wrapped = grpc.unary_stream_rpc_method_handler(
                self._guarded(self._servicer.fetch_artifact, device_only=False),
                request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
        else:  # a method added to the proto and not yet here: the generated base answers UNIMPLEMENTED
            return handler
        self._wrapped[method] = wrapped
        return wrapped

    def _principal(self, context: grpc.ServicerContext, *, device_only: bool) -> Principal:
        metadata = dict(context.invocation_metadata())  # keys arrive lower-cased
        header = metadata.get("authorization")
        scheme, _, token = header.partition(" ") if isinstance(header, str) else ("", "", "")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("the agent channel needs metadata 'authorization: Bearer <device token>' (the token "
                               "from enrollment, in the agent's state.json)")
        who = self._authenticate(token.strip())
        if device_only and who.kind != "device":
            raise Forbidden(f"the agent channel takes a device token, not a {who.kind} token: enroll the device "
                            "and connect with its device token")
        if who.kind not in ("device", "admin"):
            raise Forbidden(f"fetching a bundle needs a device or admin token, not a {who.kind} token")
        claimed = metadata.get(DEVICE_ID_HEADER)
        if who.kind == "device" and claimed is not None and claimed != who.device_id:
            raise Forbidden(f"this token belongs to device {who.device_id!r}, not {claimed!r}: a device may speak "
                            "only as itself; check the agent's device_id against its enrollment")
        return who

    def _guarded(self, inner: Callable[..., Iterator[Any]], *, device_only: bool) -> Callable[..., Iterator[Any]]:
        def guarded(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            try:
                principal = self._principal(context, device_only=device_only)
                yield from inner(request, context, principal)
                return
            except CloudError as exc:
                code = _OWN_CODES.get(type(exc)) or status_code(exc)
                message = exc.message
            except Exception:  # the last line of defence: a bug answers INTERNAL, and the server lives on
                log.exception("agent channel call %s failed", type(request).__name__)
                code = grpc.StatusCode.INTERNAL
                message = "the cloud failed on this call; its log has the details; the agent retries"
            context.abort(code, message)

        return guarded


class _Servicer(pb_grpc.AgentChannelServicer):
    """The two RPCs, called by `_Guard` with the caller's principal; the generated base's methods (reached only
    without the guard) answer UNIMPLEMENTED."""

    def __init__(self, fleet: Fleet, hub: AgentHub) -> None:
        self.fleet = fleet
        self.hub = hub

    def connect(self, requests: Iterator[Any], context: grpc.ServicerContext,
                principal: Principal) -> Iterator[Any]:
        assert principal.device_id is not None
        stream = self.hub.attach(principal.device_id)
        if stream is None:
            raise Unavailable("the cloud is shutting down; the agent reconnects with backoff")
        context.add_callback(stream.close)  # the call ended (cancelled, keepalive, shutdown): wake outbound()
        try:
            stream.push_desired(self.fleet.desired_state(principal.device_id))
        except BaseException:
            self.hub.detach(stream)
            raise
        threading.Thread(target=self._read, args=(stream, requests), name=f"agent-grpc-read-{stream.device_id}",
                         daemon=True).start()
        log.info("device %s connected over gRPC from %s", stream.device_id, context.peer())
        yield from stream.outbound()
        if self.hub.stopping:
            raise Unavailable("the cloud is stopping; the agent reconnects with backoff")
        if stream.superseded:
            raise Superseded("this device connected again on another stream; this one is closed (two agents "
                             "with one device id take turns: give each its own)")

    def _read(self, stream: DeviceStream, requests: Iterator[Any]) -> None:
        try:
            for message in requests:
                if stream.closed:
                    break
                self.hub.ingest(stream, None if message is _UNREADABLE else message)
        except grpc.RpcError:
            pass  # the call ended: the client went away, keepalive gave up, or the stream was replaced
        except Exception:
            log.exception("reading the gRPC stream of %s failed", stream.device_id)
        finally:
            self.hub.detach(stream)
            log.info("device %s's gRPC stream ended", stream.device_id)

    def fetch_artifact(self, request: Any, context: grpc.ServicerContext, principal: Principal) -> Iterator[Any]:
        info = self.fleet.tuf.get_target(request.target)
        if info is None:
            raise NotFound(f"no signed bundle {request.target!r}; a deployment builds and signs bundles")
        size = self.fleet.blobs.size(info.sha256)
        offset = request.offset
        if offset > size:
            raise OutOfRange(f"offset {offset} is past the end of {request.target} ({size} bytes); download from "
                             "offset 0 again")
        with self.fleet.blobs.open(info.sha256) as fh:
            fh.seek(offset)
            while offset < size and context.is_active():
                data = fh.read(min(CHUNK_BYTES, size - offset))
                if not data:
                    raise Unavailable(f"bundle {request.target} ended at byte {offset} of {size}; retry")
                yield pb.ArtifactChunk(offset=offset, data=data, size=size)
                offset += len(data)


__all__ = ["CHUNK_BYTES", "DEVICE_ID_HEADER", "SERVICE", "AgentChannelHandle", "FanOut", "OutOfRange",
           "start_agent_channel"]
