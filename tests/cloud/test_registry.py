"""cloud/registry.py: real ONNX models built with onnx.helper, real checker and ONNX Runtime, and bad uploads."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgefleet.cloud.errors import ModelInvalid, TooLarge
from edgefleet.cloud.registry import validate_model

MB = 1024 * 1024


def mlp_bytes(seed: int = 0) -> bytes:
    """x[N,4] -> Gemm -> Relu -> Gemm -> y[N,3]."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 8)).astype(np.float32), "W1"),
        numpy_helper.from_array(np.zeros(8, np.float32), "B1"),
        numpy_helper.from_array(rng.standard_normal((8, 3)).astype(np.float32), "W2"),
        numpy_helper.from_array(np.zeros(3, np.float32), "B2"),
    ]
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W1", "B1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("Gemm", ["r", "W2", "B2"], ["y"])],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def two_input_bytes() -> bytes:
    """a float[N,3] + an embedding lookup of ids int64[N] -> sum[N,3], and argmax as a second (int64) output."""
    table = numpy_helper.from_array(np.arange(30, dtype=np.float32).reshape(10, 3), "table")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["emb"], axis=0),
         helper.make_node("Add", ["a", "emb"], ["sum"]),
         helper.make_node("ArgMax", ["sum"], ["best"], axis=1, keepdims=0)],
        "two_inputs",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [None, 3]),
         helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch"])],
        [helper.make_tensor_value_info("sum", TensorProto.FLOAT, [None, 3]),
         helper.make_tensor_value_info("best", TensorProto.INT64, [None])],
        [table],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def test_mlp_is_accepted_with_its_signature():
    data = mlp_bytes()
    info = validate_model(data, max_bytes=MB)
    assert info.size_bytes == len(data)
    assert len(info.sha256) == 64
    assert info.opset == 17
    assert [(s.name, s.dtype, s.shape) for s in info.inputs] == [("x", "float32", ["N", 4])]
    assert [(s.name, s.dtype, s.shape) for s in info.outputs] == [("y", "float32", ["N", 3])]


def test_two_inputs_and_outputs_keep_dtypes_and_unknown_dims():
    info = validate_model(two_input_bytes(), max_bytes=MB)
    assert [(s.name, s.dtype, s.shape) for s in info.inputs] == [("a", "float32", [None, 3]),
                                                                 ("ids", "int64", ["batch"])]
    assert [(s.name, s.dtype) for s in info.outputs] == [("sum", "float32"), ("best", "int64")]


def test_initializers_listed_as_inputs_are_not_inputs():
    model = onnx.load_from_string(mlp_bytes())
    # IR 3 style: weights also appear as graph inputs; they are not what a caller feeds.
    for init in model.graph.initializer:
        model.graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    info = validate_model(model.SerializeToString(), max_bytes=MB)
    assert [s.name for s in info.inputs] == ["x"]


def test_malformed_bytes_are_not_onnx():
    with pytest.raises(ModelInvalid, match="not an ONNX model"):
        validate_model(b"\xff\xfe this is not a protobuf \x00\x01" * 10, max_bytes=MB)


def test_text_file_is_not_onnx():
    with pytest.raises(ModelInvalid, match="not an ONNX model"):
        validate_model(b"hello world, I am a README\n", max_bytes=MB)


def test_empty_upload():
    with pytest.raises(ModelInvalid, match="empty"):
        validate_model(b"", max_bytes=MB)


def test_truncated_model_is_refused():
    data = mlp_bytes()
    with pytest.raises(ModelInvalid):
        validate_model(data[: len(data) // 2], max_bytes=MB)


def test_valid_protobuf_failing_the_checker():
    graph = helper.make_graph(
        [helper.make_node("NoSuchOperator", ["x"], ["y"])],
        "bad",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(ModelInvalid, match=r"^onnx checker: .*NoSuchOperator"):
        validate_model(model.SerializeToString(), max_bytes=MB)


def test_checker_passes_but_runtime_refuses():
    # Add of float and int64: structurally valid (the checker does no type inference), but no kernel exists.
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "k"], ["y"])],
        "mixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]),
         helper.make_tensor_value_info("k", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)  # the premise of the test
    with pytest.raises(ModelInvalid, match="ONNX Runtime cannot load"):
        validate_model(model.SerializeToString(), max_bytes=MB)


def test_external_data_is_refused():
    model = onnx.load_from_string(mlp_bytes())
    init = model.graph.initializer[0]
    init.ClearField("raw_data")
    init.data_location = TensorProto.EXTERNAL
    entry = init.external_data.add()
    entry.key, entry.value = "location", "weights.bin"
    with pytest.raises(ModelInvalid, match="external data"):
        validate_model(model.SerializeToString(), max_bytes=MB)


def test_oversized_upload_is_too_large_before_parsing():
    with pytest.raises(TooLarge, match="max_model_mb") as err:
        validate_model(b"\x00" * 2048, max_bytes=1024)
    assert err.value.status_code == 413


def test_sklearn_zipmap_output_is_refused_with_the_fix():
    skl2onnx = pytest.importorskip("skl2onnx")
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.linear_model import LogisticRegression

    x = np.random.default_rng(0).standard_normal((40, 4)).astype(np.float32)
    clf = LogisticRegression().fit(x, (x[:, 0] > 0).astype(int))
    onx = skl2onnx.convert_sklearn(clf, initial_types=[("input", FloatTensorType([None, 4]))])
    with pytest.raises(ModelInvalid, match="zipmap"):
        validate_model(onx.SerializeToString(), max_bytes=MB)
    plain = skl2onnx.convert_sklearn(clf, initial_types=[("input", FloatTensorType([None, 4]))],
                                     options={id(clf): {"zipmap": False}})
    info = validate_model(plain.SerializeToString(), max_bytes=MB)
    assert [(s.name, s.dtype) for s in info.outputs] == [("label", "int64"), ("probabilities", "float32")]
