"""edge_agent/local_api.py + inference.py: real HTTP on port 0 and a real unix socket, any plain OIP client."""

from __future__ import annotations

import http.client
import json
import select
import socket

import httpx
import numpy as np
import pytest

from edgefleet.edge_agent.errors import InferenceError, ModelNotFound, ModelNotReady
from edgefleet.edge_agent.inference import InferenceService, request_to_numpy
from edgefleet.edge_agent.installer import Installer
from edgefleet.edge_agent.local_api import LocalApi
from edgefleet.edge_agent.meters import ModelledMeter
from edgefleet.edge_agent.outbox import Outbox
from edgefleet.edge_agent.telemetry import Telemetry
from edgefleet.protos.messages import TensorSpec
from edgefleet.protos.oip import InferRequest, InferResponse
from tests.edge_agent import agent_testkit as kit

BODY = {"inputs": [{"name": "x", "shape": [2, 3], "datatype": "FP32", "data": [1, 2, 3, 4, 5, 6]}]}


@pytest.fixture
def served(tmp_path):
    installer = kit.install_direct(tmp_path / "models", version=1, tmp=tmp_path)
    telemetry = Telemetry("dev-1", 60, Outbox(tmp_path / "outbox", 1 << 20))
    service = InferenceService(installer, meter=ModelledMeter(active_watts=4.0), telemetry=telemetry,
                               clock=lambda: kit.T0)
    assert service.load_active() == {"digits": 1}  # serves at once, before any network
    sock = tmp_path / "api.sock"
    api = LocalApi(service, unix_socket=sock, api_json=tmp_path / "api.json", max_body_bytes=64 * 1024,
                   telemetry=telemetry).start()
    try:
        yield api, service, telemetry, sock
    finally:
        api.stop()


def test_health_metadata_and_api_json(served, tmp_path):
    api, *_ = served
    info = json.loads((tmp_path / "api.json").read_text())
    assert info["url"] == api.url and info["http_port"] > 0 and info["http_host"] == "127.0.0.1"
    with httpx.Client(base_url=info["url"]) as c:
        assert c.get("/v2/health/live").json() == {"live": True}
        assert c.get("/v2/health/ready").status_code == 200
        meta = c.get("/v2/models/digits").json()
        assert meta["versions"] == ["1"] and meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}]
        assert c.get("/v2/models/digits/ready").status_code == 200
        assert c.get("/v2/models/nope").status_code == 404
        assert c.get("/nowhere").json()["error"].startswith("no route")


def test_infer_over_http_with_provenance(served):
    api, _, telemetry, _ = served
    r = httpx.post(f"{api.url}/v2/models/digits/infer", json={**BODY, "id": "req-1"})
    assert r.status_code == 200, r.text
    resp = InferResponse.model_validate(r.json())
    assert resp.id == "req-1" and resp.model_version == "1"
    (out,) = resp.outputs
    assert (out.name, out.datatype, out.shape) == ("y", "FP32", [2, 3])
    assert out.data == [3.0, 5.0, 7.0, 9.0, 11.0, 13.0]
    p = resp.parameters
    assert p["where"] == "local" and p["model_version"] == 1 and p["latency_ms"] > 0
    assert p["energy_source"] == "estimated" and p["energy_mj"] == pytest.approx(4.0 * p["latency_ms"], rel=1e-3)
    # versioned route, and the telemetry window counts it
    assert httpx.post(f"{api.url}/v2/models/digits/versions/1/infer", json=BODY).status_code == 200
    assert httpx.post(f"{api.url}/v2/models/digits/versions/7/infer", json=BODY).status_code == 404
    assert telemetry.open_windows() == 1
    assert httpx.get(f"{api.url}/v1/telemetry").json()["open_windows"] == 1


def test_infer_over_unix_socket(served):
    _, _, _, sock = served
    transport = httpx.HTTPTransport(uds=str(sock))
    with httpx.Client(transport=transport, base_url="http://agent") as c:
        assert c.get("/v2/health/live").status_code == 200
        r = c.post("/v2/models/digits/infer", json=BODY)
        assert r.status_code == 200 and r.json()["outputs"][0]["data"][0] == 3.0
        assert c.post("/v2/models/digits/infer", content=b"{").status_code == 400  # server still up after


