"""edge_agent/offload_client.py against real OIP servers on free ports: a binary-capable one built here on the shared
codec over a real InferenceService (the "cloud", until the cloud's own server is wired in), and the agent's own
local API (JSON). Also the helpers the router tests share: models, the server, a delaying TCP proxy."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edgefleet.common.oip_codec import HEADER_LENGTH, OipError, decode_request, encode_response
from edgefleet.edge_agent.errors import CloudUnavailable, InferenceError, ModelNotFound
from edgefleet.edge_agent.inference import InferenceService
from edgefleet.edge_agent.installer import Installer
from edgefleet.edge_agent.local_api import LocalApi
from edgefleet.edge_agent.meters import ModelledMeter
from edgefleet.edge_agent.offload_client import OffloadClient
from edgefleet.edge_agent.outbox import Outbox
from edgefleet.edge_agent.telemetry import Telemetry
from edgefleet.edge_agent.unpack import unpack_bundle
from tests.edge_agent import agent_testkit as kit
from tests.harness import free_port
from tests.netproxy import DelayProxy

X = np.array([[0.0, 0.0, 0.1], [1.0, 2.0, 3.0]], dtype=np.float32)

# -- shared with test_offload_router.py ----------------------------------------------------------------------------


def softmax_model(scale: float) -> bytes:
    """y = softmax(x * scale) over x float32 [batch, 3]: a 'classifier' whose sureness grows with `scale`."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])
    s = helper.make_tensor("s", TensorProto.FLOAT, [1], [scale])
    graph = helper.make_graph([helper.make_node("Mul", ["x", "s"], ["xs"]),
                               helper.make_node("Softmax", ["xs"], ["y"], axis=-1)], "softmax", [x], [y],
                              initializer=[s])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def expected(scale: float, x: np.ndarray = X) -> np.ndarray:
    return kit.ort_run(softmax_model(scale), {"x": x})["y"]


def serve_models(root: Path, models: dict[str, tuple[int, float]], runtime_factory=None,
                 emulation: dict[str, float] | None = None) -> InferenceService:
    """An InferenceService serving {name: (version, softmax scale)} from real bundles, with a modelled meter and
    telemetry (clock fixed at kit.T0); `emulation`: {name: the manifest's emulation_factor}."""
    installer = Installer(root / "models")
    for name, (version, scale) in models.items():
        archive = root / f"{name}-{version}.tar.gz"
        archive.write_bytes(kit.make_bundle(kit.bundle_files(name, version, model=softmax_model(scale),
                                                             emulation_factor=(emulation or {}).get(name))))
        staging = installer.new_staging(name, version)
        unpack_bundle(archive, staging)
        installer.promote(name, version, staging)
        installer.activate(name, version, previous=None)
    telemetry = Telemetry("dev-1", 60, Outbox(root / "outbox", 1 << 20))
    kwargs = {"runtime_factory": runtime_factory} if runtime_factory is not None else {}
    service = InferenceService(installer, meter=ModelledMeter(active_watts=4.0), telemetry=telemetry,
                               clock=lambda: kit.T0, **kwargs)
    assert service.load_active() == {name: v for name, (v, _) in models.items()}
    return service


