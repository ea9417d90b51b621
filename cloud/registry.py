"""ONNX model validation and signature extraction: what stands between an uploaded file and the fleet.

Theory: a model is accepted only if every consumer downstream can use it, checked in the order that gives the most
useful message first: the size limit (413 before any parsing), protobuf parsing ("is this ONNX at all"),
self-containment (external data files would not travel in a bundle), `onnx.checker` (structural validity), an ONNX
Runtime session on the CPU (what the agents and the smoke test actually run), and tensor-only inputs and outputs
(the smoke files and the inference protocol carry tensors; a skl2onnx ZipMap output is a list of dicts). Each
refusal is a `ModelInvalid` whose message says what is wrong and what to do. onnx and onnxruntime exceptions are
wrapped here, where they enter.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from edgefleet.cloud.errors import ModelInvalid, TooLarge
from edgefleet.protos.messages import TensorSpec

# A protobuf parse error and a checker error can both be pages long; one line is enough to act on.
_MAX_REASON_CHARS = 400


@dataclass(frozen=True)
class ModelInfo:
    """What the registry learned about a valid model."""

    sha256: str
    size_bytes: int
    opset: int | None
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or exc.__class__.__name__
    return text if len(text) <= _MAX_REASON_CHARS else text[: _MAX_REASON_CHARS - 3] + "..."


def _parse(data: bytes):  # -> onnx.ModelProto
    import onnx
    from google.protobuf.message import DecodeError

    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise ModelInvalid(f"not an ONNX model: protobuf parse failed ({_one_line(exc)})") from None
    # Protobuf is lenient: some non-ONNX bytes parse into an empty message. A real model has an IR version and a graph.
    if model.ir_version <= 0 or not model.HasField("graph"):
        raise ModelInvalid("not an ONNX model: no ir_version or graph in the protobuf; export the model with "
                           "torch.onnx.export, tf2onnx or skl2onnx and upload the .onnx file")
    return model


def _check_self_contained(model) -> None:
    import onnx

    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            raise ModelInvalid(
                f"initializer {tensor.name!r} uses external data; a bundle carries one file: re-save with "
                "onnx.save_model(model, path, save_as_external_data=False) (models must then stay under 2 GB)"
            )


def _spec(value_info, role: str) -> TensorSpec:
    import onnx

    kind = value_info.type.WhichOneof("value")
    if kind != "tensor_type":
        hint = ""
        if role == "output" and kind == "sequence_type":
            hint = (" (skl2onnx emits a ZipMap sequence of dicts for classifier probabilities: convert with "
                    "options={id(model): {'zipmap': False}})")
        raise ModelInvalid(f"{role} {value_info.name!r} is a {kind or 'untyped value'}, not a tensor; edgefleet "
                           f"serves tensor inputs and outputs only{hint}")
    tensor = value_info.type.tensor_type
    try:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type))
    except (KeyError, ValueError, TypeError):
        raise ModelInvalid(f"{role} {value_info.name!r} has an unsupported element type {tensor.elem_type}") from None
    # ONNX strings map to numpy object arrays; name them "str" so the agent builds unicode arrays, not pickles.
    dtype_name = "str" if dtype == np.dtype(object) else dtype.name
    shape: list[int | str | None] = []
    if tensor.HasField("shape"):
        for dim in tensor.shape.dim:
            if dim.HasField("dim_value"):
                shape.append(int(dim.dim_value))
            elif dim.HasField("dim_param") and dim.dim_param:
                shape.append(dim.dim_param)
            else:
                shape.append(None)
    return TensorSpec(name=value_info.name, dtype=dtype_name, shape=shape)


def _opset(model) -> int | None:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return None


def _check_runtime(data: bytes) -> None:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: a refused model is reported through ModelInvalid, not logs
    try:
        ort.InferenceSession(data, sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own pybind exception types (Fail, InvalidGraph, ...)
        raise ModelInvalid(f"ONNX Runtime cannot load the model: {_one_line(exc)}") from None


def validate_model(data: bytes, *, max_bytes: int) -> ModelInfo:
    """Accept `data` as a servable ONNX model or raise TooLarge / ModelInvalid with the reason."""
    if len(data) > max_bytes:
        raise TooLarge(
            f"model is {len(data) / 1e6:.1f} MB, over the {max_bytes / 1e6:.1f} MB limit; raise max_model_mb in the "
            "cloud settings or make the model smaller (quantize, prune, distill)"
        )
    if not data:
        raise ModelInvalid("not an ONNX model: the upload is empty")
    model = _parse(data)
    _check_self_contained(model)

    import onnx

    try:
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError) as exc:
        raise ModelInvalid(f"onnx checker: {_one_line(exc)}") from None
    _check_runtime(data)

    initializers = {t.name for t in model.graph.initializer}
    # Before IR 4 initializers were also listed as graph inputs; they are weights, not what a caller feeds.
    inputs = [_spec(vi, "input") for vi in model.graph.input if vi.name not in initializers]
    outputs = [_spec(vi, "output") for vi in model.graph.output]
    if not inputs:
        raise ModelInvalid("model has no inputs to feed; a servable model takes at least one input tensor")
    if not outputs:
        raise ModelInvalid("model has no outputs")
    return ModelInfo(
        sha256=hashlib.sha256(data).hexdigest(),
        size_bytes=len(data),
        opset=_opset(model),
        inputs=inputs,
        outputs=outputs,
    )


def variant_info(data: bytes, fmt: str, reference_onnx: bytes, *, max_bytes: int) -> ModelInfo:
    """The registry facts of a variant a distillation built (not an upload).

    An ONNX variant (fp32, fp16, int8 QDQ) goes through the same validation as an upload. A TFLite variant cannot
    (onnx.checker and ONNX Runtime do not read it): it takes the signature of the fp32 ONNX it was converted from,
    whose inputs and outputs it keeps in order, and the job has already run it (drift check) before it gets here.
    """
    if fmt == "onnx":
        return validate_model(data, max_bytes=max_bytes)
    if fmt != "tflite":
        raise ModelInvalid(f"unknown variant format {fmt!r}; expected onnx or tflite")
    if len(data) > max_bytes:
        raise TooLarge(f"variant is {len(data) / 1e6:.1f} MB, over the {max_bytes / 1e6:.1f} MB limit")
    # TFLite flatbuffers carry the identifier "TFL3" at bytes 4..8.
    if data[4:8] != b"TFL3":
        raise ModelInvalid("the TFLite variant is not a TFLite flatbuffer (no TFL3 identifier)")
    ref = validate_model(reference_onnx, max_bytes=max(max_bytes, len(reference_onnx)))
    return ModelInfo(sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data), opset=None, inputs=ref.inputs,
                     outputs=ref.outputs)


__all__ = ["ModelInfo", "validate_model", "variant_info"]
