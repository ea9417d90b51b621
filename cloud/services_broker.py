"""Devices' broker logins in the `Fleet` facade: issued at enrollment, revoked on demand. Mixed into `Fleet`.

Theory: `_issue_mqtt_login` runs after enrollment's own checks passed (the lead's `enroll` calls it as one step):
a new random password, its hash stored first, then the broker told (`broker_accounts`, set by the runtime like
`publish`). Database first, because the embedded broker checks the database when the device logs in again after
the broker drops it; a Mosquitto that cannot be reached fails the enrollment with 503, the agent retries, and the
retry rotates again, so the broker and the answer the device finally gets always agree. `revoke_device` stamps the
login revoked, then has the broker delete it, which drops the device's connection at once.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from edgefleet.cloud.errors import Conflict, NotFound
from edgefleet.cloud.mqtt_accounts import BrokerAccounts, hash_password, new_password
from edgefleet.protos.messages import BrokerInfo

if TYPE_CHECKING:
    from edgefleet.cloud.settings import Settings
    from edgefleet.cloud.store import Store

log = logging.getLogger(__name__)


class BrokerLoginFacade:
    """Needs `settings`, `store`, `count()` from `Fleet`; `broker_accounts` is None until the runtime sets it."""

    broker_accounts: BrokerAccounts | None = None

    if TYPE_CHECKING:
        settings: Settings
        store: Store

        def count(self, name: str, by: int = 1) -> None: ...

    def _broker_info(self, device_id: str) -> BrokerInfo:
        """Where and as whom the enrolling device connects; a new password each time (rotation)."""
        s = self.settings
        username, password = self._issue_mqtt_login(device_id)
        return BrokerInfo(host=s.mqtt_host, port=s.mqtt_port, topic_prefix=s.mqtt_topic_prefix, tls=s.mqtt_tls,
                          username=username, password=password, keepalive_s=s.mqtt_keepalive_s)

    def _issue_mqtt_login(self, device_id: str) -> tuple[str, str]:
        """(username, password) for the device's `BrokerInfo`; the password is shown this once."""
        if device_id == self.settings.mqtt_username:
            raise Conflict(f"device id {device_id!r} is the cloud's own MQTT login: give this device another id")
        password = new_password()
        self.store.put_mqtt_credential(device_id, hash_password(password), datetime.now(timezone.utc))
        if self.broker_accounts is not None:
            self.broker_accounts.issue(device_id, password)
        return device_id, password

    def _revoke_mqtt_login(self, device_id: str) -> None:
        """The login stops working and the broker drops the device's live connection (within a second)."""
        self.store.revoke_mqtt_credential(device_id, datetime.now(timezone.utc))
        if self.broker_accounts is not None:
            self.broker_accounts.revoke(device_id)

    def revoke_device(self, device_id: str) -> None:
        """Cut the device off the broker. (Its HTTP token is the token lifecycle's business: `revoke_token`.)"""
        if self.store.get_device(device_id) is None:
            raise NotFound(f"no device {device_id!r}; `fleet devices` lists the enrolled ones")
        self._revoke_mqtt_login(device_id)
        # Mosquitto publishes no last will for a client it drops by administrative action: say it here.
        self.store.set_online(device_id, False, datetime.now(timezone.utc))
        self.count("devices_revoked")
        log.info("revoked the broker login of %s", device_id)
