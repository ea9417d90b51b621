"""Jobs, distillation and cost-model calibrations: the part of the `Fleet` facade (mixed into it) that surfaces call
for `POST /api/v1/distill`, `/api/v1/jobs/...` and `GET /api/v1/classes/{name}`, and the worker's distill handler.

Theory: the API server never trains. `submit_distill` checks everything that is cheap to check (the spec, the class
names, the teacher's signature, the transfer set against it), so that a mistake is a 422 at once rather than a
failed job minutes later; it stores teacher and data as blobs and queues a job. A worker (`cloud/worker.py`) runs
`run_distill_job`: the distillation core (`cloud/distill/pipeline.py`) with the classes' stored calibrations, then
every chosen variant becomes the next version of the model named at submit, recorded with its precision, runtime,
format, the one class it was built for, the job and the cost model's prediction. Deploying it is the ordinary
`fleet deploy`; a bundle for any other class is refused (see `Fleet._ensure_bundle`).

Calibrations: a class starts from `costmodel.default_calibration`; `refit_calibration` fits what deployed variants
of the class measured in telemetry, per inference (row: a batched request is as many inferences as it has rows),
from windows of at least `REFIT_MIN_ROWS` rows, and stores the refit. A refit that would move a precision's
throughput or the class's power by more than `costmodel.MAX_REFIT_FACTOR` is held, not stored, until an operator
accepts it (`fleet classes refit NAME --accept`). Every distillation refits its classes first (where telemetry
exists) without accepting, so each build fits the devices as they are and none predicts with a held refit;
`fleet classes refit NAME` does it on demand.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import shutil
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

import numpy as np

from edgefleet.cloud.errors import Conflict, Invalid, NotFound, TooLarge
from edgefleet.protos.jobs import (
    BuiltVersion,
    CalibrationView,
    ClassDetailView,
    DistillSubmit,
    JobLogLineView,
    JobLogView,
    JobView,
    RefitView,
    VariantMeasurement,
)

if TYPE_CHECKING:
    from edgefleet.cloud.db.models import Job, ModelVersion
    from edgefleet.cloud.distill.costmodel import Calibration
    from edgefleet.cloud.worker import JobContext

log = logging.getLogger(__name__)

# The telemetry a refit learns from: the last week of windows (classes change slowly; a week smooths load spikes).
REFIT_LOOKBACK_S = 7 * 86400
# 50 rows: one 10x outlier (a cold cache, a scheduler stall) moves a window's mean per row by under 20% at 50 rows,
# by 90% at 10. Smaller windows are left out of a refit (still shown by `fleet classes show`).
REFIT_MIN_ROWS = 50


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


class DistillFacade:
    """Mixed into `Fleet`; uses its settings, store, blobs and classes."""

    # ------------------------------------------------------------------------------------------------ submit

    def submit_distill(self, submit: DistillSubmit, teacher: bytes, data: bytes, test: bytes | None = None) -> JobView:
        from edgefleet.cloud.distill.data import inspect_teacher, load_transfer_set
        from edgefleet.cloud.distill.evaluate import load_test_set
        from edgefleet.cloud.distill.spec import DistillSpec, resolve_budgets

        s = self.settings
        if len(teacher) > s.max_model_bytes:
            raise TooLarge(f"the teacher is {len(teacher) / 1e6:.1f} MB, over max_model_mb ({s.max_model_mb:g} MB)")
        if len(data) > s.max_transfer_bytes:
            raise TooLarge(f"the transfer set is {len(data) / 1e6:.1f} MB, over max_transfer_mb "
                           f"({s.max_transfer_mb:g} MB); send fewer samples or raise the setting")
        fields = submit.model_dump(exclude={"name"}, exclude_none=True)
        spec = DistillSpec.from_dict(fields)
        resolve_budgets(spec, self._classes())  # unknown class -> 422 now, not a failed job later
        info = inspect_teacher(teacher, spec)
        load_transfer_set(data, info, spec)
        if test is not None and len(test) > s.max_transfer_bytes:
            raise TooLarge(f"the test set is {len(test) / 1e6:.1f} MB, over max_transfer_mb ({s.max_transfer_mb:g} MB)")
        if test is not None:
            load_test_set(test, info, spec)
        inputs = {"teacher": self.blobs.put_bytes(teacher), "data": self.blobs.put_bytes(data)}
        if test is not None:
            inputs["test"] = self.blobs.put_bytes(test)
        row = self.store.enqueue_job("distill", spec={"name": submit.name, "distill": spec.to_dict()},
                                     inputs=inputs, max_attempts=s.job_max_attempts, now=_now())
        self.count("jobs_submitted")
        return _job_view(row)

    # ------------------------------------------------------------------------------------------------ jobs

    def _job(self, job_id: int) -> Job:
        row = self.store.get_job(job_id)
        if row is None:
            raise NotFound(f"no job {job_id}; `fleet jobs list` shows the jobs")
        return row

    def list_jobs(self, state: str | None = None, limit: int = 100) -> list[JobView]:
        return [_job_view(r) for r in self.store.list_jobs(state=state, limit=limit)]

    def get_job(self, job_id: int) -> JobView:
        return _job_view(self._job(job_id))

    def job_logs(self, job_id: int, since: int = 0) -> JobLogView:
        row = self._job(job_id)
        lines = self.store.job_log(job_id, since)
        return JobLogView(job_id=job_id, state=row.state, next=max(since, 0) + len(lines),
                          lines=[JobLogLineView(at=x.at, attempt=x.attempt, line=x.line) for x in lines])

    def cancel_job(self, job_id: int) -> JobView:
        row = self.store.request_cancel(job_id, _now())
        if row is None:
            raise NotFound(f"no job {job_id}; `fleet jobs list` shows the jobs")
        if row.state in ("succeeded", "failed"):
            raise Conflict(f"job {job_id} already {row.state}; there is nothing to cancel")
        return _job_view(row)

    def job_report(self, job_id: int) -> dict[str, Any]:
        row = self._job(job_id)
        report = (row.result or {}).get("report")
        if report is None:
            raise NotFound(f"job {job_id} has no report: it is {row.state}"
                           + (f" ({row.error})" if row.error else "") + "; reports exist once a job succeeded")
        return report

    def job_plot(self, job_id: int) -> bytes:
        row = self._job(job_id)
        key = (row.result or {}).get("plot_sha256")
        if key is None:
            raise NotFound(f"job {job_id} has no plot: it is {row.state}; plots exist once a job succeeded")
        with self.blobs.open(key) as f:
            return f.read()

    # ------------------------------------------------------------------------------------------------ calibrations

    def calibration(self, device_class: str) -> Calibration:
        from edgefleet.cloud.distill.costmodel import Calibration, default_calibration

        stored = self.store.calibrations().get(device_class)
        if stored is not None:
            return Calibration(**stored)
        return default_calibration(self._class(device_class))

    def _measurements(self, device_class: str, since: datetime,
                      min_rows: int = 0) -> list[tuple[ModelVersion, VariantMeasurement]]:
        """Deployed variants built for the class, with their predictions and the class's devices' telemetry (only
        windows of at least `min_rows` rows): per-request figures weighted by requests, per-inference (per-row)
        ones by rows."""
        devices = {d.device_id for d in self.store.list_devices(device_class)}
        windows: dict[tuple[str, int], list] = {}
        for device_id, rows in self.store.telemetry_summary(since, min_rows=min_rows).items():
            if device_id in devices:
                for w in rows:
                    windows.setdefault((w.model, w.version), []).append(w)
        out = []
        for row in self.store.list_model_versions():
            if row.built_for_class != device_class:
                continue
            ws = [w for w in windows.get((row.name, row.version), []) if w.count > 0]
            requests, inferences = sum(w.count for w in ws), sum(w.rows for w in ws)

            def mean(attr: str, weight: str) -> float | None:  # called right below, in this iteration
                pairs = [(getattr(w, attr), getattr(w, weight)) for w in ws  # noqa: B023
                         if getattr(w, attr) is not None]
                total = sum(c for _, c in pairs)
                return sum(v * c for v, c in pairs) / total if total else None

            out.append((row, VariantMeasurement(
                model=row.name, version=row.version, precision=row.precision, runtime=row.runtime,
                predicted_p95_ms=row.predicted_p95_ms, measured_p95_ms=mean("p95_ms", "count"),
                predicted_mj=row.predicted_mj, measured_mj=mean("row_mj", "rows"),
                measured_ms=mean("row_ms", "rows"), inferences=inferences, requests=requests,
                batch=inferences / requests if requests else None, windows=sum(w.windows for w in ws),
                devices=len(ws))))
        return out

    def refit_calibration(self, device_class: str, *, accept: bool = False) -> RefitView:
        """Refit the class's calibration from its deployed variants' telemetry per inference (windows of at least
        REFIT_MIN_ROWS rows) and store it, so the next distillation predicts with it; unless it moves a figure by
        more than MAX_REFIT_FACTOR and `accept` is False: then it is held, nothing changes, and the view says why.
        Invalid when no window qualifies."""
        from edgefleet.cloud.distill.costmodel import MAX_REFIT_FACTOR, Observation, refit, refit_moves

        self._class(device_class)
        current = self.calibration(device_class)
        since = _now() - timedelta(seconds=REFIT_LOOKBACK_S)
        measured = self._measurements(device_class, since, min_rows=REFIT_MIN_ROWS)
        observations = [
            Observation(precision=row.precision, macs=row.macs, row_ms=m.measured_ms, row_mj=m.measured_mj,
                        batch=m.batch or 1.0, rows=m.inferences, windows=m.windows)
            for row, m in _fittable(measured)
        ]
        used = sum(o.windows for o in observations)
        ignored = sum(m.windows for _, m in _fittable(self._measurements(device_class, since))) - used
        if not observations:
            where = f"no telemetry of variants built for {device_class} in the last {REFIT_LOOKBACK_S // 86400} days"
            if ignored > 0:
                raise Invalid(f"{where} to refit from: {ignored} window(s) had fewer than {REFIT_MIN_ROWS} rows, "
                              "the least a refit learns from; let the devices serve more inferences per window "
                              "(or raise the agents' telemetry.window_s) first")
            raise Invalid(f"{where}: deploy a distilled version to the class's devices and let them serve first")
        fitted = refit(current, observations)
        held = refit_moves(current, fitted, MAX_REFIT_FACTOR)
        applied = accept or not held
        if applied:
            self.store.put_calibration(device_class, dataclasses.asdict(fitted), _now())
            self.count("calibrations_refit")
        else:
            self.count("calibrations_refit_held")
            log.warning("refit of %s held (not applied): %s; `fleet classes refit %s --accept` applies it",
                        device_class, "; ".join(held), device_class)
        return RefitView(device_class=device_class, applied=applied, held=held, accepted=applied and bool(held),
                         current=_calibration_view(current), proposed=_calibration_view(fitted), windows=used,
                         inferences=sum(o.rows for o in observations), windows_ignored=max(ignored, 0),
                         min_rows=REFIT_MIN_ROWS, max_factor=MAX_REFIT_FACTOR, variants=[m for _, m in measured])

    def class_detail(self, name: str) -> ClassDetailView:
        info = self._class(name)
        since = _now() - timedelta(seconds=self.settings.telemetry_summary_s)
        return ClassDetailView(info=info, calibration=_calibration_view(self.calibration(name)),
                               variants=[m for _, m in self._measurements(name, since)])

    # ------------------------------------------------------------------------------------------------ variants

    def register_variant(self, name: str, variant: Any, reference_onnx: bytes, *, device_class: str, job_id: int,
                         predicted_p95_ms: float | None = None, predicted_mj: float | None = None,
                         macs: int | None = None, run: Any = None) -> ModelVersion:
        """Store a built variant as the next version of `name`, deployable to `device_class` only.

        `run(variant, x) -> y`: how the job runs the variant. A TFLite variant's smoke expected outputs are computed
        with it here, in the worker, because the API server that builds the bundle later may have no LiteRT."""
        from edgefleet.cloud.bundles import smoke_inputs, write_npz
        from edgefleet.cloud.registry import variant_info

        info = variant_info(variant.data, variant.fmt, reference_onnx, max_bytes=self.settings.max_model_bytes)
        smoke = None
        if variant.fmt == "tflite":
            if run is None or len(info.inputs) != 1:
                raise Invalid("a TFLite variant needs one input and a way to run it for its smoke test")
            feeds = smoke_inputs(info.inputs)
            out = run(variant, feeds[info.inputs[0].name])
            # Every output by the teacher's name (artifacts.run_variant_outputs), or a lone output's array.
            if not isinstance(out, dict) and len(info.outputs) != 1:
                raise Invalid("a TFLite variant with several outputs needs a run that answers every output by name")
            expected = ({k: np.asarray(v) for k, v in out.items()} if isinstance(out, dict)
                        else {info.outputs[0].name: np.asarray(out)})
            smoke = self.blobs.put_bytes(write_npz(expected))
        key = self.blobs.put_bytes(variant.data)
        return self.store.add_model_version(
            name, sha256=key, size_bytes=info.size_bytes, opset=info.opset,
            inputs=[t.to_dict() for t in info.inputs], outputs=[t.to_dict() for t in info.outputs], now=_now(),
            variant=dict(precision=variant.precision, runtime=variant.runtime, format=variant.fmt,
                         built_for_class=device_class, job_id=job_id, macs=macs, smoke_sha256=smoke,
                         predicted_p95_ms=predicted_p95_ms, predicted_mj=predicted_mj))


# ---------------------------------------------------------------------------------------------------- the worker


def run_distill_job(fleet: Any, ctx: JobContext) -> dict[str, Any]:
    """The handler of "distill" jobs (see worker.py): build, then register the chosen variants as versions."""
    from edgefleet.cloud.distill.pipeline import run_distillation
    from edgefleet.cloud.distill.spec import DistillSpec

    job = ctx.job
    spec = DistillSpec.from_dict(job.spec["distill"])
    with fleet.blobs.open(job.inputs["teacher"]) as f:
        teacher = f.read()
    with fleet.blobs.open(job.inputs["data"]) as f:
        data = f.read()
    test = None
    if "test" in job.inputs:
        with fleet.blobs.open(job.inputs["test"]) as f:
            test = f.read()
    catalog = fleet._classes()
    # Fit each class to its devices as they are: refit from the telemetry of its deployed variants when there is
    # any (a class no variant has run on yet keeps its catalog or stored calibration).
    for c in spec.classes:
        if c in catalog:
            try:
                refit = fleet.refit_calibration(c)
            except Invalid:
                continue
            if not refit.applied and refit.held:
                ctx.log(f"{c}: refit held, the class keeps its calibration until `fleet classes refit {c} --accept`: "
                        + "; ".join(refit.held))
    calibrations = {c: fleet.calibration(c) for c in spec.classes if c in catalog}
    ctx.log(f"distilling for {', '.join(spec.classes)} with calibrations: "
            + "; ".join(f"{c} ({cal.source})" for c, cal in calibrations.items()))
    root = fleet.settings.data_dir / "work"
    for stale in root.glob(f"job-{job.id}-*"):  # left by an attempt whose worker was killed on this machine
        shutil.rmtree(stale, ignore_errors=True)
    work = root / f"job-{job.id}-{ctx.attempt}"
    work.mkdir(parents=True, exist_ok=True)
    try:
        result = run_distillation(teacher, data, spec, catalog, calibrations, work, progress=ctx.progress,
                                  should_cancel=ctx.should_cancel, model_name=job.spec["name"], test_npz=test)
        ctx.progress("registering versions", 0.99)
        return _register_result(fleet, ctx, job.spec["name"], result)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _register_result(fleet: Any, ctx: JobContext, name: str, result: Any) -> dict[str, Any]:
    """Versions for the chosen variants, the plot as a blob; the job's result JSON."""
    from edgefleet.cloud.distill import artifacts

    versions: list[dict[str, Any]] = []
    provenance: dict[str, dict[str, Any]] = {}  # per version: facts its bundles' statements need (provenance.py)
    for device_class, chosen in sorted(result.chosen.items()):
        figures = result.report.classes[device_class].chosen
        row = fleet.register_variant(
            name, chosen.variant, chosen.fp32_onnx, device_class=device_class, job_id=ctx.job.id,
            predicted_p95_ms=figures.predicted_p95_ms if figures else None,
            predicted_mj=figures.predicted_mj if figures else None, macs=figures.macs if figures else None,
            run=artifacts.run_variant_outputs)
        view = BuiltVersion(device_class=device_class, model=row.name, version=row.version,
                            precision=row.precision, runtime=row.runtime, format=row.format,
                            predicted_p95_ms=row.predicted_p95_ms, predicted_mj=row.predicted_mj)
        versions.append(view.model_dump(mode="json"))
        provenance[str(row.version)] = {"candidate": chosen.candidate,
                                        "student_sha256": hashlib.sha256(chosen.fp32_onnx).hexdigest()}
        ctx.log(f"{device_class}: {chosen.candidate} {row.precision}/{row.runtime} is {row.name} v{row.version}")
    for device_class, cr in sorted(result.report.classes.items()):
        if cr.chosen is None:
            ctx.log(f"{device_class}: no candidate fits ({cr.reason})")
    plot = fleet.blobs.put_bytes(result.plot_svg().encode())
    return {"report": result.report.to_dict(), "plot_sha256": plot, "versions": versions, "provenance": provenance}


# ---------------------------------------------------------------------------------------------------- views


def _job_view(row: Job) -> JobView:
    result = row.result or {}
    return JobView(
        id=row.id, kind=row.kind, state=row.state, stage=row.stage, progress=row.progress, attempts=row.attempts,
        max_attempts=row.max_attempts, worker=row.worker, lease_until=row.lease_until,
        cancel_requested=row.cancel_requested, error=row.error, spec=row.spec, created_at=row.created_at,
        started_at=row.started_at, heartbeat_at=row.heartbeat_at, finished_at=row.finished_at,
        versions=[BuiltVersion.model_validate(v) for v in result.get("versions", [])],
        has_report="report" in result, has_plot="plot_sha256" in result,
    )


def _fittable(measured: list[tuple[ModelVersion, VariantMeasurement]]) -> list[tuple[ModelVersion, VariantMeasurement]]:
    """The variants a refit can learn from: measured per inference, with the op counts and precision of a build."""
    return [(row, m) for row, m in measured if m.measured_ms is not None and row.macs and row.precision]


def _calibration_view(cal: Calibration) -> CalibrationView:
    values = dataclasses.asdict(cal)
    return CalibrationView(device_class=cal.device_class, source=cal.source, samples=cal.samples, values=values)
