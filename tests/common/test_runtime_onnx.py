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


def test_the_direct_run_answers_and_refuses_as_the_wrapper_does(tmp_path):
    """common/ort_direct.py skips onnxruntime's Python wrapper on the hot path: same outputs, the same refusals
    (a missing input through the wrapper's own message, names, dtypes and shapes from the C session), and an
    execution provider failure handed to the wrapper, whose fallback builds the session taken from then on."""
    import onnxruntime as ort

    from edgefleet.common.ort_direct import direct_run

    directory, manifest = model_dir(tmp_path)
    session = ort.InferenceSession(str(directory / manifest.model_file), providers=["CPUExecutionProvider"])
    run = direct_run(session)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(run({"x": x})[0], session.run(None, {"x": x})[0])
    for feed, error, text in [({}, ValueError, "missing from input feed"),
                              ({"x": x, "z": x}, Exception, "Invalid input name: z"),
                              ({"x": x.astype(np.float64)}, Exception, "Unexpected input data type"),
                              ({"x": np.ones((2, 4), np.float32)}, Exception, "invalid dimensions")]:
        with pytest.raises(error, match=text):
            run(feed)
        with pytest.raises(error, match=text):
            session.run(None, feed)

    class Flaky:  # a session whose C run fails once as a CUDA provider would: the wrapper takes that run
        def __init__(self) -> None:
            self.inner, self.wrapper_runs = session, 0
            self._sess = self

        def get_outputs(self):
            return session.get_outputs()

        def get_inputs(self):
            return session.get_inputs()

        def run(self, names, feed, options=None):
            if names is None:  # the wrapper's signature: run(None, feed)
                self.wrapper_runs += 1
                self._sess = session._sess  # as set_providers builds a new C session
                return session.run(None, feed)
            from onnxruntime.capi.onnxruntime_pybind11_state import EPFail

            raise EPFail("CUDA failure 2: out of memory")

    flaky = Flaky()
    run = direct_run(flaky)
    np.testing.assert_array_equal(run({"x": x})[0], session.run(None, {"x": x})[0])
    np.testing.assert_array_equal(run({"x": x})[0], session.run(None, {"x": x})[0])
    assert flaky.wrapper_runs == 1  # the second run went to the new C session directly
