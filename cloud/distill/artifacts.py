"""Per-class artifacts of a trained student: int8 QDQ, fp16, or TFLite, each checked against the fp32 student.

Theory: the student is exported once in fp32; each device class then gets the precision and format its hardware
runs best, and no artifact ships unless it answers like the fp32 student on held-out inputs it never saw.
- int8 (CPU classes): `quant_pre_process` (shape inference + graph optimisation) then `quantize_static` in QDQ
  format, per-channel weights, activations calibrated (MinMax) on transfer-set samples. Static QDQ lets ONNX
  Runtime fuse QLinearConv/QGemm; `quantize_dynamic` would turn convolutions into ConvInteger (about 5x slower on
  CPU), so it is not used.
- fp16 (Jetson classes): `onnxruntime.transformers.float16.convert_float_to_float16(keep_io_types=True)`: weights and
  arithmetic in fp16, inputs and outputs stay float32 so the bundle's smoke input and the API do not change. The
  converter appends its Casts at the end of the node list; we sort the graph so `onnx.checker` accepts it.
- TFLite (classes whose runtime is LiteRT): onnx2tf in its own venv (converter.py), fp32 or int8 with float io.
`check_drift` compares an artifact with the fp32 student: the share of changed argmax predictions for
classification, the mean absolute error over the reference outputs' standard deviation for regression; past the
tolerance it raises ArtifactDrift with the figures in the message and in `detail`.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np

CALIBRATION_SAMPLES = 512  # MinMax ranges settle long before this; calibration time grows linearly with it
_RUN_CHUNK = 256


@dataclass(frozen=True)
class Variant:
    precision: Literal["fp32", "fp16", "int8"]
    runtime: Literal["onnxruntime", "litert"]
    fmt: Literal["onnx", "tflite"]
    data: bytes


@dataclass(frozen=True)
class DriftResult:
    metric: Literal["changed_predictions", "normalized_mae"]
    value: float  # the figure compared with the tolerance
    tolerance: float
    samples: int
    changed: int  # classification: predictions whose argmax moved; regression: 0
    max_abs_error: float
    mean_abs_error: float

    @property
    def passed(self) -> bool:
        return self.value <= self.tolerance


class _Reader:
    """CalibrationDataReader over transfer samples, in batches (the pre-processed model keeps a dynamic batch)."""

    def __init__(self, input_name: str, x: np.ndarray, batch: int = 32) -> None:
        self._batches = iter([{input_name: x[i:i + batch]} for i in range(0, len(x), batch)])

    def get_next(self):
        return next(self._batches, None)

    def rewind(self) -> None:  # quantize_static reads once; present for the CalibrationDataReader protocol
        pass


def _input_name(onnx_bytes: bytes) -> str:
    import onnx

    model = onnx.load_from_string(onnx_bytes)
    initializers = {t.name for t in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in initializers]
    if len(names) != 1:
        raise ValueError(f"the student must have exactly one input, it has {names}")
    return names[0]


def make_int8(onnx_fp32: bytes, calib_x: np.ndarray) -> bytes:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    name = _input_name(onnx_fp32)
    x = np.ascontiguousarray(calib_x[:CALIBRATION_SAMPLES], dtype=np.float32)
    reader = type("TransferReader", (_Reader, CalibrationDataReader), {})(name, x)
    with tempfile.TemporaryDirectory(prefix="int8-") as tmp:
        src, pre, out = Path(tmp, "fp32.onnx"), Path(tmp, "pre.onnx"), Path(tmp, "int8.onnx")
        src.write_bytes(onnx_fp32)
        try:
            quant_pre_process(str(src), str(pre))
        except Exception:  # noqa: BLE001 - symbolic shape inference fails on some graphs; quantize the original
            pre = src
        quantize_static(str(pre), str(out), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
        return out.read_bytes()


def make_fp16(onnx_fp32: bytes) -> bytes:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from edgefleet.cloud.distill.costmodel import _toposorted

    model = convert_float_to_float16(onnx.load_from_string(onnx_fp32), keep_io_types=True)
    model = _toposorted(model)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def make_tflite(onnx_fp32: bytes, calib_x: np.ndarray | None, work: Path, precision: str = "int8",
                env=None) -> bytes:
    """TFLite bytes through the converter venv (built on first use); ConverterUnavailable when it cannot be."""
    from edgefleet.cloud.distill.converter import ConverterEnv

    env = env or ConverterEnv()
    Path(work).mkdir(parents=True, exist_ok=True)
    calib = None if calib_x is None else np.asarray(calib_x[:CALIBRATION_SAMPLES], dtype=np.float32)
    return env.convert(onnx_fp32, calib, Path(work), precision=precision)


def make_variant(onnx_fp32: bytes, precision: str, runtime: str, calib_x: np.ndarray, work: Path) -> Variant:
    if runtime == "litert":
        return Variant(precision, "litert", "tflite", make_tflite(onnx_fp32, calib_x, work, precision))
    data = {"fp32": lambda: onnx_fp32, "fp16": lambda: make_fp16(onnx_fp32),
            "int8": lambda: make_int8(onnx_fp32, calib_x)}[precision]()
    return Variant(precision, "onnxruntime", "onnx", data)


def run_onnx(data: bytes, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(data, sess_options=options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i:i + _RUN_CHUNK]})[0] for i in range(0, len(x), _RUN_CHUNK)])


def run_variant(v: Variant, x: np.ndarray) -> np.ndarray:
    """The variant's first output on `x` (batch axis first), in float32."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if v.fmt == "onnx":
        return run_onnx(v.data, x).astype(np.float32)
    from edgefleet.cloud.distill.errors import ArtifactUnrunnable
    from edgefleet.common.errors import EdgefleetError
    from edgefleet.common.runtimes.litert import LiteRtRuntime

    runtime = LiteRtRuntime()  # the agent's own runtime: what passes here passes on the device
    try:
        runtime.load_bytes(v.data)
        name, out = runtime.inputs[0].name, runtime.outputs[0].name
        return np.concatenate([runtime.run({name: x[i:i + _RUN_CHUNK]})[out]
                               for i in range(0, len(x), _RUN_CHUNK)]).astype(np.float32)
    except EdgefleetError as exc:  # the runtimes' errors enter cloud code here, as a CloudError
        raise ArtifactUnrunnable(f"the {v.precision} {v.fmt} artifact cannot be run by LiteRT: {exc}; "
                                 "it is not shipped", detail={"precision": v.precision, "format": v.fmt}) from None
    finally:
        runtime.close()


