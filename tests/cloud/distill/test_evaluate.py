"""cloud/distill/evaluate.py and its place in the pipeline: a user's test set ranks the candidates, the report says
plainly when there is none, and degenerate students (one class, low agreement, below the majority baseline) are
warned about."""

from __future__ import annotations

import numpy as np
import pytest

from edgefleet.cloud.catalog import builtin_catalog
from edgefleet.cloud.distill.errors import DistillInputError
from edgefleet.cloud.distill.evaluate import HELDOUT_NOTE, majority_baseline, warnings_for
from edgefleet.cloud.distill.pipeline import run_distillation
from edgefleet.cloud.distill.spec import DistillSpec
from tests.cloud.distill.distill_teachers import digits, npz_bytes

FAST = dict(max_epochs=3, patience=2, max_candidates=1)


def _onehot_outputs(pred: np.ndarray, k: int) -> np.ndarray:
    out = np.zeros((len(pred), k), np.float32)
    out[np.arange(len(pred)), pred] = 5.0
    return out


def test_majority_baseline_counts_labelled_rows_only():
    assert majority_baseline(np.array([0, 0, 1, -1, -1])) == pytest.approx(2 / 3)
    assert majority_baseline(None) is None and majority_baseline(np.array([-1, -1])) is None


def test_a_collapsed_student_is_warned_about():
    pred = np.zeros(100, np.int64)
    pred[:5] = 1
    found = warnings_for(_onehot_outputs(pred, 3), agreement=0.6, accuracy=0.4, baseline=0.5, task="classification")
    text = " | ".join(found)
    assert "predicts class 0 for 95%" in text and "agrees with the teacher on only 60.0%" in text
    assert "below the majority-class baseline 50.0%" in text


def test_a_healthy_student_earns_no_warning():
    pred = np.arange(100) % 4
    assert warnings_for(_onehot_outputs(pred, 4), 0.97, 0.95, 0.25, "classification") == []
    assert warnings_for(np.zeros((5, 1), np.float32), 0.1, 0.1, None, "regression") == []


def _forest_teacher(x: np.ndarray, y: np.ndarray) -> bytes:
    """A random forest fit on (x, y) through skl2onnx: it remembers its training rows (100% on them)."""
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.ensemble import RandomForestClassifier

    clf = RandomForestClassifier(n_estimators=20, max_depth=None, random_state=0).fit(x, y)
    onx = to_onnx(clf, initial_types=[("input", FloatTensorType([None, x.shape[1]]))],
                  options={id(clf): {"zipmap": False}}, target_opset={"": 17, "ai.onnx.ml": 3})
    return onx.SerializeToString()


@pytest.fixture(scope="module")
def forest_runs(tmp_path_factory):
    x, y = digits()
    x_fit, y_fit, x_test, y_test = x[:1200], y[:1200], x[1200:], y[1200:]
    teacher = _forest_teacher(x_fit, y_fit)
    spec = DistillSpec(classes=("x86-cpu",), **FAST)
    work = tmp_path_factory.mktemp("forest")
    args = (teacher, npz_bytes(x=x_fit, y=y_fit), spec, builtin_catalog(), {})
    with_test = run_distillation(*args, work / "test", test_npz=npz_bytes(x=x_test, y=y_test), measure_classes=())
    without = run_distillation(*args, work / "heldout", measure_classes=())
    return with_test.report, without.report


def test_the_test_set_shows_what_the_held_out_split_flatters(forest_runs):
    report, _ = forest_runs
    # The held-out rows are the forest's own training rows: it is perfect there and not on rows it never saw.
    assert report.teacher.accuracy == 1.0 and report.teacher.test_accuracy < 0.99
    assert report.evaluation == "test" and report.n_test == 597 and "597 rows no model saw" in report.evaluation_note
    assert "test set" in report.metric
    cr = report.classes["x86-cpu"]
    for fig in [*cr.candidates, cr.teacher_variant]:
        assert fig.test_accuracy is not None and fig.score == fig.test_accuracy
    assert all(s.test_accuracy is not None for s in report.students)
    # A tree ensemble has no countable MACs: its cost is inferred from a measurement, and the report says so.
    assert report.teacher.counter == "measured-equivalent" and "equivalent" in report.teacher.macs_basis
    assert cr.teacher_variant.macs == report.teacher.macs > 0


def test_without_a_test_set_the_report_says_its_figures_may_flatter(forest_runs):
    _, report = forest_runs
    assert report.evaluation == "heldout" and report.evaluation_note == HELDOUT_NOTE and report.n_test == 0
    assert report.teacher.test_accuracy is None
    assert all(c.test_accuracy is None for c in report.classes["x86-cpu"].candidates)


def test_a_teacher_that_answers_one_class_is_warned_about(tmp_path):
    from tests.job_kinds import tiny_teacher

    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 8)).astype(np.float32)
    # Far from the origin on one side: the random teacher answers (nearly) one class for all of these inputs.
    x = x * 0.05 + 3.0
    spec = DistillSpec(classes=("x86-cpu",), **FAST)
    report = run_distillation(tiny_teacher(), npz_bytes(x=x), spec, builtin_catalog(), {}, tmp_path,
                              measure_classes=()).report
    assert any(w.startswith("the teacher predicts class") for w in report.warnings), report.warnings


@pytest.mark.parametrize("test_set, words", [
    (dict(x=digits()[0][:50]), "the test set has no labels"),
    (dict(x=digits()[0][:50, :10], y=digits()[1][:50]), "the test set's x has shape"),
    (dict(x=digits()[0][:50], y=np.full(50, -1)), "unlabelled rows"),
    (dict(x=digits()[0][:50], y=np.full(50, 12)), "labels range"),
])
def test_a_bad_test_set_is_refused_before_training(tmp_path, test_set, words):
    from tests.cloud.distill.distill_teachers import torch_teacher

    x, y = digits()
    with pytest.raises(DistillInputError, match=words):
        run_distillation(torch_teacher("mlp"), npz_bytes(x=x, y=y), DistillSpec(classes=("x86-cpu",), **FAST),
                         builtin_catalog(), {}, tmp_path, test_npz=npz_bytes(**test_set), measure_classes=())
