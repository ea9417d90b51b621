"""One teacher in, one budget-fitting student per device class out: the distillation pipeline.

Theory: everything cheap and refusable runs first (spec and class names, teacher signature, transfer set, labels
against the teacher's output width), so bad input fails in seconds with a `DistillInputError` and no training. Then
the teacher runs once (cached), and every candidate of the input's family, smallest first, is distilled, exported
to fp32 ONNX and scored on the held-out rows. Per class, each candidate becomes the variant that class would run:

  - runtime: LiteRT (TFLite) when the class lists "litert" first, else ONNX Runtime;
  - precision: fp16 when the class prefers fp16 (Jetson GPUs); int8 only where it PAYS: when the class's cost model
    predicts (or, for classes measured here, a run on this machine shows) a lower p95 than fp32. On tiny models the
    fixed per-call quantize/dequantize cost outweighs the cheaper arithmetic and int8 is slower, so a class that
    prefers int8 still gets fp32 then, and the report says why;
  - a quantized or converted variant must keep its predictions within `drift_tolerance` of the fp32 student on the
    held-out rows, else the class falls back to fp32 ONNX (the drift is reported).

The cost model predicts p95 ms, mJ per inference and size for the variant; `choose` (pure) takes the best score
within the budgets, or none with the nearest candidate (smallest worst overrun). `artifacts` and `costmodel` are
module-like objects passed in (default: the real modules), so tests can inject stand-ins.
"""

from __future__ import annotations

import json
import platform
import time
import warnings
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from edgefleet.cloud.distill import data as data_mod
from edgefleet.cloud.distill.errors import ArtifactDrift, ArtifactUnrunnable, ConverterUnavailable, DistillCancelled
from edgefleet.cloud.distill.export import run_onnx, to_onnx
from edgefleet.cloud.distill.families import Candidate, candidates_for
from edgefleet.cloud.distill.spec import DistillSpec, resolve_budgets
from edgefleet.cloud.distill.teacher import TeacherOutputs, teacher_outputs
from edgefleet.cloud.distill.train import train_student
from edgefleet.protos.distill import CandidateFigures, ClassResult, DistillReport, ModelFigures, StudentFigures
from edgefleet.protos.messages import Budgets, DeviceClassInfo

Progress = Callable[[str, float], None]
# Shares of the overall progress bar: the teacher run, then training (the bulk), then per-class variants.
_TEACHER_END, _TRAIN_END = 0.05, 0.85
# int8 must be at least 10% faster to pay: it risks drift, and single-sample timings of tiny models jitter by about
# that much between runs (measured: the same 9k-MAC MLP at 0.041-0.047 ms p95), which would flip the choice.
INT8_MARGIN = 0.9


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


def score_outputs(out: np.ndarray, teacher: np.ndarray, y: np.ndarray | None,
                  task: str) -> tuple[float | None, float]:
    """(accuracy against labels or None, agreement with the teacher) on held-out outputs. Regression: R^2 both."""
    if task == "regression":
        accuracy = None if y is None else _r2(out, np.asarray(y, np.float32).reshape(out.shape))
        return accuracy, _r2(out, teacher)
    pred = out.argmax(axis=1)
    known = None if y is None else y >= 0  # -1 marks an unlabelled row of a partly labelled transfer set
    accuracy = None if known is None or not known.any() else float((pred[known] == y[known]).mean())
    return accuracy, float((pred == teacher.argmax(axis=1)).mean())


def _r2(pred: np.ndarray, target: np.ndarray) -> float:
    spread = float(((target - target.mean(axis=0)) ** 2).sum())
    return 1.0 - float(((pred - target) ** 2).sum()) / spread if spread > 0 else 0.0


def _overruns(fig: CandidateFigures, budgets: Budgets) -> list[tuple[str, float, float]]:
    """(what, value, limit) for every budget the candidate breaks."""
    checks = [("p95", fig.predicted_p95_ms, budgets.p95_latency_ms, "ms"),
              ("energy", fig.predicted_mj, budgets.mj_per_inference, "mJ"),
              ("size", fig.size_bytes / 1e6, budgets.model_mb, "MB")]
    return [(f"{what} {value:.4g} {unit} > {limit:g} {unit}", value, limit)
            for what, value, limit, unit in checks if limit is not None and value > limit]


