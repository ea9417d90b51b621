"""cloud/inference/rest.py: the /v2 data plane on the real cloud (uvicorn on a free port, real tokens, real ONNX
Runtime), and `edgefleet-cloud infer` as a real process. Every answer is compared to bare onnxruntime exactly."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from edgefleet.common.oip_codec import HEADER_LENGTH, decode_response, encode_request
from tests.cloud.inference import add_distilled, bare_run, mlp_onnx
from tests.cloud_server import enroll_device, start_cloud_server
from tests.harness import free_port, wait_for

X = np.random.default_rng(5).standard_normal((3, 64)).astype(np.float32)
MODEL = mlp_onnx(1)
TEACHER, STUDENT = mlp_onnx(7, hidden=48), mlp_onnx(8)
SIGNATURE = "the model takes x FP32 [-1, 64]"


@pytest.fixture(scope="module")
def cloud(tmp_path_factory):
    server = start_cloud_server(tmp_path_factory.mktemp("cloud"), infer_max_body_mb=0.05)
    try:
        server.fleet.push_model("digits", MODEL)
        add_distilled(server.fleet, "kws", STUDENT, TEACHER)
        with server.client() as admin:
            server.device_token = enroll_device(admin, "dev-1").device_token  # type: ignore[attr-defined]
            r = admin.post("/api/v1/enrollment-tokens", json={"note": "an enroll token"})
            server.enroll_token = r.json()["token"]  # type: ignore[attr-defined]
        yield server
    finally:
        server.stop()


@pytest.fixture
def device(cloud):
    with cloud.client(cloud.device_token) as client:
        yield client


def _infer(client: httpx.Client, path: str, inputs: dict, **kw) -> httpx.Response:
    body, header_length = encode_request(inputs, **kw)
    headers = {HEADER_LENGTH: str(header_length)} if header_length is not None else {}
    return client.post(path, content=body, headers=headers)


def _outputs(r: httpx.Response) -> dict[str, np.ndarray]:
    assert r.status_code == 200, r.text
    length = r.headers.get(HEADER_LENGTH)
    return decode_response(r.content, int(length) if length is not None else None).outputs


def test_health_and_server_metadata_answer_without_a_token(cloud):
    with cloud.client("") as anyone:
        assert anyone.get("/v2/health/live").json() == {"live": True}
        assert anyone.get("/v2/health/ready").json() == {"ready": True}
        assert anyone.get("/v2").json() == {"name": "edgefleet", "version": "1", "extensions": ["binary_tensor_data"]}


def test_json_round_trip_equals_bare_onnxruntime(device):
    r = _infer(device, "/v2/models/digits/infer", {"x": X}, binary=False, id="req-1")
    assert r.headers["content-type"] == "application/json" and HEADER_LENGTH not in r.headers
    doc = r.json()
    assert (doc["model_name"], doc["model_version"], doc["id"], doc["parameters"]) == (
        "digits", "1", "req-1", {"variant": "version"})
    assert np.array_equal(_outputs(r)["probs"], bare_run(MODEL, {"x": X})["probs"])


def test_binary_round_trip_equals_bare_onnxruntime(device):
    r = _infer(device, "/v2/models/digits/versions/1/infer", {"x": X})
    assert int(r.headers[HEADER_LENGTH]) < len(r.content)  # the answer is binary, as asked
    assert np.array_equal(_outputs(r)["probs"], bare_run(MODEL, {"x": X})["probs"])
    # Binary in, JSON out (binary_outputs=False): each direction as the client asks.
    r = _infer(device, "/v2/models/digits/infer", {"x": X}, binary_outputs=False)
    assert HEADER_LENGTH not in r.headers
    assert np.array_equal(_outputs(r)["probs"], bare_run(MODEL, {"x": X})["probs"])
    # One named output asked for in binary.
    r = _infer(device, "/v2/models/digits/infer", {"x": X}, outputs=["probs"])
    assert np.array_equal(_outputs(r)["probs"], bare_run(MODEL, {"x": X})["probs"])


def test_tritonclient_round_trip(cloud):
    import tritonclient.http as triton

    client = triton.InferenceServerClient(cloud.base_url.removeprefix("http://"))
    token = {"Authorization": f"Bearer {cloud.device_token}"}
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("digits", headers=dict(token))
        meta = client.get_model_metadata("digits", headers=dict(token))
        assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 64]}]
        for binary in (True, False):
            tensor = triton.InferInput("x", list(X.shape), "FP32")
            tensor.set_data_from_numpy(X, binary_data=binary)
            out = [triton.InferRequestedOutput("probs", binary_data=binary)]
            # A fresh dict per call: tritonclient adds its Inference-Header-Content-Length to the one it is given.
            result = client.infer("digits", [tensor], outputs=out, headers=dict(token))
            assert np.array_equal(result.as_numpy("probs"), bare_run(MODEL, {"x": X})["probs"])
        result = client.infer("digits", [tensor], headers=dict(token))  # no outputs named: every output, binary
        assert np.array_equal(result.as_numpy("probs"), bare_run(MODEL, {"x": X})["probs"])
    finally:
        client.close()


def test_a_distilled_version_is_answered_by_its_teacher_under_its_name(device):
    r = _infer(device, "/v2/models/kws/infer", {"x": X})
    doc = json.loads(r.content[:int(r.headers[HEADER_LENGTH])])
    assert (doc["model_name"], doc["model_version"], doc["parameters"]) == ("kws", "1", {"variant": "teacher"})
    got = _outputs(r)["probs"]
    assert np.array_equal(got, bare_run(TEACHER, {"x": X})["probs"])
    assert not np.array_equal(got, bare_run(STUDENT, {"x": X})["probs"])


def test_model_metadata_and_readiness(device):
    assert device.get("/v2/models/digits").json() == {
        "name": "digits", "versions": ["1"], "platform": "onnxruntime_onnx",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 64]}],
        "outputs": [{"name": "probs", "datatype": "FP32", "shape": [-1, 10]}]}
    assert device.get("/v2/models/digits/versions/1/ready").json() == {"name": "digits", "ready": True}
    r = device.get("/v2/models/digits/versions/2/ready")
    assert r.status_code == 404 and "has no version 2; its versions are 1" in r.json()["error"]


@pytest.mark.parametrize("inputs, message", [
    ({"y": X}, "unknown input 'y'; " + SIGNATURE),
    ({"x": X[:, :60]}, "input 'x': shape [3, 60] does not fit; " + SIGNATURE),
    ({"x": X.astype(np.float64)}, "input 'x': datatype FP64, but " + SIGNATURE),
    ({"x": X.astype(np.int32)}, "input 'x': datatype INT32, but " + SIGNATURE),
])
def test_wrong_tensors_are_400_naming_the_signature(device, inputs, message):
    for binary in (True, False):
        r = _infer(device, "/v2/models/digits/infer", inputs, binary=binary)
        assert r.status_code == 400, r.text
        assert r.json() == {"error": f"digits v1: {message} (-1 is any size)" if "shape" in message
                            else f"digits v1: {message}"}


def test_unknown_models_versions_and_paths_are_404(device):
    cases = {"/v2/models/nope/infer": "no model 'nope'; push it first",
             "/v2/models/digits/versions/7/infer": "model 'digits' has no version 7; its versions are 1",
             "/v2/models/digits/versions/x/infer": "versions are whole numbers"}
    for path, message in cases.items():
        r = _infer(device, path, {"x": X})
        assert r.status_code == 404 and message in r.json()["error"], (path, r.text)
    assert device.get("/v2/models/nope").status_code == 404
    r = device.get("/v2/models/digits/explain")
    assert r.status_code == 404 and "/v2/models/{name}" in r.json()["error"]
    assert device.get("/v2/models/digits/infer").status_code == 405


def test_tokens_no_token_401_enroll_token_403_admin_ok(cloud):
    body, length = encode_request({"x": X})
    headers = {HEADER_LENGTH: str(length)}
    with httpx.Client(base_url=cloud.base_url) as anyone:
        r = anyone.post("/v2/models/digits/infer", content=body, headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert "send 'Authorization: Bearer <token>'" in r.json()["error"]
        r = anyone.post("/v2/models/digits/infer", content=body, headers={**headers, "Authorization": "Bearer efd_x"})
        assert r.status_code == 401 and "unknown or revoked token" in r.json()["error"]
        r = anyone.get("/v2/models/digits", headers={"Authorization": "Basic abc"})
        assert r.status_code == 401 and "must be 'Bearer <token>'" in r.json()["error"]
    with cloud.client(cloud.enroll_token) as enroller:
        r = enroller.post("/v2/models/digits/infer", content=body, headers=headers)
        assert r.status_code == 403 and "an enrollment token may only enroll" in r.json()["error"]
    with cloud.client() as admin:
        r = admin.post("/v2/models/digits/infer", content=body, headers=headers)
        assert np.array_equal(_outputs(r)["probs"], bare_run(MODEL, {"x": X})["probs"])


def test_oversize_body_is_413_before_it_is_read(cloud, device):
    big = np.zeros((400, 64), np.float32)  # 102 KB binary, over infer_max_body_mb=0.05
    r = _infer(device, "/v2/models/digits/infer", {"x": big})
    assert r.status_code == 413
    assert r.json()["error"] == ("the request body is 102542 bytes, over the server's limit of 52428 bytes "
                                 "(infer_max_body_mb); send fewer rows per request")
    # Only the head is sent: a Content-Length over the cap is refused without reading a byte of the body.
    with socket.create_connection(("127.0.0.1", int(cloud.base_url.rsplit(":", 1)[1])), timeout=10) as sock:
        sock.sendall("POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999\r\n"
                     f"Authorization: Bearer {cloud.device_token}\r\n\r\n".encode())
        head = sock.recv(65536)
    assert head.startswith(b"HTTP/1.1 413") and b"connection: close" in head.lower()
    assert np.array_equal(_outputs(_infer(device, "/v2/models/digits/infer", {"x": X}))["probs"],
                          bare_run(MODEL, {"x": X})["probs"])


def _raw(device: httpx.Client, body: bytes, header_length: str | None) -> httpx.Response:
    headers = {HEADER_LENGTH: header_length} if header_length is not None else {}
    return device.post("/v2/models/digits/infer", content=body, headers=headers)


def test_garbage_bodies_are_400_and_the_server_still_answers(device):
    body, length = encode_request({"x": X})
    assert length is not None
    header = body[:length]
    wrong_size = header.replace(b'"binary_data_size":768', b'"binary_data_size":700')
    cases = [
        (body[:-10], str(length), "the body ends 10 bytes before"),  # truncated binary
        (body, str(len(body) + 5), f"{HEADER_LENGTH} is {len(body) + 5} but the body has {len(body)} bytes"),
        (body, "-3", f"{HEADER_LENGTH} is -3"),
        (body, "twelve", f"{HEADER_LENGTH} must be a whole number"),
        (wrong_size + body[length:], str(len(wrong_size)), "binary_data_size is 700 bytes but shape [3, 64]"),
        (body + b"xx", str(length), "2 bytes after the tensors' binary data"),
        (b"\xff\xfe not json", None, "the body is not JSON"),
        (b"[1, 2]", None, "must be a JSON object"),
        (b'{"inputs": [{"name": "x", "shape": [3, -64], "datatype": "FP32", "data": []}]}', None,
         "negative dimension"),
        (b'{"inputs": [{"name": "x", "shape": [3, 64], "datatype": "FP32", "data": [1, 2]}]}', None,
         "2 values for shape [3, 64] (needs 192)"),
        (b'{"inputs": []}', None, "'inputs' must be a non-empty list"),
        (b"", None, "the body is not JSON"),
    ]
    for raw, header_length, message in cases:
        r = _raw(device, raw, header_length)
        assert r.status_code == 400, (message, r.text)
        assert message in r.json()["error"], (message, r.text)
    assert np.array_equal(_outputs(_infer(device, "/v2/models/digits/infer", {"x": X}))["probs"],
                          bare_run(MODEL, {"x": X})["probs"])


@pytest.mark.parametrize("workers", [1, 2])
def test_standalone_infer_process(tmp_path: Path, workers: int):
    from edgefleet.cloud.services import Fleet
    from edgefleet.cloud.settings import Settings

    data_dir = tmp_path / "infer-data"
    fleet = Fleet.from_settings(Settings(data_dir=data_dir))
    try:
        fleet.push_model("digits", MODEL)
        token = fleet.ensure_admin_token()
    finally:
        fleet.close()
    port, grpc_port = free_port(), free_port()
    env = {**os.environ, "EDGEFLEET_OFFLOAD_SERVES": "teacher", "EDGEFLEET_GRPC_PORT": str(grpc_port)}
    proc = subprocess.Popen([sys.executable, "-m", "edgefleet.cloud.main", "infer", "--port", str(port),
                             "--data-dir", str(data_dir), "--log-level", "warning", "--workers", str(workers)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"

        def live() -> bool:
            try:
                return httpx.get(f"{base}/v2/health/live", timeout=1).status_code == 200
            except httpx.TransportError:
                assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
                return False

        wait_for(live, 60, what="edgefleet-cloud infer to listen")
        for _ in range(2 * workers):  # a new connection each: the kernel hands them to the workers
            with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}) as client:
                r = _infer(client, "/v2/models/digits/infer", {"x": X})
                assert np.array_equal(_outputs(r)["probs"], bare_run(MODEL, {"x": X})["probs"])
                assert client.get("/api/v1/models").status_code == 404  # the data plane only
        _assert_grpc_serving(grpc_port)  # started beside REST (in the parent, with several workers)
    finally:
        proc.terminate()
        assert proc.wait(30) == 0


def _assert_grpc_serving(port: int) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


def test_a_chunked_body_over_the_cap_is_413_and_compressed_bodies_are_refused(cloud, device):
    def chunks():
        for _ in range(20):
            yield b"x" * 4096  # 80 KiB, no Content-Length: counted as it comes

    r = device.post("/v2/models/digits/infer", content=chunks())
    assert r.status_code == 413 and "over the server's limit of 52428 bytes" in r.json()["error"]
    body, _ = encode_request({"x": X}, binary=False)
    r = device.post("/v2/models/digits/infer", content=body, headers={"Content-Encoding": "gzip"})
    assert r.status_code == 400 and "send the body uncompressed" in r.json()["error"]


def test_tokens_are_looked_up_once_per_ttl(cloud):
    from edgefleet.cloud.api.app import data_plane

    tokens = data_plane(cloud.runtime.app).tokens
    tokens.clear()
    before = tokens.lookups
    with cloud.client(cloud.device_token) as client:
        for _ in range(5):
            assert client.get("/v2/models/digits/ready").status_code == 200
    with httpx.Client(base_url=cloud.base_url, headers={"Authorization": "Bearer efd_wrong"}) as wrong:
        for _ in range(5):
            assert wrong.get("/v2/models/digits/ready").status_code == 401
    assert tokens.lookups - before == 2  # one for the good token, one for the wrong one


def test_concurrent_requests_with_batching_on_get_their_own_exact_answers(tmp_path: Path):
    from concurrent.futures import ThreadPoolExecutor

    from edgefleet.cloud.api.app import data_plane

    server = start_cloud_server(tmp_path / "cloud", infer_batch_max_delay_us=20_000, infer_batch_max_size=8)
    try:
        server.fleet.push_model("digits", MODEL)
        rows = [np.random.default_rng(i).standard_normal((1 + i % 2, 64)).astype(np.float32) for i in range(16)]

        def call(x: np.ndarray) -> np.ndarray:
            with server.client() as client:
                return _outputs(_infer(client, "/v2/models/digits/infer", {"x": x}))["probs"]

        with ThreadPoolExecutor(16) as pool:
            got = list(pool.map(call, rows))
        for x, y in zip(rows, got, strict=True):
            assert np.array_equal(y, bare_run(MODEL, {"x": x})["probs"])
        batcher = next(iter(data_plane(server.runtime.app).pool._loaded.values())).batcher
        assert batcher is not None and batcher.runs >= 1
    finally:
        server.stop()
