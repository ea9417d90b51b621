"""Per class, the variant each candidate would ship as, and its figures: precision, runtime, drift, predictions.

Theory: a candidate (a trained student, or the teacher itself) becomes the variant a class would run:

  - runtime: LiteRT (TFLite) when the class lists "litert" first, else ONNX Runtime;
  - precision: fp16 when the class prefers fp16 (Jetson GPUs); int8 only where it PAYS: when the class's cost model
    predicts (or, for classes measured here, a run on this machine shows) a lower p95 than fp32. On tiny models the
    fixed per-call quantize/dequantize cost outweighs the cheaper arithmetic and int8 is slower, so a class that
    prefers int8 still gets fp32 then, and the report says why;
  - a quantized or converted variant must keep its predictions within `drift_tolerance` of the fp32 model on the
    held-out rows, else the class falls back to fp32 ONNX (the drift is reported).

Variants are built once per (candidate, precision, runtime) and shared across classes. A variant's own scores (a
quantized model can gain or lose a few predictions) replace the fp32 model's where this machine can run it, on the
held-out rows and on the user's test set. The teacher goes through the same planning (`TeacherCandidate`); a teacher
whose graph the quantizer or converter cannot handle (an ai.onnx.ml tree ensemble, say) ships fp32, with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.cloud.distill.choice import overruns
from edgefleet.cloud.distill.errors import ArtifactDrift, ArtifactUnrunnable, ConverterUnavailable
from edgefleet.cloud.distill.evaluate import score_outputs
from edgefleet.cloud.distill.spec import DistillSpec
from edgefleet.protos.distill import CandidateFigures
from edgefleet.protos.messages import Budgets, DeviceClassInfo

# int8 must be at least 10% faster to pay: it risks drift, and single-sample timings of tiny models jitter by about
# that much between runs (measured: the same 9k-MAC MLP at 0.041-0.047 ms p95), which would flip the choice.
INT8_MARGIN = 0.9


@dataclass(frozen=True)
class TeacherCandidate:
    """The teacher, planned like a student (the fields `ClassPlanner.plan` reads from a `families.Candidate`)."""

    id: str = "teacher"
    family: str = "teacher"
    width_mult: float = 1.0
    depth: int = 0


# `OpCounts.counter` of a teacher whose operators no counter knows (ai.onnx.ml tree ensembles, say): its MACs are the
# work that would take as long as its measured latency on the build machine, by the x86-cpu class's own figures.
EQUIVALENT = "measured-equivalent"


def teacher_cost(teacher_bytes: bytes, x: np.ndarray, info: Any, costmodel: Any,
                 sample_shape: list) -> tuple[Any, str, float | None]:
    """(counts or None, how they were found, measured single-sample p95 ms here or None) for the teacher.

    Counted where the counter knows the operators; else inferred from a measurement on this machine: a tree
    ensemble has no MACs, but the time it takes says what it costs, and the same figure of a student is comparable.
    """
    import warnings

    from edgefleet.cloud.distill.costmodel import DEFAULTS, OpCounts

    counts = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # onnx-tool warns once per operator it cannot profile
            counts = costmodel.count_ops(teacher_bytes, sample_shape)
    except Exception:  # noqa: BLE001 - a teacher with operators no counter knows simply has no counts
        counts = None
    measured = None
    try:
        measured = costmodel.measure_here(teacher_bytes, np.asarray(x[:64]).astype(info.input_dtype), runs=100)
    except Exception:  # noqa: BLE001 - a stand-in cost model, or a teacher that refuses single rows
        measured = None
    p95 = float(measured.p95_ms) if measured is not None else None
    # 0 MACs means "operators the counter does not know" (ai.onnx.ml Scaler, TreeEnsemble...), not free.
    if counts is not None and counts.macs > 0:
        return counts, f"counted ({counts.counter})", p95
    if measured is None:
        return None, "unknown: the counter does not know the teacher's operators and it could not be timed", None
    here = DEFAULTS["x86-cpu"]
    work_ms = max(float(measured.p50_ms) - here["overhead_ms"], 1e-4)
    macs = max(1, int(work_ms * here["gmacs_per_s"]["fp32"] * 1e6))
    basis = (f"equivalent: its operators cannot be counted, so its MACs are the work the build machine does in its "
             f"measured {measured.p50_ms:.3g} ms median (x86-cpu figures)")
    return OpCounts(macs=macs, params=0, bytes_moved=0, model_bytes=len(teacher_bytes), counter=EQUIVALENT), basis, p95


@dataclass(frozen=True)
class EvalRows:
    """Rows a variant is scored on: inputs, the teacher's outputs on them, labels (or None)."""

    x: np.ndarray
    teacher: np.ndarray
    y: np.ndarray | None


