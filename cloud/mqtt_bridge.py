"""The cloud's MQTT client: desired states out, reported state, telemetry and status in, telemetry confirmed.

Theory of operation:
- One paho 2.x client with `loop_start()` (its own network thread), logged in as the cloud (`client_id`,
  `username`, `password`: cloud/mqtt_accounts.py `cloud_login`). paho's thread reconnects by itself, waiting a
  full-jitter delay between attempts (`common.mqtt_client.JitteredClient`), so several clouds, or a cloud and its
  fleet, do not hammer a restarted broker in lockstep; `on_connect` subscribes again to `cloud_subscriptions(prefix)`
  every time; the bridge counts as connected once the SUBACK arrives.
- A persistent session: MQTT 5 with clean start off and a session expiry (`session_expiry_s`), or on a 3.1.1 broker
  (the embedded amqtt) clean session off. While the cloud is away (restarting, SIGKILLed) the broker queues what
  devices send for it, and delivers it when the same client id comes back. With MQTT 5 the bridge announces a
  Receive Maximum (`receive_maximum`): the broker keeps that many messages in flight to it, which is what lets one
  database transaction take many of them.
- Manual acknowledgement: paho sends no PUBACK by itself. Every message is handed from the network thread to a
  worker (telemetry to one, reported state and status to another, so a telemetry flood never delays a report), and
  is acknowledged only once the database committed it, or once it was found garbage (counted, never stored). A
  failed commit leaves it unacknowledged and is retried with backoff until it succeeds or the cloud stops; the
  broker then redelivers whatever was never acknowledged to the next session. An acknowledgement is sent only on
  the connection the message came in on (the redelivery on a new one is stored as a replay and acknowledged then).
- End to end: a broker's PUBACK to the agent means only that the broker has a message. After the commit, the bridge
  publishes a `TelemetryAck` (QoS 1) on each device's own `ack` topic naming the (epoch, seq) of every batch stored,
  now or before; only that, or the HTTP path's answer, lets the agent drain its outbox. Batches the cloud will never
  store (refused by the contract's limits, an unknown device) are named in `refused` so the agent stops resending.
- Telemetry ingest batches: the worker takes up to `ingest_batch` messages, or what came within `ingest_wait_s` of
  the first, and stores them in one transaction (`Fleet.record_telemetry_many`); (device, epoch, seq) stores each
  batch once.
- Checks (cloud/mqtt_checks.py), in order: topic ours, payload not empty (a retained clear: ignored, not counted), size,
  `parse_message(payload, Expected)`, topic device id == payload device id. A failure is logged, counted as
  `malformed_messages` and dropped; the bridge never raises into paho's thread. A readable message outside the
  contract's limits (protos/limits.py: NaN, a p95 of 1e308, errors > count, an oversize text), or one the `Fleet`
  refuses (`Refused`: a generation it never issued), is dropped whole and counted as `refused_messages` and
  `refused_{channel}_{reason}`. Any other exception from a `Fleet` call is logged, counted as `ingest_errors`, and
  retried.
- The database is the source of truth, not the broker: an embedded broker loses its retained messages on restart
  and a broker may be swapped. So after every (re)connect the bridge republishes each device's current desired
  state, in a thread of its own so the network loop keeps answering pings. It costs one message per device per
  reconnect; agents ignore a generation they already hold.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgefleet.cloud.errors import Refused
from edgefleet.cloud.mqtt_checks import REASON_MAX_CHARS, Checked, check_message, count, take_group, tally
from edgefleet.cloud.store_telemetry import BatchIn
from edgefleet.common.backoff import Backoff
from edgefleet.common.mqtt_client import JitteredClient
from edgefleet.protos.messages import (
    SignedDesiredState,
    TelemetryAck,
    TelemetryBatch,
)
from edgefleet.protos.telemetry import MAX_ACK_SEQS
from edgefleet.protos.topics import BROKER_DROPPED_TOPIC, cloud_subscriptions, device_topics, parse_topic

if TYPE_CHECKING:
    from edgefleet.cloud.services import Fleet

log = logging.getLogger(__name__)

_QOS = 1
_REASON_MAX_CHARS = REASON_MAX_CHARS
MqttProtocol = Literal["5", "3.1.1"]


@dataclass(frozen=True)
class _Inbound:
    """A message handed from paho's thread to a worker, with what acknowledging it needs."""

    topic: str
    payload: bytes
    mid: int
    qos: int
    connection: int  # the connection it came in on (`MqttBridge._connection`)


