"""Who may act as what, in the `Fleet` facade: bearer tokens, enrollment, device resets. Mixed into `Fleet`.

Theory: tokens are made with `secrets` and stored as sha256 hashes (`cloud/auth.py`); a revoked one is deleted, so
it fails from the next request on. Enrollment creates a device id or re-enrolls one when `cloud/enrollment.py`
admits the request (the device's own key, or the first request after an operator's reset); every enrollment
rotates the device token and the broker login (`services_broker.py`). A refusal is recorded on the device and
counted before it reaches the caller.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING

from edgefleet.cloud import auth
from edgefleet.cloud.auth import Principal
from edgefleet.cloud.enrollment import EnrollmentRefused
from edgefleet.cloud.enrollment import refusal as enrollment_refusal
from edgefleet.cloud.errors import Conflict, NotFound
from edgefleet.protos.api import DeviceView, EnrollmentTokenRequest, EnrollmentTokenView, TokenExpiryRequest, TokenView
from edgefleet.protos.messages import BrokerInfo, DeviceClassInfo, EnrollRequest, EnrollResponse, SignedDesiredState

if TYPE_CHECKING:
    from edgefleet.cloud.settings import Settings
    from edgefleet.cloud.store import Store
    from edgefleet.cloud.trust import DesiredStateSigner, TufRepository

log = logging.getLogger(__name__)


def _now() -> datetime:
    return datetime.now(timezone.utc)


class IdentityFacade:
    """Needs `settings`, `store`, `tuf`, `signer`, `count()`, `_class()`, `_resign()`, `get_device()` and the broker
    login methods from `Fleet`."""

    if TYPE_CHECKING:
        settings: Settings
        store: Store
        tuf: TufRepository
        signer: DesiredStateSigner

        def count(self, name: str, by: int = 1) -> None: ...
        def _class(self, name: str) -> DeviceClassInfo: ...
        def _resign(self, device_id: str) -> SignedDesiredState: ...
        def get_device(self, device_id: str) -> DeviceView: ...
        def _broker_info(self, device_id: str) -> BrokerInfo: ...
        def _revoke_mqtt_login(self, device_id: str) -> None: ...

    # ------------------------------------------------------------------------------------------------ tokens

    def ensure_admin_token(self) -> str | None:
        return auth.ensure_admin_token(self.store, self.settings.admin_token_file)

    def authenticate(self, token: str | None) -> Principal:
        return auth.authenticate(self.store, token)

    def create_enrollment_token(self, req: EnrollmentTokenRequest) -> EnrollmentTokenView:
        token, expires_at = auth.issue_token(self.store, "enroll", ttl_s=req.ttl_s, note=req.note)
        assert expires_at is not None
        return EnrollmentTokenView(token=token, expires_at=expires_at, note=req.note,
                                   id=self.store.token_id(auth.hash_token(token)))

    def list_tokens(self, kind: str | None = None) -> list[TokenView]:
        now = _now()
        return [TokenView(id=t.id, kind=t.kind, device_id=t.device_id, note=t.note, created_at=t.created_at,
                          expires_at=t.expires_at, expired=t.expires_at is not None and t.expires_at <= now)
                for t in self.store.list_tokens(kind)]

    def _token(self, token_id: int) -> TokenView:
        for view in self.list_tokens():
            if view.id == token_id:
                return view
        raise NotFound(f"no token {token_id}; `fleet tokens list` shows their ids")

    def revoke_token(self, token_id: int) -> TokenView:
        """The token stops working at once. A device token's broker login goes with it: the device is off HTTP and
        MQTT until it is reset and enrolls again. The admin token cannot be revoked here (no one could sign in)."""
        view = self._token(token_id)
        if view.kind == "admin":
            raise Conflict("the admin token cannot be revoked through the API: no admin could sign in afterwards")
        self.store.delete_token(token_id)
        if view.kind == "device" and view.device_id is not None:
            self._revoke_mqtt_login(view.device_id)  # the broker drops its live connection too
            self.store.set_online(view.device_id, False, _now())
        self.count("tokens_revoked")
        log.info("revoked %s token %d%s", view.kind, token_id, f" of {view.device_id}" if view.device_id else "")
        return view

    def expire_token(self, token_id: int, req: TokenExpiryRequest) -> TokenView:
        """Give an enrollment or device token (new) expiry: `ttl_s` from now."""
        view = self._token(token_id)
        if view.kind == "admin":
            raise Conflict("the admin token does not expire; keep it secret instead")
        self.store.set_token_expiry(token_id, _now() + timedelta(seconds=req.ttl_s))
        return self._token(token_id)

    # ------------------------------------------------------------------------------------------------ enrollment

    def enroll(self, req: EnrollRequest, enrolled_by: str | None = None) -> EnrollResponse:
        """Enroll a new device id, or re-enroll an existing one of the same class when `cloud/enrollment.py`
        admits it: a request signed by the device's registered key, or the first one after `reset_device`. Its device
        token is then rotated (the old one stops working) and the device keeps its generation, deployments and
        telemetry. A refusal is recorded on the device, logged and counted, and raised as EnrollmentRefused (409).
        `enrolled_by` is the hash of the enrollment token used, kept for the record."""
        cls = self._class(req.device_class)
        if req.device_id == self.settings.mqtt_username:  # checked before any row exists for the id
            raise Conflict(f"device id {req.device_id!r} is the cloud's own MQTT login: give this device another id")
        token = auth.new_token("device")
        now = _now()
        try:
            _, created = self.store.enroll_device(
                req.device_id, cls.name, dict(req.labels), req.agent_version, auth.hash_token(token), now,
                enrolled_by=enrolled_by, public_key=req.public_key,
                proof_at=req.proof.signed_at if req.proof is not None else None,
                admit=lambda existing: enrollment_refusal(existing, req, now))
        except EnrollmentRefused as exc:
            self.count("enrollments_refused")
            log.warning("refused an enrollment of %s: %s", req.device_id, exc.message)
            raise
        self.count("devices_enrolled" if created else "devices_reenrolled")
        self._resign(req.device_id)
        s = self.settings
        return EnrollResponse(
            device_id=req.device_id,
            device_token=token,
            device_class=cls,
            broker=self._broker_info(req.device_id),
            tuf_root=self.tuf.root(),
            tuf_metadata_url=f"{s.public_url}/tuf/metadata/",
            tuf_targets_url=f"{s.public_url}/tuf/targets/",
            desired_state_keys=self.signer.public_keys(),
            desired_state_url=f"{s.public_url}/api/v1/devices/{req.device_id}/desired",
        )

    def reset_device(self, device_id: str) -> DeviceView:
        """The operator's word that the device was reinstalled (a wiped SD card, a new board): its key is forgotten
        and its device token and broker login stop working at once; its next enrollment, with any valid enrollment
        token, registers the key it brings. Deployments, generation and telemetry stay."""
        now = _now()
        if self.store.reset_device(device_id, now) is None:
            raise NotFound(f"no device {device_id!r}; `fleet devices` lists the enrolled ones")
        self._revoke_mqtt_login(device_id)  # the broker drops its live connection too
        self.store.set_online(device_id, False, now)
        self.count("devices_reset")
        log.info("device %s reset by an operator: it may enroll again with a new key", device_id)
        return self.get_device(device_id)


__all__ = ["IdentityFacade"]
