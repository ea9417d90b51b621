"""`create_app(fleet)`: the FastAPI application and its routers.

Theory: routes are thin (validate, call the `Fleet`, return a `protos.api` view or a `protos.messages` model) and
raise `CloudError` subclasses, never `HTTPException`; `handlers.install` turns every error into `ErrorBody` JSON in
one place. Routers are split by resource: devices (enrollment, desired/reported/telemetry, device views), models
(classes, models, deployments), admin (tokens, status, stats), jobs (distillation, job state, logs,
reports, class calibrations) and tuf (metadata and bundles, outside /api/v1). `limits.RequestLimits` sits in front
of them all: a request's token is checked before its body is read, and the body is read under a cap.

OpenAPI is served at /openapi.json with Swagger UI at /docs; the bearer scheme lets "Authorize" take a token.

The offload data plane, the Open Inference Protocol at /v2 (cloud/inference/rest.py), is a plain ASGI app that
gets every /v2 request first, before FastAPI's middleware and routing: it is per-inference traffic, where their
few hundred microseconds would cost more than a small model's run, and it checks its own tokens and body cap
(`infer_max_body_mb`, not the JSON cap). `data_plane(app).pool` is its pool, for a gRPC server to share.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from edgefleet.cloud.api import (
    handlers,
    limits,
    routes_admin,
    routes_devices,
    routes_efficiency,
    routes_identity,
    routes_jobs,
    routes_models,
    routes_provenance,
    routes_tuf,
)

if TYPE_CHECKING:
    from edgefleet.cloud.inference.rest import DataPlane
    from edgefleet.cloud.services import Fleet


class _DataPlaneFirst:
    """Hands /v2 requests straight to the inference data plane; everything else to the app behind."""

    def __init__(self, app: ASGIApp, *, api: FastAPI) -> None:
        self.app = app
        self.api = api

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if path.startswith("/v2") and (len(path) == 3 or path[3] == "/"):
            await data_plane(self.api)(scope, receive, send)
        else:
            await self.app(scope, receive, send)


def data_plane(api: FastAPI) -> DataPlane:
    """The app's /v2 data plane, made at first use (an app built for its schema alone never loads a model); its
    `.pool` is what a gRPC server in the same process shares."""
    plane = getattr(api.state, "inference", None)
    if plane is None:
        from edgefleet.cloud.inference.standalone import build_data_plane

        plane = api.state.inference = build_data_plane(api.state.fleet)
    return plane


def create_app(fleet: Fleet) -> FastAPI:
    app = FastAPI(
        title="edgefleet cloud",
        version="1",
        summary="Model registry, per-class signed bundles, desired states and fleet telemetry.",
        docs_url="/docs",
        openapi_url="/openapi.json",
        redoc_url=None,
        responses=handlers.ERROR_RESPONSES,
    )
    app.state.fleet = fleet
    handlers.install(app)
    # In front of every route: the token before a byte of the body, then the body under its cap.
    app.add_middleware(limits.RequestLimits, api=app)
    # Added last, so outermost of ours: /v2 never passes through RequestLimits or the routers.
    app.add_middleware(_DataPlaneFirst, api=app)
    for module in (routes_devices, routes_models, routes_admin, routes_identity, routes_jobs, routes_provenance,
                   routes_efficiency):
        app.include_router(module.router, prefix="/api/v1")
    app.include_router(routes_efficiency.metrics_router)  # /metrics, where Prometheus looks
    app.include_router(routes_tuf.router)
    build_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        # FastAPI's schema (built once, then cached), with the 413 the limits answer in front of the routes.
        return app.openapi_schema or limits.document_refusals(build_openapi())

    app.openapi = openapi  # type: ignore[method-assign]

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict[str, bool]:
        return {"ok": True}

    return app
