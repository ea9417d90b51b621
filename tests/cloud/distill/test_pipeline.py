"""cloud/distill/pipeline.py: refusal before training, per-class precision choices with the real artifacts and cost
model, budgets, fallbacks (drift, no converter) with an injected stand-in, reproducibility, progress and cancel."""

from __future__ import annotations

import json
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import onnxruntime as ort
import pytest

from edgefleet.cloud.catalog import builtin_catalog
from edgefleet.cloud.distill import costmodel, pipeline
from edgefleet.cloud.distill.data import split
from edgefleet.cloud.distill.errors import ArtifactDrift, ConverterUnavailable, DistillCancelled, DistillInputError
from edgefleet.cloud.distill.pipeline import run_distillation
from edgefleet.cloud.distill.spec import DistillSpec
from edgefleet.protos.distill import DistillReport
from edgefleet.protos.messages import Budgets, DeviceClassInfo
from tests.cloud.distill.distill_teachers import (
    digits,
    label_only_teacher,
    linear_teacher,
    npz_bytes,
    sklearn_teacher,
    torch_teacher,
)

FAST = dict(max_epochs=4, patience=2, max_candidates=2)
# A CPU class that prefers int8, and a calibration on which int8 clearly pays (int8 50x the fp32 throughput, no
# extra per-call cost): the real int8 path must then be taken and drift-checked.
INT8_CLASS = DeviceClassInfo(name="cpu-int8", cores=2, memory_mb=1024, runtimes=["onnxruntime"],
                             preferred_precision="int8", idle_watts=1.0, active_watts=5.0,
                             budgets=Budgets(p95_latency_ms=100.0))
INT8_PAYS = costmodel.Calibration("cpu-int8", {"fp32": 0.02, "fp16": 0.02, "int8": 1.0}, overhead_ms=0.01,
                                  active_watts=5.0, idle_watts=1.0, source="test: int8 pays", int8_overhead_ms=0.0)


def _catalog() -> dict[str, DeviceClassInfo]:
    catalog = builtin_catalog()
    catalog["cpu-int8"] = INT8_CLASS
    catalog["rpi4-litert"] = catalog["rpi4"].model_copy(update={"name": "rpi4-litert",
                                                                "runtimes": ["litert", "onnxruntime"]})
    catalog["litert-only"] = INT8_CLASS.model_copy(update={"name": "litert-only", "runtimes": ["litert"],
                                                           "preferred_precision": "fp32"})
    return catalog


TEACHER_BYTES = sklearn_teacher()


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    x, y = digits()
    # 5%: int8 copies of 4-epoch digits MLPs change 2-3% of held-out predictions (measured); the default 2% would
    # refuse them and skip the measured int8-vs-fp32 comparison this run exercises.
    spec = DistillSpec(classes=("x86-cpu", "jetson-orin-nano", "rpi5", "cpu-int8"), drift_tolerance=0.05, **FAST)
    stages: list[tuple[str, float]] = []
    work = tmp_path_factory.mktemp("distill")
    result = run_distillation(TEACHER_BYTES, npz_bytes(x=x, y=y), spec, _catalog(), {"cpu-int8": INT8_PAYS},
                              work, progress=lambda s, f: stages.append((s, f)), model_name="digits",
                              measure_classes=("x86-cpu",))
    return result, stages, work