def choose(figures: list[CandidateFigures], budgets: Budgets) -> tuple[CandidateFigures | None,
                                                                      CandidateFigures | None, str]:
    """(chosen, nearest, reason): the best score among those that fit (ties: higher agreement with the teacher, then
    less energy, then fewer params); when none fits, none chosen and the nearest: the smallest worst ratio of figure
    to budget. Agreement breaks accuracy ties because on a small held-out part (202 digits: one image is half a
    point) several candidates tie on accuracy, and agreement is the finer signal of how well a student stands in."""
    if not figures:
        return None, None, "no candidates were built"
    fitting = [f for f in figures if f.fits]
    if fitting:
        best = max(fitting, key=lambda f: (round(f.score, 6), round(f.agreement, 6), -f.predicted_mj, -f.params))
        return best, None, (
            f"{best.candidate} as {best.precision} on {best.runtime} scores best within the budgets "
            f"({best.score:.4f}; p95 {best.predicted_p95_ms:.3g} ms, {best.predicted_mj:.3g} mJ, "
            f"{best.size_bytes / 1e6:.3g} MB); {len(fitting)} of {len(figures)} candidates fit")

    def worst(f: CandidateFigures) -> float:
        ratios = [value / limit for _, value, limit in _overruns(f, budgets)]
        return max(ratios, default=1.0)

    nearest = min(figures, key=lambda f: (worst(f), -f.score))
    return None, nearest, (
        f"no candidate fits the budgets; the nearest is {nearest.candidate} as {nearest.precision} "
        f"({nearest.why_not}); relax the budget, pick a faster class, or give a smaller grid")


