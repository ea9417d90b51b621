"""Who may enroll a device id: the decision, pure, apart from the store that applies it.

Theory of operation. An enrollment token lets its holder enroll NEW device ids; it never, on its own, re-enrolls an
id that is already enrolled (a copied agent config would take the device over: its token revoked, its broker login
rotated, every later deploy failing with 401). An existing id is re-enrolled only when:

- the request is signed by the device's own key, registered at its first enrollment (`EnrollRequest.public_key`,
  made by the agent at its first start, `edge_agent/identity.py`): the same key, a valid ed25519 signature over
  `enroll_proof_bytes`, and a `signed_at` newer than the last accepted proof and within `PROOF_WINDOW_S` of the
  cloud's clock, so a recorded request cannot be replayed; or
- an operator reset the device (`fleet devices reset ID`, after a wiped SD card): the next enrollment registers the
  key it brings, whatever it is.

Anything else is refused with `EnrollmentRefused` (409), which the store records on the device (count, time,
reason) before the refusal reaches the caller, so `fleet devices show` tells the operator someone tried.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edgefleet.cloud.errors import Conflict
from edgefleet.protos.messages import EnrollRequest, enroll_proof_bytes

# A device's clock may be off by minutes (no RTC on a Raspberry Pi until NTP syncs); a replay needs a recording newer
# than the last accepted proof anyway, so the window only bounds how long a captured request stays useful.
PROOF_WINDOW_S = 600


class EnrollmentRefused(Conflict):
    code = "enrollment_refused"


@dataclass(frozen=True)
class Enrolled:
    """What the decision needs to know of an existing device row."""

    device_class: str
    public_key: str | None
    last_proof_at: datetime | None
    reset: bool  # an operator reset it: the next enrollment is accepted and registers its key


def verify_proof(public_key: str, req: EnrollRequest) -> bool:
    if req.proof is None:
        return False
    try:
        key = Ed25519PublicKey.from_public_bytes(base64.b64decode(public_key, validate=True))
        key.verify(base64.b64decode(req.proof.signature, validate=True),
                   enroll_proof_bytes(req.device_id, req.device_class, public_key, req.proof.signed_at))
    except (InvalidSignature, ValueError):
        return False
    return True


def refusal(existing: Enrolled, req: EnrollRequest, now: datetime) -> str | None:
    """None when `req` may re-enroll the existing device; else the reason it may not, one line for the operator."""
    if existing.reset:
        return None
    if existing.public_key is None:
        return ("the device was enrolled without a device key (an older agent); run `fleet devices reset "
                f"{req.device_id}` to let it enroll again")
    if req.public_key != existing.public_key:
        return ("the request carries another device key than the one registered for this id: a copied config, or "
                f"a reinstalled device; for a reinstall run `fleet devices reset {req.device_id}`, else give the new "
                "agent a device_id of its own")
    if req.proof is None or not verify_proof(existing.public_key, req):
        return "the request is not signed by the device's registered key"
    signed_at = req.proof.signed_at
    if abs(signed_at - now) > timedelta(seconds=PROOF_WINDOW_S):
        return (f"the proof is dated {signed_at.isoformat()}, more than {PROOF_WINDOW_S} s from the cloud's clock; "
                "check the device's clock (NTP)")
    if existing.last_proof_at is not None and signed_at <= existing.last_proof_at:
        return "the proof is not newer than the last accepted one (a replayed request)"
    return None


__all__ = ["PROOF_WINDOW_S", "Enrolled", "EnrollmentRefused", "refusal", "verify_proof"]
