"""The agent's MQTT link (a `link.CloudLink`): connect with backoff, a retained last will, subscribe, publish with
acknowledgement.

Theory: paho's network thread owns the socket and reconnects by itself, waiting a full-jitter delay between
attempts (`common.mqtt_client.JitteredClient`: uniform up to `retry_initial_s * 2**attempt`, capped at
`retry_max_s`), so a broker that is down when the agent starts, or goes away later, never blocks inference, and a
fleet that lost its broker at one instant does not come back at one instant. The agent logs in with the
per-device login the cloud issued at enrollment (`BrokerInfo.username/password`) and the client id the broker binds
to it (`protos.topics.device_client_id`). On every (re)connect the link
re-subscribes to the device's desired topic, publishes `online` (retained), and tells the daemon, which then fetches
the full desired state over HTTP: the cloud's database, not the broker's retained copy, is the source of truth.
Callbacks run on paho's thread and only hand bytes to the daemon; nothing heavy happens there.

Everything is published at QoS 1. `publish_reported` (retained) and `publish_status` (retained) return True once the
broker acknowledged (PUBACK): last writer wins, and the next report supersedes a lost one. Telemetry is confirmed end
to end: `publish_telemetry` returns True only when the CLOUD says it stored the batch, a `TelemetryAck` on the
device's own `ack` topic that the cloud sends after its database commit. The broker's PUBACK alone only means the
broker has it (it may yet drop it from a full queue, or the cloud may fail to store it). An ack that comes after
`publish_telemetry` gave up (the cloud was away and came back) is kept for `take_acked()`, and the outbox drops the
batch then. A broker that refuses the ack subscription (a device role made before the topic existed, on a broker the
cloud does not administer) makes `publish_telemetry` answer False at once, so the daemon's HTTP path, whose answer
is the cloud's own, carries telemetry. The topics (`protos/topics.py`) stay in here; the daemon never names one.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edgefleet.common.backoff import Backoff
from edgefleet.common.mqtt_client import JitteredClient
from edgefleet.edge_agent.clock import Clock, SystemClock
from edgefleet.edge_agent.config import AgentConfig
from edgefleet.edge_agent.link_acks import AckBook
from edgefleet.protos.messages import (
    BrokerInfo,
    DeviceStatus,
    EnrollResponse,
    Message,
    ReportedState,
    TelemetryBatch,
)
from edgefleet.protos.topics import device_client_id, device_topics

log = logging.getLogger(__name__)


class MqttLink:
    name = "mqtt"

    def __init__(
        self,
        broker: BrokerInfo,
        device_id: str,
        *,
        on_desired: Callable[[bytes], None],
        on_connected: Callable[[], None],
        on_retained: Callable[[bytes], None] | None = None,
        retry_initial_s: float = 1.0,
        retry_max_s: float = 60.0,
        host_override: str | None = None,
        port_override: int | None = None,
        clock: Clock | None = None,
        rand: random.Random | None = None,
    ) -> None:
        self.topics = device_topics(broker.topic_prefix, device_id)
        self.device_id = device_id
        self._host = host_override or broker.host
        self._port = port_override or broker.port
        self._keepalive = broker.keepalive_s
        self._on_desired = on_desired
        self._on_retained = on_retained or on_desired
        self._on_connected = on_connected
        self._clock = clock or SystemClock()
        self._connected = threading.Event()
        # Telemetry confirmations (link_acks.py): what publish_telemetry waits on, and the late ones for take_acked().
        self._acks = AckBook(device_id)
        self._ack_mid: int | None = None
        self._acks_ok: bool | None = None  # None: not known yet (no SUBACK); False: the broker refused the topic
        # A random suffix is not used: one client id per device lets the broker drop a stale session of ours, and the
        # broker binds the device's login to exactly this id.
        backoff = Backoff(retry_initial_s, max(retry_initial_s, retry_max_s), rand=(rand or random.Random()).random)
        client = JitteredClient(CallbackAPIVersion.VERSION2, client_id=device_client_id(device_id),
                                protocol=mqtt.MQTTv311, clean_session=True, backoff=backoff)
        if broker.username:
            client.username_pw_set(broker.username, broker.password)
        if broker.tls:
            client.tls_set()
        will = DeviceStatus(device_id=device_id, online=False, at=None)
        client.will_set(self.topics.status, will.to_wire(), qos=1, retain=True)
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        client.on_subscribe = self._handle_subscribe
        self._client = client
        self._started = False

    @classmethod
    def from_config(cls, config: AgentConfig, enrollment: EnrollResponse, *, on_desired: Callable[[bytes], None],
                    on_connected: Callable[[], None], on_retained: Callable[[bytes], None] | None = None,
                    clock: Clock | None = None) -> MqttLink:
        """The daemon's default `link.LinkFactory`: the broker named at enrollment, unless `[mqtt]` overrides it."""
        return cls(enrollment.broker, config.device_id, on_desired=on_desired, on_connected=on_connected,
                   on_retained=on_retained,
                   retry_initial_s=config.retry.retry_initial_s, retry_max_s=config.retry.retry_max_s,
                   host_override=config.mqtt.host, port_override=config.mqtt.port, clock=clock)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    # paho callbacks (its network thread) ------------------------------------------------------------------------

    def _handle_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            # "Not authorized": a revoked login, or one rotated by a later enrollment; HTTP still carries the rest.
            log.warning("MQTT connect refused by %s:%s: %s", self._host, self._port, reason_code)
            return
        client.subscribe(self.topics.desired, qos=1)
        _rc, self._ack_mid = client.subscribe(self.topics.ack, qos=1)
        # Not publish_status: waiting for a PUBACK here would block the very thread that reads it.
        online = DeviceStatus(device_id=self.device_id, online=True, at=self._clock.now())
        client.publish(self.topics.status, online.to_wire(), qos=1, retain=True)
        self._connected.set()
        log.info("MQTT connected to %s:%s", self._host, self._port)
        try:
            self._on_connected()
        except Exception:
            log.exception("on_connected handler failed")

    def _handle_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._connected.clear()
        log.info("MQTT disconnected (%s); reconnecting with full-jitter backoff", reason_code)

    def _handle_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        if mid != self._ack_mid:
            return
        self._acks_ok = not any(rc.is_failure for rc in reason_codes)
        if not self._acks_ok:
            log.warning("the MQTT broker refused the telemetry ack topic %s (a device role from before it existed?); "
                        "telemetry goes over HTTP until the cloud updates the broker's ACL", self.topics.ack)

    def _handle_message(self, client, userdata, msg: mqtt.MQTTMessage) -> None:
        if msg.topic == self.topics.ack:
            self._handle_ack(bytes(msg.payload))
            return
        if msg.topic != self.topics.desired or not msg.payload:
            return  # an empty retained payload is a clear, not a document
        try:
            # MQTT 3.1.1 sets RETAIN on delivery only for a retained message sent because of a new subscription
            # (section 3.3.1.3); a live publish to our subscription arrives with it clear, retained or not.
            (self._on_retained if msg.retain else self._on_desired)(bytes(msg.payload))
        except Exception:
            log.exception("desired-state handler failed")

    def _handle_ack(self, payload: bytes) -> None:
        self._acks.handle(payload)

    def take_acked(self) -> list[tuple[int, int]]:
        """(epoch, seq) of batches the cloud confirmed (or refused for good) while nobody waited; each once."""
        return self._acks.take()

    def start(self) -> None:
        # connect_async never raises for a broker that is down; loop_start's thread keeps trying.
        self._client.connect_async(self._host, self._port, keepalive=self._keepalive)
        self._client.loop_start()
        self._started = True

    def stop(self, *, graceful: bool = True) -> None:
        if not self._started:
            return
        if graceful and self.connected:
            # 2 s: a goodbye on the way out; a broker that stopped answering must not hold up the shutdown.
            self.publish_status(DeviceStatus(device_id=self.device_id, online=False, at=self._clock.now()), 2.0)
        self._client.disconnect()
        self._client.loop_stop()
        self._started = False

    def publish_reported(self, report: ReportedState, timeout_s: float) -> bool:
        return self._publish_wait(self.topics.reported, report, retain=True, timeout_s=timeout_s)

    def publish_telemetry(self, batch: TelemetryBatch, timeout_s: float) -> bool:
        """True once the cloud confirmed it stored the batch (or refused it for good), within `timeout_s`."""
        if not self.connected or self._acks_ok is False:
            return False
        return self._acks.wait((batch.epoch, batch.seq),
                               lambda _: self._publish_wait(self.topics.telemetry, batch, timeout_s=timeout_s),
                               timeout_s, self._clock.monotonic)

    def publish_status(self, status: DeviceStatus, timeout_s: float) -> bool:
        return self._publish_wait(self.topics.status, status, retain=True, timeout_s=timeout_s)

    def _publish_wait(self, topic: str, msg: Message, *, retain: bool = False, timeout_s: float = 10.0) -> bool:
        """Publish at QoS 1; True once the broker acknowledged it (PUBACK), False when offline or timed out."""
        if not self.connected:
            return False
        info = self._client.publish(topic, msg.to_wire(), qos=1, retain=retain)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            return False
        try:
            info.wait_for_publish(timeout=timeout_s)
        except (RuntimeError, ValueError):
            return False
        return info.is_published()
