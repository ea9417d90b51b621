"""sdk/embedded.py: `Client.standalone` runs the model in-process with the agent's offload policy, and sends what
must go to the cloud straight to an OIP server (here a real one: an agent's local HTTP API, binary extension)."""

from __future__ import annotations

import socket

import numpy as np
import pytest

from edgefleet.sdk import Client, InvalidInput, ModelUnknown
from tests.sdk import kit

X = kit.sample(3)


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "digits.onnx"
    path.write_bytes(kit.digits_mlp())
    return path


def test_embedded_equals_bare_onnxruntime(model_path):
    with Client.standalone(model_path, active_watts=5.0, version=7) as app:
        r = app.infer("digits", X)
        assert np.array_equal(r.outputs["probabilities"], kit.reference(X))
        p = r.provenance
        assert (p.where, p.reason, p.model_version, p.variant, p.escalated, p.energy_source) == (
            "local", "offload_disabled", 7, "embedded", False, "estimated")
        assert p.energy_mj == pytest.approx(5.0 * p.latency_ms)
        r = app.infer("digits", {"input": X[:1]}, outputs=["probabilities"])
        assert np.array_equal(r.outputs["probabilities"], kit.reference(X[:1]))
    assert Client.standalone(model_path).infer("digits", X).provenance.energy_mj is None


def test_embedded_errors(model_path, tmp_path):
    app = Client.standalone(model_path)
    with pytest.raises(InvalidInput, match=r"datatype FP64, but the model takes input FP32 \[-1, 64\]"):
        app.infer("digits", X.astype(np.float64))
    with pytest.raises(InvalidInput, match=r"shape \[3, 2\] does not fit"):
        app.infer("digits", X[:, :2])
    with pytest.raises(InvalidInput, match="unknown output"):
        app.infer("digits", X, outputs=["logits"])
    with pytest.raises(ModelUnknown, match="serves 'digits', not 'other'"):
        app.infer("other", X)
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(ModelUnknown, match="give the path of a valid .onnx file"):
        Client.standalone(tmp_path / "junk.onnx")


def test_over_budget_goes_to_the_cloud_oip_server(model_path, tmp_path):
    with kit.serving(tmp_path / "cloud") as (cloud, *_):
        app = Client.standalone(model_path, cloud_url=cloud.url, budgets={"p95_ms": 1e-6})
        reasons = [app.infer("digits", X).provenance.reason for _ in range(3)]
        assert reasons == ["local_within_budget"] * 3  # until the window has its 3 samples
        r = app.infer("digits", X, deadline_ms=5000)
        assert (r.provenance.where, r.provenance.reason) == ("cloud", "local_p95_over_budget")
        assert r.provenance.model_version == "1" and r.provenance.latency_ms > 0
        assert np.array_equal(r.outputs["probabilities"], kit.reference(X))
        app.close()


def test_an_unreachable_cloud_falls_back_to_local(model_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again at once: nothing listens there
    app = Client.standalone(model_path, cloud_url=f"http://127.0.0.1:{port}", budgets={"p95_ms": 1e-6})
    for _ in range(3):
        app.infer("digits", X)
    r = app.infer("digits", X)
    assert (r.provenance.where, r.provenance.reason) == ("local", "cloud_failed_fallback")
    assert np.array_equal(r.outputs["probabilities"], kit.reference(X))
