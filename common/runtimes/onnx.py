"""ONNX Runtime behind the `Runtime` protocol.

Theory of operation: `load` opens an `InferenceSession` on `{model_dir}/{manifest.model_file}` with the manifest's
execution providers, keeping only those this onnxruntime build has (`get_available_providers()`) and always ending
with CPUExecutionProvider, so a bundle built for a Jetson (CUDA, TensorRT) still loads, slower, on a board whose
wheel lacks them. Input and output specs come from the session itself, not the manifest, so what the API checks
is what the engine will accept. Every onnxruntime exception is wrapped at this boundary: load -> RuntimeLoadError,
run -> InferenceError for bad inputs (INVALID_ARGUMENT) and RuntimeLoadError for the rest.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.common.errors import InferenceError, RuntimeLoadError
from edgefleet.common.ort_direct import direct_run
from edgefleet.protos.messages import Manifest, TensorSpec

# ONNX Runtime type strings -> numpy dtype names (the ones protos.oip can carry).
_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(float16)": "float16",
    "tensor(int8)": "int8",
    "tensor(int16)": "int16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(uint8)": "uint8",
    "tensor(uint16)": "uint16",
    "tensor(uint32)": "uint32",
    "tensor(uint64)": "uint64",
    "tensor(bool)": "bool",
}
CPU = "CPUExecutionProvider"


def choose_providers(wanted: list[str], available: list[str]) -> list[str]:
    chosen = [p for p in wanted if p in available and p != CPU]
    return chosen + [CPU]


def _spec(arg) -> TensorSpec:
    shape = [d if isinstance(d, int) and d >= 0 else (d if isinstance(d, str) else None) for d in arg.shape]
    return TensorSpec(name=arg.name, dtype=_ORT_TYPES.get(arg.type, arg.type), shape=shape)


class OnnxRuntime:
    name = "onnxruntime"

    def __init__(self, intra_op_threads: int = 0, inter_op_threads: int = 0) -> None:
        self.intra_op_threads = intra_op_threads
        self.inter_op_threads = inter_op_threads
        self._session = None
        self._run: Callable[[dict[str, Any]], list[Any]] | None = None
        self._inputs: list[TensorSpec] = []
        self._outputs: list[TensorSpec] = []
        self.providers: list[str] = []
        self._lock = threading.Lock()

    def load(self, model_dir: Path, manifest: Manifest) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise RuntimeLoadError("runtime 'onnxruntime' is not installed on this device: "
                                   "pip install onnxruntime") from None
        path = Path(model_dir) / manifest.model_file
        if not path.is_file():
            raise RuntimeLoadError(f"model file {manifest.model_file!r} is missing from {model_dir}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.intra_op_threads
        options.inter_op_num_threads = self.inter_op_threads
        options.log_severity_level = 3  # errors only: warnings about unused initializers flood a device's journal
        providers = choose_providers(manifest.execution_providers, ort.get_available_providers())
        try:
            session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own pybind11 types; wrap them all here
            raise RuntimeLoadError(f"onnxruntime could not load {manifest.model_file}: {exc}") from None
        with self._lock:
            self._session = session
            self._run = direct_run(session)
            self.providers = session.get_providers()
            self._inputs = [_spec(a) for a in session.get_inputs()]
            self._outputs = [_spec(a) for a in session.get_outputs()]

    @property
    def inputs(self) -> list[TensorSpec]:
        return list(self._inputs)

    @property
    def outputs(self) -> list[TensorSpec]:
        return list(self._outputs)

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        run = self._run
        if run is None:
            raise RuntimeLoadError("onnxruntime session is not loaded (or was closed)")
        try:
            results = run(inputs)
        except Exception as exc:  # noqa: BLE001 - wrap onnxruntime's exception types at the boundary
            text = str(exc)
            if "INVALID_ARGUMENT" in text or "Invalid" in type(exc).__name__:
                raise InferenceError(f"the model refused the input: {text.splitlines()[0]}") from None
            first = text.splitlines()[0] if text else repr(exc)
            raise RuntimeLoadError(f"onnxruntime failed to run the model: {first}") from None
        return {spec.name: np.asarray(value) for spec, value in zip(self._outputs, results)}

    def close(self) -> None:
        # Dropping the reference frees the session once no run holds it; ORT has no explicit close.
        with self._lock:
            self._session = None
            self._run = None
