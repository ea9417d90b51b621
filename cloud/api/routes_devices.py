"""Device routes: enrollment, the desired state over HTTP, the HTTP fallback for reported state and telemetry,
and the admin's view of devices.

A device token reaches only its own id: `check_own_device` compares the path, and the body's `device_id` must match
the path too, so one device can neither read nor write as another. The desired state is answered with the exact
bytes of `SignedDesiredState.to_wire()`, the same bytes the MQTT bridge publishes, so a verifier sees one form.
The reported-state and telemetry routes parse their bodies with `parse_message` themselves (`_admit`), after the
token check, so a body outside the contract's limits is counted exactly as on MQTT before it is refused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool

from edgefleet.cloud.api.deps import AdminDep, DeviceOrAdminDep, EnrollDep, FleetDep, check_own_device
from edgefleet.cloud.api.handlers import error_responses
from edgefleet.cloud.errors import Invalid, NotFound, RateLimited, Refused, TooLarge
from edgefleet.protos.api import DeviceView
from edgefleet.protos.messages import (
    AgentChannelInfo,
    EnrollRequest,
    EnrollResponse,
    Message,
    MessageError,
    ReportedState,
    SignedDesiredState,
    TelemetryBatch,
    check_device_id,
    parse_message,
)

if TYPE_CHECKING:
    from edgefleet.cloud.services import Fleet

router = APIRouter(tags=["devices"])
M = TypeVar("M", bound=Message)


def _device_id(device_id: str) -> str:
    try:
        return check_device_id(device_id)
    except ValueError as exc:
        raise Invalid(str(exc)) from None


def _same_device(path_id: str, body_id: str) -> None:
    if path_id != body_id:
        raise Invalid(f"body device_id {body_id!r} does not match the URL's device {path_id!r}")


@router.post("/enroll", response_model=EnrollResponse,
             responses=error_responses((409, "The device id is taken by another enrollment")))
def enroll(req: EnrollRequest, fleet: FleetDep, who: EnrollDep) -> EnrollResponse:
    """Enroll a device with an enrollment token; the answer holds its device token (shown once) and trust roots."""
    return fleet.enroll(req, enrolled_by=who.token_hash)


@router.get("/agent-channel", response_model=AgentChannelInfo, responses=error_responses(404))
def agent_channel(fleet: FleetDep, who: DeviceOrAdminDep) -> AgentChannelInfo:
    """Where agents with `transport = "grpc"` connect (host:port, and whether it is TLS), for an agent whose
    `[grpc] target` is empty. 404 while the cloud runs no agent channel."""
    info = fleet.agent_channel
    if info is None:
        raise NotFound("this cloud runs no gRPC agent channel: start it with `edgefleet-cloud serve "
                       "--agent-channel-port PORT`, or give the agent transport = \"mqtt\"")
    return info


@router.get("/devices/{device_id}/desired", response_model=SignedDesiredState, responses=error_responses(404))
async def desired(device_id: str, fleet: FleetDep, who: DeviceOrAdminDep) -> Response:
    """The device's current signed desired state (that device's token, or the admin's)."""
    check_own_device(who, _device_id(device_id))
    doc = await run_in_threadpool(fleet.desired_state, device_id)
    return Response(doc.to_wire(), media_type="application/json", headers={"Cache-Control": "no-store"})


def _json_body(model: type[Message]) -> dict[str, Any]:
    """OpenAPI for a body a route parses itself: the model's JSON schema, its definitions inlined."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return inline(defs[ref.removeprefix("#/$defs/")])
            return {k: inline(v) for k, v in node.items()}
        return [inline(v) for v in node] if isinstance(node, list) else node

    return {"requestBody": {"required": True, "content": {"application/json": {"schema": inline(schema)}}}}


async def _admit(request: Request, fleet: Fleet, channel: str, model: type[M], device_id: str) -> M:
    """A device's body parsed by the contract, as the MQTT bridge does, after the caller checked who it is. One
    outside it is counted (`refused_messages` or `malformed_messages`) and refused whole: 422 naming the field, 413
    past MAX_MESSAGE_BYTES; nothing of it is stored."""
    # The whole body, as FastAPI's own body parsing read it: answering before the client finished sending makes it
    # see a reset connection instead of the 413. How much a request may send at all is the body limit's business.
    raw = await request.body()
    try:
        msg = parse_message(raw, model)
    except MessageError as exc:
        if exc.refused:
            await run_in_threadpool(fleet.count_refused, channel, exc.reason)
        else:
            await run_in_threadpool(fleet.count, "malformed_messages")
        field = f"body.{exc.field}" if exc.field else "body"
        error = TooLarge if exc.reason == "too_large" else Refused if exc.refused else Invalid
        raise error(str(exc), detail={"fields": [{"field": field, "reason": exc.reason}]}) from None
    _same_device(device_id, msg.device_id)
    return msg


@router.post("/devices/{device_id}/reported", status_code=204, openapi_extra=_json_body(ReportedState))
async def reported(device_id: str, request: Request, fleet: FleetDep, who: DeviceOrAdminDep) -> Response:
    """HTTP fallback for the reported-state MQTT message (the device's own token only)."""
    check_own_device(who, _device_id(device_id), admin_allowed=False)
    msg = await _admit(request, fleet, "reported", ReportedState, device_id)
    await run_in_threadpool(fleet.record_reported, msg)
    return Response(status_code=204)


@router.post("/devices/{device_id}/telemetry", status_code=204, openapi_extra=_json_body(TelemetryBatch))
async def telemetry(device_id: str, request: Request, fleet: FleetDep, who: DeviceOrAdminDep) -> Response:
    """HTTP fallback for a telemetry batch (the device's own token only): 204 once stored (or stored before: an
    (epoch, seq) is stored once); 429 past the device's rate, nothing stored."""
    check_own_device(who, _device_id(device_id), admin_allowed=False)
    msg = await _admit(request, fleet, "telemetry", TelemetryBatch, device_id)
    if await run_in_threadpool(fleet.record_telemetry, msg) == "rate_limited":
        raise RateLimited(f"device {msg.device_id!r} sent more than its telemetry rate "
                          f"(telemetry_device_windows_per_s = {fleet.settings.telemetry_device_windows_per_s:g}); "
                          "nothing was stored: send the batch again later")
    return Response(status_code=204)


@router.get("/devices", response_model=list[DeviceView])
def list_devices(fleet: FleetDep, who: AdminDep) -> list[DeviceView]:
    return fleet.list_devices()


@router.get("/devices/{device_id}", response_model=DeviceView, responses=error_responses(404))
def get_device(device_id: str, fleet: FleetDep, who: AdminDep) -> DeviceView:
    return fleet.get_device(_device_id(device_id))
