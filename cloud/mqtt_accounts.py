"""Per-device broker accounts: passwords, the ACL, and the seam to whatever broker enforces them.

Theory: every device gets its own broker login at enrollment (username = device id, a random password returned
once in `EnrollResponse.broker`), bound to its client id (`protos.topics.device_client_id`). The database keeps
only a salted scrypt hash; re-enrollment rotates the password, `Fleet.revoke_device` revokes it. What a login may
do is one rule, `acl_allows`: a device publishes only its own reported, telemetry and status topics and subscribes
only to its own desired and ack topics; the cloud publishes desired states and telemetry acks and subscribes to
the devices' channels.

Who enforces it is a `BrokerAccounts` behind the `Fleet`:
- `DynsecAccounts` (cloud/dynsec.py): Mosquitto's dynamic security plugin, one client and one role per device,
  provisioned over MQTT. Works for the Mosquitto the cloud runs and for an operator's own.
- `EmbeddedAccounts` (cloud/broker_auth.py): the embedded amqtt broker checks logins against the database and
  topics against `acl_allows`, in-process.
- None: `mqtt_auth = "none"`, an open broker; logins are still issued and stored, the broker ignores them.

The cloud's own login (`cloud_password`) comes from settings or is made at the first start and kept 0600 in the
data dir, like the admin token.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Literal, Protocol

from edgefleet.cloud.errors import CloudError
from edgefleet.cloud.settings import Settings
from edgefleet.common.fsutil import atomic_write_text
from edgefleet.protos.topics import cloud_subscriptions, device_client_id, device_topics, parse_topic

# 32 bytes = 256 bits, as for the bearer tokens (cloud/auth.py): no password list or brute force reaches it.
PASSWORD_BYTES = 32
# scrypt n=2**14, r=8, p=1 (16 MiB, ~0.1 s here): the hashlib documentation's interactive-login figure. The
# passwords are random, so the slow hash only matters for a stolen database, where it costs as it should.
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**14, 8, 1
_SCRYPT_MAXMEM = 64 * 1024 * 1024
_SALT_BYTES = 16
_DIGEST_BYTES = 64  # hashlib.scrypt's default dklen

Action = Literal["publish", "subscribe"]


class BrokerAccounts(Protocol):
    """A broker's view of device logins. Both calls raise `CloudError`s (Unavailable, Conflict) with a next step."""

    def issue(self, device_id: str, password: str) -> None:
        """Create the device's login, or rotate its password; the old one stops working."""
        ...

    def revoke(self, device_id: str) -> None:
        """Delete the device's login and drop its connection."""
        ...


def new_password() -> str:
    return secrets.token_urlsafe(PASSWORD_BYTES)


def hash_password(password: str) -> str:
    """`scrypt$n$r$p$salt$hash` (salt and hash urlsafe base64): self-describing, so the cost can rise later."""
    salt = secrets.token_bytes(_SALT_BYTES)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P,
                            maxmem=_SCRYPT_MAXMEM, dklen=_DIGEST_BYTES)
    b64 = base64.urlsafe_b64encode
    return f"scrypt${_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        want = base64.urlsafe_b64decode(digest)
        if len(want) != _DIGEST_BYTES:
            return False  # a cut hash would compare a shorter prefix
        got = hashlib.scrypt(password.encode("utf-8"), salt=base64.urlsafe_b64decode(salt), n=int(n), r=int(r),
                             p=int(p), maxmem=_SCRYPT_MAXMEM, dklen=_DIGEST_BYTES)
    except (ValueError, TypeError):
        return False  # a malformed hash (or absurd parameters) never lets anyone in
    return hmac.compare_digest(got, want)


@dataclass(frozen=True)
class CloudLogin:
    username: str
    password: str
    client_id: str


def cloud_password(settings: Settings) -> str:
    """The cloud's broker password: `mqtt_password`, else the 0600 file in the data dir, made at the first start."""
    if settings.mqtt_password is not None:
        return settings.mqtt_password.get_secret_value()
    path = settings.mqtt_password_file
    try:
        return path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise CloudError(f"cannot read the cloud's MQTT password from {path}: {exc}") from None
    password = new_password()
    try:
        atomic_write_text(path, password + "\n", 0o600)  # 0600 from its first byte
    except OSError as exc:
        raise CloudError(f"cannot write the cloud's MQTT password to {path}: {exc}; set mqtt_password") from None
    return password


def cloud_login(settings: Settings) -> CloudLogin:
    return CloudLogin(settings.mqtt_username, cloud_password(settings), settings.mqtt_client_id)


def device_publish_topics(prefix: str, device_id: str) -> tuple[str, str, str]:
    t = device_topics(prefix, device_id)
    return t.reported, t.telemetry, t.status


def device_subscribe_filters(prefix: str, device_id: str) -> tuple[str, str]:
    t = device_topics(prefix, device_id)
    return t.desired, t.ack


def acl_allows(prefix: str, *, cloud_username: str, username: str, action: Action, topic: str) -> bool:
    """THE rule, for the broker that asks in-process (the embedded one); dynsec roles spell out the same topics.

    `topic` is a topic name for "publish" and a filter (wildcards allowed) for "subscribe". A filter is allowed
    only when it is exactly one the login needs: a device subscribing to `#` or to another device's desired
    topic is refused, not narrowed.
    """
    if username == cloud_username:
        if action == "publish":
            where = parse_topic(prefix, topic)
            return where is not None and where[1] in ("desired", "ack")
        return topic in cloud_subscriptions(prefix)
    try:
        allowed = (device_publish_topics(prefix, username) if action == "publish"
                   else device_subscribe_filters(prefix, username))
    except ValueError:  # a username that is no device id owns no topic
        return False
    return topic in allowed


def client_id_allowed(*, cloud: CloudLogin, username: str, client_id: str) -> bool:
    """Each device login is bound to one client id, so no login can take another's (and kick it off the broker).
    The cloud's login may also use `{client_id}-*` (its dynsec control client, an operator's tool): no device id
    is of that form, since every device's client id starts with "edgefleet-agent-"."""
    if username == cloud.username:
        return client_id == cloud.client_id or client_id.startswith(cloud.client_id + "-")
    try:
        return client_id == device_client_id(username)
    except ValueError:
        return False


__all__ = [
    "BrokerAccounts",
    "CloudLogin",
    "acl_allows",
    "client_id_allowed",
    "cloud_login",
    "cloud_password",
    "device_publish_topics",
    "device_subscribe_filters",
    "hash_password",
    "new_password",
    "verify_password",
]
