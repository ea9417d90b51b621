"""edge_agent/local_api.py + inference.py: real HTTP on port 0 and a real unix socket, any plain OIP client."""

from __future__ import annotations

import http.client
import json
import socket

import httpx
import numpy as np
import pytest

from edgefleet.edge_agent.errors import InferenceError, ModelNotFound, ModelNotReady
from edgefleet.edge_agent.inference import InferenceService, request_to_numpy
from edgefleet.edge_agent.installer import Installer
from edgefleet.edge_agent.local_api import LocalApi
from edgefleet.edge_agent.meters import ModelledMeter
from edgefleet.edge_agent.telemetry import Outbox, Telemetry
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
