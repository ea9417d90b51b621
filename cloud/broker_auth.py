"""The embedded amqtt broker's logins and ACL, checked in-process against the cloud's database.

Theory: `EmbeddedAuthority` answers the two questions a broker asks, "may this login connect with this client id"
(the cloud's own login, or a device's from `mqtt_credentials`, not revoked, password matching its scrypt hash) and
"may it publish or subscribe to this topic" (`mqtt_accounts.acl_allows`, the rule dynsec roles spell out too).
Two amqtt plugins put the questions to it; amqtt builds plugins from dotted names with a dataclass config, so the
config carries a key into `_AUTHORITIES`, not the object.

amqtt 0.12 drops the previous session of a client id (clean session) or rewrites its credentials (persistent
session) before it authenticates the CONNECT, and kicks a connected owner of that id even when the newcomer is
then refused: any client could kick the cloud off with its client id and no password. `GuardedBroker` therefore
authenticates first, refusing with CONNACK 5 before any session is touched; the rest of the connect is amqtt's own
code, copied from 0.12.1's `_initialize_client_session` (pyproject pins amqtt below 0.13, and
tests/cloud/test_broker_acl.py fails if a takeover gets through). Password checks (scrypt, a database read) run in
a worker thread so the broker's loop keeps serving.

`EmbeddedAccounts` is the `BrokerAccounts` for this broker: the database is already what it checks, so issuing and
revoking only drop the device's live connection, which then has to log in again.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from amqtt.broker import Broker
from amqtt.contexts import Action
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.mqtt.connack import NOT_AUTHORIZED, ConnackPacket
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session
from amqtt.utils import gen_client_id

from edgefleet.cloud.mqtt_accounts import CloudLogin, acl_allows, client_id_allowed, verify_password

if TYPE_CHECKING:
    from edgefleet.cloud.broker import EmbeddedBroker
    from edgefleet.cloud.store import Store

log = logging.getLogger(__name__)

# 5 s: a kick is one round trip through the broker's own loop.
_KICK_TIMEOUT_S = 5.0
_VERIFIED = "_edgefleet_verified"  # set on a session whose CONNECT GuardedBroker has already authenticated

_AUTHORITIES: dict[str, EmbeddedAuthority] = {}


class EmbeddedAuthority:
    """Logins and topics for one embedded broker; `key` is what its plugins' config names."""

    def __init__(self, store: Store, prefix: str, cloud: CloudLogin) -> None:
        self.store = store
        self.prefix = prefix.rstrip("/")
        self.cloud = cloud
        self.key = uuid.uuid4().hex
        self.open()

    def open(self) -> None:
        """Findable by the plugins (again, after `close`): the broker calls it at every start."""
        _AUTHORITIES[self.key] = self

    def close(self) -> None:
        _AUTHORITIES.pop(self.key, None)

    def check_login(self, username: str | None, password: str | None, client_id: str | None) -> bool:
        """Blocking (a database read and scrypt): call it off the broker's loop."""
        if not username or password is None or client_id is None:
            return False
        if not client_id_allowed(cloud=self.cloud, username=username, client_id=client_id):
            return False
        if username == self.cloud.username:
            return _same(password, self.cloud.password)
        try:
            row = self.store.get_mqtt_credential(username)
        except Exception:  # a database that is down refuses logins; the client retries
            log.warning("could not read the login of %r; refusing it for now", username, exc_info=True)
            return False
        return row is not None and row.revoked_at is None and verify_password(password, row.password_hash)

    def allows(self, username: str | None, action: Action | None, topic: str | None) -> bool:
        if action == Action.RECEIVE:
            return True  # what a login receives was decided when it subscribed
        if not username or not topic or action not in (Action.PUBLISH, Action.SUBSCRIBE):
            return False
        kind = "publish" if action == Action.PUBLISH else "subscribe"
        return acl_allows(self.prefix, cloud_username=self.cloud.username, username=username, action=kind,
                          topic=topic)


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


def _authority(key: str) -> EmbeddedAuthority | None:
    return _AUTHORITIES.get(key)


class EdgefleetAuthPlugin(BaseAuthPlugin):
    """amqtt auth plugin: the cloud's login or a device's, each with its own client id."""

    @dataclass
    class Config:
        authority: str = ""

    async def authenticate(self, *, session: Session) -> bool | None:
        authority = _authority(self.config.authority)
        if authority is None:
            return False
        return await asyncio.to_thread(authority.check_login, session.username, session.password, session.client_id)


