"""Device accounts on Mosquitto through its dynamic security plugin: `DynsecAccounts`, a `BrokerAccounts`.

Theory: Mosquitto 2's dynamic security plugin keeps clients (username, password, optional bound client id) and
roles (ACL lists) and is administered over MQTT: JSON `{"commands": [...]}` published to
`$CONTROL/dynamic-security/v1`, answered on `.../v1/response`, each answer carrying the command's `correlationData`.
So the cloud provisions any Mosquitto 2 it can log in to as a dynsec admin: the one it runs itself
(`MosquittoProcess`) or an operator's.

Mosquitto 2.0 does not substitute `%u`/`%c` in dynsec ACL topics (checked on 2.0.11: a role with
`edgefleet/devices/%u/reported` denies the device its own topic), so each device gets a role of its own,
`edgefleet-device-{id}`, with its literal topics. Its client is bound to `edgefleet-agent-{id}`: Mosquitto refuses
that login with any other client id, and authenticates before it drops an older session of the same id, so no
login can kick another device or the cloud. `setClientPassword`, `disableClient` and `deleteClient` drop the
client's live connection at once (also checked on 2.0.11), which is what rotation and revocation rely on.

The cloud only ever changes clients that carry an `edgefleet-device-*` role: an account that edgefleet did not make
(the operator's admin, say) is never given a new password, whatever device id someone enrolls as.

On every (re)connect the control client makes sure the cloud's own login has the role it needs to publish desired
states (`mosquitto_ctrl dynsec init` makes an admin that may administer, not publish), then calls `on_ready`, so
the bridge can republish what the broker may have refused before.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edgefleet.cloud.errors import CloudError, Conflict, Unavailable
from edgefleet.cloud.mqtt_accounts import CloudLogin, device_publish_topics, device_subscribe_filters
from edgefleet.common.backoff import Backoff
from edgefleet.common.mqtt_client import JitteredClient
from edgefleet.protos.topics import BROKER_DROPPED_TOPIC, cloud_subscriptions, device_client_id

log = logging.getLogger(__name__)

CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC = CONTROL_TOPIC + "/response"
CLOUD_ROLE = "edgefleet-cloud"
DEVICE_ROLE_PREFIX = "edgefleet-device-"


def device_role(device_id: str) -> str:
    return DEVICE_ROLE_PREFIX + device_id


def device_role_acls(prefix: str, device_id: str) -> list[dict[str, Any]]:
    """The device's ACL as dynsec entries: the same topics `acl_allows` grants, nothing else (default deny)."""
    acls = [{"acltype": "publishClientSend", "topic": t, "allow": True}
            for t in device_publish_topics(prefix, device_id)]
    acls += [{"acltype": "subscribeLiteral", "topic": t, "allow": True}
             for t in device_subscribe_filters(prefix, device_id)]
    return acls


def cloud_role_acls(prefix: str) -> list[dict[str, Any]]:
    acls = [{"acltype": "publishClientSend", "topic": f"{prefix}/devices/+/{channel}", "allow": True}
            for channel in ("desired", "ack")]
    for topic in cloud_subscriptions(prefix):
        acls += [{"acltype": "subscribePattern", "topic": topic, "allow": True},
                 {"acltype": "publishClientReceive", "topic": topic, "allow": True}]
    # The broker's drop counter (cloud/mqtt_bridge.py BROKER_DROPPED_TOPIC), read-only.
    acls += [{"acltype": "subscribeLiteral", "topic": BROKER_DROPPED_TOPIC, "allow": True},
             {"acltype": "publishClientReceive", "topic": BROKER_DROPPED_TOPIC, "allow": True}]
    return acls


