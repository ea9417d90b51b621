"""The offload target is any OIP server: a real MLServer 1.7.1 process (its own venv, tests/mlserver) answers the
shared codec, tritonclient (HTTP and gRPC), the agent's OffloadClient and the agent's offload router exactly as
bare ONNX Runtime does.

Two models: `digits` (float32 [N, 64] -> softmax [N, 10], a digits-size MLP) and `mixed` (two inputs, int64 `ids`
[N, 4] and float32 `x` [N, 4]; two outputs, float32 `y` and int64 `top`), served by tests/mlserver/onnx_runtime.py.
Answers are compared with np.array_equal: OIP JSON carries a float32 through a double's shortest repr exactly.

MLServer's REST API has no binary tensor data extension (SeldonIO/MLServer#324 is open; 1.7.1 parses every body
as JSON): a binary body gets FastAPI's 422, which the tests pin down. The agent's offload client then resends
that request as JSON and stays on JSON (`offload.binary = false` saves the first failed try; MLServer's gRPC port
does take raw_input_contents). The venv is built once per
machine and the server started once for this module.

On the default transport (MQTT) only: the offload path to MLServer does not use the agent's link (see
test_offload_e2e.py), and the deployment that it does carry runs on both transports in test_agents_e2e.py.
"""

from __future__ import annotations

import http.client
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgefleet.common.oip_codec import HEADER_LENGTH, decode_response, encode_request
from edgefleet.edge_agent.errors import InferenceError, ModelNotFound
from edgefleet.edge_agent.offload_client import OffloadClient
from tests.e2e.onnx_models import digits_mlp
from tests.mlserver.server import MLServerHandle, start_mlserver

RNG = np.random.default_rng(7)
X = RNG.standard_normal((3, 64)).astype(np.float32)
IDS = np.array([[0, 1, 2, 3], [7, -2, 5, 40], [1 << 40, 0, -9, 2]], dtype=np.int64)
XM = RNG.standard_normal((3, 4)).astype(np.float32)


def mixed_model() -> bytes:
    """y = x + float(ids) * 0.5 (float32 [N, 4]); top = argmax(y) (int64 [N, 1]): an int64 input and output."""
    half = numpy_helper.from_array(np.array([0.5], np.float32), "half")
    nodes = [helper.make_node("Cast", ["ids"], ["f"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["f", "half"], ["h"]),
             helper.make_node("Add", ["x", "h"], ["y"]),
             helper.make_node("ArgMax", ["y"], ["top"], axis=1, keepdims=1)]
    graph = helper.make_graph(nodes, "mixed", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 4]),
                                               helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4]),
                               helper.make_tensor_value_info("top", TensorProto.INT64, ["N", 1])], [half])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    paths = {"digits": root / "digits.onnx", "mixed": root / "mixed.onnx"}
    paths["digits"].write_bytes(digits_mlp())
    paths["mixed"].write_bytes(mixed_model())
    return paths


@pytest.fixture(scope="module")
def mlserver(models, tmp_path_factory):
    handle = start_mlserver(models["digits"], "digits", tmp_path_factory.mktemp("mlserver"),
                            more_models={"mixed": models["mixed"]})
    try:
        yield handle
    finally:
        handle.stop()
    assert handle.proc.returncode is not None


def bare(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))


