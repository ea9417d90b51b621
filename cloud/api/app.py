"""`create_app(fleet)`: the FastAPI application and its routers.

Theory: routes are thin (validate, call the `Fleet`, return a `protos.api` view or a `protos.messages` model) and
raise `CloudError` subclasses, never `HTTPException`; `handlers.install` turns every error into `ErrorBody` JSON in
one place. Routers are split by resource: devices (enrollment, desired/reported/telemetry, device views), models
(classes, models, deployments), admin (tokens, status, stats), jobs (distillation, job state, logs,
reports, class calibrations) and tuf (metadata and bundles, outside /api/v1). `limits.RequestLimits` sits in front
of them all: a request's token is checked before its body is read, and the body is read under a cap.

OpenAPI is served at /openapi.json with Swagger UI at /docs; the bearer scheme lets "Authorize" take a token.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import FastAPI

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
    from edgefleet.cloud.services import Fleet


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
