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
`check_drift` compares an artifact with the fp32 student on the scores output (`interface.scores_output`: logits,
probabilities or values, never an integer label): the share of changed argmax predictions for classification, the
mean absolute error over the reference outputs' standard deviation for regression; past the tolerance it raises
ArtifactDrift with the figures in the message and in `detail`.

The teacher's interface survives every variant. The student's head (`interface.HEAD` nodes: input Cast, Softmax,
ArgMax, Gather, output Casts) is left out of int8 quantization and fp16 conversion, so probabilities still sum to 1,
labels stay exact integers of the teacher's dtype, and names, dtypes and ranks stay the teacher's (both converters
keep graph input and output names; `make_variant` checks it). A TFLite variant's signature names may differ:
`Variant.outputs` records the ONNX names in order, which `run_variant` and the agent's LiteRT runtime (from the
bundle manifest) put back; `make_tflite` refuses a conversion that lost an output, a dtype or a dynamic dimension.
"""

from __future__ import annotations

import contextlib
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
    # The fp32 student's (= the teacher's) input and output names in order, and the scores output: a TFLite model's
    # own tensor names may differ, these are what it answers under. Empty: read them from the ONNX data.
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    scores: str = ""


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


def _input(onnx_bytes: bytes) -> tuple[str, str]:
    """(name, numpy dtype) of the model's one input."""
    import onnx
    from onnx import helper

    model = onnx.load_from_string(onnx_bytes)
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise ValueError(f"the student must have exactly one input, it has {[i.name for i in inputs]}")
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(inputs[0].type.tensor_type.elem_type)).name
    return inputs[0].name, dtype


def _signature(onnx_bytes: bytes) -> list[tuple[str, int]]:
    import onnx

    graph = onnx.load_from_string(onnx_bytes).graph
    initializers = {t.name for t in graph.initializer}
    return [(v.name, v.type.tensor_type.elem_type) for v in [*graph.input, *graph.output] if v.name not in initializers]


def _keeps_interface(variant: bytes, onnx_fp32: bytes, what: str) -> bytes:
    """The variant with the fp32 student's graph inputs and outputs (names, element types, and the dimensions as
    declared: shape inference in the converters renames a dynamic dimension to `unk__0`); ArtifactUnrunnable when a
    converter changed a name or type."""
    import onnx

    from edgefleet.cloud.distill.errors import ArtifactUnrunnable

    if _signature(variant) != _signature(onnx_fp32):
        raise ArtifactUnrunnable(f"the {what} variant changed the student's inputs or outputs (names, element types "
                                 f"{_signature(variant)} vs {_signature(onnx_fp32)}): it would break the teacher's "
                                 "interface, so it is not shipped", detail={"precision": what, "format": "onnx"})
    model, reference = onnx.load_from_string(variant), onnx.load_from_string(onnx_fp32).graph
    declared = {v.name: v.type for v in [*reference.input, *reference.output]}
    for value in [*model.graph.input, *model.graph.output]:
        if value.name in declared:
            value.type.CopyFrom(declared[value.name])
    # The inferred shapes of inner tensors carry the renamed dimensions into ONNX Runtime's view of the outputs.
    del model.graph.value_info[:]
    return model.SerializeToString()


def _drop_fp16_round_trips(model, head: list[str]) -> None:
    """keep_io_types=True casts every float output to fp16 and back, also one a float32 head node wrote (the
    Softmax): rounding probabilities to fp16 for nothing. Such Cast(fp16) -> Cast(fp32) pairs are taken out."""
    from onnx import TensorProto

    producer = {out: n for n in model.graph.node for out in n.output}
    head_outputs = {out for n in model.graph.node if n.name in head for out in n.output}
    rewire: dict[str, str] = {}
    dropped = set()
    for node in model.graph.node:
        to = next((a.i for a in node.attribute if a.name == "to"), None)
        inner = producer.get(node.input[0]) if node.op_type == "Cast" and to == TensorProto.FLOAT else None
        inner_to = next((a.i for a in inner.attribute if a.name == "to"), None) if inner is not None else None
        if inner is not None and inner.op_type == "Cast" and inner_to == TensorProto.FLOAT16 \
                and inner.input[0] in head_outputs:
            rewire[node.output[0]] = inner.input[0]
            dropped.update({node.name, inner.name})
    if not rewire:
        return
    for node in model.graph.node:  # the head node writes the graph output itself again
        for i, out in enumerate(node.output):
            for final, source in rewire.items():
                if out == source:
                    node.output[i] = final
    kept = [n for n in model.graph.node if n.name not in dropped]
    del model.graph.node[:]
    model.graph.node.extend(kept)


