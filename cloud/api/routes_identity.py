"""Admin routes for who may act as what: bearer tokens (list, revoke, expire) and device resets.

A revoked token stops working on the next request; a revoked device token also takes the device's broker login
with it. A device reset lets a reinstalled device enroll again with a new key (`cloud/enrollment.py`).
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query

from edgefleet.cloud.api.deps import AdminDep, FleetDep, no_unknown_fields
from edgefleet.cloud.api.handlers import error_responses
from edgefleet.protos.api import DeviceView, TokenExpiryRequest, TokenView

router = APIRouter(tags=["identity"])
# Token ids are 32-bit integers in the database.
TokenId = Annotated[int, Path(ge=1, le=2**31 - 1, description="The token's id, from GET /api/v1/tokens.")]


@router.get("/tokens", response_model=list[TokenView])
def list_tokens(fleet: FleetDep, who: AdminDep,
                kind: Annotated[Literal["admin", "enroll", "device"] | None, Query()] = None) -> list[TokenView]:
    """Every bearer token: its id, kind, device, note and expiry (never the token or its hash)."""
    return fleet.list_tokens(kind)


@router.delete("/tokens/{token_id}", response_model=TokenView, responses=error_responses(404, 409))
def revoke_token(token_id: TokenId, fleet: FleetDep, who: AdminDep) -> TokenView:
    """Revoke a token at once. For a device token, the device's broker login is revoked too."""
    return fleet.revoke_token(token_id)


@router.patch("/tokens/{token_id}", response_model=TokenView, responses=error_responses(404, 409))
def expire_token(token_id: TokenId, req: TokenExpiryRequest, fleet: FleetDep, who: AdminDep,
                 _strict: None = no_unknown_fields(TokenExpiryRequest)) -> TokenView:
    """Set a token's expiry to `ttl_s` seconds from now."""
    return fleet.expire_token(token_id, req)


@router.post("/devices/{device_id}/reset", response_model=DeviceView, responses=error_responses(404))
def reset_device(device_id: Annotated[str, Path(max_length=128)], fleet: FleetDep, who: AdminDep) -> DeviceView:
    """A reinstalled device: forget its key and revoke its token and broker login; its next enrollment registers
    the key it brings."""
    return fleet.reset_device(device_id)
