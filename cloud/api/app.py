"""`create_app(fleet)`: the FastAPI application and its routers.

Theory: routes are thin (validate, call the `Fleet`, return a `protos.api` view or a `protos.messages` model) and
raise `CloudError` subclasses, never `HTTPException`; `handlers.install` turns every error into `ErrorBody` JSON in
one place. Routers are split by resource: devices (enrollment, desired/reported/telemetry, device views), models
(classes, models, deployments), admin (tokens, status, stats), jobs (distillation, job state, logs,
reports, class calibrations) and tuf (metadata and bundles, outside /api/v1).

OpenAPI is served at /openapi.json with Swagger UI at /docs; the bearer scheme lets "Authorize" take a token.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import FastAPI

from edgefleet.cloud.api import handlers, routes_admin, routes_devices, routes_jobs, routes_models, routes_tuf

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
    for module in (routes_devices, routes_models, routes_admin, routes_jobs):
        app.include_router(module.router, prefix="/api/v1")
    app.include_router(routes_tuf.router)

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict[str, bool]:
        return {"ok": True}

    return app
