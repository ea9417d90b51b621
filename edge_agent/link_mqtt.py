"""The agent's MQTT link: connect with backoff, a retained last will, subscribe, publish with acknowledgement.

Theory: paho's network thread owns the socket and reconnects with exponential backoff (`reconnect_delay_set`), so a
broker that is down when the agent starts, or goes away later, never blocks inference. On every (re)connect the link
re-subscribes to the device's desired topic, publishes `online` (retained), and tells the daemon, which then fetches
the full desired state over HTTP: the cloud's database, not the broker's retained copy, is the source of truth.
Callbacks run on paho's thread and only hand bytes to the daemon; nothing heavy happens there.

Telemetry is published at QoS 1 and acknowledged by PUBACK: `publish_wait` returns True only when the broker has it,
so the outbox deletes a batch only then.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edgefleet.protos.messages import BrokerInfo, DeviceStatus, Message
from edgefleet.protos.topics import device_topics

log = logging.getLogger(__name__)


class MqttLink:
    def __init__(
        self,
        broker: BrokerInfo,
        device_id: str,
        *,
        on_desired: Callable[[bytes], None],
        on_connected: Callable[[], None],
        retry_initial_s: float = 1.0,
        retry_max_s: float = 60.0,
        host_override: str | None = None,
        port_override: int | None = None,
    ) -> None:
        self.topics = device_topics(broker.topic_prefix, device_id)
        self.device_id = device_id
        self._host = host_override or broker.host
        self._port = port_override or broker.port
        self._keepalive = broker.keepalive_s
        self._on_desired = on_desired
        self._on_connected = on_connected
        self.connected = threading.Event()
        # A random suffix is not used: one client id per device lets the broker drop a stale session of ours.
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"edgefleet-agent-{device_id}",
                             protocol=mqtt.MQTTv311, clean_session=True)
        if broker.username:
            client.username_pw_set(broker.username, broker.password)
        if broker.tls:
            client.tls_set()
        # Jitter on the first delay spreads a fleet's reconnects after a broker restart.
        initial = max(1, int(round(retry_initial_s * (1 + random.random() * 0.5))))
        client.reconnect_delay_set(min_delay=initial, max_delay=max(initial, int(retry_max_s)))
        will = DeviceStatus(device_id=device_id, online=False, at=None)
        client.will_set(self.topics.status, will.to_wire(), qos=1, retain=True)
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        self._client = client
        self._started = False

    # paho callbacks (its network thread) ------------------------------------------------------------------------

    def _handle_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.warning("MQTT connect refused by %s:%s: %s", self._host, self._port, reason_code)
            return
        client.subscribe(self.topics.desired, qos=1)
        from datetime import datetime, timezone

        online = DeviceStatus(device_id=self.device_id, online=True, at=datetime.now(timezone.utc))
        client.publish(self.topics.status, online.to_wire(), qos=1, retain=True)
        self.connected.set()
        log.info("MQTT connected to %s:%s", self._host, self._port)
        try:
            self._on_connected()
        except Exception:  # noqa: BLE001 - a daemon bug must not kill paho's thread
            log.exception("on_connected handler failed")

    def _handle_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected.clear()
        log.info("MQTT disconnected (%s); paho reconnects with backoff", reason_code)

    def _handle_message(self, client, userdata, msg: mqtt.MQTTMessage) -> None:
        if msg.topic != self.topics.desired or not msg.payload:
            return  # an empty retained payload is a clear, not a document
        try:
            self._on_desired(bytes(msg.payload))
        except Exception:  # noqa: BLE001 - garbage must never kill the link
            log.exception("desired-state handler failed")

    # daemon side -------------------------------------------------------------------------------------------------

    def start(self) -> None:
        # connect_async never raises for a broker that is down; loop_start's thread keeps trying.
        self._client.connect_async(self._host, self._port, keepalive=self._keepalive)
        self._client.loop_start()
        self._started = True

    def stop(self, *, graceful: bool = True) -> None:
        if not self._started:
            return
        if graceful and self.connected.is_set():
            from datetime import datetime, timezone

            off = DeviceStatus(device_id=self.device_id, online=False, at=datetime.now(timezone.utc))
            info = self._client.publish(self.topics.status, off.to_wire(), qos=1, retain=True)
            try:
                info.wait_for_publish(timeout=2.0)
            except (RuntimeError, ValueError):
                pass
        self._client.disconnect()
        self._client.loop_stop()
        self._started = False

    def publish_wait(self, topic: str, msg: Message, *, retain: bool = False, timeout_s: float = 10.0) -> bool:
        """Publish at QoS 1; True once the broker acknowledged it (PUBACK), False when offline or timed out."""
        if not self.connected.is_set():
            return False
        info = self._client.publish(topic, msg.to_wire(), qos=1, retain=retain)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            return False
        try:
            info.wait_for_publish(timeout=timeout_s)
        except (RuntimeError, ValueError):
            return False
        return info.is_published()
