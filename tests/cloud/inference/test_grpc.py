"""cloud/inference/grpc_server.py: the OIP gRPC service on a real port, over a real cloud (HTTP API, database,
tokens) and real ONNX Runtime sessions. Every answer is compared exactly with bare onnxruntime; tritonclient (a
third party's client) and raw stubs both talk to it; garbage gets the right status and the server keeps serving."""

from __future__ import annotations

import re
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tritonclient_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from onnx import TensorProto, helper

from edgefleet.cloud.inference import ModelPool, VariantResolver
from edgefleet.cloud.inference.grpc_server import SERVICE, start_grpc_server
from edgefleet.protos import grpc_predict_v2_pb2 as pb
from edgefleet.protos import grpc_predict_v2_pb2_grpc as pb_grpc
from tests.cloud.inference import bare_run, mlp_onnx
from tests.cloud_server import enroll_device, start_cloud_server

SIG = r"the model takes x FP32 \[-1, 64\]"
X = np.random.default_rng(5).standard_normal((3, 64)).astype(np.float32)
MLP = mlp_onnx(1)


def mixed_onnx() -> bytes:
    """Five inputs of five dtypes, each answered by its own output: y = 2x (FP32), m = n + 1 (INT64), e = 3d (FP64),
    j = i + 5 (INT32), u8 = u (UINT8, Identity)."""
    def vi(name: str, elem: int, width: int) -> object:
        return helper.make_tensor_value_info(name, elem, ["N", width])

    consts = [helper.make_tensor("two", TensorProto.FLOAT, [], [2.0]), helper.make_tensor("one", TensorProto.INT64,
              [], [1]), helper.make_tensor("three", TensorProto.DOUBLE, [], [3.0]),
              helper.make_tensor("five", TensorProto.INT32, [], [5])]
    nodes = [helper.make_node("Mul", ["x", "two"], ["y"]), helper.make_node("Add", ["n", "one"], ["m"]),
             helper.make_node("Mul", ["d", "three"], ["e"]), helper.make_node("Add", ["i", "five"], ["j"]),
             helper.make_node("Identity", ["u"], ["u8"])]
    inputs = [vi("x", TensorProto.FLOAT, 4), vi("n", TensorProto.INT64, 3), vi("d", TensorProto.DOUBLE, 2),
              vi("i", TensorProto.INT32, 2), vi("u", TensorProto.UINT8, 2)]
    outputs = [vi("y", TensorProto.FLOAT, 4), vi("m", TensorProto.INT64, 3), vi("e", TensorProto.DOUBLE, 2),
               vi("j", TensorProto.INT32, 2), vi("u8", TensorProto.UINT8, 2)]
    graph = helper.make_graph(nodes, "mixed", inputs, outputs, consts)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


MIXED = mixed_onnx()
FEEDS = {"x": np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32),
         "n": np.array([[1, -2, 2**40], [7, 0, -(2**50)]], np.int64),
         "d": np.array([[0.1, -1e300], [2.5, 1e-300]], np.float64),
         "i": np.array([[-7, 2**30], [3, 0]], np.int32),
         "u": np.array([[0, 255], [17, 128]], np.uint8)}
DATATYPE = {"float32": "FP32", "int64": "INT64", "float64": "FP64", "int32": "INT32", "uint8": "UINT8"}
TYPED_FIELD = {"float32": "fp32_contents", "int64": "int64_contents", "float64": "fp64_contents",
               "int32": "int_contents", "uint8": "uint_contents"}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cloud = start_cloud_server(tmp_path_factory.mktemp("grpc-cloud"))
    admin = cloud.client()
    for name, model in (("digits", MLP), ("digits", mlp_onnx(2)), ("mixed", MIXED)):
        r = admin.post("/api/v1/models", params={"name": name}, content=model,
                       headers={"Content-Type": "application/octet-stream"})
        assert r.status_code == 201, r.text
    r = admin.post("/api/v1/enrollment-tokens", json={"note": "grpc test"})
    assert r.status_code == 201, r.text
    enroll_token = r.json()["token"]
    device_token = enroll_device(admin, "dev-grpc").device_token
    pool = ModelPool(VariantResolver(cloud.fleet), max_input_bytes=1 << 20)
    handle = start_grpc_server(pool, cloud.fleet.authenticate, max_message_mb=4)
    channel = grpc.insecure_channel(f"127.0.0.1:{handle.port}")
    try:
        yield {"cloud": cloud, "handle": handle, "stub": pb_grpc.GRPCInferenceServiceStub(channel),
               "channel": channel, "admin": cloud.admin_token, "device": device_token, "enroll": enroll_token}
    finally:
        channel.close()
        admin.close()
        handle.stop(0)
        cloud.stop()


