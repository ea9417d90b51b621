"""common/runtimes: real ONNX Runtime on a tiny model, provider filtering, the registry's clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgefleet.common.runtimes import Runtime, make_runtime
from edgefleet.common.runtimes.onnx import OnnxRuntime, choose_providers
from edgefleet.edge_agent.errors import InferenceError, RuntimeLoadError
from edgefleet.protos.messages import Manifest, parse_message
from tests.edge_agent import agent_testkit as kit


def model_dir(tmp_path: Path, model: bytes | None = None) -> tuple[Path, Manifest]:
    expected = {"y": np.zeros((2, 3), np.float32)} if model is not None else None
    files = kit.bundle_files(model=model, expected_override=expected)
    for name, data in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    return tmp_path, parse_message(files["manifest.json"], Manifest)


def test_load_and_run(tmp_path):
    directory, manifest = model_dir(tmp_path)
    rt = make_runtime("onnxruntime", intra_op_threads=1)
    assert isinstance(rt, Runtime)
    rt.load(directory, manifest)
    assert [(s.name, s.dtype, s.shape) for s in rt.inputs] == [("x", "float32", ["batch", 3])]
    out = rt.run({"x": np.ones((4, 3), np.float32)})
    assert out["y"].shape == (4, 3) and np.allclose(out["y"], 3.0)
    # The manifest asks for CUDA first; this machine's wheel decides, and CPU is always there.
    assert rt.providers[-1] == "CPUExecutionProvider"
    rt.close()
    with pytest.raises(RuntimeLoadError):
        rt.run({"x": np.ones((1, 3), np.float32)})


def test_choose_providers():
    assert choose_providers(["TensorrtExecutionProvider", "CUDAExecutionProvider"], ["CPUExecutionProvider"]) == [
        "CPUExecutionProvider"]
    assert choose_providers(["CUDAExecutionProvider", "CPUExecutionProvider"],
                            ["CUDAExecutionProvider", "CPUExecutionProvider"]) == ["CUDAExecutionProvider",
                                                                                   "CPUExecutionProvider"]


def test_bad_input_is_an_inference_error(tmp_path):
    rt = OnnxRuntime()
    rt.load(*model_dir(tmp_path))
    with pytest.raises(InferenceError):
        rt.run({"x": np.ones((1, 4), np.float32)})
    with pytest.raises(InferenceError):
        rt.run({"x": np.ones((1, 3), np.int64)})


def test_corrupt_model_is_a_load_error(tmp_path):
    directory, manifest = model_dir(tmp_path, model=b"not an onnx model")
    with pytest.raises(RuntimeLoadError, match="could not load model.onnx"):
        OnnxRuntime().load(directory, manifest)
    (directory / "model.onnx").unlink()
    with pytest.raises(RuntimeLoadError, match="missing"):
        OnnxRuntime().load(directory, manifest)


def test_registry_messages():
    assert type(make_runtime("litert")).__name__ == "LiteRtRuntime"  # registered; see test_runtime_litert.py
    with pytest.raises(RuntimeLoadError, match="unknown to this agent"):
        make_runtime("tensorflow")