def make_int8(onnx_fp32: bytes, calib_x: np.ndarray) -> bytes:
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from edgefleet.cloud.distill.interface import head_nodes

    name, dtype = _input(onnx_fp32)
    x = np.ascontiguousarray(calib_x[:CALIBRATION_SAMPLES], dtype=dtype)
    reader = type("TransferReader", (_Reader, CalibrationDataReader), {})(name, x)
    with tempfile.TemporaryDirectory(prefix="int8-") as tmp:
        src, pre, out = Path(tmp, "fp32.onnx"), Path(tmp, "pre.onnx"), Path(tmp, "int8.onnx")
        src.write_bytes(onnx_fp32)
        try:
            # ONNX's own shape inference, not onnxruntime's symbolic one: that writes sym_shape_infer_temp.onnx into
            # the process's working directory when it fails (onnxruntime/tools/symbolic_shape_infer.py), and these
            # graphs (Conv/Gemm/pooling with a dynamic batch) need nothing it adds.
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        except Exception:  # noqa: BLE001 - shape inference fails on some graphs; quantize the original
            pre = src
        # The interface head stays float: a quantized Softmax's rows no longer sum to 1.
        head = head_nodes(onnx.load(str(pre)))
        quantize_static(str(pre), str(out), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, nodes_to_exclude=head)
        return _keeps_interface(out.read_bytes(), onnx_fp32, "int8")


def make_fp16(onnx_fp32: bytes) -> bytes:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from edgefleet.cloud.distill.costmodel import _toposorted
    from edgefleet.cloud.distill.interface import head_nodes

    model = onnx.load_from_string(onnx_fp32)
    # The interface head stays float32 (a label is the argmax of float32 scores; probabilities sum to 1 in float32).
    head = head_nodes(model)
    model = convert_float_to_float16(model, keep_io_types=True, node_block_list=head)
    _drop_fp16_round_trips(model, head)
    model = _toposorted(model)
    onnx.checker.check_model(model)
    return _keeps_interface(model.SerializeToString(), onnx_fp32, "fp16")


def make_tflite(onnx_fp32: bytes, calib_x: np.ndarray | None, work: Path, precision: str = "int8",
                env=None) -> bytes:
    """TFLite bytes through the converter venv (built on first use); ConverterUnavailable when it cannot be."""
    from edgefleet.cloud.distill.converter import ConverterEnv

    env = env or ConverterEnv()
    Path(work).mkdir(parents=True, exist_ok=True)
    calib = None if calib_x is None else np.asarray(calib_x[:CALIBRATION_SAMPLES], dtype=np.float32)
    tflite = env.convert(onnx_fp32, calib, Path(work), precision=precision)
    _check_tflite_interface(tflite, onnx_fp32, precision)
    return tflite


def _check_tflite_interface(tflite: bytes, onnx_fp32: bytes, precision: str) -> None:
    """The TFLite model answers with the student's outputs: as many, in order, the same dtypes and ranks, and a
    dynamic dimension where the ONNX model has one. ConverterUnavailable (stage "convert") otherwise, so the class
    keeps its ONNX variants. Skipped when this machine has no LiteRT (the drift check then refuses the variant)."""
    import onnxruntime as ort

    from edgefleet.cloud.distill.converter import _unavailable
    from edgefleet.cloud.distill.interface import ORT_DTYPES
    from edgefleet.common.errors import EdgefleetError
    from edgefleet.common.runtimes.litert import LiteRtRuntime

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(onnx_fp32, sess_options=options, providers=["CPUExecutionProvider"])
    want = [(a.name, ORT_DTYPES.get(a.type, a.type), [None if not isinstance(d, int) else d for d in a.shape])
            for a in [*session.get_inputs(), *session.get_outputs()]]
    runtime = LiteRtRuntime()
    try:
        runtime.load_bytes(tflite, [i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()])
        got = [(s.name, s.dtype, s.shape) for s in [*runtime.inputs, *runtime.outputs]]
    except EdgefleetError:
        return
    finally:
        runtime.close()
    same = len(got) == len(want) and all(
        gd == wd and len(gs) == len(ws) and all((w is None) == (g is None) for g, w in zip(gs[1:], ws[1:]))
        for (_, gd, gs), (_, wd, ws) in zip(got, want))
    if not same:
        raise _unavailable(f"onnx2tf's {precision} TFLite model does not keep the student's interface (inputs and "
                           f"outputs, dtypes, dynamic dimensions): it has {[g[1:] for g in got]}, the student "
                           f"{[w[1:] for w in want]}; the class keeps its ONNX variants", stage="convert")


