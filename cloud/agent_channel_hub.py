"""The connected devices of the gRPC agent channel: one `DeviceStream` per device, desired states pushed to it, and
what it sends checked, stored and answered, exactly as the MQTT bridge does it.

Theory of operation:
- `AgentHub` maps a device id to its one live `DeviceStream`. A second connect of the same device replaces the
  first, whose stream is closed (ABORTED), as a broker drops the older session of a client id. `publish(device_id,
  doc)` is a `Fleet.publish`: it puts the signed desired state, as the bytes the cloud signed (`to_wire()`), on
  that device's stream if it is connected, and does nothing otherwise (the agent fetches it when it connects).
  `FanOut` lets the Fleet publish to the MQTT bridge and the hub at once; one failing never stops the other.
- A stream never goes back in generations: a document older than one it already pushed is skipped, so a connect
  that read the database just before a deploy cannot deliver the new document and then the old one (which the agent
  would refuse as a replay, loudly).
- Upstream, every payload goes through the MQTT bridge's own checks (`mqtt_checks.check_message`, with the
  channel's topic built from the AUTHENTICATED device id: a payload naming another device is refused as the bridge
  refuses one on the wrong topic), then the same `Fleet` calls. Garbage is counted as the bridge counts it
  (`malformed_messages`; `count_refused(channel, reason)` for a readable message outside the contract) and answered
  with a refused `Receipt` (or, for a telemetry batch whose epoch and seq can be read, a `TelemetryAck` naming it
  refused), so the agent stops waiting; it never ends the stream or touches another message.
- Reported state and status are stored in the stream's reader thread (one device's messages in order) and answered
  with a `Receipt` after the commit. Telemetry batches from every stream go to one ingest worker that stores up to
  `ingest_batch` of them, or what came within `ingest_wait_s`, in one transaction (`record_telemetry_many`) and only
  then sends each device its `TelemetryAck`. A database failure sends nothing: the batch stays in the agent's outbox
  and comes again (the store keeps each (device, epoch, seq) once).
- A stream that ends without the agent saying goodbye (killed, stalled past keepalive) marks the device offline, the
  MQTT last will's job; a stream replaced by a newer one does not.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from edgefleet.cloud.errors import Refused
from edgefleet.cloud.mqtt_checks import REASON_MAX_CHARS, Checked, check_message, count, take_group, tally
from edgefleet.protos import agent_channel_pb2 as pb
from edgefleet.protos.messages import DeviceStatus, SignedDesiredState, TelemetryAck
from edgefleet.protos.telemetry import MAX_ACK_SEQS
from edgefleet.protos.topics import device_topics

if TYPE_CHECKING:
    from edgefleet.cloud.services import Fleet

log = logging.getLogger(__name__)

# The prefix of the topics handed to check_message: never on a broker, it only names the channel for the checks.
TOPIC_PREFIX = "grpc"
_REASON_MAX_CHARS = REASON_MAX_CHARS
_CLOSE = object()
_CHANNELS = ("reported", "status", "telemetry")
Publish = Callable[[str, SignedDesiredState], None]


class FanOut:
    """A `Fleet.publish` that hands each desired state to every publisher (the MQTT bridge, the agent hub)."""

    def __init__(self, *publishers: Publish) -> None:
        self.publishers = list(publishers)

    def __call__(self, device_id: str, doc: SignedDesiredState) -> None:
        failed: Exception | None = None
        for publish in self.publishers:
            try:
                publish(device_id, doc)
            except Exception as exc:  # noqa: BLE001 - the next transport still gets it; the Fleet logs the first
                failed = failed or exc
        if failed is not None:
            raise failed


class DeviceStream:
    """One device's open `Connect` call: what goes down it, in order, and whether it was replaced."""

    def __init__(self, device_id: str) -> None:
        self.device_id = device_id
        self.superseded = False
        self.goodbye = False  # the agent said offline itself: no last will on close
        self._queue: queue.Queue[Any] = queue.Queue()
        self._lock = threading.Lock()
        self._generation = -1  # the highest generation pushed
        self._last = b""  # the document pushed last, as sent
        self._closed = False

    def send(self, message: Any) -> bool:
        with self._lock:
            if self._closed:
                return False
            self._queue.put(message)
            return True

    def push_desired(self, doc: SignedDesiredState) -> bool:
        """Queue a desired state unless this stream already carried a newer one, or this very document (a connect
        that re-signed an expiring one publishes it, then pushes it); True when queued."""
        wire = doc.to_wire()
        with self._lock:
            if self._closed or doc.payload.generation < self._generation or wire == self._last:
                return False
            self._generation, self._last = doc.payload.generation, wire
            self._queue.put(pb.CloudMessage(desired=wire))
            return True

    def close(self, *, superseded: bool = False) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self.superseded = superseded
            self._queue.put(_CLOSE)

    @property
    def closed(self) -> bool:
        return self._closed

    def outbound(self) -> Iterator[Any]:
        """The messages to send, until `close()`; grpc iterates this in the call's worker thread."""
        while (item := self._queue.get()) is not _CLOSE:
            yield item


