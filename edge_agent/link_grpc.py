"""The agent's gRPC link (a `link.CloudLink`): one `edgefleet.v1.AgentChannel.Connect` stream to the cloud, kept up by
its own reconnect loop.

Theory of operation. A thread of its own opens a channel to `[grpc] target`, calls `Connect` with the device token
in metadata, and reads the stream until it ends; then it waits a full-jitter delay (`common.backoff.Backoff`:
uniform up to `retry_initial_s * 2**attempt`, capped at `retry_max_s`; back to the first window after a stream
that was up) and opens a fresh channel. So a cloud that is down at start, killed mid-stream or restarted never
blocks inference, and a fleet that lost its cloud together does not come back together. The cloud's first message
on every stream is the device's signed desired state: the link counts as connected from then, calls
`on_connected()` (the daemon then fetches the full desired state over HTTP, as after an MQTT reconnect), sends
`online`, and hands the document to `on_desired(raw)` as the bytes received. It never parses or trusts it: the
daemon verifies signature, generation, expiry, device and class as it does for MQTT. Keepalive pings
(`keepalive_s`, answered within `keepalive_timeout_s`) find a stream that stalled without closing; gRPC then ends
it and the loop reconnects. Callbacks run on the link's thread and only hand work to the daemon's queue.

Every message is the contract's JSON (`to_wire()`) in the envelope of protos/agent_channel.proto.
`publish_reported` and `publish_status` return True once the cloud's `Receipt` says it stored the message (or
refused it for good: then resending over HTTP would be refused too; the refusal is logged). `publish_telemetry`
returns True only on the cloud's `TelemetryAck`, sent after its commit; an ack that comes after the wait gave up
is kept for `take_acked()`. A stream that ends wakes every waiter with False at once, and the daemon takes HTTP.

grpc and the generated modules are imported when the link starts, never at import: an MQTT agent does not load
them (the agent's memory matters on a Pi), and the lean install (`.[agent]`) does not carry grpcio at all; the
`grpc` extra does, and `require_grpc()` says so in one line when it is missing.
"""

from __future__ import annotations

import itertools
import logging
import queue
import random
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from edgefleet.common.backoff import Backoff
from edgefleet.edge_agent.clock import Clock, SystemClock
from edgefleet.edge_agent.config import AgentConfig
from edgefleet.edge_agent.errors import AgentError, ConfigError
from edgefleet.edge_agent.link_acks import AckBook, Waiter
from edgefleet.protos.messages import (
    AgentChannelInfo,
    DeviceStatus,
    EnrollResponse,
    ReportedState,
    TelemetryBatch,
)

log = logging.getLogger(__name__)

INSTALL_HINT = ("transport = \"grpc\" needs grpcio and protobuf, which the lean agent install leaves out: install "
                "them with `pip install 'edgefleet[agent,grpc]'`, or set transport = \"mqtt\"")
DEVICE_ID_HEADER = "edgefleet-device-id"  # cloud/agent_channel.py checks it against the token's device
_END = object()
# 4 MiB: what the cloud sends (a desired state, acks) is at most the contract's 256 KiB.
_MAX_RECEIVE_BYTES = 4 * 1024 * 1024
# gRPC status codes after which retrying with the same token cannot help; logged loudly, retried slowly all the same
# (an operator may reset the device, or the cloud's database may come back).
_REFUSED = ("UNAUTHENTICATED", "PERMISSION_DENIED")


def require_grpc() -> None:
    """Raise ConfigError with the install hint when grpcio or protobuf (or the generated modules) cannot load."""
    try:
        import grpc  # noqa: F401

        from edgefleet.protos import agent_channel_pb2, agent_channel_pb2_grpc  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - ImportError, or protobuf's VersionError (a runtime older than gencode)
        raise ConfigError(f"{INSTALL_HINT} ({type(exc).__name__}: {exc})") from None