class ClassPlanner:
    """Builds (and caches across classes) the variant each candidate would ship as on a class, and its figures."""

    def __init__(self, artifacts, costmodel, spec: DistillSpec, heldout: tuple, calib_x: np.ndarray, work: Path,
                 test: EvalRows | None = None):
        self.artifacts, self.costmodel, self.spec = artifacts, costmodel, spec
        self.x, self.t_held, self.y_held = heldout  # inputs, teacher outputs, labels (or None)
        self.test = test
        self.calib_x = calib_x
        self.work = work
        self._variants: dict[tuple[str, str, str], tuple[Any, float | None, str | None]] = {}
        self._measured: dict[tuple[str, str], Any] = {}
        self._converter_error: str | None = None
        self._scores: dict[tuple[str, str, str], tuple[float | None, float, float | None] | None] = {}

    def _variant_scores(self, variant) -> tuple[float | None, float, float | None] | None:
        """The shipped variant's own (held-out accuracy, agreement, test accuracy): a quantized model can gain or
        lose a few predictions. None when this machine cannot run it (no LiteRT here): the fp32 scores stand in."""
        run = getattr(self.artifacts, "run_variant", None)
        if run is None:
            return None
        try:
            accuracy, agreement = score_outputs(np.asarray(run(variant, self.x)), self.t_held, self.y_held,
                                                self.spec.task)
            test_accuracy = None
            if self.test is not None:
                test_accuracy = score_outputs(np.asarray(run(variant, self.test.x)), self.test.teacher,
                                              self.test.y, self.spec.task)[0]
            return accuracy, agreement, test_accuracy
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
        except Exception as exc:  # a teacher the quantizer or converter cannot take (ai.onnx.ml ops, say)
            if cid != TeacherCandidate.id:
                raise  # a student's graph is ours: a failure there is a bug, not an input to work around
            text = " ".join(str(exc).split())[:200]
            result = (None, None, f"the teacher's {precision} {runtime} variant cannot be built ({text})")
        self._variants[key] = result
        return result

    def _measure(self, cid: str, precision: str, data: bytes) -> float:
        if (cid, precision) not in self._measured:
            self._measured[(cid, precision)] = self.costmodel.measure_here(data, self.x[:64], runs=200)
        return float(self._measured[(cid, precision)].p95_ms)

    def plan(self, cand: Any, onnx32: bytes, counts, accuracy: float | None, agreement: float,
             cls: DeviceClassInfo, cal, budgets: Budgets, measure: bool,
             test_accuracy: float | None = None) -> tuple[CandidateFigures, Any]:
        """`cand`: a `families.Candidate` or a `TeacherCandidate`; the fp32 scores stand in for a variant's own."""
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
                accuracy, agreement, own_test = own
                test_accuracy = own_test if self.test is not None else test_accuracy
        size = len(variant.data) if variant is not None else len(onnx32)
        pred = cm.predict(counts, cal, precision, runtime, model_bytes=size)
        fig = CandidateFigures(
            candidate=cand.id, family=cand.family, width_mult=cand.width_mult, depth=cand.depth, precision=precision,
            runtime=runtime, format="tflite" if runtime == "litert" else "onnx", precision_reason=why,
            accuracy=accuracy, agreement=agreement, test_accuracy=test_accuracy,
            score=test_accuracy if test_accuracy is not None else accuracy if accuracy is not None else agreement,
            params=counts.params, macs=counts.macs, size_bytes=size, predicted_p95_ms=pred.p95_ms,
            predicted_mj=pred.mj_per_inference, measured_p95_ms=measured, fits=False, drift=drift)
        over = [text for text, _, _ in overruns(fig, budgets)]
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


__all__ = ["EQUIVALENT", "INT8_MARGIN", "ClassPlanner", "EvalRows", "TeacherCandidate", "teacher_cost"]
