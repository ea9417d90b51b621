"""edge_agent/local_api.py: the OIP binary tensor extension and the `serving` seam (router), over real TCP and a
real unix socket, against a real installed digits model; every answer equals bare ONNX Runtime exactly."""

from __future__ import annotations

import http.client
import json
import socket

import httpx
import numpy as np
import pytest

from edgefleet.common import oip_codec
from edgefleet.edge_agent.inference import LocalServing
from edgefleet.edge_agent.offload import Router
from tests.sdk import kit

X = kit.sample(3)


@pytest.fixture
def served(tmp_path):
    with kit.serving(tmp_path, max_body_bytes=64 * 1024) as s:
        yield s


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("agent", timeout=20)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(20)
        self.sock.connect(self.path)


def post(conn: http.client.HTTPConnection, path: str, body: bytes, header_length: int | None,
         ) -> tuple[int, bytes, int | None]:
    headers = {"Content-Type": "application/octet-stream" if header_length is not None else "application/json"}
    if header_length is not None:
        headers[oip_codec.HEADER_LENGTH] = str(header_length)
    conn.request("POST", path, body=body, headers=headers)
    r = conn.getresponse()
    data = r.read()
    raw = r.getheader(oip_codec.HEADER_LENGTH)
    return r.status, data, int(raw) if raw is not None else None


@pytest.mark.parametrize("over", ["tcp", "unix"])
def test_binary_round_trip_equals_bare_onnxruntime(served, over):
    api, _, telemetry, sock = served
    conn = http.client.HTTPConnection(*api.address, timeout=20) if over == "tcp" else _UnixHTTPConnection(str(sock))
    body, hl = oip_codec.encode_request({"input": X}, id="r-1")
    assert hl is not None  # a binary body
    for _ in range(2):  # twice on one keep-alive connection
        status, data, rhl = post(conn, "/v2/models/digits/infer", body, hl)
        assert status == 200, data
        assert rhl is not None  # binary_data_output asked for: binary back
        resp = oip_codec.decode_response(data, rhl)
        assert resp.id == "r-1" and resp.model_name == "digits" and resp.model_version == "1"
        assert np.array_equal(resp.outputs["probabilities"], kit.reference(X))
        p = resp.parameters
        assert (p["where"], p["reason"], p["model_version"], p["variant"], p["escalated"]) == (
            "local", "local", 1, "x86-cpu-fp32", False)
        assert p["energy_source"] == "estimated" and p["energy_mj"] == pytest.approx(4.0 * p["latency_ms"], rel=1e-3)
    conn.close()
    [(_, _, where, requests, errors, rows, *_)] = telemetry.totals()
    assert (where, requests, errors, rows) == ("local", 2, 0, 6)


def test_binary_inputs_json_outputs_and_json_inputs_binary_outputs(served):
    api, *_ = served
    conn = http.client.HTTPConnection(*api.address, timeout=20)
    body, hl = oip_codec.encode_request({"input": X}, binary_outputs=False)
    status, data, rhl = post(conn, "/v2/models/digits/infer", body, hl)
    assert status == 200 and rhl is None
    out = json.loads(data)["outputs"][0]
    assert out["shape"] == [3, 10] and np.array_equal(np.asarray(out["data"], np.float32).reshape(3, 10),
                                                      kit.reference(X))
    # tritonclient's other form: JSON inputs, binary outputs asked per output
    body, hl = oip_codec.encode_request({"input": X}, binary=False, outputs=["probabilities"])
    doc = json.loads(body)
    doc["outputs"] = [{"name": "probabilities", "parameters": {"binary_data": True}}]
    status, data, rhl = post(conn, "/v2/models/digits/infer", json.dumps(doc).encode(), None)
    assert status == 200 and rhl is not None
    assert np.array_equal(oip_codec.decode_response(data, rhl).outputs["probabilities"], kit.reference(X))


def test_json_requests_still_answer_json_through_serving(served):
    api, *_ = served
    tensor = {"name": "input", "shape": [3, 64], "datatype": "FP32", "data": X.ravel().tolist()}
    r = httpx.post(f"{api.url}/v2/models/digits/infer", json={"inputs": [tensor]})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    (out,) = r.json()["outputs"]
    assert np.array_equal(np.asarray(out["data"], np.float32).reshape(out["shape"]), kit.reference(X))
    assert r.json()["parameters"]["where"] == "local"


BAD = [
    ("header length not a number", None, "abc", 400, "must be an integer"),
    ("header length past the body", None, "999999", 400, "but the body has"),
    ("wrong dtype", {"input": X.astype(np.float64)}, None, 400, "the model takes input FP32 [-1, 64]"),
    ("wrong width", {"input": np.zeros((1, 63), np.float32)}, None, 400, "shape [1, 63] does not fit"),
    ("unknown input", {"pixels": X}, None, 400, "unknown input 'pixels'"),
]