class _OipHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server: _Server

    def setup(self) -> None:
        super().setup()
        with self.server.lock:
            self.server.connections += 1
            self.server.socks.append(self.connection)

    def log_message(self, *args) -> None:
        pass

    def _send(self, status: int, body: bytes, header_length: int | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json" if header_length is None else
                         "application/octet-stream")
        if header_length is not None:
            self.send_header(HEADER_LENGTH, str(header_length))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        if self.server.drop_after_reply:  # close silently, as an idle keep-alive timeout does
            self.close_connection = True

    def _error(self, status: int, message: str) -> None:
        self._send(status, json.dumps({"error": message}).encode())

    def _route(self) -> tuple[str, str | None, str] | None:
        parts = self.path.split("/")  # ['', 'v2', 'models', name, ('versions', v,) tail]
        if len(parts) < 4 or parts[1:3] != ["v2", "models"]:
            return None
        name, rest = parts[3], parts[4:]
        version = None
        if rest[:1] == ["versions"] and len(rest) >= 2:
            version, rest = rest[1], rest[2:]
        return name, version, "/".join(rest)

    def do_GET(self) -> None:
        if self.path == "/v2/health/live":
            return self._send(200, b'{"live": true}')
        route = self._route()
        if route is None or route[0] not in self.server.service.models():
            return self._error(404, f"no model at {self.path}")
        return self._send(200, json.dumps({"name": route[0], "ready": True}).encode())

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.auth_seen.append(self.headers.get("Authorization"))
        if self.server.token and self.headers.get("Authorization") != f"Bearer {self.server.token}":
            return self._error(401, "unknown token")
        if self.server.fail_status:
            return self._error(self.server.fail_status, "the server is having a bad day")
        if self.server.garbage:
            return self._send(200, b"<html>not oip</html>")
        route = self._route()
        if route is None or route[2] != "infer":
            return self._error(404, f"no route {self.path}")
        name, version, _ = route
        header = self.headers.get(HEADER_LENGTH)
        try:
            request = decode_request(body, int(header) if header is not None else None)
            outputs, prov = self.server.service.infer_arrays(name, request.inputs, version=version,
                                                             outputs=request.outputs)
        except OipError as exc:
            return self._error(exc.status, str(exc))
        except ModelNotFound as exc:
            return self._error(404, str(exc))
        except InferenceError as exc:
            return self._error(400, str(exc))
        with self.server.lock:
            self.server.served += 1
            self.server.binary_requests += header is not None
        params = {**prov.parameters(), "where": "cloud-test-server"}
        reply, length = encode_response(name, str(prov.model_version), outputs, id=request.id, parameters=params,
                                        binary=request.binary_outputs)
        self._send(200, reply, length)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        pass  # a client or a stop() that cut a connection: expected here, and the tests assert what matters


