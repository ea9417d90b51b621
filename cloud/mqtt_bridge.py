"""The cloud's MQTT client: desired states out, reported state, telemetry and status in.

Theory of operation:
- One paho 2.x client with `loop_start()` (its own network thread), logged in as the cloud (`client_id`,
  `username`, `password`: cloud/mqtt_accounts.py `cloud_login`). paho's thread reconnects by itself, waiting a
  full-jitter delay between attempts (`common.mqtt_client.JitteredClient`), so several clouds, or a cloud and its
  fleet, do not hammer a restarted broker in lockstep; `on_connect` subscribes again to `cloud_subscriptions(prefix)`
  every time, since a clean session forgets subscriptions; the bridge counts as connected once the SUBACK arrives.
- Out: `publish(device_id, doc)` (what `Fleet` calls after it signs a document) sends the `SignedDesiredState` bytes
  retained at QoS 1 on the device's desired topic, the same bytes the HTTP route serves.
- In: every message is checked in this order: topic ours, payload not empty (a retained clear: ignored, not counted),
  size, `parse_message(payload, Expected)`, topic device id == payload device id. A failure is logged, counted as
  `malformed_messages` and dropped; the bridge never raises into paho's thread. A readable message outside the
  contract's limits (protos/limits.py: NaN, a p95 of 1e308, errors > count, an oversize text), or one the `Fleet`
  refuses (`Refused`: a generation it never issued), is dropped whole and counted as `refused_messages` and
  `refused_{channel}_{reason}`. Any other exception from a `Fleet` call is logged and counted as `ingest_errors`.
  Ingest runs inline in the network thread so that paho sends the PUBACK only after the database has the message
  (at-least-once; `record_telemetry` is idempotent on seq).
- The database is the source of truth, not the broker: an embedded broker loses its retained messages on restart
  and a broker may be swapped. So after every (re)connect the bridge republishes each device's current desired
  state, in a thread of its own so the network loop keeps answering pings. It costs one message per device per
  reconnect; agents ignore a generation they already hold.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edgefleet.cloud.errors import Refused
from edgefleet.common.backoff import Backoff
from edgefleet.common.mqtt_client import JitteredClient
from edgefleet.protos.messages import (
    MAX_MESSAGE_BYTES,
    DeviceStatus,
    MessageError,
    ReportedState,
    SignedDesiredState,
    TelemetryBatch,
    parse_message,
)
from edgefleet.protos.topics import cloud_subscriptions, device_topics, parse_topic

if TYPE_CHECKING:
    from edgefleet.cloud.services import Fleet

log = logging.getLogger(__name__)

_EXPECTED: dict[str, type] = {"reported": ReportedState, "telemetry": TelemetryBatch, "status": DeviceStatus}
_QOS = 1
_REASON_MAX_CHARS = 200  # a reason quoted from a hostile payload stays one readable log line


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
    ) -> None:
        self.fleet = fleet
        self.host = host
        self.port = port
        self.prefix = prefix.rstrip("/")
        self.keepalive_s = keepalive_s
        self.republish_on_connect = republish_on_connect
        # What this bridge saw, for tests and logs; the durable counters live in the Fleet (`/api/v1/stats`).
        self.counters: Counter[str] = Counter()
        self._connected = threading.Event()
        self._stopping = False
        self._subscribe_mid: int | None = None
        # MQTT 3.1.1: amqtt speaks nothing newer, and nothing here needs MQTT 5 yet.
        self._client = JitteredClient(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=True,
            protocol=mqtt.MQTTv311,
            backoff=Backoff(reconnect_min_s, reconnect_max_s),
        )
        if username:
            self._client.username_pw_set(username, password)
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message

    # -- lifecycle -------------------------------------------------------------------------------------------------

    def start(self) -> MqttBridge:
        # connect_async: a broker that is down at start is retried by the loop instead of failing the cloud.
        self._client.connect_async(self.host, self.port, keepalive=self.keepalive_s)
        self._client.loop_start()
        return self

    def wait_connected(self, timeout_s: float = 10.0) -> bool:
        return self._connected.wait(timeout_s)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def stop(self) -> None:
        self._stopping = True
        try:
            self._client.disconnect()
        finally:
            self._client.loop_stop()
            self._connected.clear()

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
            if self._stopping or not self._connected.is_set():
                break
            try:
                self.publish(device.device_id, self.fleet.desired_state(device.device_id))
                sent += 1
            except Exception:
                log.exception("could not republish the desired state of %s", device.device_id)
                self._count("ingest_errors")
        log.info("republished %d desired state(s) after connecting", sent)
        return sent

    # -- paho callbacks (network thread) ---------------------------------------------------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            log.warning("MQTT broker %s:%d refused the cloud's connection: %s; check mqtt_username/mqtt_password "
                        "(or %s) against the broker's accounts", self.host, self.port, reason_code,
                        "the data dir's mqtt-cloud.password")
            return
        _rc, self._subscribe_mid = client.subscribe([(topic, _QOS) for topic in cloud_subscriptions(self.prefix)])
        log.info("connected to MQTT broker %s:%d; subscribing", self.host, self.port)

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
        if not self._stopping:
            log.warning("lost the MQTT broker %s:%d (%s); reconnecting with backoff", self.host, self.port, reason_code)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            self.handle(msg.topic, msg.payload)
        except Exception:
            log.exception("unexpected error handling a message on %r", msg.topic)
            self._count("ingest_errors")

    # -- in --------------------------------------------------------------------------------------------------------

    def handle(self, topic: str, payload: bytes) -> str:
        """Check and ingest one message; returns what happened: "recorded", "ignored", "malformed", "refused" (a
        readable message outside the contract's limits, or a generation the cloud never issued), "failed"."""
        where = parse_topic(self.prefix, topic)
        if where is None or where[1] not in _EXPECTED:
            return self._malformed(topic, "topic is not a device's reported, telemetry or status channel")
        if not payload:
            return "ignored"  # an empty retained payload clears the topic; nothing to record
        if len(payload) > MAX_MESSAGE_BYTES:
            return self._malformed(topic, f"{len(payload)} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit")
        device_id, channel = where
        try:
            msg = parse_message(bytes(payload), _EXPECTED[channel])
        except MessageError as exc:
            if exc.refused:
                return self._refused(topic, channel, exc.reason, str(exc))
            return self._malformed(topic, str(exc))
        if msg.device_id != device_id:
            return self._malformed(topic, f"payload device_id {msg.device_id!r} does not match the topic's")
        record = {
            "reported": self.fleet.record_reported,
            "telemetry": self.fleet.record_telemetry,
            "status": self.fleet.record_status,
        }[channel]
        try:
            record(msg)
        except Refused as exc:  # counted by the Fleet, which knows why
            log.warning("refused a %s message from %s: %s", channel, device_id, exc.message[:_REASON_MAX_CHARS])
            self.counters["refused_messages"] += 1
            return "refused"
        except Exception:
            log.exception("recording %s from %s failed", channel, device_id)
            self._count("ingest_errors")
            return "failed"
        self.counters[f"recorded_{channel}"] += 1
        return "recorded"

    def _malformed(self, topic: str, reason: str) -> str:
        log.warning("dropped a malformed message on %r: %s", topic[:_REASON_MAX_CHARS], reason[:_REASON_MAX_CHARS])
        self._count("malformed_messages")
        return "malformed"

    def _refused(self, topic: str, channel: str, reason: str, text: str) -> str:
        log.warning("refused a message on %r (%s): %s", topic[:_REASON_MAX_CHARS], reason, text[:_REASON_MAX_CHARS])
        self.counters["refused_messages"] += 1
        try:
            self.fleet.count_refused(channel, reason)
        except Exception:
            log.warning("could not store the refusal counters", exc_info=True)
        return "refused"

    def _count(self, name: str) -> None:
        self.counters[name] += 1
        try:
            self.fleet.count(name)
        except Exception:
            log.warning("could not store counter %s", name, exc_info=True)