def test_report_per_class_with_real_artifacts_and_costmodel(real_run):
    result, _, work = real_run
    report = result.report
    assert report.teacher_output_kind == "probabilities" and "log(p + 1e-12)" in report.how_probabilities_were_handled
    assert report.n_samples == 1797 and report.n_heldout == 270 and report.has_labels
    assert report.teacher.accuracy is not None and len(report.students) == 2
    assert all(s.macs > 0 and s.params > 0 for s in report.students)
    assert set(report.classes) == {"x86-cpu", "jetson-orin-nano", "rpi5", "cpu-int8"}
    for name, r in report.classes.items():
        assert r.chosen is not None and r.chosen.fits and len(r.candidates) == 2, name
        assert r.teacher_variant is not None and r.teacher_variant.family == "teacher"
        # The objective's pick (efficiency by default) is one of the two rules' picks, shown side by side.
        assert r.objective == "efficiency" and r.chosen == r.chosen_by_efficiency and r.chosen_by_accuracy
        assert r.chosen_by_accuracy.score == max(c.score for c in [*r.candidates, r.teacher_variant] if c.fits)
    # Per class, the precision each student would ship as: x86 decided on a run measured here; jetson fp16 as
    # preferred; rpi5 prefers int8, which cannot pay on a model of a few thousand MACs (fixed per-call cost), so
    # fp32 and the report says why.
    def student(name):
        return max(report.classes[name].candidates, key=lambda c: c.score)

    x86 = student("x86-cpu")
    assert "measured here" in x86.precision_reason and x86.measured_p95_ms is not None
    assert student("jetson-orin-nano").precision == "fp16"
    rpi5 = student("rpi5")
    assert rpi5.precision == "fp32" and "prefers int8, but int8 does not pay" in rpi5.precision_reason
    int8 = student("cpu-int8")
    assert int8.precision == "int8" and "int8 pays" in int8.precision_reason
    assert int8.drift is not None and int8.drift <= 0.05 and report.classes["cpu-int8"].calibration_source
    # Its accuracy is the int8 artifact's own on the held-out rows, not the fp32 student's.
    held = split(1797, DistillSpec(classes=("x86-cpu",))).heldout_idx
    x, y = digits()
    int8_variant = result.variants["cpu-int8"][int8.candidate]
    session = ort.InferenceSession(int8_variant.data, providers=["CPUExecutionProvider"])
    # The student keeps the skl2onnx teacher's outputs: `label` int64, then `probabilities` (test_interface.py).
    assert [o.name for o in session.get_outputs()] == ["label", "probabilities"]
    own = float((session.run(["probabilities"], {"input": x[held]})[0].argmax(1) == y[held]).mean())
    assert int8.accuracy == pytest.approx(own)
    # Artifacts: the chosen variants (a student's, or the teacher's own) load and answer like the figures say.
    for name, art in result.chosen.items():
        fig = report.classes[name].chosen
        assert art.candidate == fig.candidate and art.variant.precision == fig.precision
        reference = TEACHER_BYTES if fig.family == "teacher" else result.students[fig.candidate]
        assert len(art.variant.data) == fig.size_bytes and art.fp32_onnx == reference
        session = ort.InferenceSession(art.variant.data, providers=["CPUExecutionProvider"])
        out = session.run(None, {"input": digits()[0][:5]})
        assert any(o.shape == (5, 10) for o in out)
        assert art.variant.fmt == "onnx"
    # The JSON and the plot are written next to the work, and the JSON parses back into the model.
    parsed = DistillReport.model_validate(json.loads((work / "report.json").read_text()))
    assert parsed == report
    assert (work / "plot.svg").read_text().startswith("<svg")


def test_progress_runs_from_0_to_1_through_named_stages(real_run):
    _, stages, _ = real_run
    fractions = [f for _, f in stages]
    assert fractions == sorted(fractions) and fractions[0] == 0.0 and fractions[-1] == 1.0
    names = {s for s, _ in stages}
    assert {"check inputs", "teacher outputs", "done"} <= names
    assert any(s.startswith("train mlp-") for s in names) and any(s.startswith("variants ") for s in names)


def test_none_fits_names_the_nearest(tmp_path):
    x, y = digits()
    spec = DistillSpec(classes=("rpi4",), budgets={"rpi4": Budgets(p95_latency_ms=1e-4)}, **FAST)
    result = run_distillation(torch_teacher("mlp"), npz_bytes(x=x, y=y), spec, _catalog(), {}, tmp_path)
    r = result.report.classes["rpi4"]
    assert r.chosen is None and r.nearest is not None and "no candidate fits" in r.reason
    assert all(not c.fits and c.why_not.startswith("p95") for c in r.candidates)
    assert "rpi4" not in result.chosen
    # Nearest: the fastest (smallest worst overrun), which for this grid is the smallest student.
    assert r.nearest.predicted_p95_ms == min(c.predicted_p95_ms for c in r.candidates)


def test_same_seed_same_students(tmp_path):
    x, y = digits()
    spec = DistillSpec(classes=("x86-cpu",), max_epochs=3, patience=2, max_candidates=1)
    args = (torch_teacher("mlp"), npz_bytes(x=x, y=y), spec, _catalog(), {})
    a = run_distillation(*args, tmp_path / "a", measure_classes=())
    b = run_distillation(*args, tmp_path / "b", measure_classes=())
    assert a.students == b.students and a.report.students[0].agreement == b.report.students[0].agreement


def test_image_teacher_without_labels(tmp_path):
    x, _ = digits()
    spec = DistillSpec(classes=("x86-cpu",), max_epochs=2, patience=2, max_candidates=1)
    result = run_distillation(torch_teacher("nhwc"), npz_bytes(x=x.reshape(-1, 8, 8, 1)), spec, _catalog(), {},
                              tmp_path, measure_classes=())
    report = result.report
    assert report.students[0].family == "dscnn2d" and report.students[0].accuracy is None
    assert not report.has_labels and "agreement" in report.metric
    chosen = report.classes["x86-cpu"].chosen
    assert chosen is not None and chosen.accuracy is None and chosen.score == chosen.agreement


# ---- bad input: refused before any training


