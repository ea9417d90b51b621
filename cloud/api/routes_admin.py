"""Admin routes for operating the fleet: enrollment tokens, the desired-against-reported status table, counters.

Counters (`/stats`) are what a person checks when something looks wrong: malformed MQTT messages, ingest errors,
refused documents. They come from the `Fleet`, which the MQTT bridge and the routes both count into.
"""

from __future__ import annotations

from fastapi import APIRouter

from edgefleet.cloud.api.deps import AdminDep, FleetDep, no_unknown_fields
from edgefleet.protos.api import DeviceStatusRow, EnrollmentTokenRequest, EnrollmentTokenView, StatsView

router = APIRouter(tags=["admin"])


@router.post("/enrollment-tokens", response_model=EnrollmentTokenView, status_code=201)
def create_enrollment_token(req: EnrollmentTokenRequest, fleet: FleetDep, who: AdminDep,
                            _strict: None = no_unknown_fields(EnrollmentTokenRequest)) -> EnrollmentTokenView:
    """A token devices enroll with; shown once, valid for `ttl_s` seconds."""
    return fleet.create_enrollment_token(req)


@router.get("/status", response_model=list[DeviceStatusRow])
def status(fleet: FleetDep, who: AdminDep) -> list[DeviceStatusRow]:
    """One row per device and model: desired against reported, with the latest latency and energy."""
    return fleet.status()


@router.get("/stats", response_model=StatsView)
def stats(fleet: FleetDep, who: AdminDep) -> StatsView:
    return fleet.stats()
