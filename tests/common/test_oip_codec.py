"""The OIP codec against itself, against tritonclient (a third party's implementation of the binary extension), and
against garbage."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tritonclient.http as triton
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edgefleet.common.oip_codec import (
    OipError,
    check_inputs,
    check_outputs,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
    signature,
)
from edgefleet.protos.messages import TensorSpec

DTYPES = ["float32", "float64", "float16", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
          "bool"]


def _arrays() -> st.SearchStrategy[np.ndarray]:
    return st.sampled_from(DTYPES).flatmap(lambda dt: hnp.arrays(
        np.dtype(dt), hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4),
        elements=hnp.from_dtype(np.dtype(dt), allow_nan=False, allow_infinity=False)))


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.sampled_from(["x", "y", "mask", "ids"]), _arrays(), min_size=1, max_size=3),
       st.booleans())
def test_request_round_trip_exact(inputs, binary):
    body, length = encode_request(inputs, binary=binary)
    assert (length is not None) == binary
    got = decode_request(body, length)
    assert list(got.inputs) == list(inputs)
    for name, array in inputs.items():
        assert got.inputs[name].dtype == array.dtype
        assert got.inputs[name].shape == array.shape
        assert np.array_equal(got.inputs[name], array)
    assert got.binary_outputs is binary


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.sampled_from(["probs", "label"]), _arrays(), min_size=1, max_size=2), st.booleans())
def test_response_round_trip_exact(outputs, binary):
    body, length = encode_response("m", "3", outputs, id="r1", parameters={"where": "cloud"}, binary=binary)
    got = decode_response(body, length)
    assert (got.model_name, got.model_version, got.id, got.parameters) == ("m", "3", "r1", {"where": "cloud"})
    for name, array in outputs.items():
        assert got.outputs[name].dtype == array.dtype
        assert np.array_equal(got.outputs[name], array)


def test_tritonclient_request_body_decodes_exactly():
    x = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    ids = np.array([[5, -2]], dtype=np.int64)
    a = triton.InferInput("x", list(x.shape), "FP32")
    a.set_data_from_numpy(x, binary_data=True)
    b = triton.InferInput("ids", list(ids.shape), "INT64")
    b.set_data_from_numpy(ids, binary_data=False)
    out = triton.InferRequestedOutput("y", binary_data=True)
    body, length = triton.InferenceServerClient.generate_request_body([a, b], outputs=[out], request_id="42")
    got = decode_request(body, length)
    assert got.id == "42"
    assert np.array_equal(got.inputs["x"], x) and got.inputs["x"].dtype == np.float32
    assert np.array_equal(got.inputs["ids"], ids) and got.inputs["ids"].dtype == np.int64
    assert got.outputs == ["y"]
    assert got.binary_outputs == {"y"}


def test_tritonclient_reads_our_binary_response():
    y = np.linspace(-1, 1, 10, dtype=np.float32).reshape(1, 10)
    label = np.array([3], dtype=np.int64)
    body, length = encode_response("digits", "2", {"y": y, "label": label}, binary={"y"})
    result = triton.InferResult.from_response_body(body, header_length=length)
    assert np.array_equal(result.as_numpy("y"), y)
    assert np.array_equal(result.as_numpy("label"), label)
    assert result.get_response()["model_version"] == "2"


def test_request_parameters_binary_data_output_means_every_output():
    body, length = encode_request({"x": np.zeros((1, 2), np.float32)}, binary=True)
    assert decode_request(body, length).binary_outputs is True
    body, length = encode_request({"x": np.zeros((1, 2), np.float32)}, binary=False)
    assert decode_request(body, length).binary_outputs is False


def test_nested_json_data_is_accepted():
    body = json.dumps({"inputs": [{"name": "x", "shape": [2, 2], "datatype": "INT32", "data": [[1, 2], [3, 4]]}]})
    got = decode_request(body.encode(), None)
    assert got.inputs["x"].tolist() == [[1, 2], [3, 4]]


def _binary_body(header: dict, payload: bytes) -> tuple[bytes, int]:
    head = json.dumps(header).encode()
    return head + payload, len(head)


GARBAGE = [
    (b"not json", None, "not JSON"),
    (b"[1, 2]", None, "JSON object"),
    (b"{}", None, "'inputs' must be a non-empty list"),
    (b'{"inputs": []}', None, "non-empty list"),
    (b'{"inputs": [7]}', None, "must be an object"),
    (b'{"inputs": [{"shape": [1], "datatype": "FP32", "data": [1]}]}', None, "'name'"),
    (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP99", "data": [1]}]}', None, "unknown datatype"),
    (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": ["a"]}]}', None, "BYTES"),
    (b'{"inputs": [{"name": "x", "shape": "1", "datatype": "FP32", "data": [1]}]}', None, "list of integers"),
    (b'{"inputs": [{"name": "x", "shape": [-1], "datatype": "FP32", "data": [1]}]}', None, "negative"),
    (b'{"inputs": [{"name": "x", "shape": [3], "datatype": "FP32", "data": [1]}]}', None, "1 values for shape [3]"),
    (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": ["a"]}]}', None, "not a list of FP32"),
    (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32"}]}', None, "give 'data'"),
    (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "INT8", "data": [1000]}]}', None, "INT8"),
    (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]},'
     b' {"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]}', None, "given twice"),
    (b'{"inputs": [{"name": "x", "shape": [4611686018427387904, 4], "datatype": "FP32", "data": []}]}', None,
     "values for shape"),
    (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}], "outputs": {"a": 1}}', None,
     "'outputs' must be a list"),
]


@pytest.mark.parametrize("body,length,message", GARBAGE)
def test_garbage_json_is_refused_with_a_reason(body, length, message):
    with pytest.raises(OipError) as err:
        decode_request(body, length)
    assert message in str(err.value)
    assert err.value.status == 400


@pytest.mark.parametrize("header,payload,length_delta,message", [
    ({"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": 8}}]},
     b"\0" * 4, 0, "the body ends 4 bytes before"),
    ({"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": 4}}]},
     b"\0" * 4, 0, "needs 8"),
    ({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": -4}}]},
     b"", 0, "non-negative"),
    ({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": 4}}]},
     b"\0" * 12, 0, "8 bytes after"),
    ({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": 4}}]},
     b"\0" * 4, 10_000, "Inference-Header-Content-Length is"),
    ({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": 4}}]},
     b"\0" * 4, -3, "not JSON"),
])
def test_garbage_binary_is_refused_with_a_reason(header, payload, length_delta, message):
    body, length = _binary_body(header, payload)
    with pytest.raises(OipError) as err:
        decode_request(body, length + length_delta)
    assert message in str(err.value)


def test_max_elements_is_413():
    body, length = encode_request({"x": np.zeros((10, 10), np.float32)})
    with pytest.raises(OipError) as err:
        decode_request(body, length, max_elements=99)
    assert err.value.status == 413
    assert decode_request(body, length, max_elements=100).inputs["x"].shape == (10, 10)


SPECS = [TensorSpec(name="x", dtype="float32", shape=["batch", 64]), TensorSpec(name="mask", dtype="bool", shape=[1])]


def test_signature_reads_like_the_model():
    assert signature(SPECS) == "x FP32 [-1, 64], mask BOOL [1]"


@pytest.mark.parametrize("inputs,message", [
    ({"x": np.zeros((2, 64), np.float64), "mask": np.zeros(1, bool)}, "datatype FP64"),
    ({"x": np.zeros((2, 63), np.float32), "mask": np.zeros(1, bool)}, "shape [2, 63] does not fit"),
    ({"x": np.zeros((64,), np.float32), "mask": np.zeros(1, bool)}, "shape [64] does not fit"),
    ({"x": np.zeros((1, 64), np.float32)}, "missing input(s) ['mask']"),
    ({"x": np.zeros((1, 64), np.float32), "mask": np.zeros(1, bool), "y": np.zeros(1)}, "unknown input 'y'"),
])
def test_check_inputs_names_the_expected_signature(inputs, message):
    with pytest.raises(OipError) as err:
        check_inputs(inputs, SPECS)
    assert message in str(err.value)
    assert "x FP32 [-1, 64], mask BOOL [1]" in str(err.value)


def test_check_inputs_accepts_any_batch():
    ok = {"x": np.zeros((7, 64), np.float32), "mask": np.ones(1, bool)}
    assert check_inputs(ok, SPECS) is ok


def test_check_outputs():
    check_outputs(None, SPECS)
    check_outputs(["x"], SPECS)
    with pytest.raises(OipError, match="unknown output 'z'"):
        check_outputs(["z"], SPECS)


def test_error_response_is_reported():
    with pytest.raises(OipError, match="the server answered an error: no such model"):
        decode_response(b'{"error": "no such model"}', None)


def test_unencodable_dtype_is_refused():
    with pytest.raises(OipError, match="complex64"):
        encode_response("m", None, {"y": np.zeros(2, np.complex64)})


def test_big_endian_and_fortran_order_arrays_encode_as_their_values():
    want = np.arange(6, dtype=np.float32).reshape(2, 3)
    for array in (want.astype(">f4"), np.asfortranarray(want), want[:, ::-1][:, ::-1]):
        for binary in (True, False):
            body, length = encode_response("m", None, {"y": array}, binary=binary)
            got = decode_response(body, length).outputs["y"]
            assert got.dtype == np.float32 and np.array_equal(got, want)
    check_inputs({"x": np.zeros((1, 64), ">f4"), "mask": np.zeros(1, bool)}, SPECS)  # float32, either byte order