def drift(reference: np.ndarray, got: np.ndarray, task: str, tolerance: float) -> DriftResult:
    reference, got = reference.astype(np.float64), got.astype(np.float64)
    if reference.shape != got.shape:
        raise ValueError(f"artifact output shape {got.shape} differs from the fp32 student's {reference.shape}")
    err = np.abs(got - reference)
    max_err, mean_err = float(err.max(initial=0.0)), float(err.mean()) if err.size else 0.0
    if task == "classification":
        changed = int(np.sum(reference.argmax(axis=-1) != got.argmax(axis=-1)))
        share = changed / max(1, len(reference))
        return DriftResult("changed_predictions", share, tolerance, len(reference), changed, max_err, mean_err)
    scale = float(reference.std()) or 1.0
    return DriftResult("normalized_mae", mean_err / scale, tolerance, len(reference), 0, max_err, mean_err)


def check_drift(v: Variant, reference_fp32: bytes, x_heldout: np.ndarray, task: str, tolerance: float) -> DriftResult:
    """DriftResult when within tolerance; ArtifactDrift (figures in message and detail) when past it."""
    from edgefleet.cloud.distill.errors import ArtifactDrift

    result = drift(run_onnx(reference_fp32, np.ascontiguousarray(x_heldout, dtype=np.float32)),
                   run_variant(v, x_heldout), task, tolerance)
    if not result.passed:
        what = (f"changed {result.changed} of {result.samples} held-out predictions ({result.value:.1%})"
                if result.metric == "changed_predictions" else
                f"has a mean absolute error of {result.value:.3g} standard deviations of the output")
        raise ArtifactDrift(f"the {v.precision} {v.fmt} artifact {what}, past the tolerance of {tolerance:g} "
                            f"(max abs error {result.max_abs_error:.4g}, mean {result.mean_abs_error:.4g}); "
                            "keep a higher precision for this class or raise drift_tolerance",
                            detail={**asdict(result), "precision": v.precision, "format": v.fmt})
    return result


__all__ = ["DriftResult", "Variant", "check_drift", "drift", "make_fp16", "make_int8", "make_tflite", "make_variant",
           "run_onnx", "run_variant"]