@pytest.mark.parametrize("case,inputs,header,status,message", BAD, ids=[b[0] for b in BAD])
def test_bad_binary_requests_are_clear_errors(served, case, inputs, header, status, message):
    api, *_ = served
    body, hl = oip_codec.encode_request(inputs or {"input": X})
    conn = http.client.HTTPConnection(*api.address, timeout=20)
    got, data, _ = post(conn, "/v2/models/digits/infer", body, hl) if header is None else \
        _raw_post(conn, body, header)
    assert got == status and message in json.loads(data)["error"], data
    assert httpx.get(f"{api.url}/v2/health/live").status_code == 200


def _raw_post(conn, body, header):
    conn.request("POST", "/v2/models/digits/infer", body=body, headers={oip_codec.HEADER_LENGTH: header})
    r = conn.getresponse()
    return r.status, r.read(), None


def test_unknown_model_version_and_parameters(served):
    api, *_ = served
    conn = http.client.HTTPConnection(*api.address, timeout=20)
    body, hl = oip_codec.encode_request({"input": X})
    status, data, _ = post(conn, "/v2/models/ghost/infer", body, hl)
    assert status == 404 and "not on this device" in json.loads(data)["error"]
    status, data, _ = post(conn, "/v2/models/digits/versions/9/infer", body, hl)
    assert status == 404 and "version 9 is not active" in json.loads(data)["error"]
    for params, message in (({"deadline_ms": -1}, "deadline_ms must be a positive"),
                            ({"tier": "urgent"}, "tier must be one of realtime, background")):
        body, hl = oip_codec.encode_request({"input": X}, parameters=params)
        status, data, _ = post(conn, "/v2/models/digits/infer", body, hl)
        assert status == 400 and message in json.loads(data)["error"], data


def test_binary_limit_is_four_times_the_json_limit(served):
    api, *_ = served
    assert api.max_body_bytes == 64 * 1024 and api.max_binary_bytes == 256 * 1024
    conn = http.client.HTTPConnection(*api.address, timeout=20)
    big = kit.sample(400)  # 100 KiB of tensor: over the JSON limit, within the binary one
    body, hl = oip_codec.encode_request({"input": big})
    assert api.max_body_bytes < len(body) < api.max_binary_bytes
    status, data, rhl = post(conn, "/v2/models/digits/infer", body, hl)
    assert status == 200 and np.array_equal(oip_codec.decode_response(data, rhl).outputs["probabilities"],
                                            kit.reference(big))
    body, hl = oip_codec.encode_request({"input": kit.sample(1100)})  # 275 KiB: over it
    status, data, _ = post(conn, "/v2/models/digits/infer", body, hl)
    assert status == 413 and "the binary body limit" in json.loads(data)["error"]


class RecordingRouter:
    """A serving object with the offload router's call, recording what each request asked for."""

    def __init__(self, service) -> None:
        self.local = LocalServing(service)
        self.calls: list[tuple[str, float | None, str]] = []

    def infer_arrays(self, name, inputs, *, version=None, outputs=None, deadline_ms=None, tier="realtime"):
        self.calls.append((name, deadline_ms, tier))
        result, params = self.local.infer_arrays(name, inputs, version=version, outputs=outputs)
        return result, {**params, "reason": "recorded"}


def test_deadline_and_tier_reach_the_router(tmp_path):
    with kit.serving(tmp_path, router_factory=RecordingRouter) as (api, *_):
        conn = http.client.HTTPConnection(*api.address, timeout=20)
        body, hl = oip_codec.encode_request({"input": X}, parameters={"deadline_ms": 12.5, "tier": "background"})
        status, data, rhl = post(conn, "/v2/models/digits/infer", body, hl)
        assert status == 200 and oip_codec.decode_response(data, rhl).parameters["reason"] == "recorded"
        r = httpx.post(f"{api.url}/v2/models/digits/infer", json={
            "inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": X[0].tolist()}],
            "parameters": {"deadline_ms": 7}})
        assert r.status_code == 200 and r.json()["parameters"]["reason"] == "recorded"
        assert api.router.calls == [("digits", 12.5, "background"), ("digits", 7, "realtime")]


def test_the_real_offload_router_serves_through_the_api(tmp_path):
    # No offload target configured: the router keeps everything local and says why.
    with kit.serving(tmp_path, router_factory=lambda service: Router(service, None)) as (api, *_):
        conn = http.client.HTTPConnection(*api.address, timeout=20)
        body, hl = oip_codec.encode_request({"input": X}, parameters={"deadline_ms": 50})
        status, data, rhl = post(conn, "/v2/models/digits/infer", body, hl)
        assert status == 200, data
        resp = oip_codec.decode_response(data, rhl)
        assert np.array_equal(resp.outputs["probabilities"], kit.reference(X))
        assert (resp.parameters["where"], resp.parameters["reason"]) == ("local", "offload_disabled")
        # a model neither here nor anywhere: the router's error, mapped like the service's
        status, data, _ = post(conn, "/v2/models/ghost/infer", body, hl)
        assert status == 404 and "not on this device" in json.loads(data)["error"]