class AgentHub:
    """The devices connected over gRPC; `publish` is a `Fleet.publish`, `ingest` takes what a stream read."""

    def __init__(self, fleet: Fleet, *, ingest_batch: int = 500, ingest_wait_s: float = 0.05) -> None:
        self.fleet = fleet
        self.ingest_batch = max(1, ingest_batch)
        self.ingest_wait_s = ingest_wait_s
        self.counters: Counter[str] = Counter()  # what this hub saw, for tests and logs
        self._streams: dict[str, DeviceStream] = {}
        self._lock = threading.Lock()
        self._telemetry: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------------

    def start(self) -> AgentHub:
        self._stop.clear()
        self._worker = threading.Thread(target=self._telemetry_worker, name="edgefleet-agent-channel-ingest",
                                        daemon=True)
        self._worker.start()
        return self

    def stop(self) -> None:
        """Close every stream (their calls end) and stop the ingest worker; what was not stored is not acked."""
        self._stop.set()
        with self._lock:
            streams, self._streams = list(self._streams.values()), {}
        for stream in streams:
            stream.close()
        if self._worker is not None:
            self._worker.join(10)

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def attach(self, device_id: str) -> DeviceStream | None:
        """A new stream for the device, closing its older one; None once the hub is stopping."""
        stream = DeviceStream(device_id)
        with self._lock:
            if self._stop.is_set():
                return None
            old = self._streams.get(device_id)
            self._streams[device_id] = stream
        if old is not None:
            log.info("device %s connected again over gRPC; closing its older stream", device_id)
            self.counters["superseded"] += 1
            old.close(superseded=True)
        self.counters["connects"] += 1
        return stream

    def detach(self, stream: DeviceStream) -> None:
        """The stream's call ended: forget it (unless a newer one replaced it) and mark the device offline when the
        agent did not say so itself."""
        stream.close()
        with self._lock:
            current = self._streams.get(stream.device_id) is stream
            if current:
                del self._streams[stream.device_id]
        if not current or stream.goodbye or self._stop.is_set():
            return
        try:
            self.fleet.record_status(DeviceStatus(device_id=stream.device_id, online=False,
                                                  at=datetime.now(timezone.utc)))
        except Exception:
            log.warning("could not mark %s offline after its stream ended", stream.device_id, exc_info=True)

    def connected(self) -> list[str]:
        with self._lock:
            return sorted(self._streams)

    def stream_of(self, device_id: str) -> DeviceStream | None:
        with self._lock:
            return self._streams.get(device_id)

    # -- down ------------------------------------------------------------------------------------------------------

    def publish(self, device_id: str, doc: SignedDesiredState) -> None:
        stream = self.stream_of(device_id)
        if stream is not None and stream.push_desired(doc):
            self.counters["published"] += 1

    def _send(self, device_id: str, message: Any) -> bool:
        """To the device's current stream (a reconnect in between gets it there: `take_acked` picks it up)."""
        stream = self.stream_of(device_id)
        return stream is not None and stream.send(message)

    # -- up --------------------------------------------------------------------------------------------------------

    def ingest(self, stream: DeviceStream, message: Any) -> None:
        """One AgentMessage read from `stream` (or None: bytes that are not one). Never raises."""
        try:
            self._ingest(stream, message)
        except Exception:  # a bug, not a device's fault: this message is lost, the stream carries on
            log.exception("handling a gRPC message from %s failed unexpectedly", stream.device_id)
            self._count("ingest_errors")

    def _ingest(self, stream: DeviceStream, message: Any) -> None:
        channel = message.WhichOneof("payload") if message is not None else None
        if channel not in _CHANNELS:
            why = "not an AgentMessage" if message is None else "an AgentMessage with no payload"
            self._tally(Checked("malformed", device_id=stream.device_id, reason=why))
            if message is not None and message.id:
                stream.send(pb.CloudMessage(receipt=pb.Receipt(id=message.id, refused=True, reason="malformed")))
            return
        topic = getattr(device_topics(TOPIC_PREFIX, stream.device_id), channel)
        checked = check_message(TOPIC_PREFIX, topic, getattr(message, channel))
        if channel == "telemetry":
            if checked.outcome == "ok":
                self._telemetry.put((stream.device_id, checked.msg))
                return
            self._tally(checked)
            if checked.outcome == "refused" and checked.msg is not None:
                self._send_acks({(stream.device_id, checked.msg.epoch): ([], [checked.msg.seq])},
                                checked.reason.partition(":")[0])
            return
        receipt = self._record_control(stream, checked)
        if receipt is not None and message.id:
            receipt.id = message.id
            stream.send(pb.CloudMessage(receipt=receipt))

    def _record_control(self, stream: DeviceStream, checked: Checked) -> Any:
        """Store a reported state or status; the Receipt to send, or None when storing failed (no answer: the agent
        takes the HTTP path)."""
        if checked.outcome != "ok":
            self._tally(checked)
            return pb.Receipt(refused=checked.outcome != "ignored", reason=checked.outcome)
        record = self.fleet.record_reported if checked.channel == "reported" else self.fleet.record_status
        try:
            record(checked.msg)
        except Refused as exc:  # counted by the Fleet, which knows why
            log.warning("refused a %s message from %s: %s", checked.channel, checked.device_id,
                        exc.message[:_REASON_MAX_CHARS])
            self.counters["refused_messages"] += 1
            return pb.Receipt(refused=True, reason=exc.message[:_REASON_MAX_CHARS])
        except Exception:
            log.exception("recording %s from %s failed; not acknowledged (the agent sends it over HTTP)",
                          checked.channel, checked.device_id)
            self._count("ingest_errors")
            return None
        if checked.channel == "status" and not checked.msg.online:
            stream.goodbye = True
        self.counters[f"recorded_{checked.channel}"] += 1
        return pb.Receipt()

    def _telemetry_worker(self) -> None:
        while not self._stop.is_set():
            items = take_group(self._telemetry, self.ingest_batch, self.ingest_wait_s)
            if not items:
                continue
            try:
                self._store_telemetry(items)
            except Exception:  # a bug, not a database error: never kill the worker
                log.exception("gRPC telemetry ingest failed unexpectedly")
                self._count("ingest_errors")

    def _store_telemetry(self, items: list[tuple[str, Any]]) -> None:
        """One transaction, then the TelemetryAcks; a failed commit acks nothing (the agents resend)."""
        try:
            outcomes = self.fleet.record_telemetry_many([msg for _, msg in items])
        except Exception:
            log.exception("storing %d telemetry batch(es) from gRPC failed; not acknowledged, the agents resend them",
                          len(items))
            self._count("ingest_errors")
            return
        acks: dict[tuple[str, int], tuple[list[int], list[int]]] = {}
        reasons: dict[tuple[str, int], str] = {}
        for (device_id, msg), outcome in zip(items, outcomes, strict=True):
            entry = acks.setdefault((device_id, msg.epoch), ([], []))
            if outcome in ("unknown_device", "rate_limited"):  # counted by the Fleet
                entry[1].append(msg.seq)
                reasons.setdefault((device_id, msg.epoch), outcome)
                self.counters["refused_messages"] += 1
            else:
                entry[0].append(msg.seq)
                self.counters["recorded_telemetry"] += 1
        for key, value in acks.items():
            self._send_acks({key: value}, reasons.get(key, ""))

    def _send_acks(self, acks: dict[tuple[str, int], tuple[list[int], list[int]]], reason: str) -> None:
        for (device_id, epoch), (seqs, refused) in acks.items():
            for i in range(0, max(len(seqs), len(refused)), MAX_ACK_SEQS):
                ack = TelemetryAck(device_id=device_id, epoch=epoch, seqs=seqs[i:i + MAX_ACK_SEQS],
                                   refused=refused[i:i + MAX_ACK_SEQS], reason=reason[:64])
                # Not sent (the device went away): it resends the batch, stored as a replay and acked then.
                sent = self._send(device_id, pb.CloudMessage(telemetry_ack=ack.to_wire()))
                self.counters["acks_sent" if sent else "acks_unsent"] += 1

    # -- counting (as cloud/mqtt_bridge.py counts) -----------------------------------------------------------------

    def _tally(self, checked: Checked) -> None:
        tally(self.fleet, self.counters, checked, "gRPC")

    def _count(self, name: str) -> None:
        count(self.fleet, self.counters, name)


__all__ = ["TOPIC_PREFIX", "AgentHub", "DeviceStream", "FanOut"]