class MqttBridge:
    """Connects the `Fleet` to an MQTT broker. `start()` returns at once; `wait_connected()` blocks with a bound."""

    def __init__(
        self,
        fleet: Fleet,
        host: str,
        port: int,
        prefix: str = "edgefleet",
        *,
        client_id: str = "edgefleet-cloud",
        keepalive_s: int = 30,
        reconnect_min_s: float = 1.0,
        reconnect_max_s: float = 30.0,
        republish_on_connect: bool = True,
        username: str | None = None,
        password: str | None = None,
        protocol: MqttProtocol = "5",
        session_expiry_s: int = 7 * 86_400,
        receive_maximum: int = 1000,
        ingest_batch: int = 500,
        ingest_wait_s: float = 0.05,
        retry_max_s: float = 5.0,
    ) -> None:
        self.fleet = fleet
        self.host = host
        self.port = port
        self.prefix = prefix.rstrip("/")
        self.keepalive_s = keepalive_s
        self.republish_on_connect = republish_on_connect
        self.protocol = protocol
        self.session_expiry_s = session_expiry_s
        self.receive_maximum = receive_maximum
        self.ingest_batch = max(1, ingest_batch)
        self.ingest_wait_s = ingest_wait_s
        self.retry_max_s = retry_max_s
        # What this bridge saw, for tests and logs; the durable counters live in the Fleet (`/api/v1/stats`).
        self.counters: Counter[str] = Counter()
        self._connected = threading.Event()
        self._stop = threading.Event()
        self._subscribe_mid: int | None = None
        self._connection = 0  # +1 on every CONNACK: an ack is only sent on the connection its message came on
        self._telemetry: queue.Queue[_Inbound] = queue.Queue()
        self._control: queue.Queue[_Inbound] = queue.Queue()
        # Checked telemetry groups waiting for the store worker: one, so at most three groups are in the cloud's
        # hands (parsing, waiting, committing), well inside the Receive Maximum.
        self._groups: queue.Queue[Any] = queue.Queue(maxsize=1)
        self._workers: list[threading.Thread] = []
        v5 = protocol == "5"
        self._client = JitteredClient(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            # MQTT 3.1.1: clean session off keeps the session; MQTT 5 says so at connect (clean_start, expiry).
            clean_session=None if v5 else False,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            backoff=Backoff(reconnect_min_s, reconnect_max_s),
            manual_ack=True,
        )
        if username:
            self._client.username_pw_set(username, password)
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message

    # -- lifecycle -------------------------------------------------------------------------------------------------

    def start(self) -> MqttBridge:
        self._stop.clear()
        self._workers = [threading.Thread(target=self._telemetry_worker, name="edgefleet-ingest-telemetry",
                                          daemon=True),
                         threading.Thread(target=self._store_worker, name="edgefleet-ingest-store", daemon=True),
                         threading.Thread(target=self._control_worker, name="edgefleet-ingest-control",
                                          daemon=True)]
        for worker in self._workers:
            worker.start()
        # connect_async: a broker that is down at start is retried by the loop instead of failing the cloud.
        if self.protocol == "5":
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = self.session_expiry_s
            props.ReceiveMaximum = self.receive_maximum
            self._client.connect_async(self.host, self.port, keepalive=self.keepalive_s, clean_start=False,
                                       properties=props)
        else:
            self._client.connect_async(self.host, self.port, keepalive=self.keepalive_s)
        self._client.loop_start()
        return self

    def wait_connected(self, timeout_s: float = 10.0) -> bool:
        return self._connected.wait(timeout_s)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def stop(self) -> None:
        """Stop ingesting, then disconnect. What was received but not committed stays unacknowledged: the broker
        holds it for this session and delivers it again when the cloud is back."""
        self._stop.set()
        for worker in self._workers:
            worker.join(timeout=10)
        try:
            self._client.disconnect()
        finally:
            self._client.loop_stop()
            self._connected.clear()

    def backlog(self) -> int:
        """Messages received and not yet handled (for tests and `fleet stats`)."""
        return self._telemetry.qsize() + self._control.qsize()

    # -- out -------------------------------------------------------------------------------------------------------

    def publish(self, device_id: str, doc: SignedDesiredState) -> None:
        """Retained QoS 1 on the device's desired topic. While disconnected paho queues it; reconnect republishes."""
        topic = device_topics(self.prefix, device_id).desired
        info = self._client.publish(topic, doc.to_wire(), qos=_QOS, retain=True)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            log.warning("publishing desired state for %s failed: %s", device_id, mqtt.error_string(info.rc))
            self.counters["publish_errors"] += 1
        else:
            self.counters["published"] += 1

    def republish_all(self) -> int:
        """Publish every device's current desired state from the database; returns how many were sent."""
        sent = 0
        try:
            devices = self.fleet.list_devices()
        except Exception:
            log.exception("could not list devices to republish desired states")
            self._count("ingest_errors")
            return 0
        for device in devices:
            if self._stop.is_set() or not self._connected.is_set():
                break
            try:
                self.publish(device.device_id, self.fleet.desired_state(device.device_id))
                sent += 1
            except Exception:
                log.exception("could not republish the desired state of %s", device.device_id)
                self._count("ingest_errors")
        log.info("republished %d desired state(s) after connecting", sent)
        return sent

    def _send_acks(self, acks: dict[tuple[str, int], tuple[list[int], list[int], str]]) -> None:
        """One TelemetryAck per (device, epoch): stored seqs and refused ones, at most MAX_ACK_SEQS each."""
        for (device_id, epoch), (seqs, refused, reason) in acks.items():
            topic = device_topics(self.prefix, device_id).ack
            for i in range(0, max(len(seqs), len(refused)), MAX_ACK_SEQS):
                ack = TelemetryAck(device_id=device_id, epoch=epoch, seqs=seqs[i:i + MAX_ACK_SEQS],
                                   refused=refused[i:i + MAX_ACK_SEQS], reason=reason[:64])
                info = self._client.publish(topic, ack.to_wire(), qos=_QOS)
                # Not sent (no connection): the agent resends the batch, the cloud stores it as a replay and acks.
                self.counters["acks_sent" if info.rc == mqtt.MQTT_ERR_SUCCESS else "acks_unsent"] += 1

    # -- paho callbacks (network thread) ---------------------------------------------------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            log.warning("MQTT broker %s:%d refused the cloud's connection: %s; check mqtt_username/mqtt_password "
                        "(or %s) against the broker's accounts", self.host, self.port, reason_code,
                        "the data dir's mqtt-cloud.password")
            return
        self._connection += 1
        # A kept session keeps its subscriptions too; subscribing again is harmless and covers a new broker.
        _rc, self._subscribe_mid = client.subscribe([(topic, _QOS) for topic in cloud_subscriptions(self.prefix)])
        client.subscribe(BROKER_DROPPED_TOPIC, 0)  # best effort: a broker without it, or an ACL, refuses; fine
        log.info("connected to MQTT broker %s:%d (session %s); subscribing", self.host, self.port,
                 "resumed" if getattr(flags, "session_present", False) else "new")

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: Any, properties: Any) -> None:
        # Ready only once the broker has acknowledged the subscriptions: before that, reports would be lost.
        if mid != self._subscribe_mid:
            return
        refused = [rc for rc in reason_codes if rc.is_failure]
        if refused:
            log.error("MQTT broker refused the cloud's subscriptions (%s); check its ACLs", refused)
            return
        self._connected.set()
        self.counters["connects"] += 1
        if self.republish_on_connect:
            threading.Thread(target=self.republish_all, name="edgefleet-republish", daemon=True).start()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        self._connected.clear()
        if not self._stop.is_set():
            log.warning("lost the MQTT broker %s:%d (%s); reconnecting with backoff", self.host, self.port, reason_code)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        # Nothing heavy here: this thread also answers pings. The workers check, store and acknowledge.
        if msg.topic == BROKER_DROPPED_TOPIC:
            self._broker_dropped(bytes(msg.payload))
            return
        item = _Inbound(msg.topic, bytes(msg.payload), msg.mid, msg.qos, self._connection)
        where = parse_topic(self.prefix, msg.topic)
        (self._telemetry if where is not None and where[1] == "telemetry" else self._control).put(item)

    def _broker_dropped(self, payload: bytes) -> None:
        try:
            value = int(payload.decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            return
        if value != self.counters.get("broker_dropped_messages", -1):
            self.counters["broker_dropped_messages"] = value
            if value > 0:
                log.warning("the MQTT broker reports %d message(s) dropped since it started (a full queue?); "
                            "agents resend what the cloud never confirmed", value)
            try:
                self.fleet.set_gauge("broker_dropped_messages", value)
            except Exception:
                log.warning("could not store the broker's drop count", exc_info=True)

    def _ack(self, item: _Inbound) -> None:
        if item.qos == 0 or item.connection != self._connection:
            return  # QoS 0 needs none; from an older connection the broker redelivers it, and we ack that copy
        self._client.ack(item.mid, item.qos)

    # -- workers ---------------------------------------------------------------------------------------------------

    def _retrying(self, what: str, call: Any) -> tuple[bool, Any]:
        """`call()` until it returns or the bridge stops; (False, None) when stopped first. Each failure is logged and
        counted as `ingest_errors`, then retried with a capped full-jitter backoff: the message is not
        acknowledged meanwhile, so nothing is lost while the database is away."""
        backoff = Backoff(0.05, self.retry_max_s)
        while not self._stop.is_set():
            try:
                return True, call()
            except Refused:
                raise
            except Exception:
                log.exception("recording %s failed; retrying (the broker holds the message until it is stored)",
                              what)
                self._count("ingest_errors")
                self._stop.wait(backoff.next_delay())
        return False, None

    def _telemetry_worker(self) -> None:
        while not self._stop.is_set():
            items = take_group(self._telemetry, self.ingest_batch, self.ingest_wait_s)
            if not items:
                continue
            try:
                group = self._check_group(items)
            except Exception:  # a bug, not a database error: never kill the worker
                log.exception("telemetry ingest failed unexpectedly")
                self._count("ingest_errors")
                continue
            # Handed to the store worker: this thread parses the next group while that one commits.
            while not self._stop.is_set():
                try:
                    self._groups.put(group, timeout=0.2)
                    break
                except queue.Full:
                    continue

    def _store_worker(self) -> None:
        while not self._stop.is_set():
            try:
                group = self._groups.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                self._store_group(*group)
            except Exception:  # a bug, not a database error: never kill the worker
                log.exception("telemetry ingest failed unexpectedly")
                self._count("ingest_errors")

    def _ingest_telemetry(self, items: list[_Inbound]) -> None:
        """Check, store and acknowledge one group in the calling thread (the two workers split this in two)."""
        self._store_group(*self._check_group(items))

    def _check_group(self, items: list[_Inbound]) -> tuple[list[tuple[_Inbound, TelemetryBatch | BatchIn]],
                                                           dict[tuple[str, int], tuple[list[int], list[int], str]],
                                                           dict[tuple[str, int], str]]:
        """Check every message of a group: garbage is counted and acknowledged now (refused batches named for the
        ack); what may be stored comes back with the acks and reasons gathered so far."""
        good: list[tuple[_Inbound, TelemetryBatch | BatchIn]] = []
        acks: dict[tuple[str, int], tuple[list[int], list[int], str]] = {}
        reasons: dict[tuple[str, int], str] = {}  # why the first refused batch of each group was refused
        for item in items:
            checked = self.check(item.topic, item.payload)
            if checked.outcome == "ok":
                good.append((item, checked.msg))
                continue
            self._tally(checked)
            if checked.outcome == "refused" and checked.msg is not None:
                entry = acks.setdefault((checked.msg.device_id, checked.msg.epoch), ([], [], ""))
                entry[1].append(checked.msg.seq)
                reasons.setdefault((checked.msg.device_id, checked.msg.epoch), checked.reason.partition(":")[0])
            self._ack(item)
        return good, acks, reasons

    def _store_group(self, good: list[tuple[_Inbound, TelemetryBatch | BatchIn]],
                     acks: dict[tuple[str, int], tuple[list[int], list[int], str]],
                     reasons: dict[tuple[str, int], str]) -> None:
        """One transaction for the group, retried until it commits; then PUBACKs and TelemetryAcks."""
        if good:
            done, outcomes = self._retrying("telemetry", lambda: self.fleet.record_telemetry_many(
                [m for _, m in good]))
            if not done:
                return  # stopping: unacknowledged, the broker delivers them to the next session
            for (item, msg), outcome in zip(good, outcomes, strict=True):
                entry = acks.setdefault((msg.device_id, msg.epoch), ([], [], ""))
                if outcome in ("unknown_device", "rate_limited"):  # counted by the Fleet
                    entry[1].append(msg.seq)
                    reasons.setdefault((msg.device_id, msg.epoch), outcome)
                    self.counters["refused_messages"] += 1
                else:
                    entry[0].append(msg.seq)
                    self.counters["recorded_telemetry"] += 1
                self._ack(item)
        self._send_acks({k: (seqs, refused, reasons.get(k, "")) for k, (seqs, refused, _) in acks.items()})

    def _control_worker(self) -> None:
        while not self._stop.is_set():
            try:
                item = self._control.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                if self._handle_control(item):
                    self._ack(item)
            except Exception:
                log.exception("handling a message on %r failed unexpectedly", item.topic[:_REASON_MAX_CHARS])
                self._count("ingest_errors")
                self._ack(item)  # a bug for this message, not a database outage: do not wedge the queue on it

    def _handle_control(self, item: _Inbound) -> bool:
        """Reported state or status; True when it may be acknowledged (False: stopped before it was stored)."""
        checked = self.check(item.topic, item.payload)
        if checked.outcome != "ok":
            self._tally(checked)
            return True
        record = self.fleet.record_reported if checked.channel == "reported" else self.fleet.record_status
        try:
            done, _ = self._retrying(checked.channel, lambda: record(checked.msg))
        except Refused as exc:  # counted by the Fleet, which knows why
            log.warning("refused a %s message from %s: %s", checked.channel, checked.device_id,
                        exc.message[:_REASON_MAX_CHARS])
            self.counters["refused_messages"] += 1
            return True
        if done:
            self.counters[f"recorded_{checked.channel}"] += 1
        return done

    # -- in --------------------------------------------------------------------------------------------------------

    def check(self, topic: str, payload: bytes) -> Checked:
        """Check one message (no database): topic, emptiness, size, contract, device id; counts nothing."""
        return check_message(self.prefix, topic, payload)

    def handle(self, topic: str, payload: bytes) -> str:
        """Check and ingest one message synchronously (tests, tools); returns "recorded", "ignored", "malformed",
        "refused" (outside the contract's limits, a generation the cloud never issued, an unknown device), or
        "failed" (the Fleet raised: nothing was stored). The broker path goes through the workers instead."""
        checked = self.check(topic, payload)
        if checked.outcome != "ok":
            self._tally(checked)
            return checked.outcome
        try:
            if checked.channel == "telemetry":
                if self.fleet.record_telemetry_many([checked.msg])[0] in ("unknown_device", "rate_limited"):
                    self.counters["refused_messages"] += 1
                    return "refused"
            elif checked.channel == "reported":
                self.fleet.record_reported(checked.msg)
            else:
                self.fleet.record_status(checked.msg)
        except Refused as exc:  # counted by the Fleet, which knows why
            log.warning("refused a %s message from %s: %s", checked.channel, checked.device_id,
                        exc.message[:_REASON_MAX_CHARS])
            self.counters["refused_messages"] += 1
            return "refused"
        except Exception:
            log.exception("recording %s from %s failed", checked.channel, checked.device_id)
            self._count("ingest_errors")
            return "failed"
        self.counters[f"recorded_{checked.channel}"] += 1
        return "recorded"

    def _tally(self, checked: Checked) -> None:
        """Log and count a message that will not be recorded."""
        tally(self.fleet, self.counters, checked, "MQTT")

    def _count(self, name: str) -> None:
        count(self.fleet, self.counters, name)