class DynsecAccounts:
    """A control connection to Mosquitto's dynamic security plugin. `start()`, then `issue`/`revoke`; `stop()`."""

    def __init__(self, host: str, port: int, login: CloudLogin, prefix: str, *, timeout_s: float = 5.0,
                 retry_initial_s: float = 1.0, retry_max_s: float = 30.0, tls: bool = False,
                 keepalive_s: int = 30, on_ready: Callable[[], None] | None = None) -> None:
        self.host, self.port = host, port
        self.login = login
        self.prefix = prefix.rstrip("/")
        self.timeout_s = timeout_s
        self.keepalive_s = keepalive_s
        self.on_ready = on_ready
        self._ready = threading.Event()  # the cloud's role is in place
        self._subscribed = threading.Event()  # answers can arrive
        self._lock = threading.Lock()
        self._pending: dict[str, tuple[threading.Event, list[dict[str, Any]]]] = {}
        self._subscribe_mid: int | None = None
        # Its own client id: the bridge holds the cloud's, and two connections with one id would kick each other
        # (a random part, so several cloud replicas' control clients do not either).
        self._client = JitteredClient(CallbackAPIVersion.VERSION2,
                                      client_id=f"{login.client_id}-dynsec-{uuid.uuid4().hex[:8]}",
                                      clean_session=True, protocol=mqtt.MQTTv311,
                                      backoff=Backoff(retry_initial_s, retry_max_s))
        self._client.username_pw_set(login.username, login.password)
        if tls:
            self._client.tls_set()
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message

    # -- lifecycle -------------------------------------------------------------------------------------------------

    def start(self) -> DynsecAccounts:
        self._client.connect_async(self.host, self.port, keepalive=self.keepalive_s)
        self._client.loop_start()
        return self

    def wait_ready(self, timeout_s: float) -> bool:
        return self._ready.wait(timeout_s)

    def stop(self) -> None:
        self._subscribed.clear()
        self._ready.clear()
        self._client.disconnect()
        self._client.loop_stop()

    # -- BrokerAccounts --------------------------------------------------------------------------------------------

    def issue(self, device_id: str, password: str) -> None:
        role = device_role(device_id)
        existing = self._get_client(device_id)
        if existing is None:
            # A role left by a half-finished revocation is replaced, so its ACL is always today's.
            self._run([{"command": "deleteRole", "rolename": role}], ok_errors=("Role not found",))
            self._run([
                {"command": "createRole", "rolename": role, "acls": device_role_acls(self.prefix, device_id)},
                {"command": "createClient", "username": device_id, "password": password,
                 "clientid": device_client_id(device_id), "roles": [{"rolename": role}],
                 "textname": f"edgefleet device {device_id}"},
            ])
            return
        self._check_ours(device_id, existing)
        # A role made by an older cloud gains today's entries (the ack topic); existing ones answer "already exists".
        self._run([{"command": "addRoleACL", "rolename": role, **acl}
                   for acl in device_role_acls(self.prefix, device_id)])
        # setClientPassword drops the live connection: the old password stops working at once.
        self._run([
            {"command": "setClientId", "username": device_id, "clientid": device_client_id(device_id)},
            {"command": "setClientPassword", "username": device_id, "password": password},
            {"command": "enableClient", "username": device_id},
        ])

    def revoke(self, device_id: str) -> None:
        existing = self._get_client(device_id)
        if existing is not None:
            self._check_ours(device_id, existing)
            self._run([{"command": "deleteClient", "username": device_id}])  # drops its connection at once
        self._run([{"command": "deleteRole", "rolename": device_role(device_id)}], ok_errors=("Role not found",))

    def _upgrade_device_roles(self) -> None:
        """Give every device role today's ACL entries (roles made before the `ack` topic existed lack it); an entry
        already there answers "already exists". Mosquitto drops the clients of a role that changed: those devices
        reconnect once, after an upgrade only."""
        (answer,) = self.request([{"command": "listRoles", "verbose": False, "count": -1, "offset": 0}])
        if answer.get("error"):
            raise Unavailable(f"Mosquitto dynamic security refused listRoles: {answer['error']}")
        commands = []
        for role in answer.get("data", {}).get("roles", []):
            name = role if isinstance(role, str) else role.get("rolename", "")
            device_id = name[len(DEVICE_ROLE_PREFIX):] if name.startswith(DEVICE_ROLE_PREFIX) else ""
            try:
                acls = device_role_acls(self.prefix, device_id) if device_id else []
            except ValueError:  # a role named like ours around an id that is not one: not ours to change
                continue
            commands += [{"command": "addRoleACL", "rolename": name, **acl} for acl in acls]
        for i in range(0, len(commands), 100):  # one control message stays small
            self._run(commands[i:i + 100])

    # -- commands --------------------------------------------------------------------------------------------------

    def _get_client(self, username: str) -> dict[str, Any] | None:
        (answer,) = self.request([{"command": "getClient", "username": username}])
        if answer.get("error") == "Client not found":
            return None
        if answer.get("error"):
            raise Unavailable(f"Mosquitto dynamic security refused getClient {username!r}: {answer['error']}")
        return answer.get("data", {}).get("client", {})

    def _check_ours(self, device_id: str, client: dict[str, Any]) -> None:
        roles = {r.get("rolename") for r in client.get("roles", [])}
        if device_role(device_id) not in roles:
            raise Conflict(
                f"the broker already has an account {device_id!r} that edgefleet did not make (it lacks the role "
                f"{device_role(device_id)!r}): enroll this device under another id, or remove that account with "
                f"mosquitto_ctrl dynsec deleteClient {device_id}"
            )

    def _run(self, commands: list[dict[str, Any]], ok_errors: tuple[str, ...] = ()) -> None:
        for command, answer in zip(commands, self.request(commands), strict=True):
            error = answer.get("error")
            if error and error not in ok_errors and not error.endswith("already exists"):
                raise Unavailable(f"Mosquitto dynamic security refused {command['command']}: {error}")

    def request(self, commands: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Send `commands` in one message; their answers in order. Raises `Unavailable` past `timeout_s`."""
        if not self._subscribed.wait(self.timeout_s):
            raise Unavailable(self._no_answer("cannot reach it"))
        keys = [uuid.uuid4().hex for _ in commands]
        waits = {k: (threading.Event(), []) for k in keys}
        with self._lock:
            self._pending.update(waits)
        try:
            body = {"commands": [{**c, "correlationData": k} for c, k in zip(commands, keys, strict=True)]}
            info = self._client.publish(CONTROL_TOPIC, json.dumps(body), qos=1)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                raise Unavailable(self._no_answer(mqtt.error_string(info.rc)))
            answers = []
            for key in keys:
                event, box = waits[key]
                if not event.wait(self.timeout_s):
                    raise Unavailable(self._no_answer(f"no answer within {self.timeout_s:g} s"))
                answers.append(box[0])
            return answers
        finally:
            with self._lock:
                for k in keys:
                    self._pending.pop(k, None)

    def _no_answer(self, why: str) -> str:
        return (f"the MQTT broker {self.host}:{self.port} did not provision the device login ({why}): check that it "
                f"runs Mosquitto's dynamic security plugin and that {self.login.username!r} is a dynsec admin "
                "(docs/protocol.md, Broker accounts), or set mqtt_auth = \"none\" for an open broker; the agent "
                "retries enrollment by itself")

    def _ensure_cloud_role(self) -> None:
        try:
            self._run([{"command": "createRole", "rolename": CLOUD_ROLE, "acls": cloud_role_acls(self.prefix)}])
            # An older role (another topic prefix) gains today's entries; existing ones answer "already exists".
            self._run([{"command": "addRoleACL", "rolename": CLOUD_ROLE, **acl}
                       for acl in cloud_role_acls(self.prefix)])
            self._upgrade_device_roles()
            me = self._get_client(self.login.username) or {}
            if CLOUD_ROLE not in {r.get("rolename") for r in me.get("roles", [])}:
                # Mosquitto drops a client whose roles change, this one included (2.0.11 answers "Internal error"
                # although the role was added): send it, expect the kick, and check again on the reconnect.
                self._client.publish(CONTROL_TOPIC, json.dumps({"commands": [
                    {"command": "addClientRole", "username": self.login.username, "rolename": CLOUD_ROLE,
                     "priority": 1}]}), qos=1)
                log.info("gave the cloud's MQTT login %r the role %r", self.login.username, CLOUD_ROLE)
                return
        except CloudError as exc:
            log.error("could not give the cloud's MQTT login its role: %s", exc.message)
            return
        self._ready.set()
        log.info("Mosquitto dynamic security ready on %s:%d", self.host, self.port)
        if self.on_ready is not None:
            try:
                self.on_ready()
            except Exception:
                log.exception("the dynamic security on_ready callback failed")

    # -- paho callbacks (network thread) ---------------------------------------------------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            log.warning("MQTT broker %s:%d refused the cloud's dynsec login %r: %s", self.host, self.port,
                        self.login.username, reason_code)
            return
        _rc, self._subscribe_mid = client.subscribe(RESPONSE_TOPIC, qos=1)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: Any, properties: Any) -> None:
        if mid != self._subscribe_mid:
            return
        if any(rc.is_failure for rc in reason_codes):
            log.error("MQTT broker refused the dynamic security response topic to %r: is it a dynsec admin?",
                      self.login.username)
            return
        self._subscribed.set()
        # Commands wait for answers that this very thread reads: set up in a thread of its own.
        threading.Thread(target=self._ensure_cloud_role, name="edgefleet-dynsec-setup", daemon=True).start()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        self._subscribed.clear()
        self._ready.clear()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            answers = json.loads(msg.payload)["responses"]
        except (ValueError, KeyError, TypeError):
            log.warning("unreadable dynamic security answer on %s", msg.topic)
            return
        with self._lock:
            for answer in answers if isinstance(answers, list) else []:
                waiter = self._pending.get(answer.get("correlationData")) if isinstance(answer, dict) else None
                if waiter is not None:
                    waiter[1].append(answer)
                    waiter[0].set()