BAD = [
    ("wrong shape", {"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": [0] * 8}]}, 400,
     "does not fit the model's [-1, 3]"),
    ("count mismatch", {"inputs": [{"name": "x", "shape": [2, 3], "datatype": "FP32", "data": [1, 2]}]}, 400,
     "2 values for shape [2, 3]"),
    ("wrong datatype", {"inputs": [{"name": "x", "shape": [1, 3], "datatype": "INT64", "data": [1, 2, 3]}]}, 400,
     "datatype INT64 but the model wants FP32"),
    ("unknown datatype", {"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP8", "data": [1, 2, 3]}]}, 400,
     "unknown datatype 'FP8'"),
    ("unknown input", {"inputs": [{"name": "z", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}, 400,
     "unknown input 'z'"),
    ("strings as data", {"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": ["a", "b", "c"]}]},
     400, "data is not a list of FP32"),
    ("no inputs", {"inputs": []}, 400, "not an OIP inference request"),
    ("not an object", [1, 2], 400, "not an OIP inference request"),
    ("unknown output", {**BODY, "outputs": [{"name": "nope"}]}, 400, "unknown output 'nope'"),
]


@pytest.mark.parametrize("case,body,status,message", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_are_clear_400s(served, case, body, status, message):
    api, *_ = served
    r = httpx.post(f"{api.url}/v2/models/digits/infer", json=body)
    assert r.status_code == status and message in r.json()["error"], r.text


def test_non_json_unknown_model_and_big_body(served):
    api, *_ = served
    r = httpx.post(f"{api.url}/v2/models/digits/infer", content=b"\x00not json",
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "Invalid JSON" in r.json()["error"]
    r = httpx.post(f"{api.url}/v2/models/ghost/infer", json=BODY)
    assert r.status_code == 404 and "not on this device" in r.json()["error"]
    r = httpx.post(f"{api.url}/v2/models/digits/infer", content=b"x" * (65 * 1024))
    assert r.status_code == 413 and "limit" in r.json()["error"]
    # no Content-Length at all (raw client)
    host, port = api.address
    conn = http.client.HTTPConnection(host, port, timeout=5)
    conn.putrequest("POST", "/v2/models/digits/infer")
    conn.endheaders()
    assert conn.getresponse().status == 411
    conn.close()


def test_no_model_active_is_503(tmp_path):
    installer = Installer(tmp_path / "models")
    (tmp_path / "models" / "digits" / "1").mkdir(parents=True)  # installed, never activated
    service = InferenceService(installer)
    with LocalApi(service) as api:
        assert httpx.get(f"{api.url}/v2/health/ready").status_code == 503
        r = httpx.post(f"{api.url}/v2/models/digits/infer", json=BODY)
        assert r.status_code == 503 and "not active yet" in r.json()["error"]


def test_activation_swaps_the_model(tmp_path):
    installer = kit.install_direct(tmp_path / "models", version=1, tmp=tmp_path)
    kit.install_direct(tmp_path / "models", version=2, tmp=tmp_path)
    service = InferenceService(installer)
    service.load_active()
    x = {"x": np.ones((1, 3), np.float32)}
    assert service.run("digits", x)[1].model_version == 2
    service.activate("digits", 1)
    out, prov = service.run("digits", x)
    assert prov.model_version == 1 and out["y"].tolist() == [[3.0, 3.0, 3.0]]
    service.activate("digits", None)
    with pytest.raises(ModelNotReady):
        service.run("digits", x)
    with pytest.raises(ModelNotFound):
        service.run("ghost", x)
    service.activate("digits", 1)
    request = InferRequest(inputs=[{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}])
    with pytest.raises(InferenceError, match="missing input"):
        request_to_numpy(request, service.get("digits").runtime.inputs + [TensorSpec(name="z", dtype="float32",
                                                                                     shape=[1])])


def test_stale_socket_is_replaced_and_removed(tmp_path):
    sock_path = tmp_path / "api.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(sock_path))
    s.close()  # a socket file left by a killed agent
    api = LocalApi(InferenceService(Installer(tmp_path / "models")), unix_socket=sock_path).start()
    api.stop()
    assert not sock_path.exists()


# -- limits: read timeouts (api.read_timeout_s) and shapes too large for their data -----------------------------------

READ_TIMEOUT_S = 0.5
WAIT_S = 20  # a bound on waiting for the server, not a timing assertion


@pytest.fixture
def strict(tmp_path):
    installer = kit.install_direct(tmp_path / "models", version=1, tmp=tmp_path)
    service = InferenceService(installer)
    service.load_active()
    api = LocalApi(service, unix_socket=tmp_path / "api.sock", read_timeout_s=READ_TIMEOUT_S).start()
    try:
        yield api, tmp_path / "api.sock"
    finally:
        api.stop()


def connect(api: LocalApi, sock_path, over: str) -> socket.socket:
    if over == "tcp":
        s = socket.create_connection(api.address, timeout=WAIT_S)
    else:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(WAIT_S)
        s.connect(str(sock_path))
    return s


def read_to_eof(s: socket.socket) -> bytes:
    """Everything the server sends until it closes; a server that never closes fails the test after WAIT_S."""
    got = b""
    while data := s.recv(65536):
        got += data
    return got


@pytest.mark.parametrize("over", ["tcp", "unix"])
def test_a_body_shorter_than_its_content_length_is_408_and_closed(strict, over):
    api, sock_path = strict
    with connect(api, sock_path, over) as s:
        s.sendall(b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: agent\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n" + b'{"inputs": [')
        answer = read_to_eof(s)  # before api.read_timeout_s the server waited here for ever
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), answer
    assert "api.read_timeout_s" in json.loads(body)["error"]
    assert httpx.get(f"{api.url}/v2/health/live").status_code == 200  # and the server still answers others


@pytest.mark.parametrize("over", ["tcp", "unix"])
def test_stalled_headers_and_idle_keepalive_connections_are_closed(strict, over):
    api, sock_path = strict
    with connect(api, sock_path, over) as s:
        s.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: agent\r\n")  # the blank line never comes
        assert read_to_eof(s) == b""
    with connect(api, sock_path, over) as s:  # one answered request, then silence on the kept-alive connection
        s.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: agent\r\n\r\n")
        assert read_to_eof(s).startswith(b"HTTP/1.1 200")


def test_a_request_dripped_a_byte_at_a_time_is_cut_off_by_the_deadline(strict):
    """Each byte arrives well within READ_TIMEOUT_S, so only a deadline on the whole request ends it."""
    api, _ = strict
    request = b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: agent\r\nContent-Length: 512\r\n\r\n" + b" " * 512
    sent = 0
    with socket.create_connection(api.address, timeout=WAIT_S) as s:
        for byte in request[: len(request) // 4 + 1]:
            try:
                s.sendall(bytes([byte]))
            except OSError:
                break  # the server closed the connection
            sent += 1
            if select.select([s], [], [], READ_TIMEOUT_S / 5)[0]:
                break  # the server answered or closed
        read_to_eof(s)
    assert sent < len(request) // 4, f"the server took {sent} dripped bytes"


def test_a_shape_too_large_for_its_data_is_an_inference_error():
    spec = [TensorSpec(name="x", dtype="float32", shape=[None, 64])]
    for shape, data in (([2**58, 64], []), ([2**63, 64], [0.0] * 64), ([2**58 * 3, 64], [0.0] * 64)):
        request = InferRequest(inputs=[{"name": "x", "shape": shape, "datatype": "FP32", "data": data}])
        with pytest.raises(InferenceError, match="too large for the data"):
            request_to_numpy(request, spec)
    request = InferRequest(inputs=[{"name": "x", "shape": [0, 64], "datatype": "FP32", "data": []}])
    assert request_to_numpy(request, spec)["x"].shape == (0, 64)


def test_a_huge_declared_shape_is_a_400_over_http(served):
    api, *_ = served
    for shape in ([2**58, 3], [2**64, 3], [2**62 * 4, 3]):
        r = httpx.post(f"{api.url}/v2/models/digits/infer",
                       json={"inputs": [{"name": "x", "shape": shape, "datatype": "FP32", "data": []}]})
        assert r.status_code == 400 and "too large for the data" in r.json()["error"], (shape, r.text)


def test_metrics_are_prometheus_text_a_standard_parser_reads(served):
    from datetime import timedelta

    from prometheus_client.parser import text_string_to_metric_families

    api, service, telemetry, _ = served
    for _ in range(3):
        assert httpx.post(f"{api.url}/v2/models/digits/infer", json=BODY).status_code == 200  # 2 rows each
    [batch] = telemetry.flush(kit.T0 + timedelta(seconds=60))
    [window] = batch.windows
    r = httpx.get(f"{api.url}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "version"))): s.value
               for family in text_string_to_metric_families(r.text) for s in family.samples}
    key = (("model", "digits"), ("where", "local"))
    assert samples[("edgefleet_agent_requests_total", key)] == 3
    assert samples[("edgefleet_agent_inferences_total", key)] == 6
    assert samples[("edgefleet_agent_busy_seconds_total", key)] == pytest.approx(window.mean_ms * 3 / 1000)
    energy = ("edgefleet_agent_energy_joules_total", (("energy_source", "estimated"), *key))
    assert samples[energy] == pytest.approx(window.mean_mj * 3 / 1000)
    assert samples[("edgefleet_agent_outbox_batches", ())] == 1
    assert samples[("edgefleet_agent_outbox_dropped_windows_total", ())] == 0
