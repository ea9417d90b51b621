"""Efficiency routes: figures a user can act on, and the Prometheus scrape.

`GET /api/v1/efficiency[?model=&version=&device_class=&device_id=&window_s=]` (admin): `EfficiencyView`, the
telemetry of the look-back per device, per class and per model version, with fleet-wide totals, each figure labelled
measured, estimated or mixed (cloud/efficiency.py). `GET /api/v1/models/{name}/efficiency` (admin):
`ModelEfficiencyView`, per class the teacher against what edgefleet ships and routes (`fleet efficiency MODEL`).
`GET /metrics` (outside /api/v1, where Prometheus looks): the text exposition (cloud/metrics.py), open while
`metrics_public` is true (the default), else the admin token's like any admin route.
"""

from __future__ import annotations

from fastapi import APIRouter, Query, Request, Response

from edgefleet.cloud import metrics
from edgefleet.cloud.api.deps import AdminDep, FleetDep, admin, principal
from edgefleet.cloud.api.handlers import error_responses
from edgefleet.cloud.services_efficiency import efficiency, model_efficiency
from edgefleet.protos.api import EfficiencyView, ModelEfficiencyView
from edgefleet.protos.limits import Version

router = APIRouter(tags=["efficiency"])
metrics_router = APIRouter(tags=["metrics"])

# 90 days: as far back as the raw telemetry windows are worth summing in one request.
MAX_WINDOW_S = 90 * 86400
WindowQuery = Query(default=None, ge=60, le=MAX_WINDOW_S,
                    description="Look-back in seconds (default: the cloud's telemetry_summary_s)")


@router.get("/efficiency", response_model=EfficiencyView)
def get_efficiency(
    fleet: FleetDep,
    who: AdminDep,
    model: str | None = Query(default=None, max_length=64),
    version: Version | None = Query(default=None),
    device_class: str | None = Query(default=None, max_length=64),
    device_id: str | None = Query(default=None, max_length=128),
    window_s: int | None = WindowQuery,
) -> EfficiencyView:
    """mJ per inference, inferences per kWh and cost per million inferences per device, class and model version."""
    return efficiency(fleet, model=model, version=version, device_class=device_class, device_id=device_id,
                      window_s=window_s)


@router.get("/models/{name}/efficiency", response_model=ModelEfficiencyView, responses=error_responses(404))
def get_model_efficiency(name: str, fleet: FleetDep, who: AdminDep,
                         window_s: int | None = WindowQuery) -> ModelEfficiencyView:
    """Per device class: the teacher as it would run there against the student variant plus offload."""
    return model_efficiency(fleet, name, window_s=window_s)


@metrics_router.get("/metrics", response_class=Response,
                    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}})
def get_metrics(request: Request, fleet: FleetDep) -> Response:
    # A plain def: FastAPI runs it in its thread pool, so the database reads stay off the event loop.
    if not fleet.settings.metrics_public:
        admin(principal(request, None))  # 401 without a token, 403 with one that is not the admin's
    return Response(content=metrics.exposition(fleet), media_type=metrics.CONTENT_TYPE)
