"""common/runtimes/litert.py: a real .tflite made by the converter venv, loaded through the registry by the
manifest's runtime "litert", passing the same smoke test as its ONNX sibling; the tflite-runtime fallback and the
clear error when neither package is installed."""

from __future__ import annotations

import hashlib
import io
import sys
import types
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

from edgefleet.cloud.distill.artifacts import run_onnx
from edgefleet.common.runtimes import Runtime, available_runtimes, make_runtime
from edgefleet.common.runtimes.litert import LiteRtRuntime
from edgefleet.edge_agent.apply import smoke_test
from edgefleet.edge_agent.errors import InferenceError, RuntimeLoadError, SmokeTestFailed
from edgefleet.protos.messages import FileEntry, Manifest, SmokeTest, TensorSpec
from tests.cloud.distill import artifact_models as am


@pytest.fixture(scope="session")
def tflite_model(tmp_path_factory):
    """(onnx bytes, int8 tflite bytes, samples): converted once per session (10-20 s; venv cached)."""
    data = am.dscnn(8)
    x = am.samples((1, 28, 28), 64)
    return data, am.tflite_or_skip(data, x, tmp_path_factory.mktemp("tflite"), "int8"), x


def bundle_dir(root: Path, onnx_bytes: bytes, tflite: bytes, x: np.ndarray) -> tuple[Path, Manifest]:
    """A bundle laid out as the cloud builds it: model.tflite, smoke inputs and the ONNX student's outputs."""
    files = {"model.tflite": tflite}
    for name, arrays in (("smoke/input.npz", {"input": x[:4]}), ("smoke/expected.npz",
                                                                 {"logits": run_onnx(onnx_bytes, x[:4])})):
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        files[name] = buf.getvalue()
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(content)
    manifest = Manifest(
        name="digits", version=1, device_class="rpi4", runtime="litert", precision="int8", model_file="model.tflite",
        inputs=[TensorSpec(name="input", dtype="float32", shape=[None, 1, 28, 28])],
        outputs=[TensorSpec(name="logits", dtype="float32", shape=[None, 10])],
        files=[FileEntry(path=n, sha256=hashlib.sha256(c).hexdigest(), size=len(c)) for n, c in files.items()],
        smoke_test=SmokeTest(input_file="smoke/input.npz", expected_file="smoke/expected.npz", rtol=0, atol=0.05),
        created_at=datetime.now(timezone.utc))
    return root, manifest


@pytest.mark.timeout(1800)  # the first use on a machine builds the converter venv
def test_registry_picks_litert_and_it_runs(tflite_model, tmp_path):
    onnx_bytes, tflite, x = tflite_model
    directory, manifest = bundle_dir(tmp_path, onnx_bytes, tflite, x)
    assert "litert" in available_runtimes()
    rt = make_runtime(manifest.runtime, intra_op_threads=1)
    assert isinstance(rt, LiteRtRuntime) and isinstance(rt, Runtime)
    rt.load(directory, manifest)
    assert [(s.name, s.dtype, s.shape) for s in rt.inputs] == [("input", "float32", [None, 1, 28, 28])]
    assert [(s.name, s.shape) for s in rt.outputs] == [("logits", [None, 10])]
    for batch in (1, 7, 1):  # the signature runner resizes a dynamic batch both ways
        out = rt.run({"input": x[:batch]})
        assert out["logits"].shape == (batch, 10)
    reference = run_onnx(onnx_bytes, x)
    got = rt.run({"input": x})["logits"]
    assert np.mean(got.argmax(1) == reference.argmax(1)) >= 0.95  # int8 against the fp32 ONNX student
    rt.close()
    with pytest.raises(RuntimeLoadError, match="not loaded"):
        rt.run({"input": x[:1]})


@pytest.mark.timeout(1800)
def test_smoke_test_passes_and_catches_a_wrong_model(tflite_model, tmp_path):
    onnx_bytes, tflite, x = tflite_model
    directory, manifest = bundle_dir(tmp_path / "good", onnx_bytes, tflite, x)
    smoke_test(make_runtime("litert"), directory, manifest)
    wrong, manifest = bundle_dir(tmp_path / "wrong", am.dscnn(8, seed=5), tflite, x)  # expected from another net
    with pytest.raises(SmokeTestFailed, match="differs from the expected"):
        smoke_test(make_runtime("litert"), wrong, manifest)


@pytest.mark.timeout(1800)
def test_bad_inputs_are_inference_errors(tflite_model, tmp_path):
    onnx_bytes, tflite, x = tflite_model
    rt = LiteRtRuntime()
    rt.load(*bundle_dir(tmp_path, onnx_bytes, tflite, x))
    with pytest.raises(InferenceError, match="missing input 'input'"):
        rt.run({"x": x[:1]})
    with pytest.raises(InferenceError, match="dtype float64"):
        rt.run({"input": x[:1].astype(np.float64)})
    with pytest.raises(InferenceError, match="refused"):
        rt.run({"input": np.zeros((1, 3, 5), np.float32)})
    with pytest.raises(InferenceError, match="refused"):
        rt.run({"input": np.zeros((2, 1, 28, 27), np.float32)})
    assert rt.run({"input": x[:3]})["logits"].shape == (3, 10)  # still usable after refusals


def test_corrupt_or_missing_file_is_a_load_error(tmp_path):
    directory, manifest = bundle_dir(tmp_path, am.mlp(), b"not a flatbuffer at all", am.samples((64,), 4))
    with pytest.raises(RuntimeLoadError, match="LiteRT could not load"):
        LiteRtRuntime().load(directory, manifest)
    (directory / "model.tflite").unlink()
    with pytest.raises(RuntimeLoadError, match="missing"):
        LiteRtRuntime().load(directory, manifest)


def test_neither_package_installed_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ai_edge_litert", None)  # None in sys.modules makes the import fail
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    monkeypatch.setitem(sys.modules, "tflite_runtime", None)
    monkeypatch.setitem(sys.modules, "tflite_runtime.interpreter", None)
    with pytest.raises(RuntimeLoadError, match=r"pip install 'edgefleet\[litert\]'"):
        LiteRtRuntime().load_bytes(b"")


@pytest.mark.timeout(1800)
def test_falls_back_to_tflite_runtime(tflite_model, monkeypatch):
    from ai_edge_litert.interpreter import Interpreter

    fake = types.ModuleType("tflite_runtime.interpreter")
    fake.Interpreter = Interpreter  # the same API, as tflite-runtime exposes it
    monkeypatch.setitem(sys.modules, "ai_edge_litert", None)
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    monkeypatch.setitem(sys.modules, "tflite_runtime", types.ModuleType("tflite_runtime"))
    monkeypatch.setitem(sys.modules, "tflite_runtime.interpreter", fake)
    onnx_bytes, tflite, x = tflite_model
    rt = LiteRtRuntime()
    rt.load_bytes(tflite, ["input"], ["logits"])
    assert rt.run({"input": x[:2]})["logits"].shape == (2, 10)
