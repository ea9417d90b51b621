"""Dependencies shared by the routes: the Fleet, and who is calling.

Theory: every route names what it needs in its signature (`FleetDep`, `AdminDep`, `PrincipalDep`) and FastAPI
resolves it; no route reads headers itself. A bearer token is resolved once per request by `Fleet.authenticate`,
which raises `Unauthorized` for an unknown or expired token. The role checks here raise `Forbidden` (403), never
`HTTPException`: the one `CloudError` handler in `app.py` turns both into `ErrorBody` JSON.

Roles: `admin` may do anything; an `enroll` token may only enroll; a `device` token may only read its own desired
state, post its own reported state and telemetry, and download bundles.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel

from edgefleet.cloud.auth import Principal
from edgefleet.cloud.errors import Forbidden, Invalid, Unauthorized
from edgefleet.cloud.services import Fleet

# auto_error=False: a missing header reaches `principal` and becomes our own 401 ErrorBody, not FastAPI's.
_bearer = HTTPBearer(auto_error=False, description="An admin, enrollment or device token.")


def get_fleet(request: Request) -> Fleet:
    fleet: Fleet = request.app.state.fleet
    return fleet


# A parameter with Depends(...) is resolved by calling the dependency; FastAPI never reads its type as a body.
FleetDep = Annotated[Fleet, Depends(get_fleet)]


def bearer_token(header: str | None) -> str:
    """The token of an `Authorization: Bearer <token>` header; `Unauthorized` when there is none."""
    if not header:
        raise Unauthorized("this endpoint needs a token: send 'Authorization: Bearer <token>' "
                           "(the admin token is in admin.token in the cloud's data directory)")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("the Authorization header must be 'Bearer <token>'")
    return token.strip()


def principal(
    request: Request,
    # Read for OpenAPI's "Authorize" button only; the header is parsed by bearer_token.
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    # limits.RequestLimits may have resolved it already, before the body was read; it is asked once per request.
    known = getattr(request.state, "principal", None)
    if isinstance(known, Principal):
        return known
    who = get_fleet(request).authenticate(bearer_token(request.headers.get("authorization")))
    request.state.principal = who
    return who


PrincipalDep = Annotated[Principal, Depends(principal)]


# "an enroll token" would be wrong, and "a admin token": each kind with its article, as the messages say it.
_A_TOKEN = {"admin": "an admin token", "enroll": "an enrollment token", "device": "a device token"}


def _a_token(kind: str) -> str:
    return _A_TOKEN.get(kind, f"a token of kind {kind!r}")


def admin(who: PrincipalDep) -> Principal:
    if who.kind != "admin":
        raise Forbidden(f"this endpoint needs the admin token; {_a_token(who.kind)} may not use it")
    return who


AdminDep = Annotated[Principal, Depends(admin)]


def enrollment(who: PrincipalDep) -> Principal:
    if who.kind != "enroll":
        raise Forbidden(f"enrolling needs an enrollment token, not {_a_token(who.kind)}: "
                        "create one with POST /api/v1/enrollment-tokens (`fleet tokens create`)")
    return who


EnrollDep = Annotated[Principal, Depends(enrollment)]


def device_or_admin(who: PrincipalDep) -> Principal:
    if who.kind not in ("device", "admin"):
        raise Forbidden(f"this endpoint needs a device or admin token; {_a_token(who.kind)} may not use it")
    return who


DeviceOrAdminDep = Annotated[Principal, Depends(device_or_admin)]


def check_own_device(who: Principal, device_id: str, *, admin_allowed: bool = True) -> None:
    """A device token may touch only its own device id; the admin token may read any (where allowed)."""
    if who.kind == "admin" and admin_allowed:
        return
    if who.kind != "device":
        raise Forbidden(f"this endpoint needs the token of device {device_id!r}")
    if who.device_id != device_id:
        raise Forbidden(f"this token belongs to device {who.device_id!r}, not {device_id!r}")


def no_unknown_fields(model: type[BaseModel]) -> Any:
    """Refuse a JSON body with keys `model` does not have.

    The `protos.api` request views ignore extra keys (so an older cloud accepts a newer CLI's additions); at the
    API edge a misspelt key (`ttl` for `ttl_s`) must not silently fall back to a default.
    """
    known = set(model.model_fields)

    async def check(request: Request) -> None:
        try:
            data = json.loads(await request.body())  # cached by Starlette: FastAPI already read it
        except ValueError:
            return  # not JSON: FastAPI's own validation says so
        if isinstance(data, dict) and (unknown := sorted(set(data) - known)):
            raise Invalid(f"body.{unknown[0]}: unknown field; the fields are {', '.join(sorted(known))}",
                          detail={"unknown_fields": unknown[:20]})

    return Depends(check)