@pytest.fixture
def no_training(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("training started despite bad input")

    monkeypatch.setattr(pipeline, "train_student", boom)


def _bad_cases():
    x, y = digits()
    mlp = lambda: torch_teacher("mlp")  # noqa: E731 - built lazily, inside the test
    return {
        "rank 5 teacher": (lambda: linear_teacher((1, 1, 2, 4, 8), 3), lambda: npz_bytes(x=np.zeros((30, 1, 2, 4, 8))),
                           ("x86-cpu",), "rank 5"),
        "only int64 output": (label_only_teacher, lambda: npz_bytes(x=x), ("x86-cpu",), "no float output"),
        "shape mismatch": (mlp, lambda: npz_bytes(x=x.reshape(-1, 1, 8, 8)), ("x86-cpu",), "reshape x"),
        "nan": (mlp, lambda: npz_bytes(x=np.where(np.arange(64) == 7, np.nan, x)), ("x86-cpu",), "NaN"),
        "inf": (mlp, lambda: npz_bytes(x=np.where(np.arange(64) == 7, -np.inf, x)), ("x86-cpu",), "infinite"),
        "empty": (mlp, lambda: npz_bytes(x=np.zeros((0, 64), np.float32)), ("x86-cpu",), "empty"),
        "label >= K": (mlp, lambda: npz_bytes(x=x, y=y + 1), ("x86-cpu",), "does not match"),
        "label count": (mlp, lambda: npz_bytes(x=x, y=y[:100]), ("x86-cpu",), "100 labels for 1797"),
        "unknown class": (mlp, lambda: npz_bytes(x=x), ("x86-cpu", "toaster"), "unknown device class 'toaster'"),
        "not an npz": (mlp, lambda: b"x,y\n1,2\n", ("x86-cpu",), "not an .npz"),
        "missing x": (mlp, lambda: npz_bytes(inputs_wrong=x), ("x86-cpu",), "expected key 'x'"),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_bad_input_is_refused_before_training(case, tmp_path, no_training):
    teacher, npz, classes, message = _bad_cases()[case]
    spec = DistillSpec(classes=classes, **FAST)
    with pytest.raises(DistillInputError, match=message):
        run_distillation(teacher(), npz(), spec, _catalog(), {}, tmp_path)


# ---- fallbacks, with an injected artifacts stand-in


@dataclass(frozen=True)
class FakeVariant:
    precision: str
    runtime: str
    fmt: str
    data: bytes


def _fake_artifacts(calls: list):
    def make_variant(onnx_fp32, precision, runtime, calib_x, work):
        calls.append((precision, runtime))
        if runtime == "litert":
            raise ConverterUnavailable("no network to build the converter venv", detail={"stage": "build"})
        return FakeVariant(precision, runtime, "onnx", onnx_fp32[: len(onnx_fp32) // 4])

    def check_drift(v, reference, x, task, tolerance):
        if v.precision == "int8":
            raise ArtifactDrift("int8 changed 9% of predictions", detail={"value": 0.09, "changed": 24})
        return SimpleNamespace(value=0.0)

    return SimpleNamespace(Variant=FakeVariant, make_variant=make_variant, check_drift=check_drift)


def test_drift_and_missing_converter_fall_back_to_fp32(tmp_path):
    x, y = digits()
    calls: list = []
    spec = DistillSpec(classes=("rpi4-litert", "cpu-int8", "litert-only"), **FAST)
    result = run_distillation(torch_teacher("mlp"), npz_bytes(x=x, y=y), spec, _catalog(), {"cpu-int8": INT8_PAYS},
                              tmp_path, artifacts=_fake_artifacts(calls), measure_classes=())
    classes = result.report.classes
    # This class runs LiteRT first; the converter cannot be built: ONNX Runtime fp32 instead, said in the reason.
    rpi4 = classes["rpi4-litert"].chosen
    assert rpi4.runtime == "onnxruntime" and rpi4.precision == "fp32" and rpi4.format == "onnx"
    assert "TFLite converter unavailable" in rpi4.precision_reason
    # The converter venv failure is remembered: one attempt for the whole job, not one per candidate and class.
    assert sum(1 for _, rt in calls if rt == "litert") == 1
    # int8 pays on cpu-int8 but drifts past tolerance: fp32 ships, the drift figure is reported.
    c8 = classes["cpu-int8"].chosen
    assert c8.precision == "fp32" and "drifted" in c8.precision_reason and c8.drift == pytest.approx(0.09)
    # A class that runs LiteRT only cannot take an ONNX fallback: nothing fits, and the report says why.
    only = classes["litert-only"]
    assert only.chosen is None and "converter unavailable" in only.nearest.why_not
    assert set(result.chosen) == {"rpi4-litert", "cpu-int8"}


def test_cancel_between_steps(tmp_path):
    x, y = digits()
    polls = iter([False] * 4 + [True] * 100)
    with pytest.raises(DistillCancelled):
        run_distillation(torch_teacher("mlp"), npz_bytes(x=x, y=y), DistillSpec(classes=("x86-cpu",), **FAST),
                         _catalog(), {}, tmp_path, should_cancel=lambda: next(polls), measure_classes=())
