"""MQTT topic layout: `{prefix}/devices/{device_id}/{channel}`. See docs/protocol.md."""

from __future__ import annotations

from dataclasses import dataclass

from edgefleet.protos.messages import check_device_id

CHANNELS = ("desired", "reported", "telemetry", "status", "ack")


@dataclass(frozen=True)
class DeviceTopics:
    prefix: str
    device_id: str

    def _t(self, channel: str) -> str:
        return f"{self.prefix}/devices/{self.device_id}/{channel}"

    @property
    def desired(self) -> str:  # cloud -> agent, retained, QoS 1, SignedDesiredState
        return self._t("desired")

    @property
    def reported(self) -> str:  # agent -> cloud, retained, QoS 1, ReportedState
        return self._t("reported")

    @property
    def telemetry(self) -> str:  # agent -> cloud, QoS 1, TelemetryBatch
        return self._t("telemetry")

    @property
    def ack(self) -> str:  # cloud -> agent, QoS 1, not retained, TelemetryAck: batches committed in the database
        return self._t("ack")

    @property
    def status(self) -> str:  # agent -> cloud, retained, QoS 1, DeviceStatus; also the last will
        return self._t("status")


def device_topics(prefix: str, device_id: str) -> DeviceTopics:
    check_device_id(device_id)
    return DeviceTopics(prefix.rstrip("/"), device_id)


def device_client_id(device_id: str) -> str:
    """The MQTT client id an agent connects with; the broker binds each device's account to it, so no other
    login can take it (and kick the agent off) and this device's login can take no other."""
    check_device_id(device_id)
    return f"edgefleet-agent-{device_id}"


# Mosquitto's count of messages it dropped since it started (a full queue for an absent client, among others),
# published every sys_interval; the cloud reads it for `fleet stats`. Other brokers may lack it.
BROKER_DROPPED_TOPIC = "$SYS/broker/publish/messages/dropped"


def cloud_subscriptions(prefix: str) -> list[str]:
    """What the cloud subscribes to: every device's agent-to-cloud channels."""
    p = prefix.rstrip("/")
    return [f"{p}/devices/+/reported", f"{p}/devices/+/telemetry", f"{p}/devices/+/status"]


def parse_topic(prefix: str, topic: str) -> tuple[str, str] | None:
    """(device_id, channel) for a topic under `prefix`, or None when it is not ours or malformed."""
    p = prefix.rstrip("/") + "/devices/"
    if not topic.startswith(p):
        return None
    rest = topic[len(p):].split("/")
    if len(rest) != 2 or rest[1] not in CHANNELS:
        return None
    try:
        check_device_id(rest[0])
    except ValueError:
        return None
    return rest[0], rest[1]