class GrpcLink:
    name = "grpc"

    def __init__(
        self,
        target: str,
        device_id: str,
        device_token: str,
        *,
        on_desired: Callable[[bytes], None],
        on_connected: Callable[[], None],
        on_retained: Callable[[bytes], None] | None = None,
        tls: bool = False,
        ca_file: str | Path | None = None,
        retry_initial_s: float = 1.0,
        retry_max_s: float = 60.0,
        keepalive_s: float = 30.0,
        keepalive_timeout_s: float = 10.0,
        clock: Clock | None = None,
        rand: random.Random | None = None,
        discover: Callable[[], AgentChannelInfo] | None = None,
    ) -> None:
        # target "": ask `discover` (the cloud's GET /api/v1/agent-channel) before each stream until it answers.
        if not target and discover is None:
            raise ConfigError("the gRPC link needs a target (host:port) or a way to discover it")
        self.target = target
        self._discover = discover
        self.device_id = device_id
        self._token = device_token
        self._on_desired = on_desired
        self._on_connected = on_connected
        # on_retained is MQTT's: a gRPC stream keeps nothing, the cloud reads every push from its database.
        del on_retained
        self._tls = tls or ca_file is not None
        self._ca_file = Path(ca_file) if ca_file else None
        self._keepalive_s = keepalive_s
        self._keepalive_timeout_s = keepalive_timeout_s
        self._clock = clock or SystemClock()
        self._backoff = Backoff(retry_initial_s, max(retry_initial_s, retry_max_s),
                                rand=(rand or random.Random()).random)
        self._connected = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._out: queue.Queue[Any] | None = None  # the open stream's requests
        self._call: Any = None
        self._ids = itertools.count(1)
        self._receipts: dict[int, Waiter] = {}
        # Telemetry confirmations (link_acks.py), as in link_mqtt.py.
        self._acks = AckBook(device_id, self._lock)
        self.attempts = 0  # streams tried (tests and logs read them)
        self.sessions = 0  # of which got as far as the desired state

    @classmethod
    def from_config(cls, config: AgentConfig, enrollment: EnrollResponse, *, on_desired: Callable[[bytes], None],
                    on_connected: Callable[[], None], on_retained: Callable[[bytes], None] | None = None,
                    clock: Clock | None = None, discover: Callable[[], AgentChannelInfo] | None = None) -> GrpcLink:
        """The daemon's `link.LinkFactory` for transport = "grpc": `[grpc] target`, else what `discover` (the
        cloud's `GET /api/v1/agent-channel`) names; the token from enrollment."""
        g = config.grpc
        return cls(g.target, config.device_id, enrollment.device_token, on_desired=on_desired,
                   on_connected=on_connected, on_retained=on_retained, tls=g.tls, ca_file=g.ca_file or None,
                   retry_initial_s=config.retry.retry_initial_s, retry_max_s=config.retry.retry_max_s,
                   keepalive_s=g.keepalive_s, keepalive_timeout_s=g.keepalive_timeout_s, clock=clock,
                   discover=None if g.target else discover)

    def _resolve(self) -> str:
        """The target to dial: the configured one, or the one the cloud names (asked until it answers; a cloud
        that names another later is followed at the next stream). Raises CloudUnavailable or AgentError."""
        if self._discover is None:
            return self.target
        info = self._discover()
        if info.target != self.target:
            log.info("the cloud names its gRPC agent channel %s%s", info.target, " (TLS)" if info.tls else "")
        self.target = info.target
        self._tls = self._tls or info.tls
        return self.target

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    # -- lifecycle -------------------------------------------------------------------------------------------------

    def start(self) -> None:
        require_grpc()  # the daemon checked at start; a link built by hand says it here
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="edgefleet-grpc-link", daemon=True)
        self._thread.start()

    def stop(self, *, graceful: bool = True) -> None:
        if self._thread is None:
            return
        if graceful and self.connected:
            # 2 s: a goodbye on the way out; a cloud that stopped answering must not hold up the shutdown.
            self.publish_status(DeviceStatus(device_id=self.device_id, online=False, at=self._clock.now()), 2.0)
        self._stop.set()
        with self._lock:
            call = self._call
        if call is not None:
            call.cancel()
        self._thread.join(10)
        self._thread = None

    def _loop(self) -> None:
        import grpc

        from edgefleet.protos import agent_channel_pb2_grpc as pb_grpc

        while not self._stop.is_set():
            try:
                was_up = self._session(grpc, pb_grpc)
            except Exception:  # a bug here must not end the loop: the agent would stay offline for good
                log.exception("the gRPC link failed unexpectedly; reconnecting")
                was_up = False
            if was_up:
                self._backoff.reset()
            delay = self._backoff.next_delay()
            if not self._stop.is_set():
                log.info("gRPC link to %s down; reconnecting in %.1f s", self.target, delay)
            if self._stop.wait(delay):
                return

    def _channel(self, grpc: Any) -> Any:
        options = [
            ("grpc.keepalive_time_ms", int(self._keepalive_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(self._keepalive_timeout_s * 1000)),
            # grpcio 1.85 times an unanswered ping out by this; keepalive_timeout_ms alone let a stall go 40 s+.
            ("grpc.http2.ping_timeout_ms", int(self._keepalive_timeout_s * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.max_receive_message_length", _MAX_RECEIVE_BYTES),
            ("grpc.enable_retries", 0),  # this loop retries, with its own backoff and a fresh channel
        ]
        if not self._tls:
            return grpc.insecure_channel(self.target, options=options)
        roots = self._ca_file.read_bytes() if self._ca_file is not None else None  # None: the system's roots
        return grpc.secure_channel(self.target, grpc.ssl_channel_credentials(root_certificates=roots),
                                   options=options)

    def fetch_artifact(self, target: str, offset: int) -> Iterator[tuple[int, bytes, int]]:
        """`FetchArtifact`: the bundle a TUF target path names, from byte `offset`, as (offset, data, size) chunks,
        on a channel of its own (closed when the iterator ends or is dropped). Raises `grpc.RpcError` as gRPC
        does; edge_agent/fetch.py maps the codes. A stall is found by the same keepalive as the stream's."""
        require_grpc()
        import grpc

        from edgefleet.protos import agent_channel_pb2 as pb
        from edgefleet.protos import agent_channel_pb2_grpc as pb_grpc

        if not self.target:
            self._resolve()  # CloudUnavailable / AgentError: the fetcher takes HTTP
        channel = self._channel(grpc)
        try:
            metadata = [("authorization", f"Bearer {self._token}"), (DEVICE_ID_HEADER, self.device_id)]
            call = pb_grpc.AgentChannelStub(channel).FetchArtifact(pb.FetchRequest(target=target, offset=offset),
                                                                   metadata=metadata)
            for chunk in call:
                yield int(chunk.offset), bytes(chunk.data), int(chunk.size)
        finally:
            channel.close()

    def _session(self, grpc: Any, pb_grpc: Any) -> bool:
        """One stream, until it ends; True when it got as far as the desired state."""
        from edgefleet.protos import agent_channel_pb2 as pb

        out: queue.Queue[Any] = queue.Queue()
        up = False
        self.attempts += 1
        try:
            self._resolve()
        except AgentError as exc:
            log.warning("gRPC link: %s", exc)
            return False
        channel = self._channel(grpc)
        try:
            metadata = [("authorization", f"Bearer {self._token}"), (DEVICE_ID_HEADER, self.device_id)]
            call = pb_grpc.AgentChannelStub(channel).Connect(iter(out.get, _END), metadata=metadata)
            with self._lock:
                if self._stop.is_set():
                    call.cancel()
                self._call, self._out = call, out
            for message in call:
                kind = message.WhichOneof("payload")
                if kind == "desired":
                    if not up:
                        up = True
                        self._up(pb)
                    self._hand(self._on_desired, bytes(message.desired))
                elif kind == "telemetry_ack":
                    self._handle_ack(bytes(message.telemetry_ack))
                elif kind == "receipt":
                    self._handle_receipt(message.receipt)
        except grpc.RpcError as exc:
            code = exc.code().name if hasattr(exc, "code") and exc.code() is not None else "UNKNOWN"
            details = exc.details() if hasattr(exc, "details") else str(exc)
            if code in _REFUSED:
                log.error("the cloud refused the gRPC link (%s): %s", code, details)
            elif not self._stop.is_set():
                log.warning("gRPC link to %s ended (%s): %s", self.target, code, details)
        finally:
            self._down(out)
            channel.close()
        return up

    def _up(self, pb: Any) -> None:
        self.sessions += 1
        self._connected.set()
        log.info("gRPC link connected to %s", self.target)
        self._hand(lambda _: self._on_connected(), b"")
        online = DeviceStatus(device_id=self.device_id, online=True, at=self._clock.now())
        self._send(pb.AgentMessage(status=online.to_wire()))  # no receipt wanted: this thread reads them

    def _down(self, out: queue.Queue[Any]) -> None:
        self._connected.clear()
        with self._lock:
            if self._out is out:
                self._out, self._call = None, None
            waiters = list(self._receipts.values())
            self._receipts.clear()
        waiters += self._acks.waiters()
        out.put(_END)
        for waiter in waiters:  # nothing more comes on this stream: answer False now, the daemon takes HTTP
            waiter.event.set()

    @staticmethod
    def _hand(callback: Callable[[bytes], None], raw: bytes) -> None:
        try:
            callback(raw)
        except Exception:
            log.exception("gRPC link handler failed")

    # -- what the cloud sends --------------------------------------------------------------------------------------

    def _handle_receipt(self, receipt: Any) -> None:
        with self._lock:
            waiter = self._receipts.pop(receipt.id, None)
        if receipt.refused:
            log.warning("the cloud refused message %d for good (%s)", receipt.id, receipt.reason or "no reason")
        if waiter is not None:
            waiter.ok = True
            waiter.event.set()

    def _handle_ack(self, payload: bytes) -> None:
        self._acks.handle(payload)

    def take_acked(self) -> list[tuple[int, int]]:
        """(epoch, seq) of batches the cloud confirmed (or refused for good) while nobody waited; each once."""
        return self._acks.take()

    # -- the daemon's side -----------------------------------------------------------------------------------------

    def _send(self, message: Any) -> bool:
        with self._lock:
            if self._out is None or not self._connected.is_set():
                return False
            self._out.put(message)
            return True

    def _publish_wait(self, field: str, wire: bytes, timeout_s: float) -> bool:
        from edgefleet.protos import agent_channel_pb2 as pb

        if not self.connected:
            return False
        waiter = Waiter()
        message_id = next(self._ids)
        with self._lock:
            self._receipts[message_id] = waiter
        try:
            if not self._send(pb.AgentMessage(id=message_id, **{field: wire})):
                return False
            waiter.event.wait(timeout_s)
            return waiter.ok
        finally:
            with self._lock:
                self._receipts.pop(message_id, None)

    def publish_reported(self, report: ReportedState, timeout_s: float) -> bool:
        return self._publish_wait("reported", report.to_wire(), timeout_s)

    def publish_status(self, status: DeviceStatus, timeout_s: float) -> bool:
        return self._publish_wait("status", status.to_wire(), timeout_s)

    def publish_telemetry(self, batch: TelemetryBatch, timeout_s: float) -> bool:
        """True once the cloud confirmed it stored the batch (or refused it for good), within `timeout_s`."""
        from edgefleet.protos import agent_channel_pb2 as pb

        if not self.connected:
            return False
        return self._acks.wait((batch.epoch, batch.seq),
                               lambda _: self._send(pb.AgentMessage(telemetry=batch.to_wire())), timeout_s)

__all__ = ["DEVICE_ID_HEADER", "INSTALL_HINT", "GrpcLink", "require_grpc"]