def md(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def raw_request(model: str, feeds: dict[str, np.ndarray], version: str = "") -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=model, model_version=version, id="req-1")
    for name, array in feeds.items():
        req.inputs.add(name=name, datatype=DATATYPE[array.dtype.name], shape=array.shape)
        req.raw_input_contents.append(array.astype(array.dtype.newbyteorder("<")).tobytes())
    return req


def typed_request(model: str, feeds: dict[str, np.ndarray]) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=model)
    for name, array in feeds.items():
        t = req.inputs.add(name=name, datatype=DATATYPE[array.dtype.name], shape=array.shape)
        getattr(t.contents, TYPED_FIELD[array.dtype.name]).extend(array.ravel().tolist())
    return req


def raw_outputs(resp: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    dtypes = {v: np.dtype(k).newbyteorder("<") for k, v in DATATYPE.items()}
    return {t.name: np.frombuffer(raw, dtypes[t.datatype]).reshape(list(t.shape))
            for t, raw in zip(resp.outputs, resp.raw_output_contents, strict=True)}


def typed_outputs(resp: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    by_type = {v: k for k, v in DATATYPE.items()}
    out = {}
    for t in resp.outputs:
        dtype = by_type[t.datatype]
        out[t.name] = np.array(getattr(t.contents, TYPED_FIELD[dtype]), dtype).reshape(list(t.shape))
    return out


def assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert list(got) == list(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and np.array_equal(got[name], want[name]), name


def status_of(call, *args, **kwargs) -> tuple[object, str]:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    return info.value.code(), info.value.details()


# -- right answers ---------------------------------------------------------------------------------------------------


def test_tritonclient_round_trip_equals_bare_onnxruntime(env):
    client = tritonclient_grpc.InferenceServerClient(f"127.0.0.1:{env['handle'].port}")
    headers = {"authorization": f"Bearer {env['device']}"}
    try:
        assert client.is_server_live(headers=headers) and client.is_server_ready(headers=headers)
        assert client.is_model_ready("mixed", headers=headers) and not client.is_model_ready("nope", headers=headers)
        meta = client.get_model_metadata("digits", headers=headers, as_json=True)
        assert meta == {"name": "digits", "versions": ["1", "2"], "platform": "onnxruntime_onnx",
                        "inputs": [{"name": "x", "datatype": "FP32", "shape": ["-1", "64"]}],
                        "outputs": [{"name": "probs", "datatype": "FP32", "shape": ["-1", "10"]}]}
        inp = tritonclient_grpc.InferInput("x", list(X.shape), "FP32")
        inp.set_data_from_numpy(X)
        got = client.infer("digits", [inp], model_version="1", headers=headers)
        assert np.array_equal(got.as_numpy("probs"), bare_run(MLP, {"x": X})["probs"])
        assert got.get_response().model_version == "1"
        inputs = []
        for name, array in FEEDS.items():
            inputs.append(tritonclient_grpc.InferInput(name, list(array.shape), DATATYPE[array.dtype.name]))
            inputs[-1].set_data_from_numpy(array)
        wanted = [tritonclient_grpc.InferRequestedOutput(n) for n in ("m", "y")]
        got = client.infer("mixed", inputs, outputs=wanted, headers=headers)
        want = bare_run(MIXED, FEEDS)
        assert [o.name for o in got.get_response().outputs] == ["m", "y"]
        assert_same({n: got.as_numpy(n) for n in ("m", "y")}, {n: want[n] for n in ("m", "y")})
    finally:
        client.close()


def test_raw_in_raw_out_and_typed_in_typed_out(env):
    stub, want = env["stub"], bare_run(MIXED, FEEDS)
    resp = stub.ModelInfer(raw_request("mixed", FEEDS), metadata=md(env["admin"]))
    assert (resp.model_name, resp.model_version, resp.id) == ("mixed", "1", "req-1")
    assert resp.parameters["variant"].string_param == "version"
    assert not any(t.HasField("contents") for t in resp.outputs)
    assert_same(raw_outputs(resp), want)
    # KServe's convention: typed contents in, typed contents out.
    resp = stub.ModelInfer(typed_request("mixed", FEEDS), metadata=md(env["device"]))
    assert len(resp.raw_output_contents) == 0
    assert_same(typed_outputs(resp), want)
    # A version by number answers that version's own file.
    resp = stub.ModelInfer(raw_request("digits", {"x": X}, version="2"), metadata=md(env["device"]))
    assert resp.model_version == "2"
    assert np.array_equal(raw_outputs(resp)["probs"], bare_run(mlp_onnx(2), {"x": X})["probs"])


def test_server_and_model_metadata_and_readiness(env):
    stub, meta = env["stub"], md(env["device"])
    assert stub.ServerLive(pb.ServerLiveRequest(), metadata=meta).live
    assert stub.ServerReady(pb.ServerReadyRequest(), metadata=meta).ready
    server = stub.ServerMetadata(pb.ServerMetadataRequest(), metadata=meta)
    assert server.name == "edgefleet" and server.version
    assert stub.ModelReady(pb.ModelReadyRequest(name="digits", version="2"), metadata=meta).ready
    assert not stub.ModelReady(pb.ModelReadyRequest(name="digits", version="3"), metadata=meta).ready
    got = stub.ModelMetadata(pb.ModelMetadataRequest(name="mixed"), metadata=meta)
    assert (got.name, list(got.versions), got.platform) == ("mixed", ["1"], "onnxruntime_onnx")
    assert [(t.name, t.datatype, list(t.shape)) for t in got.inputs] == [
        ("x", "FP32", [-1, 4]), ("n", "INT64", [-1, 3]), ("d", "FP64", [-1, 2]), ("i", "INT32", [-1, 2]),
        ("u", "UINT8", [-1, 2])]
    assert [t.name for t in got.outputs] == ["y", "m", "e", "j", "u8"]
    assert list(stub.ModelMetadata(pb.ModelMetadataRequest(name="digits", version="1"), metadata=meta).versions) \
        == ["1"]


def test_health_answers_serving_without_a_token(env):
    health = health_pb2_grpc.HealthStub(env["channel"])
    for service in ("", SERVICE):
        assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == \
            health_pb2.HealthCheckResponse.SERVING


# -- who may call ----------------------------------------------------------------------------------------------------


def test_tokens_unauthenticated_permission_denied_and_cached(env):
    stub, req = env["stub"], pb.ServerLiveRequest()
    code, details = status_of(stub.ServerLive, req)
    assert code == grpc.StatusCode.UNAUTHENTICATED and "Bearer <token>" in details
    for metadata in (md("efd_not-a-real-token"), [("authorization", "Basic dXNlcjpwdw==")],
                     [("authorization", "Bearer ")]):
        assert status_of(stub.ServerLive, req, metadata=metadata)[0] == grpc.StatusCode.UNAUTHENTICATED
    code, details = status_of(stub.ModelInfer, raw_request("digits", {"x": X}), metadata=md(env["enroll"]))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "enrollment token may only enroll" in details
    tokens = env["handle"].tokens
    before = tokens.lookups
    for _ in range(20):
        stub.ModelInfer(raw_request("digits", {"x": X}), metadata=md(env["device"]))
    assert tokens.lookups - before <= 1  # one database lookup per token and TTL, not per call


# -- every error mapping, and garbage ----------------------------------------------------------------------------


def _tensor(name="x", datatype="FP32", shape=(3, 64)) -> pb.ModelInferRequest.InferInputTensor:
    return pb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=list(shape))


def _req(*tensors, raw=(), model="digits", version="", outputs=()) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=model, model_version=version, inputs=list(tensors),
                               raw_input_contents=list(raw))
    for name in outputs:
        req.outputs.add(name=name)
    return req


def _typed(datatype: str, shape, field: str, values) -> pb.ModelInferRequest.InferInputTensor:
    t = _tensor(datatype=datatype, shape=shape)
    getattr(t.contents, field).extend(values)
    return t


OK = X.tobytes()
INVALID, NOT_FOUND, EXHAUSTED = "INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED"
BAD = {
    "unknown model": (_req(_tensor(), raw=[OK], model="nope"), NOT_FOUND, "no model 'nope'"),
    "unknown version": (_req(_tensor(), raw=[OK], version="9"), NOT_FOUND, "has no version 9; its versions are 1, 2"),
    "version not a number": (_req(_tensor(), raw=[OK], version="latest"), NOT_FOUND, "versions are whole numbers"),
    "no model name": (_req(_tensor(), raw=[OK], model=""), INVALID, "set model_name"),
    "no inputs": (_req(), INVALID, "the request has no inputs"),
    "wrong input name": (_req(_tensor(name="y"), raw=[OK]), INVALID, r"unknown input 'y'; " + SIG),
    "wrong shape": (_req(_tensor(shape=(3, 63)), raw=[X[:, :63].tobytes()]), INVALID,
                    r"input 'x': shape \[3, 63\] does not fit; " + SIG),
    "wrong dtype": (_req(_tensor(datatype="FP64"), raw=[X.astype(np.float64).tobytes()]), INVALID,
                    r"input 'x': datatype FP64, but " + SIG),
    "unknown output": (_req(_tensor(), raw=[OK], outputs=["nope"]), INVALID, "unknown output 'nope'"),
    "raw bytes of the wrong length": (_req(_tensor(), raw=[OK[:-4]]), INVALID,
                                      r"has 764 bytes but shape \[3, 64\] of FP32 needs 768"),
    "shape and bytes disagree": (_req(_tensor(shape=(2, 64)), raw=[OK]), INVALID, "needs 512"),
    "more raw contents than inputs": (_req(_tensor(), raw=[OK, OK]), INVALID,
                                      "2 raw_input_contents for 1 inputs"),
    "unknown datatype": (_req(_tensor(datatype="FP8"), raw=[OK]), INVALID, "unknown datatype 'FP8'; use one of"),
    "BYTES": (_req(_tensor(datatype="BYTES"), raw=[OK]), INVALID, "BYTES tensors are not supported"),
    "negative dimension": (_req(_tensor(shape=(-1, 64)), raw=[OK]), INVALID, "negative dimension"),
    "huge declared shape": (_req(_tensor(shape=(2**40, 2**40)), raw=[OK]), EXHAUSTED,
                            "over the server's limit of 4194304"),
    "zero-size shape numpy cannot index": (_req(_tensor(shape=(0, 2**62, 2**62)), raw=[b""]), INVALID, "too large"),
    "over the pool's byte limit": (_req(_tensor(shape=(4200, 64)), raw=[np.zeros((4200, 64), np.float32).tobytes()]),
                                   EXHAUSTED, "over the server's limit of 1048576"),
    "typed values too few": (_req(_typed("FP32", (3, 64), "fp32_contents", [1.0] * 5)), INVALID,
                             r"contents.fp32_contents has 5 values but shape \[3, 64\] needs 192"),
    "typed values in the wrong field": (_req(_typed("FP32", (3, 64), "int64_contents", [1] * 192)), INVALID,
                                        "values go in contents.fp32_contents, not int64_contents"),
    "raw BOOL byte not 0 or 1": (_req(_tensor(name="x", datatype="BOOL", shape=(1, 2)), raw=[b"\x00\x02"]), INVALID,
                        "neither 0 nor 1"),
    "raw and typed mixed": (_req(_typed("FP32", (3, 64), "fp32_contents", [1.0] * 192), raw=[OK]), INVALID,
                            "raw or typed, not both"),
    "typed FP16": (_req(_typed("FP16", (3, 64), "fp32_contents", [1.0] * 192)), INVALID,
                   "send it in raw_input_contents"),
    "input twice": (_req(_tensor(), _tensor(), raw=[OK, OK]), INVALID, "is given twice"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_requests_get_their_status_and_the_server_keeps_serving(env, case):
    request, code, message = BAD[case]
    got_code, details = status_of(env["stub"].ModelInfer, request, metadata=md(env["device"]))
    assert got_code.name == code, details
    assert re.search(message, details), details
    good = env["stub"].ModelInfer(raw_request("digits", {"x": X}, version="1"), metadata=md(env["device"]))
    assert np.array_equal(raw_outputs(good)["probs"], bare_run(MLP, {"x": X})["probs"])


def test_typed_int_out_of_range_is_invalid(env):
    req = pb.ModelInferRequest(model_name="mixed")
    for name, array in FEEDS.items():
        t = req.inputs.add(name=name, datatype=DATATYPE[array.dtype.name], shape=array.shape)
        values = array.ravel().tolist()
        if name == "u":
            values[0] = 256  # does not fit UINT8
        getattr(t.contents, TYPED_FIELD[array.dtype.name]).extend(values)
    code, details = status_of(env["stub"].ModelInfer, req, metadata=md(env["device"]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "outside the range of UINT8 (0..255)" in details


def test_oversized_message_and_undecodable_bytes(env):
    big = np.zeros((5 * 1024 * 1024 // 256, 64), np.float32)  # 5 MiB, over max_message_mb=4
    code, _ = status_of(env["stub"].ModelInfer, raw_request("digits", {"x": big}), metadata=md(env["device"]))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    # Bytes that are no protobuf message at all: grpc refuses them before our code runs.
    junk = env["channel"].unary_unary("/inference.GRPCInferenceService/ModelInfer")
    code, _ = status_of(junk, b"\xff\xff\xff\xff garbage", metadata=md(env["device"]))
    assert code == grpc.StatusCode.INTERNAL
    unknown = env["channel"].unary_unary("/inference.GRPCInferenceService/ModelStreamInfer")
    assert status_of(unknown, b"", metadata=md(env["device"]))[0] == grpc.StatusCode.UNIMPLEMENTED
    assert env["stub"].ServerLive(pb.ServerLiveRequest(), metadata=md(env["device"])).live


# -- TLS and stopping -------------------------------------------------------------------------------------------------


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "grpc.crt", tmp_path / "grpc.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_tls_serves_and_stop_closes_the_port(env, tmp_path):
    cert, key = _self_signed(tmp_path)
    pool = ModelPool(VariantResolver(env["cloud"].fleet))
    handle = start_grpc_server(pool, env["handle"].tokens, tls_cert=cert, tls_key=key)
    creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
    try:
        with grpc.secure_channel(f"localhost:{handle.port}", creds) as channel:
            resp = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(raw_request("digits", {"x": X}, "1"),
                                                                        metadata=md(env["device"]))
            assert np.array_equal(raw_outputs(resp)["probs"], bare_run(MLP, {"x": X})["probs"])
        with grpc.insecure_channel(f"127.0.0.1:{handle.port}") as plain:  # plaintext to a TLS port: refused
            code, _ = status_of(pb_grpc.GRPCInferenceServiceStub(plain).ServerLive, pb.ServerLiveRequest(),
                                metadata=md(env["device"]), timeout=5)
            assert code == grpc.StatusCode.UNAVAILABLE
    finally:
        handle.stop(0)
    handle.stop(0)  # a second stop is harmless
    with grpc.secure_channel(f"localhost:{handle.port}", creds) as channel:
        code, _ = status_of(pb_grpc.GRPCInferenceServiceStub(channel).ServerLive, pb.ServerLiveRequest(),
                            metadata=md(env["device"]), timeout=5)
        assert code == grpc.StatusCode.UNAVAILABLE


def test_tls_needs_both_files(env, tmp_path):
    from edgefleet.cloud.errors import Invalid

    cert, _ = _self_signed(tmp_path)
    with pytest.raises(Invalid, match="needs both a certificate and its key"):
        start_grpc_server(ModelPool(VariantResolver(env["cloud"].fleet)), env["handle"].tokens, tls_cert=cert)


def test_serve_with_grpc_port_serves_rest_and_grpc_from_one_pool(tmp_path):
    # `edgefleet-cloud serve --grpc-port` wiring (CloudRuntime): the same model answers both ways, equal bits.
    cloud = start_cloud_server(tmp_path / "cloud", grpc_port=0)
    try:
        with cloud.client() as admin:
            r = admin.post("/api/v1/models", params={"name": "digits"}, content=MLP,
                           headers={"Content-Type": "application/octet-stream"})
            assert r.status_code == 201, r.text
            rest = admin.post("/v2/models/digits/infer", json={"inputs": [
                {"name": "x", "shape": list(X.shape), "datatype": "FP32", "data": X.ravel().tolist()}]})
            assert rest.status_code == 200, rest.text
        port = cloud.runtime.grpc.port
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE))
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            got = raw_outputs(pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                raw_request("digits", {"x": X}), metadata=md(cloud.admin_token)))
        want = np.asarray(rest.json()["outputs"][0]["data"], np.float32).reshape(got["probs"].shape)
        assert np.array_equal(got["probs"], want)
        assert np.array_equal(got["probs"], bare_run(MLP, {"x": X})["probs"])
    finally:
        cloud.stop()
    assert cloud.runtime.grpc is None  # stopped with the runtime
