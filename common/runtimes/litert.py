"""LiteRT (TensorFlow Lite) behind the `Runtime` protocol.

Theory of operation: `load` opens `{model_dir}/{manifest.model_file}` (a `.tflite`) with
`ai_edge_litert.interpreter.Interpreter`, or with `tflite_runtime.interpreter.Interpreter` on older devices where only
that is installed (tflite-runtime 2.14 fails at inference under numpy 2, so ai-edge-litert comes first). Models
converted by edgefleet (onnx2tf) carry a `serving_default` signature whose input names are the ONNX input names
and whose outputs are `output_0..n` in ONNX order; the signature runner resizes a dynamic batch by itself. Names
are taken from the manifest (which records the ONNX student's, that is the teacher's, names in order): by name when
the signature's keys are those names, else by position, so a TFLite bundle answers with the same names (and passes
the same smoke test) as its ONNX sibling. A model without signatures is run through the raw tensor API, its inputs
matched to the manifest by position. An interpreter is not thread-safe, so runs are serialised by a lock. Engine
exceptions are wrapped here: load -> RuntimeLoadError, bad inputs -> InferenceError.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from edgefleet.common.errors import InferenceError, RuntimeLoadError
from edgefleet.protos.messages import Manifest, TensorSpec

INSTALL_HINT = "pip install 'edgefleet[litert]' (ai-edge-litert)"


def interpreter_class():
    """The Interpreter class of whichever LiteRT package this device has."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter
        except ImportError:
            raise RuntimeLoadError(f"runtime 'litert' is not installed on this device: {INSTALL_HINT}") from None
    return Interpreter


def _shape(signature) -> list[int | None]:
    return [None if d < 0 else int(d) for d in signature]


