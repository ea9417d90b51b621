"""Devices' broker logins in SQL (table `mqtt_credentials`, migration 0004): a part of `Store`, mixed into it.

Only the salted hash is stored (`cloud/mqtt_accounts.py` makes and checks it). `put_mqtt_credential` is an upsert:
a re-enrollment replaces the hash and clears a revocation; `revoke_mqtt_credential` stamps `revoked_at`, which the
embedded broker reads at every login.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import update

from edgefleet.cloud.db.models import MqttCredential

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    from sqlalchemy.orm import Session


class MqttCredentialStoreMixin:
    """Broker-login queries; needs `_tx()` and `_insert()` from `Store`."""

    if TYPE_CHECKING:

        def _tx(self) -> AbstractContextManager[Session]: ...

        def _insert(self, table: Any) -> Any: ...

    def put_mqtt_credential(self, device_id: str, password_hash: str, now: datetime) -> None:
        values = {"password_hash": password_hash, "issued_at": now, "revoked_at": None}
        stmt = self._insert(MqttCredential).values(device_id=device_id, **values)
        stmt = stmt.on_conflict_do_update(index_elements=[MqttCredential.device_id], set_=values)
        with self._tx() as s:
            s.execute(stmt)

    def get_mqtt_credential(self, device_id: str) -> MqttCredential | None:
        with self._tx() as s:
            return s.get(MqttCredential, device_id)

    def revoke_mqtt_credential(self, device_id: str, now: datetime) -> bool:
        """Stamp the login revoked; False when the device never had one (or it was revoked already)."""
        stmt = (update(MqttCredential)
                .where(MqttCredential.device_id == device_id, MqttCredential.revoked_at.is_(None))
                .values(revoked_at=now))
        with self._tx() as s:
            return s.execute(stmt).rowcount > 0
