"""The cloud's MQTT side, wired from settings: the broker it runs (if any), who provisions device logins, the bridge.

Theory: `start_mqtt` decides once, from `mqtt_auth` and what `start_broker` ran:
- `mqtt_auth = "none"`: an open broker; no accounts are provisioned (devices still get a login, which it ignores).
- the embedded broker: it checks logins against the database itself; `EmbeddedAccounts` only drops connections.
- any Mosquitto (the cloud's own `MosquittoProcess` or the operator's): `DynsecAccounts` over MQTT. It starts
  before the bridge and gets `mqtt_command_timeout_s` to give the cloud's login its publishing role, so the
  bridge's first republish is not refused; if the broker is late, its `on_ready` republishes once it is ready.
The bridge always logs in as the cloud (`cloud_login`): on an open broker the credentials are simply unused.
`MqttSide.stop()` stops the bridge, then the control client, then the broker they talk to.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from edgefleet.cloud.broker import BrokerAuth, EmbeddedBroker, RunningBroker, start_broker
from edgefleet.cloud.mqtt_accounts import BrokerAccounts, cloud_login
from edgefleet.cloud.mqtt_bridge import MqttBridge

if TYPE_CHECKING:
    from edgefleet.cloud.dynsec import DynsecAccounts
    from edgefleet.cloud.services import Fleet
    from edgefleet.cloud.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class MqttSide:
    broker: RunningBroker | None
    accounts: BrokerAccounts | None
    bridge: MqttBridge
    dynsec: DynsecAccounts | None = None

    def stop(self) -> None:
        try:
            self.bridge.stop()
        finally:
            try:
                if self.dynsec is not None:
                    self.dynsec.stop()
            finally:
                if self.broker is not None:
                    self.broker.stop()


def start_mqtt(settings: Settings, fleet: Fleet) -> MqttSide:
    s = settings
    login = cloud_login(s)
    secured = s.mqtt_auth != "none"
    auth = BrokerAuth(login, s.mqtt_topic_prefix, fleet.store, s.mosquitto_dynsec_plugin) if secured else None
    broker = start_broker(s.embedded_broker, s.mqtt_host, s.mqtt_port, s.data_dir, auth=auth)
    dynsec: DynsecAccounts | None = None
    try:
        protocol = s.mqtt_protocol
        if protocol == "auto":
            protocol = "3.1.1" if isinstance(broker, EmbeddedBroker) else "5"
        bridge = MqttBridge(fleet, s.mqtt_host, s.mqtt_port, s.mqtt_topic_prefix, keepalive_s=s.mqtt_keepalive_s,
                            client_id=login.client_id, username=login.username, password=login.password,
                            reconnect_min_s=s.mqtt_retry_initial_s, reconnect_max_s=s.mqtt_retry_max_s,
                            protocol=protocol, session_expiry_s=s.mqtt_session_expiry_s,
                            ingest_batch=s.mqtt_ingest_batch, ingest_wait_s=s.mqtt_ingest_wait_s)
        side = MqttSide(broker=broker, accounts=None, bridge=bridge)
        if isinstance(broker, EmbeddedBroker) and broker.authority is not None:
            from edgefleet.cloud.broker_auth import EmbeddedAccounts

            side.accounts = EmbeddedAccounts(broker)
        elif secured:
            from edgefleet.cloud.dynsec import DynsecAccounts

            def republish() -> None:
                if bridge.connected:
                    bridge.republish_all()

            side.dynsec = dynsec = DynsecAccounts(s.mqtt_host, s.mqtt_port, login, s.mqtt_topic_prefix,
                                         timeout_s=s.mqtt_command_timeout_s, retry_initial_s=s.mqtt_retry_initial_s,
                                         retry_max_s=s.mqtt_retry_max_s, tls=s.mqtt_tls,
                                         keepalive_s=s.mqtt_keepalive_s, on_ready=republish).start()
            side.accounts = side.dynsec
            if not side.dynsec.wait_ready(s.mqtt_command_timeout_s):
                log.warning("Mosquitto dynamic security on %s:%d is not ready yet; enrollments answer 503 until "
                            "it is", s.mqtt_host, s.mqtt_port)
        bridge.start()
    except BaseException:
        if dynsec is not None:
            dynsec.stop()
        if broker is not None:
            broker.stop()
        raise
    return side