def post(handle: MLServerHandle, path: str, body: bytes, header_length: int | None,
         content_type: str | None = None) -> tuple[int, dict, bytes]:
    headers = {"Content-Type": content_type or ("application/json" if header_length is None
                                                else "application/octet-stream")}
    if header_length is not None:
        headers[HEADER_LENGTH] = str(header_length)
    conn = http.client.HTTPConnection("127.0.0.1", handle.http_port, timeout=10)
    try:
        conn.request("POST", path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert set(got) == set(want)
    for name, value in want.items():
        assert got[name].dtype == value.dtype, name
        assert got[name].shape == value.shape, name
        assert np.array_equal(got[name], value), name


# -- (a) the shared codec, over http.client ----------------------------------------------------------------------------


@pytest.mark.parametrize(("model", "feeds"), [("digits", {"x": X}), ("mixed", {"ids": IDS, "x": XM})])
def test_json_request_equals_bare_onnxruntime(mlserver, models, model, feeds):
    body, header_length = encode_request(feeds, binary=False, id="req-1")
    assert header_length is None
    status, headers, data = post(mlserver, f"/v2/models/{model}/infer", body, None)
    assert status == 200, data
    assert HEADER_LENGTH.lower() not in headers  # MLServer answers plain JSON
    response = decode_response(data, None)
    assert (response.model_name, response.model_version, response.id) == (model, "1", "req-1")
    assert_same(response.outputs, bare(models[model], feeds))


def test_json_request_by_version_and_named_output(mlserver, models):
    feeds = {"ids": IDS, "x": XM}
    body, _ = encode_request(feeds, binary=False, outputs=["top"])
    status, _, data = post(mlserver, "/v2/models/mixed/versions/1/infer", body, None)
    assert status == 200, data
    assert_same(decode_response(data, None).outputs, {"top": bare(models["mixed"], feeds)["top"]})


def test_binary_extension_request_is_refused_by_mlserver_rest(mlserver):
    """MLServer 1.7.1 has no binary extension. Sent as application/octet-stream (as OffloadClient and tritonclient
    do), FastAPI hands the raw bytes to the request model, and MLServer's validation-error handler itself fails to
    serialise them: a bare 500. Sent as application/json, orjson refuses the tensor bytes: 422 json_invalid."""
    body, header_length = encode_request({"x": X}, binary=True)
    assert header_length is not None and len(body) == header_length + X.nbytes
    status, _, data = post(mlserver, "/v2/models/digits/infer", body, header_length)
    assert (status, data) == (500, b"Internal Server Error")
    status, _, data = post(mlserver, "/v2/models/digits/infer", body, header_length, content_type="application/json")
    assert status == 422, data
    assert json.loads(data)["detail"][0]["type"] == "json_invalid"


def test_unknown_model_and_version_are_404(mlserver):
    body, _ = encode_request({"x": X}, binary=False)
    status, _, data = post(mlserver, "/v2/models/nope/infer", body, None)
    assert (status, json.loads(data)) == (404, {"error": "Model nope not found"})
    status, _, data = post(mlserver, "/v2/models/digits/versions/9/infer", body, None)
    assert (status, json.loads(data)) == (404, {"error": "Model digits with version 9 not found"})


def test_metadata_carries_the_onnx_signature(mlserver):
    conn = http.client.HTTPConnection("127.0.0.1", mlserver.http_port, timeout=10)
    try:
        conn.request("GET", "/v2/models/mixed")
        response = conn.getresponse()
        doc = json.loads(response.read())
    finally:
        conn.close()
    assert response.status == 200
    assert doc["inputs"] == [{"name": "ids", "datatype": "INT64", "shape": [-1, 4]},
                             {"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
    assert doc["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [-1, 4]},
                              {"name": "top", "datatype": "INT64", "shape": [-1, 1]}]


# -- (b) tritonclient --------------------------------------------------------------------------------------------------


def test_tritonclient_http_json(mlserver, models):
    import tritonclient.http as th

    client = th.InferenceServerClient(f"127.0.0.1:{mlserver.http_port}")
    try:
        assert client.is_server_ready() and client.is_model_ready("mixed")
        ids, x = th.InferInput("ids", list(IDS.shape), "INT64"), th.InferInput("x", list(XM.shape), "FP32")
        ids.set_data_from_numpy(IDS, binary_data=False)
        x.set_data_from_numpy(XM, binary_data=False)
        outputs = [th.InferRequestedOutput("y", binary_data=False), th.InferRequestedOutput("top", binary_data=False)]
        result = client.infer("mixed", [ids, x], outputs=outputs)
        want = bare(models["mixed"], {"ids": IDS, "x": XM})
        assert_same({"y": result.as_numpy("y"), "top": result.as_numpy("top")}, want)
        # No outputs named: tritonclient asks for binary_data_output, MLServer answers JSON anyway.
        digits = th.InferInput("x", list(X.shape), "FP32")
        digits.set_data_from_numpy(X, binary_data=False)
        assert_same({"probs": client.infer("digits", [digits]).as_numpy("probs")}, bare(models["digits"], {"x": X}))
        with pytest.raises(th.InferenceServerException, match="not found"):
            client.infer("nope", [digits])
    finally:
        client.close()


def test_tritonclient_grpc_raw_contents(mlserver, models):
    """MLServer's gRPC port does take raw_input_contents (tritonclient.grpc's default): binary tensors there."""
    import tritonclient.grpc as tg

    client = tg.InferenceServerClient(mlserver.grpc_address)
    try:
        assert client.is_server_live() and client.is_model_ready("digits")
        ids, x = tg.InferInput("ids", list(IDS.shape), "INT64"), tg.InferInput("x", list(XM.shape), "FP32")
        ids.set_data_from_numpy(IDS)
        x.set_data_from_numpy(XM)
        result = client.infer("mixed", [ids, x])
        assert_same({"y": result.as_numpy("y"), "top": result.as_numpy("top")},
                    bare(models["mixed"], {"ids": IDS, "x": XM}))
        with pytest.raises(tg.InferenceServerException, match="not found"):
            client.infer("nope", [x])
    finally:
        client.close()


# -- (c) the agent's offload client and router -------------------------------------------------------------------------


def test_offload_client_json_equals_bare_onnxruntime(mlserver, models):
    client = OffloadClient(mlserver.http_url, binary=False, timeout_s=10.0)
    try:
        assert client.live() and client.ready("digits") and client.ready("mixed", "1")
        response = client.infer("digits", {"x": X})
        assert (response.model_name, response.model_version) == ("digits", "1")
        assert_same(response.outputs, bare(models["digits"], {"x": X}))
        feeds = {"ids": IDS, "x": XM}
        assert_same(client.infer("mixed", feeds, version="1").outputs, bare(models["mixed"], feeds))
        assert client.metadata("digits")["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 64]}]
    finally:
        client.close()


def test_offload_client_maps_mlserver_errors(mlserver, models):
    client = OffloadClient(mlserver.http_url, binary=False, timeout_s=10.0)
    try:
        with pytest.raises(ModelNotFound, match="Model nope not found"):
            client.infer("nope", {"x": X})
        with pytest.raises(ModelNotFound, match="version 9 not found"):
            client.infer("digits", {"x": X}, version="9")
        # The runtime's own 400 (tests/mlserver/onnx_runtime.py), naming the signature.
        with pytest.raises(InferenceError, match=r"\(400\).*unknown input 'z'.*x tensor\(float\)"):
            client.infer("digits", {"z": X})
        with pytest.raises(InferenceError, match=r"\(400\).*input 'x' is INT64"):
            client.infer("digits", {"x": X.astype(np.int64)})
        with pytest.raises(InferenceError, match=r"\(400\).*missing input\(s\) \['ids'\]"):
            client.infer("mixed", {"x": XM})
    finally:
        client.close()
    binary = OffloadClient(mlserver.http_url, binary=True, timeout_s=10.0)
    try:  # MLServer's REST cannot read the binary extension (500): the client sends JSON once, then stays on JSON
        assert_same(binary.infer("digits", {"x": X}).outputs, bare(models["digits"], {"x": X}))
        assert binary.binary is False
        with pytest.raises(ModelNotFound):  # and the errors read as before
            binary.infer("nope", {"x": X})
    finally:
        binary.close()


def test_agent_router_offloads_a_model_it_lacks_to_mlserver(mlserver, models, tmp_path):
    from edgefleet.edge_agent.config import OffloadConfig
    from edgefleet.edge_agent.inference import InferenceService
    from edgefleet.edge_agent.installer import Installer
    from edgefleet.edge_agent.offload import Router

    config = OffloadConfig(enabled=True, url=mlserver.http_url, binary=False, timeout_ms=10_000)
    client = OffloadClient(config.url, binary=config.binary, timeout_s=config.timeout_ms / 1000.0)
    router = Router(InferenceService(Installer(tmp_path / "models")), client, config)
    try:
        outputs, params = router.infer_arrays("digits", {"x": X})
        assert_same(outputs, bare(models["digits"], {"x": X}))
        assert (params["where"], params["model_version"]) == ("cloud", 1)
        outputs, params = router.infer_arrays("mixed", {"ids": IDS, "x": XM}, tier="background")
        assert_same(outputs, bare(models["mixed"], {"ids": IDS, "x": XM}))
        assert params["where"] == "cloud"
        with pytest.raises(ModelNotFound, match="Model nope not found"):
            router.infer_arrays("nope", {"x": X})
    finally:
        router.close()
