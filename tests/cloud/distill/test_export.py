"""cloud/distill/export.py: opset 17, dynamic batch, one self-contained file that matches torch."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from edgefleet.cloud.distill.export import OPSET, run_onnx, to_onnx
from edgefleet.cloud.distill.families import build_student, candidates_for
from edgefleet.cloud.distill.train import predict
from edgefleet.cloud.errors import CloudError


@pytest.mark.parametrize("shape", [[None, 64], [None, 1, 8, 8], [None, 8, 8, 1], [None, 2, 50]])
def test_export_is_opset17_dynamic_batch_and_matches_torch(shape):
    torch.manual_seed(0)
    cand = candidates_for(shape, 10, 6)[-1]
    net = build_student(cand, shape, 10).eval()
    data = to_onnx(net, shape, output_name="logits")
    model = onnx.load_from_string(data)
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [OPSET]
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    assert [i.name for i in model.graph.input] == ["input"] and [o.name for o in model.graph.output] == ["logits"]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    # BatchNorm is folded into the convolutions in eval mode: the graph carries no training-only operators.
    assert "BatchNormalization" not in {n.op_type for n in model.graph.node}
    for batch in (1, 7):
        x = np.random.default_rng(batch).standard_normal((batch, *shape[1:])).astype(np.float32)
        np.testing.assert_allclose(run_onnx(data, x), predict(net, x), atol=1e-4, rtol=1e-4)


def test_dynamic_non_batch_dimension_is_refused():
    net = build_student(candidates_for([None, 64], 10, 6)[0], [None, 64], 10)
    with pytest.raises(CloudError, match="must be fixed"):
        to_onnx(net, [None, "features"])


def test_doc_string_and_names():
    net = build_student(candidates_for([None, 4], 2, 6)[0], [None, 4], 2)
    data = to_onnx(net, [None, 4], input_name="x", output_name="values", doc_string="student of test")
    model = onnx.load_from_string(data)
    assert model.doc_string == "student of test" and model.producer_name == "edgefleet-distill"
    assert model.graph.input[0].name == "x" and model.graph.output[0].name == "values"


def test_dynamic_dims_stay_dynamic_and_run_at_other_sizes():
    shape = [None, 2, 50]
    net = build_student(next(c for c in candidates_for(shape, 3, 6) if c.family == "cnn1d"), shape, 3).eval()
    data = to_onnx(net, shape, dynamic_dims={2: "time"})
    dims = onnx.load_from_string(data).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 2, "time"]
    for t in (9, 50, 123):
        x = np.random.default_rng(t).standard_normal((3, 2, t)).astype(np.float32)
        np.testing.assert_allclose(run_onnx(data, x), predict(net, x), atol=1e-4, rtol=1e-4)


def test_run_onnx_reads_the_scores_output_unless_told_another():
    """A student with the skl2onnx interface (`label` first, then `probabilities`): the scores by default."""
    from edgefleet.cloud.distill.interface import Interface, Port, export_student

    iface = Interface(Port("features", "float64", (None, 4)),
                      (Port("label", "int64", (None,), "label"),
                       Port("probabilities", "float32", (None, 3), "probabilities")), "probabilities")
    net = build_student(candidates_for([None, 4], 3, 6)[0], [None, 4], 3).eval()
    data = export_student(net, iface, [None, 4])
    x = np.random.default_rng(0).standard_normal((7, 4))  # float64, as the teacher takes it
    probabilities = run_onnx(data, x)
    assert probabilities.shape == (7, 3) and np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-6)
    label = run_onnx(data, x, output="label")
    assert label.dtype == np.int64 and label.shape == (7, 1)  # one row per sample
    np.testing.assert_array_equal(label[:, 0], probabilities.argmax(axis=1))
