"""One teacher in, one budget-fitting model per device class out: the distillation pipeline.

Theory: everything cheap and refusable runs first (spec and class names, teacher signature and interface, transfer
set, test set, labels against the teacher's output width), so bad input fails in seconds with a `DistillInputError`
and no training. Then the teacher runs once (cached), a small transfer set gets synthetic training rows the teacher
labels (`augment`), and every candidate of the input's family, smallest first, is distilled and exported to fp32
ONNX with the teacher's own interface (`interface`), then scored on the held-out rows and, when the user gave one,
on the test set (`evaluate`, with its warnings). Per class, `planner.ClassPlanner` builds the variant each student,
and the teacher itself, would ship as (runtime, precision where it pays, drift check, predicted p95/mJ/MB);
`choice` (pure) drops every student costlier than the teacher's variant and picks by the spec's objective, the
teacher included. `artifacts` and `costmodel` are module-like objects passed in (default: the real modules), so
tests can inject stand-ins.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from edgefleet.cloud.distill import data as data_mod
from edgefleet.cloud.distill.choice import TEACHER, choose, gate_on_teacher
from edgefleet.cloud.distill.errors import DistillCancelled
from edgefleet.cloud.distill.evaluate import (
    HELDOUT_NOTE,
    TEST_NOTE,
    load_test_set,
    majority_baseline,
    score_outputs,
    warnings_for,
)
from edgefleet.cloud.distill.export import run_onnx
from edgefleet.cloud.distill.families import Candidate, candidates_for
from edgefleet.cloud.distill.interface import describe as describe_interface
from edgefleet.cloud.distill.interface import export_student, filter_candidates
from edgefleet.cloud.distill.planner import (
    EQUIVALENT,
    ClassPlanner,
    EvalRows,
    TeacherCandidate,
    teacher_cost,
)
from edgefleet.cloud.distill.spec import DistillSpec, resolve_budgets
from edgefleet.cloud.distill.teacher import TeacherOutputs, teacher_outputs
from edgefleet.cloud.distill.train import train_student
from edgefleet.protos.distill import ClassResult, DistillReport, ModelFigures, StudentFigures
from edgefleet.protos.messages import DeviceClassInfo

Progress = Callable[[str, float], None]
# Shares of the overall progress bar: the teacher run, then training (the bulk), then per-class variants.
_TEACHER_END, _TRAIN_END = 0.05, 0.85


@dataclass(frozen=True)
class ChosenArtifact:
    device_class: str
    candidate: str
    variant: Any  # artifacts.Variant: precision, runtime, fmt, data
    fp32_onnx: bytes  # the student before quantization/conversion, the drift reference


@dataclass(frozen=True)
class DistillResult:
    report: DistillReport
    chosen: dict[str, ChosenArtifact]  # only the classes where a candidate fits
    students: dict[str, bytes] = field(default_factory=dict)  # candidate id -> fp32 ONNX
    # class -> candidate id ("teacher" too) -> the variant built for that class (None where it cannot ship)
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)

    def plot_svg(self) -> str:
        from edgefleet.cloud.distill.report import plot_svg

        return plot_svg(self.report)


@dataclass
class _Student:
    candidate: Candidate
    onnx: bytes
    counts: Any  # costmodel.OpCounts
    accuracy: float | None
    agreement: float
    figures: StudentFigures
    test_accuracy: float | None = None
    warnings: list[str] = field(default_factory=list)


def _default_modules(artifacts, costmodel):
    if artifacts is None:
        from edgefleet.cloud.distill import artifacts as artifacts
    if costmodel is None:
        from edgefleet.cloud.distill import costmodel as costmodel
    return artifacts, costmodel


def _teacher_figures(teacher_bytes, info, targets: TeacherOutputs, t_held, y_held, counts, basis: str,
                     measured_p95_ms: float | None, test: EvalRows | None, task: str) -> ModelFigures:
    accuracy = score_outputs(t_held, t_held, y_held, task)[0] if y_held is not None else None
    test_accuracy = score_outputs(test.teacher, test.teacher, test.y, task)[0] if test is not None else None
    counted = counts is not None and counts.counter != EQUIVALENT
    return ModelFigures(size_bytes=len(teacher_bytes), params=counts.params if counted else None,
                        macs=counts.macs if counts is not None else None,
                        counter=counts.counter if counts is not None else None, macs_basis=basis,
                        accuracy=accuracy, test_accuracy=test_accuracy, measured_p95_ms=measured_p95_ms,
                        input_shape=list(info.input_shape), output=info.chosen_output)


def run_distillation(teacher_bytes: bytes, npz: bytes | Path, spec: DistillSpec,
                     catalog: Mapping[str, DeviceClassInfo], calibrations: Mapping[str, Any], work_dir: Path,
                     progress: Progress | None = None, should_cancel: Callable[[], bool] | None = None, *,
                     model_name: str = "student", artifacts: ModuleType | Any = None,
                     costmodel: ModuleType | Any = None,
                     measure_classes: Collection[str] | None = None,
                     test_npz: bytes | Path | None = None) -> DistillResult:
    """Distil `teacher_bytes` on the transfer set `npz` for `spec.classes`; `test_npz`: the user's labelled test set
    (rows no model saw), on which every candidate and the teacher are then ranked.

    `progress(stage, fraction)`: fraction of the whole job in [0, 1]. `should_cancel()` is polled between epochs and
    steps; True raises DistillCancelled. `calibrations`: per class (a missing class gets the cost model's default).
    `measure_classes`: classes whose int8-vs-fp32 decision and p95 are also measured on this machine (default:
    "x86-cpu" when this machine is x86-64, whose single-core timing the class stands for).
    """
    artifacts, costmodel = _default_modules(artifacts, costmodel)
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    if measure_classes is None:
        measure_classes = ("x86-cpu",) if platform.machine().lower() in ("x86_64", "amd64") else ()

    def report_progress(stage: str, fraction: float) -> None:
        if progress is not None:
            progress(stage, min(1.0, max(0.0, fraction)))

    def check_cancel(where: str) -> None:
        if should_cancel is not None and should_cancel():
            raise DistillCancelled(f"cancelled {where}")

    # 1. Everything refusable, before any expensive step.
    report_progress("check inputs", 0.0)
    budgets = resolve_budgets(spec, catalog)
    info = data_mod.inspect_teacher(teacher_bytes, spec)
    transfer = data_mod.load_transfer_set(npz, info, spec)
    test_set = load_test_set(test_npz, info, spec) if test_npz is not None else None
    shape = [None, *transfer.x.shape[1:]]
    candidates_for(shape, info.n_out or 1, spec.max_candidates)  # rank check; the real width comes from the teacher

    # 2. The teacher, once.
    check_cancel("before the teacher run")
    report_progress("teacher outputs", 0.01)
    targets = teacher_outputs(teacher_bytes, transfer.x, info, spec, work_dir / "teacher-cache")
    if transfer.y is not None:  # the output width is certain now, even for a teacher with a dynamic one
        transfer = data_mod.TransferSet(transfer.x, data_mod.check_labels(transfer.y, len(transfer.x),
                                                                          targets.n_out, spec))
    parts = data_mod.split(len(transfer.x), spec)
    # A small transfer set gets synthetic TRAINING rows labelled by the teacher, appended after the real rows (the
    # validation and held-out indices do not move): cloud/distill/augment.py.
    from edgefleet.cloud.distill.augment import extend as augment_training_rows

    transfer, targets, parts, augmentation = augment_training_rows(
        transfer, targets, parts, spec,
        lambda x_syn, s: teacher_outputs(teacher_bytes, x_syn, info, s, work_dir / "teacher-cache"))
    held = parts.heldout_idx
    x_held, y_held, t_held = transfer.x[held], None if transfer.y is None else transfer.y[held], targets.logits[held]
    sample_shape = list(transfer.x.shape[1:])
    test = None
    if test_set is not None:
        t_test = teacher_outputs(teacher_bytes, test_set.x, info, spec, work_dir / "teacher-cache").logits
        test = EvalRows(test_set.x, t_test, data_mod.check_labels(test_set.y, len(test_set.x), targets.n_out, spec))
    t_counts, t_basis, t_measured = teacher_cost(teacher_bytes, x_held, info, costmodel, sample_shape)
    teacher = _teacher_figures(teacher_bytes, info, targets, t_held, y_held, t_counts, t_basis, t_measured, test,
                               spec.task)
    report_progress("teacher outputs", _TEACHER_END)

    # 3. Train, export and score every candidate, smallest first. Every student keeps the teacher's interface (input
    # name, dtype and dynamic dimensions; every output by name, dtype and meaning): cloud/distill/interface.py.
    iface = describe_interface(teacher_bytes, info, targets, transfer.x, spec.task)
    candidates, interface_notes = filter_candidates(iface, candidates_for(shape, targets.n_out, spec.max_candidates))
    interface_notes = [*interface_notes, *iface.notes]  # what the students' interface does differently, and why
    students: list[_Student] = []
    span = (_TRAIN_END - _TEACHER_END) / len(candidates)
    for i, cand in enumerate(candidates):
        check_cancel(f"before training {cand.id}")
        base = _TEACHER_END + i * span
        started = time.perf_counter()
        trained = train_student(cand, transfer, targets, parts, spec,
                                progress=lambda stage, f, base=base: report_progress(stage, base + f * span * 0.9),
                                should_cancel=should_cancel)
        onnx_bytes = export_student(trained.module, iface, shape, doc_string=" ".join(
            [f"edgefleet distilled student {cand.id} of {model_name}, seed {spec.seed}.", *interface_notes]))
        report_progress(f"export {cand.id}", base + span * 0.95)
        accuracy, agreement = score_outputs(run_onnx(onnx_bytes, x_held, output=iface.scores), t_held, y_held,
                                            spec.task)
        counts = costmodel.count_ops(onnx_bytes, sample_shape)
        students.append(_Student(cand, onnx_bytes, counts, accuracy, agreement, StudentFigures(
            candidate=cand.id, family=cand.family, width_mult=cand.width_mult, depth=cand.depth,
            hidden=list(cand.hidden), epochs=trained.epochs, best_epoch=trained.best_epoch,
            val_agreement=trained.val_agreement, accuracy=accuracy, agreement=agreement, params=counts.params,
            macs=counts.macs, size_bytes=len(onnx_bytes), train_s=round(time.perf_counter() - started, 3))))

    # 3b. Every student on the user's test set, and the warnings a degenerate one earns.
    eval_y = test.y if test is not None else y_held
    baseline = majority_baseline(eval_y) if spec.task == "classification" else None
    for st in students:
        out = run_onnx(st.onnx, x_held if test is None else test.x)
        acc_eval, agreement_eval = st.accuracy, st.agreement
        if test is not None:
            st.test_accuracy, agreement_eval = score_outputs(out, test.teacher, test.y, spec.task)
            acc_eval = st.test_accuracy
        st.warnings = warnings_for(out, agreement_eval, acc_eval, baseline, spec.task,
                                   who=f"student {st.candidate.id}")
        st.figures = st.figures.model_copy(update={"test_accuracy": st.test_accuracy, "warnings": st.warnings})

    # 4. Per class: the variant each candidate (and the teacher) would ship as, its predictions, both rules' picks.
    results: dict[str, ClassResult] = {}
    chosen: dict[str, ChosenArtifact] = {}
    built: dict[str, dict[str, Any]] = {}
    calib_x = transfer.x[parts.train_idx[np.random.default_rng(spec.seed).permutation(len(parts.train_idx))[:512]]]
    planner = ClassPlanner(artifacts, costmodel, spec, (x_held, t_held, y_held), calib_x, work_dir / "variants",
                           test=test)
    # The teacher agrees with itself; its accuracy figures are its own.
    t_agreement = 1.0
    for k, name in enumerate(spec.classes):
        check_cancel(f"before building variants for {name}")
        report_progress(f"variants {name}", _TRAIN_END + (1 - _TRAIN_END) * k / len(spec.classes))
        cls = catalog[name]
        cal = calibrations.get(name) or costmodel.default_calibration(cls)
        figures, variants = [], {}
        for st in students:
            fig, variant = planner.plan(st.candidate, st.onnx, st.counts, st.accuracy, st.agreement, cls, cal,
                                        budgets[name], measure=name in measure_classes,
                                        test_accuracy=st.test_accuracy)
            figures.append(fig.model_copy(update={"warnings": st.warnings}))
            variants[st.candidate.id] = variant
        teacher_fig = None
        if t_counts is not None:  # a teacher that can be neither counted nor timed is no candidate (said in basis)
            teacher_fig, variants[TEACHER] = planner.plan(
                TeacherCandidate(), teacher_bytes, t_counts, teacher.accuracy, t_agreement, cls, cal, budgets[name],
                measure=name in measure_classes, test_accuracy=teacher.test_accuracy)
        figures = gate_on_teacher(figures, teacher_fig)
        built[name] = variants
        decision = choose(figures, budgets[name], objective=spec.objective, teacher=teacher_fig,
                          max_accuracy_drop=spec.max_accuracy_drop)
        results[name] = ClassResult(
            device_class=name, budgets=budgets[name], calibration_source=getattr(cal, "source", ""),
            objective=spec.objective, chosen=decision.chosen, reason=decision.reason, nearest=decision.nearest,
            candidates=figures, teacher_predicted_p95_ms=teacher_fig.predicted_p95_ms if teacher_fig else None,
            teacher_predicted_mj=teacher_fig.predicted_mj if teacher_fig else None,
            chosen_by_accuracy=decision.by_accuracy, chosen_by_efficiency=decision.by_efficiency,
            teacher_variant=teacher_fig, teacher_is_best=decision.teacher_is_best)
        best = decision.chosen
        if best is not None:
            onnx32 = teacher_bytes if best.family == TEACHER else \
                next(st.onnx for st in students if st.candidate.id == best.candidate)
            chosen[name] = ChosenArtifact(name, best.candidate, variants[best.candidate], onnx32)

    teacher_eval = (test.teacher, teacher.test_accuracy) if test is not None else (t_held, teacher.accuracy)
    report_warnings = warnings_for(teacher_eval[0], 1.0, teacher_eval[1], baseline, spec.task, who="the teacher")
    for name, result in results.items():
        if result.chosen is not None:
            report_warnings += [f"{name}: {w}" for w in result.chosen.warnings]
    report = DistillReport(
        model_name=model_name, task=spec.task, teacher=teacher, teacher_output_kind=targets.kind,
        how_probabilities_were_handled=targets.how_probabilities_were_handled(),
        metric=_metric_words(spec.task, transfer.y is not None, test is not None),
        # The user's rows: synthetic training rows are counted apart (n_synthetic), never as samples given.
        n_samples=len(transfer.x) - augmentation.n_synthetic, n_synthetic=augmentation.n_synthetic,
        n_train=len(parts.train_idx) - augmentation.n_synthetic, n_val=len(parts.val_idx), n_heldout=len(held),
        has_labels=transfer.y is not None,
        temperature=spec.temperature, alpha=spec.alpha, students=[st.figures for st in students], classes=results,
        seed=spec.seed, created_at=datetime.now(timezone.utc), objective=spec.objective,
        max_accuracy_drop=spec.max_accuracy_drop, evaluation="test" if test is not None else "heldout",
        evaluation_note=TEST_NOTE.format(n=len(test.x)) if test is not None else HELDOUT_NOTE,
        n_test=len(test.x) if test is not None else 0, majority_baseline=baseline, warnings=report_warnings,
        interface_notes=interface_notes)
    _write(work_dir, report)
    report_progress("done", 1.0)
    return DistillResult(report, chosen, {st.candidate.id: st.onnx for st in students}, built)


def _metric_words(task: str, has_labels: bool, has_test: bool = False) -> str:
    if has_test:
        return ("R^2 against the test set's labels" if task == "regression" else
                "accuracy against the test set's labels (rows no model saw)")
    if task == "regression":
        return "R^2 against the labels on held-out rows" if has_labels else "R^2 against the teacher on held-out rows"
    if has_labels:
        return "accuracy against the labels on held-out rows"
    return "agreement with the teacher's argmax on held-out rows (no labels given)"


def _write(work_dir: Path, report: DistillReport) -> None:
    from edgefleet.cloud.distill.report import plot_svg

    (work_dir / "report.json").write_text(json.dumps(report.to_dict(), indent=2))
    (work_dir / "plot.svg").write_text(plot_svg(report))


__all__ = ["ChosenArtifact", "ClassPlanner", "DistillResult", "choose", "run_distillation", "score_outputs"]