def make_variant(onnx_fp32: bytes, precision: str, runtime: str, calib_x: np.ndarray, work: Path) -> Variant:
    import onnx

    from edgefleet.cloud.distill.interface import scores_output

    graph = onnx.load_from_string(onnx_fp32).graph
    initializers = {t.name for t in graph.initializer}
    names = dict(inputs=tuple(i.name for i in graph.input if i.name not in initializers),
                 outputs=tuple(o.name for o in graph.output), scores=scores_output(onnx_fp32))
    if runtime == "litert":
        return Variant(precision, "litert", "tflite", make_tflite(onnx_fp32, calib_x, work, precision), **names)
    data = {"fp32": lambda: onnx_fp32, "fp16": lambda: make_fp16(onnx_fp32),
            "int8": lambda: make_int8(onnx_fp32, calib_x)}[precision]()
    return Variant(precision, "onnxruntime", "onnx", data, **names)


def run_onnx(data: bytes, x: np.ndarray, output: str | None = None) -> np.ndarray:
    """One output (default: the scores, `interface.scores_output`) on `x`, cast to the model's input dtype, one
    row per sample."""
    from edgefleet.cloud.distill.export import run_onnx as run

    return run(data, x, batch=_RUN_CHUNK, output=output)


def run_variant(v: Variant, x: np.ndarray) -> np.ndarray:
    """The variant's scores output on `x` (batch axis first), in float32, one row per sample ([N] becomes [N, 1])."""
    if v.fmt == "onnx":
        out = run_onnx(v.data, x, output=v.scores or None)
    else:
        with _litert(v) as runtime:
            spec = runtime.inputs[0]
            scores = v.scores or next((o.name for o in runtime.outputs if o.dtype.startswith("float")),
                                      runtime.outputs[0].name)
            x = np.ascontiguousarray(x, dtype=spec.dtype)
            out = np.concatenate([runtime.run({spec.name: x[i:i + _RUN_CHUNK]})[scores]
                                  for i in range(0, len(x), _RUN_CHUNK)])
    return out.reshape(len(out), -1).astype(np.float32)


def run_variant_outputs(v: Variant, feeds: dict[str, np.ndarray] | np.ndarray) -> dict[str, np.ndarray]:
    """Every output of the variant on `feeds` (or one array for its one input), under the teacher's names and in
    their dtypes: a bundle's smoke test expects them all."""
    if v.fmt == "onnx":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = 1
        session = ort.InferenceSession(v.data, sess_options=options, providers=["CPUExecutionProvider"])
        if not isinstance(feeds, dict):
            feeds = {session.get_inputs()[0].name: np.asarray(feeds)}
        return {o.name: np.asarray(r) for o, r in zip(session.get_outputs(), session.run(None, feeds))}
    with _litert(v) as runtime:
        if not isinstance(feeds, dict):
            feeds = {runtime.inputs[0].name: np.asarray(feeds)}
        return runtime.run(feeds)


@contextlib.contextmanager
def _litert(v: Variant):
    """The agent's own LiteRT runtime on a TFLite variant, answering under the ONNX names: what passes here passes
    on the device, which loads it with the same names from the bundle manifest."""
    from edgefleet.cloud.distill.errors import ArtifactUnrunnable
    from edgefleet.common.errors import EdgefleetError
    from edgefleet.common.runtimes.litert import LiteRtRuntime

    runtime = LiteRtRuntime()
    try:
        runtime.load_bytes(v.data, list(v.inputs) or None, list(v.outputs) or None)
        yield runtime
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

    reference = run_onnx(reference_fp32, x_heldout, output=v.scores or None)
    result = drift(reference.reshape(len(reference), -1), run_variant(v, x_heldout), task, tolerance)
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
           "run_onnx", "run_variant", "run_variant_outputs"]