class OipServer:
    """A real OIP REST server (JSON and the binary extension) over `service`, on `port` (0: any free one)."""

    def __init__(self, service: InferenceService, port: int = 0, token: str = "") -> None:
        self.server = _Server(("127.0.0.1", port), _OipHandler)
        self.server.service = service
        self.server.token = token
        self.server.lock = threading.Lock()
        self.server.connections = self.server.served = self.server.binary_requests = 0
        self.server.fail_status = 0
        self.server.garbage = False
        self.server.drop_after_reply = False
        self.server.auth_seen = []
        self.server.socks = []
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop as a killed process does: the listener and every open connection go."""
        self.server.shutdown()
        self.server.server_close()
        with self.server.lock:
            for sock in self.server.socks:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self._thread.join(timeout=5)


# -- the client's tests ---------------------------------------------------------------------------------------------


@pytest.fixture
def cloud(tmp_path):
    server = OipServer(serve_models(tmp_path / "cloud", {"digits": (7, 5.0)}))
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize("binary", [True, False])
def test_infer_round_trip_binary_and_json(cloud, binary):
    client = OffloadClient(cloud.url, binary=binary)
    response = client.infer("digits", {"x": X})
    assert response.model_name == "digits" and response.model_version == "7"
    np.testing.assert_array_equal(response.outputs["y"], expected(5.0))
    assert response.parameters["where"] == "cloud-test-server" and response.parameters["model_version"] == 7
    versioned = client.infer("digits", {"x": X}, version="7", outputs=["y"])
    np.testing.assert_array_equal(versioned.outputs["y"], expected(5.0))
    assert cloud.server.binary_requests == (2 if binary else 0)
    assert client.live() and client.ready("digits") and not client.ready("nope")
    client.close()


@pytest.mark.parametrize("binary", [True, False])
def test_against_the_agents_local_api(tmp_path, binary):
    service = serve_models(tmp_path, {"digits": (3, 2.0)})
    with LocalApi(service) as api:
        client = OffloadClient(api.url, binary=binary)
        response = client.infer("digits", {"x": X})
        np.testing.assert_allclose(response.outputs["y"], expected(2.0), rtol=1e-6)
        assert response.model_version == "3" and response.parameters["where"] == "local"
        with pytest.raises(ModelNotFound, match="has no model 'nope'"):
            client.infer("nope", {"x": X})
        assert client.metadata("digits")["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}]


def test_one_keep_alive_connection_per_thread(cloud):
    client = OffloadClient(cloud.url)
    for _ in range(5):
        client.infer("digits", {"x": X})
    assert cloud.server.connections == 1
    errors: list[BaseException] = []

    def other() -> None:
        try:
            for _ in range(3):
                client.infer("digits", {"x": X})
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=other) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert errors == [] and cloud.server.connections == 3 and cloud.server.served == 11
    client.close()


def test_a_connection_the_server_dropped_is_retried_once_on_a_fresh_one(cloud):
    cloud.server.drop_after_reply = True
    client = OffloadClient(cloud.url)
    for _ in range(3):
        np.testing.assert_array_equal(client.infer("digits", {"x": X}).outputs["y"], expected(5.0))
    assert cloud.server.connections == 3 and cloud.server.served == 3


def test_bearer_token(tmp_path):
    server = OipServer(serve_models(tmp_path, {"digits": (1, 5.0)}), token="s3cret")
    try:
        with pytest.raises(CloudUnavailable, match=r"refused this device's token \(401\): unknown token; check "
                                                   "offload.token"):
            OffloadClient(server.url).infer("digits", {"x": X})
        client = OffloadClient(server.url, token="wrong")
        client.set_token("s3cret")
        assert client.infer("digits", {"x": X}).model_version == "1"
        assert server.server.auth_seen == [None, "Bearer s3cret"]
    finally:
        server.stop()


def test_4xx_are_inference_errors_with_the_servers_message(cloud):
    client = OffloadClient(cloud.url)
    with pytest.raises(ModelNotFound, match="has no model 'nope': model 'nope' is not on this device"):
        client.infer("nope", {"x": X})
    with pytest.raises(InferenceError, match=r"\(400\): input 'x': shape \[2, 4\] does not fit; the model takes "
                                             r"x FP32 \[-1, 3\]"):
        client.infer("digits", {"x": np.zeros((2, 4), np.float32)})
    with pytest.raises(InferenceError, match="cannot carry"):
        client.infer("digits", {"x": np.array([["a"]])})


@pytest.mark.parametrize(("status", "garbage", "message"), [
    (503, False, r"failed on model 'digits' \(503\): the server is having a bad day"),
    (429, False, r"\(429\)"),
    (0, True, "not an OIP inference response"),
])
def test_5xx_429_and_garbage_are_cloud_unavailable(cloud, status, garbage, message):
    cloud.server.fail_status, cloud.server.garbage = status, garbage
    with pytest.raises(CloudUnavailable, match=message):
        OffloadClient(cloud.url).infer("digits", {"x": X})


def test_network_failures_are_cloud_unavailable(cloud):
    with pytest.raises(CloudUnavailable, match="refused the connection"):
        OffloadClient(f"http://127.0.0.1:{free_port()}").infer("digits", {"x": X})
    proxy = DelayProxy(cloud.port, delay_s=0.5)
    try:
        with pytest.raises(CloudUnavailable, match=r"did not answer POST /v2/models/digits/infer within 100 ms "
                                                   r"\(offload.timeout_ms\)"):
            OffloadClient(proxy.url, timeout_s=0.1).infer("digits", {"x": X})
    finally:
        proxy.stop()
    client = OffloadClient(cloud.url)
    client.infer("digits", {"x": X})
    cloud.stop()  # killed between two requests: the kept connection is dead, and so is a new one
    with pytest.raises(CloudUnavailable, match="refused the connection"):
        client.infer("digits", {"x": X})


def test_url_prefix_and_bad_urls(cloud):
    with pytest.raises(ValueError, match="offload url must be"):
        OffloadClient("ftp://x")
    client = OffloadClient(cloud.url + "/mounted/")
    assert client.prefix == "/mounted"
    with pytest.raises(ModelNotFound, match="no route /mounted/v2/models/digits/infer"):
        client.infer("digits", {"x": X})