class ClassPlanner:
    """Builds (and caches across classes) the variant each candidate would ship as on a class, and its figures."""

    def __init__(self, artifacts, costmodel, spec: DistillSpec, heldout: tuple, calib_x: np.ndarray, work: Path):
        self.artifacts, self.costmodel, self.spec = artifacts, costmodel, spec
        self.x, self.t_held, self.y_held = heldout  # inputs, teacher outputs, labels (or None)
        self.calib_x = calib_x
        self.work = work
        self._variants: dict[tuple[str, str, str], tuple[Any, float | None, str | None]] = {}
        self._measured: dict[tuple[str, str], Any] = {}
        self._converter_error: str | None = None
        self._scores: dict[tuple[str, str, str], tuple[float | None, float] | None] = {}

    def _variant_scores(self, variant) -> tuple[float | None, float] | None:
        """The shipped variant's own held-out scores (a quantized model can gain or lose a few predictions); None
        when this machine cannot run it (no LiteRT here), and the fp32 student's scores stand in."""
        run = getattr(self.artifacts, "run_variant", None)
        if run is None:
            return None
        try:
            return score_outputs(np.asarray(run(variant, self.x)), self.t_held, self.y_held, self.spec.task)
        except Exception:  # noqa: BLE001 - e.g. ImportError of LiteRT on the build machine; fp32 figures stand in
            return None

    def _build(self, cid: str, onnx32: bytes, precision: str, runtime: str) -> tuple[Any, float | None, str | None]:
        """(variant, drift, error): error names why this variant cannot ship (drift, converter missing)."""
        key = (cid, precision, runtime)
        if key in self._variants:
            return self._variants[key]
        if runtime == "litert" and self._converter_error is not None:
            return None, None, self._converter_error  # the converter venv failed once: do not rebuild it per model
        a = self.artifacts
        result: tuple[Any, float | None, str | None]
        try:
            if precision == "fp32" and runtime == "onnxruntime":
                # The fp32 student is the drift reference itself: nothing to build or check.
                result = (a.Variant("fp32", "onnxruntime", "onnx", onnx32), 0.0, None)
                self._variants[key] = result
                return result
            work = self.work / f"{cid}-{precision}-{runtime}"
            work.mkdir(parents=True, exist_ok=True)
            # Calibrated on training rows, checked on held-out rows: the check sees inputs calibration never saw,
            # as a device will.
            variant = a.make_variant(onnx32, precision, runtime, self.calib_x, work)
            drift = _drift_value(a.check_drift(variant, onnx32, self.x, self.spec.task, self.spec.drift_tolerance))
            result = (variant, drift, None)
            self._scores[key] = self._variant_scores(variant)
        except ArtifactDrift as exc:
            result = (None, _drift_value(exc.detail), f"{precision} {runtime} variant drifted: {exc.message}")
        except ArtifactUnrunnable as exc:
            result = (None, None, f"{precision} {runtime} variant cannot run: {exc.message}")
        except ConverterUnavailable as exc:
            result = (None, None, f"TFLite converter unavailable: {exc.message}")
            if (exc.detail or {}).get("stage") != "convert":  # the venv itself, not this model: same for all
                self._converter_error = result[2]
        self._variants[key] = result
        return result

    def _measure(self, cid: str, precision: str, data: bytes) -> float:
        if (cid, precision) not in self._measured:
            self._measured[(cid, precision)] = self.costmodel.measure_here(data, self.x[:64], runs=200)
        return float(self._measured[(cid, precision)].p95_ms)

    def plan(self, cand: Candidate, onnx32: bytes, counts, accuracy: float | None, agreement: float,
             cls: DeviceClassInfo, cal, budgets: Budgets, measure: bool) -> tuple[CandidateFigures, Any]:
        cm = self.costmodel
        runtime = "litert" if cls.runtimes[0] == "litert" else "onnxruntime"
        measured: float | None = None
        if cls.preferred_precision == "fp16":
            precision, why = "fp16", f"{cls.name} prefers fp16 (its GPU providers run fp16 natively)"
        else:
            p32, p8 = cm.predict(counts, cal, "fp32", runtime), cm.predict(counts, cal, "int8", runtime)
            m32 = m8 = err8 = None
            if measure and runtime == "onnxruntime":
                int8_variant, _, err8 = self._build(cand.id, onnx32, "int8", "onnxruntime")
                m32 = self._measure(cand.id, "fp32", onnx32)
                m8 = self._measure(cand.id, "int8", int8_variant.data) if err8 is None else None
            if m32 is not None and m8 is not None:
                pays, basis = m8 < INT8_MARGIN * m32, f"measured here: int8 p95 {m8:.3g} ms vs fp32 {m32:.3g} ms"
            else:
                pays, basis = p8.p95_ms < INT8_MARGIN * p32.p95_ms, (f"predicted: int8 p95 {p8.p95_ms:.3g} ms vs "
                                                                     f"fp32 {p32.p95_ms:.3g} ms")
            prefers = f"{cls.name} prefers int8, but " if cls.preferred_precision == "int8" and not pays else ""
            if pays:
                precision, why = "int8", f"int8 pays ({basis})"
            else:
                precision, why = "fp32", (f"{prefers}int8 does not pay ({basis}; it must be 10% faster): at "
                                          f"{counts.macs:,} MACs the fixed per-call quantize/dequantize cost "
                                          "outweighs the cheaper arithmetic")
            if precision == "fp32" and err8 is not None:
                why += f"; besides, the {err8}"  # measured runs were skipped: the int8 variant cannot ship anyway
            measured = m8 if precision == "int8" else m32
        variant, drift, error = self._build(cand.id, onnx32, precision, runtime)
        why_not = None
        if error is not None:
            if "onnxruntime" in cls.runtimes:
                why += f"; {error}: falling back to fp32 on ONNX Runtime"
                precision, runtime = "fp32", "onnxruntime"
                variant, _, _ = self._build(cand.id, onnx32, "fp32", "onnxruntime")
                m32_done = self._measured.get((cand.id, "fp32"))
                measured = None if m32_done is None else float(m32_done.p95_ms)
            else:
                why_not = error
        if runtime == "litert":
            why = f"{cls.name} runs LiteRT first: TFLite {variant.precision if variant else precision}; {why}"
        if variant is not None:
            precision = variant.precision
            own = self._scores.get((cand.id, precision, runtime))
            if own is not None:
                accuracy, agreement = own
        size = len(variant.data) if variant is not None else len(onnx32)
        pred = cm.predict(counts, cal, precision, runtime, model_bytes=size)
        fig = CandidateFigures(
            candidate=cand.id, family=cand.family, width_mult=cand.width_mult, depth=cand.depth, precision=precision,
            runtime=runtime, format="tflite" if runtime == "litert" else "onnx", precision_reason=why,
            accuracy=accuracy, agreement=agreement, score=accuracy if accuracy is not None else agreement,
            params=counts.params, macs=counts.macs, size_bytes=size, predicted_p95_ms=pred.p95_ms,
            predicted_mj=pred.mj_per_inference, measured_p95_ms=measured, fits=False, drift=drift)
        over = [text for text, _, _ in _overruns(fig, budgets)]
        if why_not is None and over:
            why_not = "; ".join(over)
        return fig.model_copy(update={"fits": why_not is None, "why_not": why_not}), variant


