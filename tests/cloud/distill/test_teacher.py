"""cloud/distill/teacher.py: one cached ONNX Runtime run, probabilities detected and turned into logits."""

from __future__ import annotations

import numpy as np
import pytest

from edgefleet.cloud.distill import teacher as teacher_mod
from edgefleet.cloud.distill.data import inspect_teacher
from edgefleet.cloud.distill.errors import DistillInputError
from edgefleet.cloud.distill.spec import DistillSpec
from edgefleet.cloud.distill.teacher import EPS, looks_like_probabilities, teacher_outputs
from tests.cloud.distill.distill_teachers import digits, linear_teacher, sklearn_teacher, torch_teacher

SPEC = DistillSpec(classes=("rpi4",))


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_sklearn_probabilities_become_logits_whose_softmax_is_p():
    onx = sklearn_teacher()
    info = inspect_teacher(onx, SPEC)
    x, _ = digits()
    out = teacher_outputs(onx, x, info, SPEC, None)
    assert out.kind == "probabilities" and out.detected_by == "name" and out.logits.shape == (1797, 10)
    import onnxruntime as ort

    p = ort.InferenceSession(onx, providers=["CPUExecutionProvider"]).run(["probabilities"], {"input": x})[0]
    np.testing.assert_allclose(_softmax(out.logits), p, atol=1e-5)
    np.testing.assert_allclose(out.logits, np.log(p + EPS), rtol=1e-6)
    # At temperature T the soft targets are (p + eps)^(1/T) renormalised; the floor moves them by at most ~eps^(1/T).
    T = 4.0
    soft = (p.astype(np.float64) + EPS) ** (1 / T)
    np.testing.assert_allclose(_softmax(out.logits / T), soft / soft.sum(1, keepdims=True), atol=1e-5)
    exact = p.astype(np.float64) ** (1 / T)
    assert np.abs(_softmax(out.logits / T) - exact / exact.sum(1, keepdims=True)).max() < 2e-3
    assert "log(p + 1e-12)" in out.how_probabilities_were_handled()


def test_softmax_output_is_detected_by_values_and_logits_are_left_alone():
    x, _ = digits()
    probs = torch_teacher("mlp", softmax=True)  # output named "probs": name and values both say probabilities
    out = teacher_outputs(probs, x, inspect_teacher(probs, SPEC), SPEC, None)
    assert out.kind == "probabilities"
    logits = torch_teacher("mlp")
    out = teacher_outputs(logits, x, inspect_teacher(logits, SPEC), SPEC, None)
    assert out.kind == "logits" and out.detected_by == "values" and out.how_probabilities_were_handled() is None
    assert out.logits.min() < 0  # untouched logits


def test_output_kind_override():
    x, _ = digits()
    onx = torch_teacher("mlp")
    spec = DistillSpec(classes=("rpi4",), output_kind="logits")
    sk = sklearn_teacher()
    forced = teacher_outputs(sk, x, inspect_teacher(sk, spec), spec, None)
    assert forced.kind == "logits" and forced.logits.min() >= 0  # taken as given: raw probabilities
    spec = DistillSpec(classes=("rpi4",), output_kind="probabilities")
    with pytest.raises(DistillInputError, match="negative"):
        teacher_outputs(onx, x, inspect_teacher(onx, spec), spec, None)


def test_detection_rule():
    p = _softmax(np.random.default_rng(0).standard_normal((50, 4)))
    assert looks_like_probabilities(p)
    assert not looks_like_probabilities(p * 0.9)  # rows do not sum to 1
    assert not looks_like_probabilities(np.full((5, 1), 1.0))  # one column is a score, not a distribution


def test_cache_is_keyed_by_teacher_and_inputs(tmp_path, monkeypatch):
    x, _ = digits()
    onx = torch_teacher("mlp")
    info = inspect_teacher(onx, SPEC)
    first = teacher_outputs(onx, x, info, SPEC, tmp_path)
    assert not first.cache_hit and len(list(tmp_path.glob("*.npy"))) == 1

    def no_run(*args, **kwargs):
        raise AssertionError("the teacher ran again despite the cache")

    monkeypatch.setattr(teacher_mod, "_run", no_run)
    second = teacher_outputs(onx, x, info, SPEC, tmp_path)
    assert second.cache_hit and np.array_equal(first.logits, second.logits)
    monkeypatch.undo()
    other = teacher_outputs(onx, x[:100], info, SPEC, tmp_path)  # other inputs: a new entry
    assert not other.cache_hit and len(list(tmp_path.glob("*.npy"))) == 2


def test_fixed_batch_teacher_runs_in_padded_chunks():
    x, _ = digits()
    fixed = torch_teacher("mlp", dynamic=False)  # exported with batch 1 baked in
    info = inspect_teacher(fixed, SPEC)
    assert info.input_shape[0] == 1
    out = teacher_outputs(fixed, x[:37], info, SPEC, None)
    dyn = torch_teacher("mlp")
    ref = teacher_outputs(dyn, x[:37], inspect_teacher(dyn, SPEC), SPEC, None)
    np.testing.assert_allclose(out.logits, ref.logits, atol=1e-5)


def test_regression_values_and_single_column_classification():
    x = np.random.default_rng(0).standard_normal((40, 8)).astype(np.float32)
    onx = linear_teacher((1, 8), 1)
    spec = DistillSpec(classes=("rpi4",), task="regression")
    out = teacher_outputs(onx, x, inspect_teacher(onx, spec), spec, None)
    assert out.kind == "values" and out.logits.shape == (40, 1)
    with pytest.raises(DistillInputError, match="K >= 2"):
        teacher_outputs(onx, x, inspect_teacher(onx, SPEC), SPEC, None)


def test_run_outputs_gives_every_output_as_the_teacher_does():
    onx = sklearn_teacher()
    info = inspect_teacher(onx, SPEC)
    x, _ = digits()
    out = teacher_mod.run_outputs(onx, x[:50], info)
    assert list(out) == ["label", "probabilities"]
    assert out["label"].dtype == np.int64 and out["label"].shape == (50,)
    assert out["probabilities"].shape == (50, 10)
    np.testing.assert_array_equal(out["label"], out["probabilities"].argmax(axis=1))
