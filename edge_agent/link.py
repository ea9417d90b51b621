"""What the daemon needs from its link to the cloud: `CloudLink`, whatever the transport.

Theory of operation: a link owns its connection and its reconnect loop (backoff with jitter); the daemon never sees
a socket, a topic or a broker. On every (re)connect the link calls `on_connected()`, and each desired-state document
that arrives goes to `on_desired(raw)` as the bytes received: the link never parses or trusts it, the daemon
verifies it. Both callbacks run on the link's own thread and must only hand the work to the daemon's queue.

A publish returns True only once the cloud side acknowledged it within `timeout_s` (reported state and status: the
broker's PUBACK; telemetry: the cloud's own confirmation after its commit, a `TelemetryAck`), and False when the
link is down or the acknowledgement did not come in time; the daemon then sends the same message over
HTTP, and a telemetry batch leaves the disk outbox only after one of the two acknowledged it. Publishing a message
twice is harmless: reported state is last-writer-wins and the cloud ignores a telemetry seq it already stored.

`MqttLink` (link_mqtt.py) and `GrpcLink` (link_grpc.py, the cloud's agent channel; `transport = "grpc"`) implement
it. The daemon builds its link with a `LinkFactory` once enrolled, because the enrollment answer names the broker.
With gRPC, bundles come over the same channel too (`FetchArtifact`, fetch.py), HTTP when it cannot serve.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from edgefleet.protos.messages import DeviceStatus, EnrollResponse, ReportedState, TelemetryBatch


class CloudLink(Protocol):
    name: str  # the transport, as logs and last_error name it: "mqtt"

    @property
    def connected(self) -> bool:
        """True while the link is up; the daemon polls the desired state over HTTP while it is False."""
        ...

    def start(self) -> None:
        """Begin connecting in the background; never raises or blocks for a cloud that is down."""
        ...

    def stop(self) -> None:
        """Say offline where the transport can, then close; the link calls back no more."""
        ...

    def publish_reported(self, report: ReportedState, timeout_s: float) -> bool:
        """The cloud's latest view of this device; True once acknowledged."""
        ...

    def publish_telemetry(self, batch: TelemetryBatch, timeout_s: float) -> bool:
        """One outbox batch; True once the CLOUD confirmed it stored it (only then may the outbox drop it), not
        merely once a broker or proxy has it."""
        ...

    def take_acked(self) -> list[tuple[int, int]]:
        """(epoch, seq) of batches the cloud confirmed after `publish_telemetry` stopped waiting; each once."""
        ...

    def publish_status(self, status: DeviceStatus, timeout_s: float) -> bool:
        """Online or offline; True once acknowledged."""
        ...


class LinkFactory(Protocol):
    def __call__(self, enrollment: EnrollResponse, *, on_desired: Callable[[bytes], None],
                 on_connected: Callable[[], None],
                 on_retained: Callable[[bytes], None] | None = None) -> CloudLink:
        """A link, not yet started, to the cloud named at enrollment. `on_retained` (default: on_desired) takes a
        document the transport kept and hands over on (re)subscribe, MQTT's retained message: it may be older than
        what the device already fetched over HTTP, which is not an attack."""
        ...
