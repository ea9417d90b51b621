"""Artifacts: int8 QDQ per-channel static quantization, fp16 with float32 io, TFLite through the converter, and
the drift check that refuses an artifact which answers differently from the fp32 student."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from edgefleet.cloud.distill import artifacts as art
from edgefleet.cloud.distill.errors import ArtifactDrift
from tests.cloud.distill import artifact_models as am


@pytest.fixture(scope="module")
def cnn():
    return am.dscnn(16), am.samples((1, 28, 28), 256, seed=1), am.samples((1, 28, 28), 200, seed=2)


def test_int8_is_static_qdq_per_channel(cnn):
    data, calib, heldout = cnn
    q = art.make_int8(data, calib)
    model = onnx.load_from_string(q)
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv", "Gemm"} <= ops
    assert not ops & {"ConvInteger", "MatMulInteger", "DynamicQuantizeLinear"}  # not quantize_dynamic
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    int8_weights = [v for v in inits.values() if v.dtype == np.int8 and v.ndim == 4]
    assert int8_weights, "conv weights are stored as int8"
    # Per-channel: every conv weight's DequantizeLinear has one scale per output channel.
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and inits.get(node.input[0]) is not None \
                and inits[node.input[0]].ndim == 4:
            assert inits[node.input[1]].shape == (inits[node.input[0]].shape[0],)
    assert len(q) < len(data)
    result = art.check_drift(art.Variant("int8", "onnxruntime", "onnx", q), data, heldout, "classification", 0.02)
    assert result.passed and result.metric == "changed_predictions" and result.samples == 200
    assert 0 < result.max_abs_error < 1.0


def test_fp16_keeps_float32_io_and_passes_the_checker(cnn):
    data, _, heldout = cnn
    half = art.make_fp16(data)
    model = onnx.load_from_string(half)
    onnx.checker.check_model(model)
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert all(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    result = art.check_drift(art.Variant("fp16", "onnxruntime", "onnx", half), data, heldout, "classification", 0.0)
    assert result.changed == 0 and result.max_abs_error < 1e-2


def test_drift_past_tolerance_is_refused_with_figures(cnn):
    data, _, heldout = cnn
    other = art.Variant("int8", "onnxruntime", "onnx", am.dscnn(16, seed=7))  # a different network entirely
    with pytest.raises(ArtifactDrift) as info:
        art.check_drift(other, data, heldout, "classification", 0.02)
    err = info.value
    assert "changed" in err.message and "of 200 held-out predictions" in err.message
    assert err.detail["changed"] > 4 and err.detail["value"] > 0.02 and err.detail["precision"] == "int8"
    assert err.status_code == 500 and err.code == "artifact_drift"


def test_regression_drift_uses_error_over_output_spread():
    ref = np.linspace(0, 10, 100, dtype=np.float32).reshape(50, 2)
    assert art.drift(ref, ref + 0.01, "regression", 0.02).passed
    result = art.drift(ref, ref + 1.0, "regression", 0.02)
    assert not result.passed and result.metric == "normalized_mae"
    assert result.max_abs_error == pytest.approx(1.0) and result.mean_abs_error == pytest.approx(1.0)
    assert result.value == pytest.approx(1.0 / ref.std(), rel=1e-5)


def test_make_variant_dispatches(cnn):
    data, calib, _ = cnn
    assert art.make_variant(data, "fp32", "onnxruntime", calib, Path(".")).data == data
    v = art.make_variant(data, "fp16", "onnxruntime", calib, Path("."))
    assert (v.precision, v.runtime, v.fmt) == ("fp16", "onnxruntime", "onnx")


@pytest.mark.timeout(1800)  # the first run on a machine builds the converter venv (about 2 min measured)
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_tflite_variant_matches_the_student(cnn, tmp_path, precision):
    data, calib, heldout = cnn
    tflite = am.tflite_or_skip(data, calib, tmp_path, precision)
    assert tflite[4:8] == b"TFL3"  # the flatbuffer file identifier
    v = art.Variant(precision, "litert", "tflite", tflite)
    result = art.check_drift(v, data, heldout, "classification", 0.02)
    assert result.passed
    if precision == "fp32":
        assert result.max_abs_error < 1e-4


def _labelled_student() -> bytes:
    """A student with the skl2onnx interface: `label` int64 [N] then `probabilities` [N, 10], float64 input."""
    from edgefleet.cloud.distill.families import build_student, candidates_for
    from edgefleet.cloud.distill.interface import Interface, Port, export_student

    iface = Interface(Port("pixels", "float64", ("n", 64)),
                      (Port("label", "int64", ("n",), "label"),
                       Port("probabilities", "float32", ("n", 10), "probabilities")), "probabilities")
    shape = [None, 64]
    rng = np.random.default_rng(0)
    net = build_student(candidates_for(shape, 10, 6)[-1], shape, 10, rng.uniform(0, 8, 64), rng.uniform(1, 5, 64))
    return export_student(net, iface, shape)


@pytest.mark.parametrize("precision", ["int8", "fp16"])
def test_variants_keep_the_interface_and_float_head(precision, tmp_path):
    student = _labelled_student()
    x = np.random.default_rng(3).uniform(0, 16, (300, 64))
    v = art.make_variant(student, precision, "onnxruntime", x[:200], tmp_path)
    assert (v.inputs, v.outputs, v.scores) == (("pixels",), ("label", "probabilities"), "probabilities")
    model = onnx.load_from_string(v.data)
    io = [(t.name, t.type.tensor_type.elem_type, [d.dim_param or d.dim_value for d in t.type.tensor_type.shape.dim])
          for t in [*model.graph.input, *model.graph.output]]
    assert io == [("pixels", onnx.TensorProto.DOUBLE, ["n", 64]), ("label", onnx.TensorProto.INT64, ["n"]),
                  ("probabilities", onnx.TensorProto.FLOAT, ["n", 10])]
    out = art.run_variant_outputs(v, x[200:])  # one array: fed under the input's name
    assert out["label"].dtype == np.int64 and out["label"].shape == (100,)
    np.testing.assert_array_equal(out["label"], out["probabilities"].argmax(axis=1))
    # The head stayed float32: rows sum to 1 as exactly as in the fp32 student (an int8 Softmax would not).
    np.testing.assert_allclose(out["probabilities"].sum(axis=1), 1.0, atol=1e-6)
    result = art.check_drift(v, student, x[200:], "classification", 0.05)  # on the probabilities
    assert result.passed and result.samples == 100 and result.max_abs_error < 0.2


def test_a_variant_that_loses_the_interface_is_not_shipped():
    from edgefleet.cloud.distill.errors import ArtifactUnrunnable

    student = am.mlp()
    renamed = onnx.load_from_string(student)
    renamed.graph.output[0].name = "output_0"
    renamed.graph.node[-1].output[0] = "output_0"
    with pytest.raises(ArtifactUnrunnable, match="changed the student's inputs or outputs"):
        art._keeps_interface(renamed.SerializeToString(), student, "int8")