def _drift_value(result) -> float | None:
    """The changed share from a DriftResult (or an ArtifactDrift's detail dict), whatever its field is called."""
    if result is None:
        return None
    names = ("value", "changed_fraction", "drift")  # DriftResult.value; never "changed", which is a count
    for name in names:
        value = result.get(name) if isinstance(result, dict) else getattr(result, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def _default_modules(artifacts, costmodel):
    if artifacts is None:
        from edgefleet.cloud.distill import artifacts as artifacts
    if costmodel is None:
        from edgefleet.cloud.distill import costmodel as costmodel
    return artifacts, costmodel


def _teacher_figures(teacher_bytes, info, targets: TeacherOutputs, t_held, y_held, costmodel,
                     shape) -> ModelFigures:
    accuracy = None
    if y_held is not None:
        accuracy = score_outputs(t_held, t_held, y_held, targets.kind == "values" and "regression" or "")[0]
    params = macs = counter = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # onnx-tool warns once per operator it cannot profile
            counts = costmodel.count_ops(teacher_bytes, shape)
        # 0 MACs means "operators the counter does not know" (ai.onnx.ml Scaler, LinearClassifier...), not free.
        if counts.macs > 0:
            params, macs, counter = counts.params, counts.macs, counts.counter
    except Exception:  # noqa: BLE001 - a teacher with operators no counter knows simply has no counts
        pass
    return ModelFigures(size_bytes=len(teacher_bytes), params=params, macs=macs, counter=counter, accuracy=accuracy,
                        input_shape=list(info.input_shape), output=info.chosen_output)


def run_distillation(teacher_bytes: bytes, npz: bytes | Path, spec: DistillSpec,
                     catalog: Mapping[str, DeviceClassInfo], calibrations: Mapping[str, Any], work_dir: Path,
                     progress: Progress | None = None, should_cancel: Callable[[], bool] | None = None, *,
                     model_name: str = "student", artifacts: ModuleType | Any = None,
                     costmodel: ModuleType | Any = None,
                     measure_classes: Collection[str] | None = None) -> DistillResult:
    """Distil `teacher_bytes` on the transfer set `npz` for `spec.classes`.

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
    held = parts.heldout_idx
    x_held, y_held, t_held = transfer.x[held], None if transfer.y is None else transfer.y[held], targets.logits[held]
    sample_shape = list(transfer.x.shape[1:])
    teacher = _teacher_figures(teacher_bytes, info, targets, t_held, y_held, costmodel, sample_shape)
    report_progress("teacher outputs", _TEACHER_END)

    # 3. Train, export and score every candidate, smallest first.
    candidates = candidates_for(shape, targets.n_out, spec.max_candidates)
    output_name = "values" if spec.task == "regression" else "logits"
    students: list[_Student] = []
    span = (_TRAIN_END - _TEACHER_END) / len(candidates)
    for i, cand in enumerate(candidates):
        check_cancel(f"before training {cand.id}")
        base = _TEACHER_END + i * span
        started = time.perf_counter()
        trained = train_student(cand, transfer, targets, parts, spec,
                                progress=lambda stage, f, base=base: report_progress(stage, base + f * span * 0.9),
                                should_cancel=should_cancel)
        onnx_bytes = to_onnx(trained.module, shape, output_name=output_name,
                             doc_string=f"edgefleet distilled student {cand.id} of {model_name}, seed {spec.seed}")
        report_progress(f"export {cand.id}", base + span * 0.95)
        accuracy, agreement = score_outputs(run_onnx(onnx_bytes, x_held), t_held, y_held, spec.task)
        counts = costmodel.count_ops(onnx_bytes, sample_shape)
        students.append(_Student(cand, onnx_bytes, counts, accuracy, agreement, StudentFigures(
            candidate=cand.id, family=cand.family, width_mult=cand.width_mult, depth=cand.depth,
            hidden=list(cand.hidden), epochs=trained.epochs, best_epoch=trained.best_epoch,
            val_agreement=trained.val_agreement, accuracy=accuracy, agreement=agreement, params=counts.params,
            macs=counts.macs, size_bytes=len(onnx_bytes), train_s=round(time.perf_counter() - started, 3))))

    # 4. Per class: the variant each candidate would ship as, its predictions, the choice.
    results: dict[str, ClassResult] = {}
    chosen: dict[str, ChosenArtifact] = {}
    calib_x = transfer.x[parts.train_idx[np.random.default_rng(spec.seed).permutation(len(parts.train_idx))[:512]]]
    planner = ClassPlanner(artifacts, costmodel, spec, (x_held, t_held, y_held), calib_x, work_dir / "variants")
    teacher_counts = None
    if teacher.macs is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            teacher_counts = costmodel.count_ops(teacher_bytes, sample_shape)
    for k, name in enumerate(spec.classes):
        check_cancel(f"before building variants for {name}")
        report_progress(f"variants {name}", _TRAIN_END + (1 - _TRAIN_END) * k / len(spec.classes))
        cls = catalog[name]
        cal = calibrations.get(name) or costmodel.default_calibration(cls)
        figures, variants = [], {}
        for st in students:
            fig, variant = planner.plan(st.candidate, st.onnx, st.counts, st.accuracy, st.agreement, cls, cal,
                                        budgets[name], measure=name in measure_classes)
            figures.append(fig)
            variants[st.candidate.id] = variant
        best, nearest, reason = choose(figures, budgets[name])
        teacher_pred = costmodel.predict(teacher_counts, cal, "fp32", "onnxruntime") if teacher_counts else None
        results[name] = ClassResult(
            device_class=name, budgets=budgets[name], calibration_source=getattr(cal, "source", ""), chosen=best,
            reason=reason, nearest=nearest, candidates=figures,
            teacher_predicted_p95_ms=teacher_pred.p95_ms if teacher_pred else None,
            teacher_predicted_mj=teacher_pred.mj_per_inference if teacher_pred else None)
        if best is not None:
            onnx32 = next(st.onnx for st in students if st.candidate.id == best.candidate)
            chosen[name] = ChosenArtifact(name, best.candidate, variants[best.candidate], onnx32)

    report = DistillReport(
        model_name=model_name, task=spec.task, teacher=teacher, teacher_output_kind=targets.kind,
        how_probabilities_were_handled=targets.how_probabilities_were_handled(),
        metric=_metric_words(spec.task, transfer.y is not None), n_samples=len(transfer.x),
        n_train=len(parts.train_idx), n_val=len(parts.val_idx), n_heldout=len(held), has_labels=transfer.y is not None,
        temperature=spec.temperature, alpha=spec.alpha, students=[st.figures for st in students], classes=results,
        seed=spec.seed, created_at=datetime.now(timezone.utc))
    _write(work_dir, report)
    report_progress("done", 1.0)
    return DistillResult(report, chosen, {st.candidate.id: st.onnx for st in students})


def _metric_words(task: str, has_labels: bool) -> str:
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
