"""Admin routes for bundle provenance: the signed statements of how a version's bundles were made, and the key.

`GET /api/v1/models/{name}/versions/{version}/provenance[?device_class=C]` answers one `BundleProvenanceView` per
bundle: the envelope found inside the bundle and one over the archive. Naming a class builds its bundle first when
missing, as a deployment would (builds are deterministic, so it is the bundle a later deployment ships).
`GET /api/v1/provenance/keys` is the public key to verify them with; `fleet login` pins it.
"""

from __future__ import annotations

from fastapi import APIRouter, Query
from fastapi.concurrency import run_in_threadpool

from edgefleet.cloud.api.deps import AdminDep, FleetDep
from edgefleet.cloud.api.handlers import error_responses
from edgefleet.protos.limits import Version
from edgefleet.protos.provenance import BundleProvenanceView, ProvenanceKeysView

router = APIRouter(tags=["provenance"])


@router.get("/models/{name}/versions/{version}/provenance", response_model=list[BundleProvenanceView],
            responses=error_responses(404))
async def model_provenance(
    name: str,
    version: Version,
    fleet: FleetDep,
    who: AdminDep,
    device_class: str | None = Query(default=None, max_length=64, description="Only (or build) this class's bundle"),
) -> list[BundleProvenanceView]:
    # A missing bundle is built here (an ONNX Runtime smoke run): off the event loop.
    return await run_in_threadpool(fleet.bundle_provenance, name, version, device_class)


@router.get("/provenance/keys", response_model=ProvenanceKeysView)
def provenance_keys(fleet: FleetDep, who: AdminDep) -> ProvenanceKeysView:
    return fleet.provenance_keys()
