"""cloud/enrollment.py and the Fleet's enrollment, reset and token lifecycle, on SQLite and PostgreSQL, with the
agent's real device key (edge_agent/identity.py): an enrolled id is re-enrolled only by its own key or after an
operator's reset; a copied config is refused, recorded and counted, and the real device keeps working."""

from __future__ import annotations

import base64
import os
import stat
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from edgefleet.cloud.enrollment import PROOF_WINDOW_S, Enrolled, EnrollmentRefused, refusal, verify_proof
from edgefleet.cloud.errors import Conflict, NotFound, Unauthorized
from edgefleet.cloud.services import Fleet
from edgefleet.edge_agent.identity import KEY_FILE, DeviceKey
from edgefleet.protos.api import EnrollmentTokenRequest, TokenExpiryRequest
from edgefleet.protos.messages import EnrollProof, EnrollRequest
from tests.cloud.test_services import make_settings

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)


def now() -> datetime:
    return datetime.now(timezone.utc)


@pytest.fixture
def fleet(tmp_path: Path, db_url: str) -> Fleet:
    f = Fleet.from_settings(make_settings(tmp_path, db_url))
    yield f
    f.close()


def request(key: DeviceKey | None, device_id: str = "pi-1", at: datetime | None = None, *, cls: str = "rpi4",
            sign: bool = True) -> EnrollRequest:
    if key is None:
        return EnrollRequest(device_id=device_id, device_class=cls)
    proof = key.proof(device_id, cls, at or now()) if sign else None
    return EnrollRequest(device_id=device_id, device_class=cls, public_key=key.public_key, proof=proof)


# -- the device key ------------------------------------------------------------------------------------------------


def test_the_device_key_is_made_once_0600_and_reloaded(tmp_path):
    first = DeviceKey.load_or_create(tmp_path)
    path = tmp_path / KEY_FILE
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert DeviceKey.load_or_create(tmp_path).public_key == first.public_key
    assert len(base64.b64decode(first.public_key)) == 32
    assert DeviceKey.load_or_create(tmp_path / "other").public_key != first.public_key


def test_a_proof_verifies_only_for_its_own_key_and_fields(tmp_path):
    key, other = DeviceKey.load_or_create(tmp_path / "a"), DeviceKey.load_or_create(tmp_path / "b")
    good = request(key, at=NOW)
    assert verify_proof(key.public_key, good)
    assert not verify_proof(other.public_key, good)
    assert not verify_proof(key.public_key, good.model_copy(update={"device_id": "pi-2"}))
    assert not verify_proof(key.public_key, good.model_copy(update={"device_class": "rpi5"}))
    moved = good.model_copy(update={"proof": EnrollProof(signed_at=NOW + timedelta(seconds=1),
                                                         signature=good.proof.signature)})
    assert not verify_proof(key.public_key, moved)
    assert not verify_proof(key.public_key, request(None))


# -- the rule, as a table --------------------------------------------------------------------------------------------


def _table(tmp_path):
    key, other = DeviceKey.load_or_create(tmp_path / "a"), DeviceKey.load_or_create(tmp_path / "b")
    registered = Enrolled("rpi4", key.public_key, NOW - timedelta(hours=1), reset=False)
    window = timedelta(seconds=PROOF_WINDOW_S + 1)
    return [
        ("own key, fresh proof", registered, request(key, at=NOW), None),
        ("own key, proof within the window", registered, request(key, at=NOW - timedelta(minutes=5)), None),
        ("after a reset, any key", Enrolled("rpi4", None, None, reset=True), request(other, at=NOW), None),
        ("after a reset, even no key", Enrolled("rpi4", None, None, reset=True), request(None), None),
        ("copied config: another key", registered, request(other, at=NOW), "another device key"),
        ("own key, no proof", registered, request(key, sign=False), "not signed"),
        ("older agent, no key", registered, request(None), "another device key"),
        ("legacy row without a key", Enrolled("rpi4", None, None, reset=False), request(key, at=NOW),
         "without a device key"),
        ("proof from the past", registered, request(key, at=NOW - window), "from the cloud's clock"),
        ("proof from the future", registered, request(key, at=NOW + window), "from the cloud's clock"),
        ("replayed proof", Enrolled("rpi4", key.public_key, NOW, reset=False), request(key, at=NOW), "replayed"),
        ("signature of another key", registered,
         request(key, at=NOW).model_copy(update={"proof": other.proof("pi-1", "rpi4", NOW)}), "not signed"),
    ]


def test_the_rule_table(tmp_path):
    for name, existing, req, expected in _table(tmp_path):
        got = refusal(existing, req, NOW)
        if expected is None:
            assert got is None, f"{name}: refused ({got})"
        else:
            assert got is not None and expected in got, f"{name}: {got!r}"


# -- the Fleet, on both databases -------------------------------------------------------------------------------------


def test_first_enrollment_registers_the_key_and_only_it_re_enrolls(fleet, tmp_path):
    key = DeviceKey.load_or_create(tmp_path / "agent")
    first = fleet.enroll(request(key))
    view = fleet.get_device("pi-1")
    assert view.has_device_key and view.enrollments_refused == 0
    again = fleet.enroll(request(key))  # the same agent after losing state.json: its key proves it
    with pytest.raises(Unauthorized):
        fleet.authenticate(first.device_token)
    assert fleet.authenticate(again.device_token).device_id == "pi-1"
    assert fleet.stats().counters["devices_reenrolled"] == 1


