"""Admin routes for what gets deployed: device classes, models (upload and list) and deployments.

Model upload takes the raw ONNX bytes as the body (`application/octet-stream`) and enforces `max_model_mb` while
the body streams in: a Content-Length over the limit is refused before a byte is read, and a body without one
(chunked) is cut off at the limit, so a 10 GB mistake costs at most the limit in memory (`limits.RequestLimits`
applies both rules before the route runs, after the token; `read_limited` keeps them where it is called).
`Fleet.push_model` then validates the model (ONNX checker, ONNX Runtime session) in a worker thread.

Getting a model back: `GET /models/{name}/versions` and `/versions/{version}` answer the version views (signature
with full shapes); `GET /models/{name}/versions/{version}/file[?device_class=C]` streams the model file itself, the
uploaded one or, with a class, the one inside that class's bundle (what its devices run, ONNX or TFLite; the bundle
is built first when missing), with its sha256 in `X-Edgefleet-Sha256` and a file name in Content-Disposition. An
unknown model, version or class is a 404 naming what to check.
"""

from __future__ import annotations

from fastapi import APIRouter, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from edgefleet.cloud.api.deps import AdminDep, FleetDep, no_unknown_fields
from edgefleet.cloud.api.handlers import error_responses
from edgefleet.cloud.errors import Invalid, TooLarge
from edgefleet.protos.api import DeploymentView, DeployRequest, DeviceClassInfo, ModelVersionView
from edgefleet.protos.limits import Version
from edgefleet.protos.messages import check_name

router = APIRouter()


@router.get("/classes", response_model=list[DeviceClassInfo], tags=["classes"])
def list_classes(fleet: FleetDep, who: AdminDep) -> list[DeviceClassInfo]:
    return fleet.list_classes()


@router.post("/classes", response_model=DeviceClassInfo, status_code=201, tags=["classes"],
             responses=error_responses((409, "The name is a class from a catalog file")))
def add_class(info: DeviceClassInfo, fleet: FleetDep, who: AdminDep) -> DeviceClassInfo:
    """Add a device class to the catalog (or replace a user-defined one)."""
    return fleet.add_class(info)


def _too_large(limit_mb: float, limit: int, got: str) -> TooLarge:
    return TooLarge(f"the model is larger than the max_model_mb limit of {limit_mb:g} MB ({got}); make it "
                    "smaller (quantize, prune, distill) or raise max_model_mb in the cloud's settings",
                    detail={"limit_bytes": limit})


async def read_limited(request: Request, limit_mb: float) -> bytes:
    """The request body, refused with `TooLarge` as soon as it passes `limit_mb` (MiB, as Settings counts)."""
    limit = int(limit_mb * 1024 * 1024)
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise Invalid(f"Content-Length {declared!r} is not a number")
        if int(declared) > limit:
            raise _too_large(limit_mb, limit, f"Content-Length {int(declared)} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _too_large(limit_mb, limit, f"more than {limit} bytes sent")
    return bytes(body)


@router.post(
    "/models",
    response_model=ModelVersionView,
    status_code=201,
    tags=["models"],
    # x-body-limit: limits.RequestLimits caps this raw body at max_model_mb (not the JSON cap).
    openapi_extra={"x-body-limit": "max_model_mb", "requestBody": {"required": True, "content": {
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}},
    responses=error_responses((413, "Larger than max_model_mb")),
)
async def push_model(
    request: Request,
    fleet: FleetDep,
    who: AdminDep,
    name: str = Query(description="Model name: a-z 0-9 . _ -, e.g. digits"),
) -> ModelVersionView:
    """Upload an ONNX model as the raw request body; it becomes the next version of `name`."""
    try:
        check_name(name)
    except ValueError as exc:
        raise Invalid(f"query parameter name: {exc}") from None
    ctype = request.headers.get("content-type", "application/octet-stream").split(";")[0].strip().lower()
    if ctype not in ("application/octet-stream", "application/onnx", ""):
        raise Invalid(f"send the ONNX file as the raw body with Content-Type application/octet-stream, not {ctype}")
    # An empty body goes on to the Fleet, which refuses it as model_invalid like any other non-model.
    data = await read_limited(request, fleet.settings.max_model_mb)
    return await run_in_threadpool(fleet.push_model, name, data)


@router.get("/models", response_model=list[ModelVersionView], tags=["models"])
def list_models(fleet: FleetDep, who: AdminDep) -> list[ModelVersionView]:
    return fleet.list_models()


@router.get("/models/{name}/versions", response_model=list[ModelVersionView], tags=["models"],
            responses=error_responses(404))
def model_versions(name: str, fleet: FleetDep, who: AdminDep) -> list[ModelVersionView]:
    """Every version of one model, oldest first, with inputs and outputs (full shapes)."""
    return fleet.model_versions(name)


@router.get("/models/{name}/versions/{version}", response_model=ModelVersionView, tags=["models"],
            responses=error_responses(404))
def model_version(name: str, version: Version, fleet: FleetDep, who: AdminDep) -> ModelVersionView:
    return fleet.get_model(name, version)


@router.get(
    "/models/{name}/versions/{version}/file",
    tags=["models"],
    response_class=Response,
    responses={200: {"description": "The model file (ONNX or TFLite), its sha256 in X-Edgefleet-Sha256",
                     "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
               **error_responses(404)},
)
async def model_file(
    name: str,
    version: Version,
    fleet: FleetDep,
    who: AdminDep,
    device_class: str | None = Query(default=None, max_length=64,
                                     description="The model file this class runs, from its bundle (built if missing)"),
) -> Response:
    """Download a model version: the uploaded file, or with `device_class` the variant that class runs."""
    # Naming a class may build its bundle (an ONNX Runtime smoke run): off the event loop.
    art = await run_in_threadpool(fleet.model_artifact, name, version, device_class)
    headers = {"X-Edgefleet-Sha256": art.sha256, "Content-Disposition": f'attachment; filename="{art.filename}"',
               "Content-Length": str(art.size_bytes)}
    return StreamingResponse(art.chunks(fleet.blobs), media_type="application/octet-stream", headers=headers)


@router.post("/deployments", response_model=DeploymentView, status_code=201, tags=["deployments"],
             responses=error_responses(404))
def deploy(req: DeployRequest, fleet: FleetDep, who: AdminDep,
           _strict: None = no_unknown_fields(DeployRequest)) -> DeploymentView:
    """Deploy a model version to one device, a device class or a label; builds missing bundles first."""
    return fleet.deploy(req)


@router.get("/deployments", response_model=list[DeploymentView], tags=["deployments"])
def list_deployments(fleet: FleetDep, who: AdminDep) -> list[DeploymentView]:
    return fleet.list_deployments()
