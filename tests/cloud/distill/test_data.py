"""cloud/distill/data.py and spec.py: every bad input is a DistillInputError naming the fix, before any training."""

from __future__ import annotations

import numpy as np
import pytest

from edgefleet.cloud.catalog import builtin_catalog
from edgefleet.cloud.distill.data import check_labels, inspect_teacher, load_transfer_set, split
from edgefleet.cloud.distill.errors import DistillInputError
from edgefleet.cloud.distill.spec import DistillSpec, resolve_budgets
from edgefleet.protos.messages import Budgets
from tests.cloud.distill.distill_teachers import (
    digits,
    label_only_teacher,
    linear_teacher,
    npz_bytes,
    sklearn_teacher,
    torch_teacher,
)

SPEC = DistillSpec(classes=("rpi4",))


def test_sklearn_teacher_signature_picks_the_float_output():
    info = inspect_teacher(sklearn_teacher(), SPEC)
    assert info.input_name == "input" and info.input_shape == [None, 64] and info.input_dtype == "float32"
    assert [(o.name, o.dtype) for o in info.outputs] == [("label", "int64"), ("probabilities", "float32")]
    assert info.chosen_output == "probabilities" and info.n_out == 10


def test_named_output_must_exist_and_be_float():
    with pytest.raises(DistillInputError, match="not an output"):
        inspect_teacher(sklearn_teacher(), DistillSpec(classes=("rpi4",), teacher_output="logits"))
    with pytest.raises(DistillInputError, match="int64"):
        inspect_teacher(sklearn_teacher(), DistillSpec(classes=("rpi4",), teacher_output="label"))


def test_int64_only_teacher_is_refused():
    with pytest.raises(DistillInputError, match="no float output"):
        inspect_teacher(label_only_teacher(), SPEC)


def test_rank5_teacher_is_refused():
    with pytest.raises(DistillInputError, match="rank 5"):
        inspect_teacher(linear_teacher((1, 1, 2, 4, 8), 3), SPEC)


@pytest.mark.parametrize("blob", [b"", b"not an onnx model at all", b"PK\x03\x04garbage"])
def test_non_onnx_teacher_is_refused(blob):
    with pytest.raises(DistillInputError, match="teacher"):
        inspect_teacher(blob, SPEC)


@pytest.fixture(scope="module")
def mlp_info():
    return inspect_teacher(torch_teacher("mlp"), SPEC)


def test_transfer_set_loads_from_bytes_and_path(mlp_info, tmp_path):
    x, y = digits()
    ts = load_transfer_set(npz_bytes(x=x.astype(np.float64), y=y.astype(np.int32)), mlp_info, SPEC)
    assert ts.x.dtype == np.float32 and ts.x.shape == (1797, 64) and ts.y.dtype == np.int64
    path = tmp_path / "t.npz"
    path.write_bytes(npz_bytes(X=x))  # the alternative key, no labels
    ts = load_transfer_set(path, mlp_info, SPEC)
    assert ts.y is None and len(ts.x) == 1797


@pytest.mark.parametrize("make, message", [
    (lambda x, y: npz_bytes(x=x.reshape(-1, 1, 8, 8)), r"shape \[1797, 1, 8, 8\].*\['N', 64\]"),
    (lambda x, y: npz_bytes(x=x[:, :32]), "reshape x"),
    (lambda x, y: npz_bytes(x=np.where(np.arange(64) == 3, np.nan, x)), "NaN or infinite"),
    (lambda x, y: npz_bytes(x=np.where(np.arange(64) == 5, np.inf, x)), "NaN or infinite"),
    (lambda x, y: npz_bytes(x=np.zeros((0, 64), np.float32)), "empty"),
    (lambda x, y: npz_bytes(x=x[:5]), "at least 20"),
    (lambda x, y: npz_bytes(x=x, y=np.where(y == 9, 10, y)), r"0\.\.10.*10 outputs"),
    (lambda x, y: npz_bytes(x=x, y=y - 2), "class indices"),  # -1 marks unlabelled; -2 is garbage
    (lambda x, y: npz_bytes(x=x, y=y[:-3]), "1794 labels for 1797 inputs"),
    (lambda x, y: npz_bytes(x=x, y=np.eye(10)[y]), "one-hot"),
    (lambda x, y: npz_bytes(x=x, y=y + 0.5), "whole class indices"),
    (lambda x, y: b"this is not a zip archive", "not an .npz"),
    (lambda x, y: b"", "empty"),
    (lambda x, y: npz_bytes(features=x, y=y), "expected key 'x'"),
    (lambda x, y: npz_bytes(x=np.array(["a"] * 30)), "numeric"),
])
def test_bad_transfer_sets_are_refused(mlp_info, make, message):
    x, y = digits()
    with pytest.raises(DistillInputError, match=message):
        load_transfer_set(make(x, y), mlp_info, SPEC)


