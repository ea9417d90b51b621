"""Efficiency views: the part of the service layer behind `GET /api/v1/efficiency`, `GET /api/v1/models/{name}/
efficiency`, `/metrics`, and the figures in `fleet status` and `fleet stats`.

Theory: the store sums telemetry windows (cloud/store_efficiency.py); the pure core (cloud/efficiency.py) regroups
the sums and computes every figure with its label. This module only gathers the inputs: the settings' prices and
look-back, the sums, and for a model the distillation report of each class's variant, whose per-class teacher
figures (`ClassResult.teacher_variant`: the teacher as the cost model predicts it on the class) are the other side
of the comparison. The student's side comes from the fleet's telemetry of the variant built for the class (local and
offloaded windows: what edgefleet ships and routes) when there is any, else from the same report's prediction,
labelled "estimated". Functions over the `Fleet`, not a mixin, so the facade's bases stay as they are.

Per rollout: rollouts do not exist yet (issue #12); the view grows a `by_rollout` grouping with them.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING

from pydantic import ValidationError

from edgefleet.cloud import efficiency as core
from edgefleet.cloud.errors import NotFound
from edgefleet.cloud.store_efficiency import efficiency_slices
from edgefleet.protos.api import (
    ClassEfficiency,
    EfficiencyRow,
    EfficiencySide,
    EfficiencyView,
    LabelledFigure,
    ModelEfficiencyView,
)
from edgefleet.protos.distill import CandidateFigures, ClassResult, DistillReport

if TYPE_CHECKING:
    from edgefleet.cloud.db.models import ModelVersion
    from edgefleet.cloud.services import Fleet


def prices(fleet: Fleet) -> core.Prices:
    s = fleet.settings
    return core.Prices(energy_per_kwh=s.energy_price_per_kwh, offload_per_million=s.offload_price_per_million)


def since_of(window_s: int) -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0) - timedelta(seconds=window_s)


def efficiency(fleet: Fleet, *, model: str | None = None, device_class: str | None = None,
               device_id: str | None = None, version: int | None = None,
               window_s: int | None = None) -> EfficiencyView:
    """Figures per device, per class and per model version over the look-back (default telemetry_summary_s)."""
    window_s = window_s or fleet.settings.telemetry_summary_s
    since = since_of(window_s)
    slices = efficiency_slices(fleet.store, since, model=model, device_id=device_id, device_class=device_class,
                               version=version)
    p = prices(fleet)
    by_device = [EfficiencyRow(device_id=k[0], device_class=k[1], model=k[2], version=k[3],
                               figures=core.figures(t, p))
                 for k, t in core.merge(slices, lambda s: (s.device_id, s.device_class, s.model, s.version)).items()]
    by_class = [EfficiencyRow(device_class=k[0], model=k[1], version=k[2], figures=core.figures(t, p))
                for k, t in core.merge(slices, lambda s: (s.device_class, s.model, s.version)).items()]
    by_version = [EfficiencyRow(model=k[0], version=k[1], figures=core.figures(t, p))
                  for k, t in core.merge(slices, lambda s: (s.model, s.version)).items()]
    return EfficiencyView(since=since, window_s=window_s, prices=p.view(), label_rule=core.LABEL_RULE,
                          total=core.figures(core.total(slices), p), by_device=by_device, by_class=by_class,
                          by_version=by_version)


# ---------------------------------------------------------------------------------------------------- per model


def _figure(value: float | None, source: str) -> LabelledFigure:
    return LabelledFigure(value=value, source=source if value is not None else "none")  # type: ignore[arg-type]


def _score(c: CandidateFigures | None) -> float | None:
    return None if c is None else c.score


def _teacher_side(report: DistillReport, cr: ClassResult, p: core.Prices) -> EfficiencySide:
    tv = cr.teacher_variant
    mj = tv.predicted_mj if tv else cr.teacher_predicted_mj
    p95 = tv.predicted_p95_ms if tv else cr.teacher_predicted_p95_ms
    t = report.teacher
    accuracy = _score(tv) if tv else (t.test_accuracy if report.evaluation == "test" else t.accuracy)
    return EfficiencySide(
        mj_per_inference=_figure(mj, "estimated"), inferences_per_kwh=_figure(core.inferences_per_kwh(mj), "estimated"),
        cost_per_million=_figure(core.cost_per_million(mj, 0.0, p), "estimated"),
        accuracy=_figure(accuracy, "measured"), p95_ms=_figure(p95, "estimated"))  # on the device: no offload


def _edgefleet_side(chosen: CandidateFigures | None, row: ModelVersion | None, t: core.Totals,
                    p: core.Prices) -> tuple[EfficiencySide, list[str]]:
    none = LabelledFigure()
    if row is None:  # nothing ships for the class
        return EfficiencySide(mj_per_inference=none, inferences_per_kwh=none, cost_per_million=none,
                              accuracy=none, p95_ms=none), []
    f = core.figures(t, p)
    notes: list[str] = []
    predicted_mj = row.predicted_mj if row and row.predicted_mj is not None else (chosen.predicted_mj if chosen
                                                                                  else None)
    predicted_p95 = row.predicted_p95_ms if row and row.predicted_p95_ms is not None else (
        chosen.predicted_p95_ms if chosen else None)
    if f.mj_per_inference is not None:
        mj, mj_source = f.mj_per_inference, f.energy_source
    else:
        mj, mj_source = predicted_mj, "estimated"
        notes.append("energy: the cost model's prediction (no telemetry with energy yet: deploy the version and "
                     "let the devices serve)")
    if f.p95_ms is not None:
        p95, p95_source = f.p95_ms, "measured"
    else:
        p95, p95_source = predicted_p95, "estimated"
    if f.inferences:
        share, share_source = f.offload_share or 0.0, "measured"
    else:
        share, share_source = 0.0, "estimated"
    if f.measured_share is not None and f.energy_source == "mixed":
        notes.append(f"energy: {f.measured_share:.0%} of the metered inferences measured, the rest estimated")
    side = EfficiencySide(
        mj_per_inference=_figure(mj, mj_source), inferences_per_kwh=_figure(core.inferences_per_kwh(mj), mj_source),
        # Nothing offloaded: the cost is the energy's alone, and so is its label.
        cost_per_million=_figure(core.cost_per_million(mj, share, p),
                                 core.weaker(mj_source, share_source) if share else mj_source),  # type: ignore[arg-type]
        accuracy=_figure(_score(chosen), "measured"), p95_ms=_figure(p95, p95_source),
        offload_share=_figure(share, share_source))
    return side, notes


def model_efficiency(fleet: Fleet, model: str, *, window_s: int | None = None) -> ModelEfficiencyView:
    """Per class the model was distilled for: the teacher against what edgefleet ships and routes there."""
    versions = [v for v in fleet.store.list_model_versions() if v.name == model]
    if not versions:
        raise NotFound(f"no model {model!r}; `fleet models` lists the models, and `fleet distill` builds one with "
                       "the teacher figures to compare against")
    built = [v for v in versions if v.job_id is not None and v.built_for_class]
    if not built:
        raise NotFound(f"model {model!r} has no distilled versions, so there are no teacher figures to compare: "
                       f"distill it for your device classes with `fleet distill`, deploy a variant, then wait for "
                       "telemetry")
    latest: dict[str, ModelVersion] = {}
    for v in built:  # ascending versions: the newest variant per class wins
        latest[v.built_for_class] = v  # type: ignore[index]
    window_s = window_s or fleet.settings.telemetry_summary_s
    since = since_of(window_s)
    p = prices(fleet)
    slices = efficiency_slices(fleet.store, since, model=model)
    reports: dict[int, DistillReport | None] = {}
    classes: list[ClassEfficiency] = []
    newest_job = max(v.job_id for v in built)  # type: ignore[type-var]
    for device_class, row in sorted(latest.items()):
        job_id = int(row.job_id)  # type: ignore[arg-type]
        if job_id not in reports:
            reports[job_id] = _report(fleet, job_id)
        report = reports[job_id]
        cr = report.classes.get(device_class) if report else None
        if report is None or cr is None:
            continue  # a report that no longer reads: nothing to compare against (noted below when none is left)
        classes.append(_class_efficiency(report, cr, row, core.only(slices, device_class=device_class,
                                                                    version=row.version), p))
    newest = reports.get(newest_job) or _report(fleet, newest_job)
    if newest is not None:  # classes of the newest job where no candidate fit: teacher figures only
        for device_class, cr in sorted(newest.classes.items()):
            if device_class not in latest:
                classes.append(_class_efficiency(newest, cr, None, [], p))
    if not classes:
        raise NotFound(f"the distillation reports of {model!r} (job {newest_job}) no longer read; run `fleet distill` "
                       "again to have teacher figures to compare against")
    return ModelEfficiencyView(model=model, job_id=newest_job, evaluation=newest.evaluation if newest else "",
                               since=since, window_s=window_s, prices=p.view(), label_rule=core.LABEL_RULE,
                               classes=sorted(classes, key=lambda c: c.device_class))


def _report(fleet: Fleet, job_id: int) -> DistillReport | None:
    try:
        return DistillReport.model_validate(fleet.job_report(job_id))
    except (NotFound, ValidationError):
        return None


def _class_efficiency(report: DistillReport, cr: ClassResult, row: ModelVersion | None, slices: list[core.Slice],
                      p: core.Prices) -> ClassEfficiency:
    t = core.total(slices)
    teacher = _teacher_side(report, cr, p)
    chosen = cr.chosen if row is not None else None
    shipped, notes = _edgefleet_side(chosen, row, t, p)
    if row is None:
        notes.append(f"no candidate fits the class ({cr.reason}): nothing is shipped; the teacher's figures only")
    elif not t.rows:
        notes.append(f"no telemetry of v{row.version} on {cr.device_class} in the look-back: `fleet deploy "
                     f"{report.model_name} --version {row.version} --class {cr.device_class}`, then wait for "
                     "telemetry")
    notes.append(f"teacher: predicted on the class by the cost model ({cr.calibration_source or 'assumed'} "
                 "calibration)")
    notes.append(f"accuracy: {report.metric}")
    delta = None
    if teacher.accuracy.value is not None and shipped.accuracy.value is not None:
        delta = (shipped.accuracy.value - teacher.accuracy.value) * 100
    return ClassEfficiency(
        device_class=cr.device_class, version=row.version if row else None,
        candidate=chosen.candidate if chosen else None, precision=row.precision if row else None,
        runtime=row.runtime if row else None, teacher_is_best=cr.teacher_is_best, teacher=teacher, edgefleet=shipped,
        times_better={
            "mj_per_inference": core.times_better(teacher.mj_per_inference.value, shipped.mj_per_inference.value),
            "inferences_per_kwh": core.times_better(teacher.inferences_per_kwh.value,
                                                    shipped.inferences_per_kwh.value, higher_is_better=True),
            "cost_per_million": core.times_better(teacher.cost_per_million.value, shipped.cost_per_million.value),
            "p95_ms": core.times_better(teacher.p95_ms.value, shipped.p95_ms.value),
        },
        accuracy_delta_points=delta, inferences=t.rows, devices=len({s.device_id for s in slices}), notes=notes)


__all__ = ["efficiency", "model_efficiency", "prices", "since_of"]
