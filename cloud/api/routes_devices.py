"""Device routes: enrollment, the desired state over HTTP, the HTTP fallback for reported state and telemetry,
and the admin's view of devices.

A device token reaches only its own id: `check_own_device` compares the path, and the body's `device_id` must match
the path too, so one device can neither read nor write as another. The desired state is answered with the exact
bytes of `SignedDesiredState.to_wire()`, the same bytes the MQTT bridge publishes, so a verifier sees one form.
"""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.concurrency import run_in_threadpool

from edgefleet.cloud.api.deps import AdminDep, DeviceOrAdminDep, EnrollDep, FleetDep, check_own_device
from edgefleet.cloud.errors import Invalid
from edgefleet.protos.api import DeviceView
from edgefleet.protos.messages import (
    EnrollRequest,
    EnrollResponse,
    ReportedState,
    SignedDesiredState,
    TelemetryBatch,
    check_device_id,
)

router = APIRouter(tags=["devices"])


def _device_id(device_id: str) -> str:
    try:
        return check_device_id(device_id)
    except ValueError as exc:
        raise Invalid(str(exc)) from None


def _same_device(path_id: str, body_id: str) -> None:
    if path_id != body_id:
        raise Invalid(f"body device_id {body_id!r} does not match the URL's device {path_id!r}")


@router.post("/enroll", response_model=EnrollResponse,
             responses={409: {"description": "The device id is taken by another enrollment"}})
def enroll(req: EnrollRequest, fleet: FleetDep, who: EnrollDep) -> EnrollResponse:
    """Enroll a device with an enrollment token; the answer holds its device token (shown once) and trust roots."""
    return fleet.enroll(req, enrolled_by=who.token_hash)


@router.get("/devices/{device_id}/desired", response_model=SignedDesiredState)
async def desired(device_id: str, fleet: FleetDep, who: DeviceOrAdminDep) -> Response:
    """The device's current signed desired state (that device's token, or the admin's)."""
    check_own_device(who, _device_id(device_id))
    doc = await run_in_threadpool(fleet.desired_state, device_id)
    return Response(doc.to_wire(), media_type="application/json", headers={"Cache-Control": "no-store"})


@router.post("/devices/{device_id}/reported", status_code=204)
def reported(device_id: str, msg: ReportedState, fleet: FleetDep, who: DeviceOrAdminDep) -> Response:
    """HTTP fallback for the reported-state MQTT message (the device's own token only)."""
    check_own_device(who, _device_id(device_id), admin_allowed=False)
    _same_device(device_id, msg.device_id)
    fleet.record_reported(msg)
    return Response(status_code=204)


@router.post("/devices/{device_id}/telemetry", status_code=204)
def telemetry(device_id: str, msg: TelemetryBatch, fleet: FleetDep, who: DeviceOrAdminDep) -> Response:
    """HTTP fallback for a telemetry batch (the device's own token only); a seq already stored is ignored."""
    check_own_device(who, _device_id(device_id), admin_allowed=False)
    _same_device(device_id, msg.device_id)
    fleet.record_telemetry(msg)
    return Response(status_code=204)


@router.get("/devices", response_model=list[DeviceView])
def list_devices(fleet: FleetDep, who: AdminDep) -> list[DeviceView]:
    return fleet.list_devices()


@router.get("/devices/{device_id}", response_model=DeviceView)
def get_device(device_id: str, fleet: FleetDep, who: AdminDep) -> DeviceView:
    return fleet.get_device(_device_id(device_id))