def test_regression_labels_match_output_width():
    spec = DistillSpec(classes=("rpi4",), task="regression")
    assert check_labels(np.zeros((30, 2)), 30, 2, spec).dtype == np.float32
    with pytest.raises(DistillInputError, match="width 3"):
        check_labels(np.zeros((30, 3)), 30, 2, spec)


def test_split_is_seeded_disjoint_and_complete():
    a, b, c = split(1000, SPEC), split(1000, SPEC), split(1000, DistillSpec(classes=("rpi4",), seed=1))
    assert all(np.array_equal(p, q) for p, q in zip((a.train_idx, a.val_idx, a.heldout_idx),
                                                       (b.train_idx, b.val_idx, b.heldout_idx)))
    assert not np.array_equal(a.heldout_idx, c.heldout_idx)
    joined = np.concatenate([a.train_idx, a.val_idx, a.heldout_idx])
    assert sorted(joined.tolist()) == list(range(1000))
    assert len(a.heldout_idx) == 150 and len(a.val_idx) == 150


def test_unknown_class_and_stray_budget_are_refused():
    catalog = builtin_catalog()
    with pytest.raises(DistillInputError, match="unknown device class 'rpi9'.*rpi4"):
        resolve_budgets(DistillSpec(classes=("rpi9",)), catalog)
    with pytest.raises(DistillInputError, match="not a target class"):
        resolve_budgets(DistillSpec(classes=("rpi4",), budgets={"rpi5": Budgets(p95_latency_ms=1)}), catalog)


def test_budget_override_replaces_only_given_fields():
    catalog = builtin_catalog()
    spec = DistillSpec(classes=("rpi4", "rpi5"), budgets={"rpi4": {"p95_latency_ms": 2.5}})
    budgets = resolve_budgets(spec, catalog)
    assert budgets["rpi4"].p95_latency_ms == 2.5
    assert budgets["rpi4"].mj_per_inference == catalog["rpi4"].budgets.mj_per_inference
    assert budgets["rpi5"] == catalog["rpi5"].budgets


@pytest.mark.parametrize("bad", [dict(classes=()), dict(temperature=0), dict(alpha=1.5), dict(val_fraction=0.6),
                                 dict(task="ranking"), dict(max_candidates=0)])
def test_spec_ranges(bad):
    with pytest.raises(DistillInputError, match="spec|device classes"):
        DistillSpec(**{"classes": ("rpi4",), **bad})


def test_spec_round_trips_through_dict():
    spec = DistillSpec(classes=("rpi4",), budgets={"rpi4": Budgets(model_mb=1.0)}, seed=3)
    assert DistillSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(DistillInputError, match="unknown keys"):
        DistillSpec.from_dict({"classes": ["rpi4"], "epochs": 3})


def test_a_zipmap_output_is_refused_with_the_fix():
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.tree import DecisionTreeClassifier

    x, y = digits()
    clf = DecisionTreeClassifier(max_depth=3, random_state=0).fit(x, y)
    onx = to_onnx(clf, initial_types=[("input", FloatTensorType([None, 64]))], target_opset={"": 17, "ai.onnx.ml": 3})
    with pytest.raises(DistillInputError, match="'output_probability' is seq.*not a tensor.*zipmap off"):
        inspect_teacher(onx.SerializeToString(), SPEC)