def test_a_copied_config_is_refused_recorded_and_the_device_keeps_working(fleet, tmp_path):
    real = fleet.enroll(request(DeviceKey.load_or_create(tmp_path / "real")))
    copy = DeviceKey.load_or_create(tmp_path / "copy")  # the same config, another data dir: another key
    for _ in range(2):
        with pytest.raises(EnrollmentRefused, match="another device key.*fleet devices reset pi-1"):
            fleet.enroll(request(copy))
    assert fleet.authenticate(real.device_token).device_id == "pi-1"  # not revoked
    view = fleet.get_device("pi-1")
    assert view.enrollments_refused == 2 and "another device key" in view.last_refused_reason
    assert view.last_refused_at is not None
    assert fleet.stats().counters["enrollments_refused"] == 2
    assert "devices_reenrolled" not in fleet.stats().counters
    assert issubclass(EnrollmentRefused, Conflict) and EnrollmentRefused.status_code == 409


def test_a_recorded_request_cannot_be_replayed(fleet, tmp_path):
    key = DeviceKey.load_or_create(tmp_path / "agent")
    fleet.enroll(request(key))
    recorded = request(key)
    fleet.enroll(recorded)
    with pytest.raises(EnrollmentRefused, match="replayed"):
        fleet.enroll(recorded)


def test_reset_lets_a_reinstalled_device_enroll_with_a_new_key(fleet, tmp_path):
    old = fleet.enroll(request(DeviceKey.load_or_create(tmp_path / "old-sd-card")))
    new_key = DeviceKey.load_or_create(tmp_path / "new-sd-card")
    with pytest.raises(EnrollmentRefused):
        fleet.enroll(request(new_key))
    view = fleet.reset_device("pi-1")
    assert view.reset_pending and not view.has_device_key
    with pytest.raises(Unauthorized):  # the reset cut the old token off at once
        fleet.authenticate(old.device_token)
    fresh = fleet.enroll(request(new_key))
    assert fleet.authenticate(fresh.device_token).device_id == "pi-1"
    view = fleet.get_device("pi-1")
    assert view.has_device_key and not view.reset_pending
    with pytest.raises(EnrollmentRefused):  # the old key is no longer this device's
        fleet.enroll(request(DeviceKey.load_or_create(tmp_path / "old-sd-card")))
    with pytest.raises(NotFound):
        fleet.reset_device("no-such-device")


def test_a_device_enrolled_without_a_key_re_enrolls_only_after_a_reset(fleet, tmp_path):
    fleet.enroll(request(None))  # an agent from before device keys
    key = DeviceKey.load_or_create(tmp_path / "agent")
    with pytest.raises(EnrollmentRefused, match="without a device key"):
        fleet.enroll(request(key))
    fleet.reset_device("pi-1")
    fleet.enroll(request(key))
    assert fleet.get_device("pi-1").has_device_key


# -- tokens: list, revoke, expire --------------------------------------------------------------------------------------


def test_tokens_are_listed_without_secrets_and_revoked_at_once(fleet, tmp_path):
    admin = fleet.ensure_admin_token()
    enroll_tok = fleet.create_enrollment_token(EnrollmentTokenRequest(note="lab"))
    device = fleet.enroll(request(DeviceKey.load_or_create(tmp_path / "agent")))
    tokens = fleet.list_tokens()
    assert sorted(t.kind for t in tokens) == ["admin", "device", "enroll"]
    dumped = "".join(t.model_dump_json() for t in tokens)
    for secret in (admin, enroll_tok.token, device.device_token):
        assert secret not in dumped
    assert [t.id for t in fleet.list_tokens("enroll")] == [enroll_tok.id]

    fleet.revoke_token(enroll_tok.id)
    with pytest.raises(Unauthorized):
        fleet.authenticate(enroll_tok.token)
    (device_row,) = fleet.list_tokens("device")
    fleet.revoke_token(device_row.id)
    with pytest.raises(Unauthorized):
        fleet.authenticate(device.device_token)
    login = fleet.store.get_mqtt_credential("pi-1")
    assert login is None or login.revoked_at is not None  # the broker login went with it
    (admin_row,) = fleet.list_tokens("admin")
    with pytest.raises(Conflict, match="admin token cannot be revoked"):
        fleet.revoke_token(admin_row.id)
    with pytest.raises(NotFound):
        fleet.revoke_token(999_999)
    assert fleet.authenticate(admin).kind == "admin"


def test_a_token_can_be_given_an_expiry(fleet):
    tok = fleet.create_enrollment_token(EnrollmentTokenRequest(note="lab", ttl_s=7 * 24 * 3600))
    view = fleet.expire_token(tok.id, TokenExpiryRequest(ttl_s=60))
    assert timedelta(seconds=50) < view.expires_at - now() <= timedelta(seconds=60) and not view.expired
    fleet.store.set_token_expiry(tok.id, now() - timedelta(seconds=1))
    assert [t.expired for t in fleet.list_tokens("enroll")] == [True]
    with pytest.raises(Unauthorized, match="expired"):
        fleet.authenticate(tok.token)
