"""cloud/mqtt_accounts.py: the ACL rule and the client-id binding, table-driven; password hashing; the cloud's own
login kept 0600 in the data dir. And cloud/dynsec.py's role for a device spells out the same topics."""

from __future__ import annotations

import pytest

from edgefleet.cloud.dynsec import cloud_role_acls, device_role_acls
from edgefleet.cloud.mqtt_accounts import (
    CloudLogin,
    acl_allows,
    client_id_allowed,
    cloud_login,
    hash_password,
    new_password,
    verify_password,
)
from edgefleet.cloud.settings import Settings

P = "edgefleet"
CLOUD = CloudLogin("edgefleet-cloud", "s3cret", "edgefleet-cloud")


@pytest.mark.parametrize(("username", "action", "topic", "allowed"), [
    # a device: its own three channels out, its own desired in, nothing else
    ("dev-a", "publish", "edgefleet/devices/dev-a/reported", True),
    ("dev-a", "publish", "edgefleet/devices/dev-a/telemetry", True),
    ("dev-a", "publish", "edgefleet/devices/dev-a/status", True),
    ("dev-a", "publish", "edgefleet/devices/dev-a/desired", False),  # only the cloud signs and sends those
    ("dev-a", "publish", "edgefleet/devices/dev-b/reported", False),
    ("dev-a", "publish", "edgefleet/devices/dev-b/telemetry", False),
    ("dev-a", "publish", "edgefleet/devices/dev-b/status", False),
    ("dev-a", "publish", "other/devices/dev-a/reported", False),
    ("dev-a", "subscribe", "edgefleet/devices/dev-a/desired", True),
    ("dev-a", "subscribe", "edgefleet/devices/dev-b/desired", False),
    ("dev-a", "subscribe", "edgefleet/devices/+/desired", False),
    ("dev-a", "subscribe", "edgefleet/devices/dev-a/#", False),
    ("dev-a", "subscribe", "#", False),
    ("dev-a", "subscribe", "edgefleet/devices/dev-a/reported", False),
    ("not a device id", "publish", "edgefleet/devices/not a device id/reported", False),
    # the cloud: desired states out, the devices' channels in
    ("edgefleet-cloud", "publish", "edgefleet/devices/dev-a/desired", True),
    ("edgefleet-cloud", "publish", "edgefleet/devices/dev-a/reported", False),
    ("edgefleet-cloud", "subscribe", "edgefleet/devices/+/reported", True),
    ("edgefleet-cloud", "subscribe", "edgefleet/devices/+/telemetry", True),
    ("edgefleet-cloud", "subscribe", "edgefleet/devices/+/status", True),
    ("edgefleet-cloud", "subscribe", "#", False),
])
def test_acl(username, action, topic, allowed):
    assert acl_allows(P, cloud_username=CLOUD.username, username=username, action=action, topic=topic) is allowed


@pytest.mark.parametrize(("username", "client_id", "allowed"), [
    ("dev-a", "edgefleet-agent-dev-a", True),
    ("dev-a", "edgefleet-agent-dev-b", False),
    ("dev-a", "edgefleet-cloud", False),
    ("dev-a", "dev-a", False),
    ("edgefleet-cloud", "edgefleet-cloud", True),
    ("edgefleet-cloud", "edgefleet-cloud-dynsec-1a2b", True),
    ("edgefleet-cloud", "edgefleet-agent-dev-a", False),
    ("bad id!", "edgefleet-agent-bad id!", False),
])
def test_each_login_is_bound_to_its_client_id(username, client_id, allowed):
    assert client_id_allowed(cloud=CLOUD, username=username, client_id=client_id) is allowed


def test_passwords_are_random_and_only_a_salted_hash_is_kept():
    a, b = new_password(), new_password()
    assert a != b and len(a) >= 43  # 32 random bytes
    h1, h2 = hash_password(a), hash_password(a)
    assert h1 != h2 and a not in h1  # salted
    assert verify_password(a, h1) and verify_password(a, h2)
    assert not verify_password(b, h1)
    for broken in ("", "scrypt$1$2", "md5$x$y$z$a$b", "scrypt$x$8$1$AAAA$AAAA", h1[:-4]):
        assert not verify_password(a, broken)


def test_the_clouds_login_is_made_once_and_kept_0600(tmp_path):
    s = Settings(data_dir=tmp_path / "data")
    s.data_dir.mkdir()
    first = cloud_login(s)
    assert first.username == "edgefleet-cloud" and first.client_id == "edgefleet-cloud" and first.password
    assert oct(s.mqtt_password_file.stat().st_mode & 0o777) == "0o600"
    assert cloud_login(s).password == first.password  # a restart keeps it
    assert cloud_login(Settings(data_dir=tmp_path / "data", mqtt_password="given")).password == "given"


def test_the_clouds_client_id_cannot_look_like_a_devices():
    from edgefleet.cloud.errors import Invalid

    with pytest.raises(Invalid, match="mqtt_client_id"):
        Settings(mqtt_client_id="edgefleet-agent-x")


def test_dynsec_roles_grant_what_the_acl_grants():
    acls = device_role_acls(P, "dev-a")
    sends = {a["topic"] for a in acls if a["acltype"] == "publishClientSend"}
    subscribes = {a["topic"] for a in acls if a["acltype"] == "subscribeLiteral"}
    assert all(a["allow"] for a in acls)
    assert sends == {f"{P}/devices/dev-a/{c}" for c in ("reported", "telemetry", "status")}
    assert subscribes == {f"{P}/devices/dev-a/desired", f"{P}/devices/dev-a/ack"}
    cloud_sends = {a["topic"] for a in cloud_role_acls(P) if a["acltype"] == "publishClientSend"}
    assert cloud_sends == {f"{P}/devices/+/desired", f"{P}/devices/+/ack"}
