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
