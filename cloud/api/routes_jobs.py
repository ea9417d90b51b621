"""Admin routes for background work: submitting a distillation, following its job, reading its report and plot; and
a class's cost-model facts (calibration, predicted against measured) with the refit that learns from telemetry.

`POST /distill` is multipart/form-data: files `teacher` (ONNX), `data` (the transfer set, .npz) and optionally `test`
(a labelled test set, .npz), and a form field `spec` holding `protos.jobs.DistillSubmit` as JSON.
`limits.RequestLimits` refuses the request before its body is read when it cannot fit the limits (max_model_mb + 2 x
max_transfer_mb; by its Content-Length, or at that many bytes when chunked), and each file is held to its own limit
here. Job ids are 32-bit in the database (`jobs.id` is INTEGER), so a larger one is a 422 naming `path.job_id`,
never a database error.
The Fleet checks the rest (spec, classes, teacher signature, data against it) before anything is queued, so a
mistake is a 422 with the reason here rather than a failed job later. Training happens in `edgefleet-cloud worker`
processes, never in this server.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Path, Query, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from edgefleet.cloud.api.deps import AdminDep, FleetDep
from edgefleet.cloud.api.handlers import error_responses
from edgefleet.cloud.errors import Invalid, TooLarge
from edgefleet.protos.jobs import ClassDetailView, DistillSubmit, JobLogView, JobState, JobView, RefitView
from edgefleet.protos.limits import INT32_MAX

router = APIRouter()
_READ_CHUNK = 1024 * 1024
JobId = Annotated[int, Path(ge=1, le=INT32_MAX, description="The job's id (jobs.id is a 32-bit INTEGER).")]


async def _read_upload(upload: UploadFile, what: str, limit: int, limit_name: str) -> bytes:
    body = bytearray()
    while chunk := await upload.read(_READ_CHUNK):
        body += chunk
        if len(body) > limit:
            raise TooLarge(f"{what} is larger than {limit_name} ({limit / 1024 / 1024:g} MB); send a smaller one "
                           "or raise the limit in the cloud's settings", detail={"limit_bytes": limit})
    if not body:
        raise Invalid(f"{what} is empty; send the file's bytes")
    return bytes(body)


def _parse_spec(raw: str) -> DistillSubmit:
    try:
        return DistillSubmit.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        if first.get("type") == "json_invalid":
            raise Invalid(f"spec is not valid JSON ({first.get('msg')}); send a JSON object") from None
        if first.get("type") == "extra_forbidden":
            raise Invalid(f"spec.{where}: unknown field; the fields are "
                          f"{', '.join(sorted(DistillSubmit.model_fields))}") from None
        raise Invalid(f"spec.{where}: {first.get('msg')}" if where else f"spec: {first.get('msg')}") from None


@router.post("/distill", response_model=JobView, status_code=201, tags=["jobs"],
             responses=error_responses((413, "Teacher or transfer set over its size limit")))
async def submit_distill(
    fleet: FleetDep,
    who: AdminDep,
    teacher: Annotated[UploadFile, File(description="The teacher model (ONNX).")],
    data: Annotated[UploadFile, File(description="The transfer set (.npz with x, optionally y).")],
    spec: Annotated[str, Form(description="DistillSubmit as JSON: name, classes, task, budgets, seed, ...")],
    test: Annotated[UploadFile | None, File(description="Optional labelled test set (.npz with x and y): rows no "
                                                        "model saw, on which candidates are ranked.")] = None,
) -> JobView:
    """Queue a distillation of `teacher` for the spec's device classes; answers with the queued job."""
    s = fleet.settings
    submit = _parse_spec(spec)
    teacher_bytes = await _read_upload(teacher, "the teacher", s.max_model_bytes, "max_model_mb")
    data_bytes = await _read_upload(data, "the transfer set", s.max_transfer_bytes, "max_transfer_mb")
    test_bytes = None
    if test is not None:
        test_bytes = await _read_upload(test, "the test set", s.max_transfer_bytes, "max_transfer_mb")
    return await run_in_threadpool(fleet.submit_distill, submit, teacher_bytes, data_bytes, test_bytes)


@router.get("/jobs", response_model=list[JobView], tags=["jobs"])
def list_jobs(fleet: FleetDep, who: AdminDep, state: JobState | None = None,
              limit: int = Query(default=100, ge=1, le=1000)) -> list[JobView]:
    """Jobs, newest first."""
    return fleet.list_jobs(state=state, limit=limit)


@router.get("/jobs/{job_id}", response_model=JobView, tags=["jobs"], responses=error_responses(404))
def get_job(job_id: JobId, fleet: FleetDep, who: AdminDep) -> JobView:
    return fleet.get_job(job_id)


@router.get("/jobs/{job_id}/logs", response_model=JobLogView, tags=["jobs"], responses=error_responses(404))
def job_logs(job_id: JobId, fleet: FleetDep, who: AdminDep,
             since: int = Query(default=0, ge=0, le=INT32_MAX,
                                description="Lines already read; the answer's `next`.")) -> JobLogView:
    """The job's log lines from offset `since`; readable while the job runs."""
    return fleet.job_logs(job_id, since)


@router.post("/jobs/{job_id}/cancel", response_model=JobView, tags=["jobs"], responses=error_responses(404, 409))
def cancel_job(job_id: JobId, fleet: FleetDep, who: AdminDep) -> JobView:
    """Cancel: a queued job at once, a running one at its next progress report (409 once it finished)."""
    return fleet.cancel_job(job_id)


@router.get("/jobs/{job_id}/report", tags=["jobs"],
            responses={200: {"description": "protos.distill.DistillReport as JSON"}, **error_responses(404)})
def job_report(job_id: JobId, fleet: FleetDep, who: AdminDep) -> Any:
    """The distillation report (teacher against the chosen student per class, every candidate) once succeeded."""
    return JSONResponse(fleet.job_report(job_id))


@router.get("/jobs/{job_id}/plot.svg", tags=["jobs"], response_class=Response,
            responses={200: {"content": {"image/svg+xml": {}}, "description": "Accuracy against mJ/inference"},
                       **error_responses(404)})
def job_plot(job_id: JobId, fleet: FleetDep, who: AdminDep) -> Response:
    return Response(content=fleet.job_plot(job_id), media_type="image/svg+xml")


@router.get("/classes/{name}", response_model=ClassDetailView, tags=["classes"])
def class_detail(name: str, fleet: FleetDep, who: AdminDep) -> ClassDetailView:
    """A class's facts, the cost-model calibration in use, and predicted against measured per deployed variant."""
    return fleet.class_detail(name)


@router.post("/classes/{name}/refit", response_model=RefitView, tags=["classes"])
def refit_calibration(name: str, fleet: FleetDep, who: AdminDep,
                      accept: Annotated[bool, Query(description="Apply the refit even if it moves a figure by more "
                                                                "than max_factor (held otherwise).")] = False,
                      ) -> RefitView:
    """Refit the class's calibration from its deployed variants' telemetry per inference; later distillations use
    it. A refit that moves a figure by more than `max_factor` is held (200, `applied: false`, `held` says why) until
    asked again with `accept=true`."""
    return fleet.refit_calibration(name, accept=accept)