class LiteRtRuntime:
    name = "litert"

    def __init__(self, intra_op_threads: int = 0, inter_op_threads: int = 0) -> None:
        self.num_threads = intra_op_threads or None  # None: LiteRT's default
        self._interpreter = None
        self._runner = None
        self._input_keys: list[str] = []  # signature input names (or tensor indices as str)
        self._output_keys: list[str] = []
        self._inputs: list[TensorSpec] = []
        self._outputs: list[TensorSpec] = []
        self._lock = threading.Lock()

    def load(self, model_dir: Path, manifest: Manifest) -> None:
        path = Path(model_dir) / manifest.model_file
        if not path.is_file():
            raise RuntimeLoadError(f"model file {manifest.model_file!r} is missing from {model_dir}")
        self.load_bytes(path.read_bytes(), [s.name for s in manifest.inputs], [s.name for s in manifest.outputs])

    def load_bytes(self, data: bytes, input_names: list[str] | None = None,
                   output_names: list[str] | None = None) -> None:
        """Load a .tflite from memory (the cloud's drift check uses this); names as in `load`."""
        interpreter_cls = interpreter_class()
        try:
            interpreter = interpreter_cls(model_content=data, num_threads=self.num_threads)
            signatures = interpreter.get_signature_list()
            if signatures:
                key = "serving_default" if "serving_default" in signatures else sorted(signatures)[0]
                runner = interpreter.get_signature_runner(key)
                in_details, out_details = runner.get_input_details(), runner.get_output_details()
                in_keys = list(signatures[key]["inputs"])
                out_keys = sorted(signatures[key]["outputs"], key=_natural)
            else:
                runner = None
                interpreter.allocate_tensors()
                in_details = {str(i): d for i, d in enumerate(interpreter.get_input_details())}
                out_details = {str(i): d for i, d in enumerate(interpreter.get_output_details())}
                in_keys, out_keys = list(in_details), list(out_details)
        except RuntimeLoadError:
            raise
        except Exception as exc:  # noqa: BLE001 - LiteRT raises ValueError/RuntimeError from C++; wrap them all
            raise RuntimeLoadError(f"LiteRT could not load the model: {exc}") from None
        in_keys, out_keys = _by_name(in_keys, input_names), _by_name(out_keys, output_names)
        in_names = _names(in_keys, input_names, "input", in_details)
        out_names = _names(out_keys, output_names, "output", out_details)
        with self._lock:
            self._interpreter, self._runner = interpreter, runner
            self._input_keys, self._output_keys = in_keys, out_keys
            self._inputs = [_spec(n, in_details[k]) for n, k in zip(in_names, in_keys)]
            self._outputs = [_spec(n, out_details[k]) for n, k in zip(out_names, out_keys)]

    @property
    def inputs(self) -> list[TensorSpec]:
        return list(self._inputs)

    @property
    def outputs(self) -> list[TensorSpec]:
        return list(self._outputs)

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._interpreter is None:
            raise RuntimeLoadError("LiteRT interpreter is not loaded (or was closed)")
        feed = {}
        for spec, key in zip(self._inputs, self._input_keys):
            if spec.name not in inputs:
                raise InferenceError(f"missing input {spec.name!r}; the model takes {[s.name for s in self._inputs]}")
            value = np.asarray(inputs[spec.name])
            if value.dtype != np.dtype(spec.dtype):
                raise InferenceError(f"input {spec.name!r} has dtype {value.dtype}, the model takes {spec.dtype}")
            # Checked here, not left to LiteRT: a failed resize leaves the XNNPACK delegate unprepared for later runs.
            if value.ndim != len(spec.shape) or any(d is not None and d != v for d, v in zip(spec.shape, value.shape)):
                raise InferenceError(f"the model refused the input: {spec.name!r} has shape {list(value.shape)}, "
                                     f"the model takes {spec.shape}")
            feed[key] = np.ascontiguousarray(value)
        try:
            with self._lock:
                results = self._run_locked(feed)
        except Exception as exc:  # noqa: BLE001 - LiteRT raises ValueError for shapes, RuntimeError for the rest
            text = str(exc).splitlines()[0] if str(exc) else repr(exc)
            if isinstance(exc, ValueError):
                raise InferenceError(f"the model refused the input: {text}") from None
            raise RuntimeLoadError(f"LiteRT failed to run the model: {text}") from None
        return {spec.name: results[key] for spec, key in zip(self._outputs, self._output_keys)}

    def _run_locked(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._runner is not None:
            return {k: np.array(v) for k, v in self._runner(**feed).items()}
        interpreter = self._interpreter
        for key, value in feed.items():
            detail = interpreter.get_input_details()[int(key)]
            if list(detail["shape"]) != list(value.shape):
                interpreter.resize_tensor_input(detail["index"], value.shape)
                interpreter.allocate_tensors()
        for key, value in feed.items():
            interpreter.set_tensor(interpreter.get_input_details()[int(key)]["index"], value)
        interpreter.invoke()
        return {k: np.array(interpreter.get_tensor(interpreter.get_output_details()[int(k)]["index"]))
                for k in self._output_keys}

    def close(self) -> None:
        with self._lock:
            self._interpreter = self._runner = None


def _natural(name: str) -> tuple:
    head = name.rstrip("0123456789")
    tail = name[len(head):]
    return (head, int(tail) if tail else -1)


def _by_name(keys: list[str], wanted: list[str] | None) -> list[str]:
    """The signature's keys in the manifest's order when they carry the manifest's names (a converter that kept the
    ONNX names); otherwise as they are, matched by position."""
    if wanted is not None and len(wanted) == len(keys) and set(wanted) == set(keys):
        return list(wanted)
    return keys


def _names(keys: list[str], wanted: list[str] | None, kind: str, details: dict) -> list[str]:
    """Our names for the model's tensors: the manifest's by position when the counts agree, else the model's."""
    if wanted is None:
        return [details[k].get("name", k) if k.isdigit() else k for k in keys]
    if len(wanted) != len(keys):
        raise RuntimeLoadError(f"the manifest lists {len(wanted)} {kind}s, the TFLite model has {len(keys)}; "
                               "rebuild the bundle")
    return list(wanted)


def _spec(name: str, detail: dict) -> TensorSpec:
    signature = detail.get("shape_signature", detail["shape"])
    return TensorSpec(name=name, dtype=np.dtype(detail["dtype"]).name, shape=_shape(signature))


__all__ = ["INSTALL_HINT", "LiteRtRuntime", "interpreter_class"]