class EdgefleetTopicPlugin(BaseTopicPlugin):
    """amqtt topic plugin: `acl_allows` for every publish and subscribe."""

    @dataclass
    class Config:
        authority: str = ""

    async def topic_filtering(self, *, session: Session | None = None, topic: str | None = None,
                              action: Action | None = None) -> bool | None:
        authority = _authority(self.config.authority)
        if authority is None or session is None:
            return False
        return authority.allows(session.username, action, topic)


def plugin_config(authority: EmbeddedAuthority) -> dict[str, Any]:
    """The `plugins` section of the broker config: only these two (no anonymous login, no $SYS chatter)."""
    return {f"{__name__}.EdgefleetAuthPlugin": {"authority": authority.key},
            f"{__name__}.EdgefleetTopicPlugin": {"authority": authority.key}}


class GuardedBroker(Broker):
    """amqtt's Broker, authenticating a CONNECT before any existing session of its client id is touched."""

    async def _initialize_client_session(self, reader: Any, writer: Any, remote_address: str,
                                         remote_port: int) -> tuple[BrokerProtocolHandler, Session]:
        try:
            handler, client_session = await BrokerProtocolHandler.init_from_connect(reader, writer,
                                                                                    self.plugins_manager)
        except MQTTError as exc:
            await writer.close()
            raise MQTTError(exc) from exc
        except NoDataError as exc:
            raise AMQTTError(exc) from exc

        # The one change from amqtt: authenticate here, before the session table is read or written.
        if not await super()._authenticate(client_session, None):
            log.info("refused MQTT login %r (client id %r) from %s", client_session.username,
                     client_session.client_id, remote_address)
            await ConnackPacket.build(0, NOT_AUTHORIZED).to_stream(writer)
            await writer.close()
            raise MQTTError(f"login {client_session.username!r} refused")
        # amqtt publishes a last will without a topic check: a will on another device's topic is refused here.
        if client_session.will_flag and not await self._topic_filtering(
                client_session, topic=client_session.will_topic or "", action=Action.PUBLISH):
            log.info("refused MQTT login %r: its last will is on %r", client_session.username,
                     client_session.will_topic)
            await ConnackPacket.build(0, NOT_AUTHORIZED).to_stream(writer)
            await writer.close()
            raise MQTTError(f"login {client_session.username!r} refused: last will on {client_session.will_topic!r}")

        # From here on, amqtt 0.12.1's code.
        if client_session.clean_session:
            if client_session.client_id is not None and client_session.client_id != "":
                await self._delete_session(client_session.client_id)
            else:
                client_session.client_id = gen_client_id()
            client_session.parent = 0
        elif client_session.client_id in self._sessions:
            existing, _ = self._sessions[client_session.client_id]
            existing.will_flag = client_session.will_flag
            existing.will_message = client_session.will_message
            existing.will_topic = client_session.will_topic
            existing.will_qos = client_session.will_qos
            existing.keep_alive = client_session.keep_alive
            existing.username = client_session.username
            existing.password = client_session.password
            client_session = existing
            client_session.parent = 1
        else:
            client_session.parent = 0

        timeout_disconnect_delay = self.config.get("timeout-disconnect-delay", 0)
        if client_session.keep_alive > 0 and isinstance(timeout_disconnect_delay, int):
            client_session.keep_alive += timeout_disconnect_delay
        setattr(client_session, _VERIFIED, True)
        return handler, client_session

    async def _authenticate(self, session: Session, listener: Any) -> bool:
        # Already authenticated in _initialize_client_session a moment ago: spare a second scrypt.
        if session.__dict__.pop(_VERIFIED, False):
            return True
        return await super()._authenticate(session, listener)

    async def kick(self, username: str) -> int:
        """Drop every live connection of `username`; how many there were."""
        kicked = 0
        for session, handler in list(self._sessions.values()):
            if session.username == username and handler is not None and session.transitions.is_connected():
                await handler.stop()
                kicked += 1
        return kicked


class EmbeddedAccounts:
    """`BrokerAccounts` of the embedded broker: logins live in the database; a change drops the live connection."""

    def __init__(self, broker: EmbeddedBroker) -> None:
        self.broker = broker

    def issue(self, device_id: str, password: str) -> None:
        self.broker.kick(device_id)  # it logs in again, and only the new password works

    def revoke(self, device_id: str) -> None:
        self.broker.kick(device_id)


__all__ = ["EdgefleetAuthPlugin", "EdgefleetTopicPlugin", "EmbeddedAccounts", "EmbeddedAuthority", "GuardedBroker",
           "plugin_config"]
