"""The teacher's signature and the transfer set, checked before anything expensive runs.

Theory: every mistake a user can make with the inputs is caught here, cheaply, and named in one line that says what
to change: a teacher that is not ONNX, has several inputs, an input rank no student family handles, an output that
is not a tensor (skl2onnx's ZipMap: the student reproduces every output, see `interface`), no float output to
distill (a lone int64 `label` carries no soft targets), a transfer set that is not an `.npz`, lacks `x`,
has a shape that does not match the teacher's input, holds NaN/inf, is empty, or carries labels whose count or
range does not fit the task. ONNX Runtime reads the signature (it also proves the teacher loads, which is what the
teacher run needs). The split into train / validation / held-out is a seeded permutation, so a rebuild with the same
seed sees the same rows.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgefleet.cloud.distill.errors import DistillInputError
from edgefleet.cloud.distill.families import family_for
from edgefleet.cloud.distill.spec import DistillSpec
from edgefleet.protos.messages import TensorSpec

_X_KEYS = ("x", "X", "inputs")
_Y_KEYS = ("y", "Y", "labels")
_FLOAT_DTYPES = ("float32", "float64", "float16")
# ORT type strings -> numpy dtype names, for the signature we report.
_ORT_TYPES = {"tensor(float)": "float32", "tensor(double)": "float64", "tensor(float16)": "float16",
              "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int8)": "int8", "tensor(uint8)": "uint8",
              "tensor(bool)": "bool", "tensor(string)": "str"}
# Fewer rows cannot give every split (train, validation, held-out) enough rows to measure anything.
MIN_SAMPLES = 20


@dataclass(frozen=True)
class TeacherInfo:
    input_name: str
    input_shape: list  # batch first; None or a string for a dynamic dimension
    input_dtype: str
    outputs: list[TensorSpec]
    chosen_output: str

    @property
    def output(self) -> TensorSpec:
        return next(o for o in self.outputs if o.name == self.chosen_output)

    @property
    def n_out(self) -> int | None:
        """The output width when the graph fixes it ([N] counts as 1), else None (known after the teacher run)."""
        shape = self.output.shape
        if len(shape) == 1:
            return 1
        return shape[1] if isinstance(shape[1], int) and shape[1] > 0 else None


@dataclass(frozen=True)
class TransferSet:
    x: np.ndarray  # float32, batch first
    y: np.ndarray | None  # int64 [N] for classification, float32 [N] or [N, D] for regression


@dataclass(frozen=True)
class Split:
    train_idx: np.ndarray
    val_idx: np.ndarray
    heldout_idx: np.ndarray


def open_session(teacher_bytes: bytes):
    import onnxruntime as ort

    if not teacher_bytes:
        raise DistillInputError("the teacher is empty; upload the teacher's .onnx file")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(teacher_bytes, sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime's own exception types: InvalidProtobuf, Fail, InvalidGraph...
        text = " ".join(str(exc).split())[:300]
        raise DistillInputError(f"the teacher is not an ONNX model ONNX Runtime can load ({text}); export it with "
                                "torch.onnx.export, tf2onnx or skl2onnx (zipmap off)") from None


def _shape(dims) -> list:
    return [d if isinstance(d, int) and d > 0 else (d if isinstance(d, str) else None) for d in dims]


def inspect_teacher(teacher_bytes: bytes, spec: DistillSpec) -> TeacherInfo:
    session = open_session(teacher_bytes)
    inputs = session.get_inputs()
    if len(inputs) != 1:
        names = [i.name for i in inputs]
        raise DistillInputError(f"the teacher has {len(inputs)} inputs {names}; a student takes one input tensor: "
                                "export the teacher with a single input")
    inp = inputs[0]
    in_dtype = _ORT_TYPES.get(inp.type, inp.type)
    if in_dtype not in _FLOAT_DTYPES:
        raise DistillInputError(f"the teacher's input {inp.name!r} is {in_dtype}; distillation needs a float input "
                                "(students learn a smooth function of it)")
    in_shape = _shape(inp.shape)
    family_for(in_shape)  # an unhandled rank is refused here, before the transfer set is even read

    for o in session.get_outputs():
        if not str(o.type).startswith("tensor("):
            # skl2onnx's default ZipMap gives seq(map(int64, tensor(float))): a list of dicts no student graph makes.
            raise DistillInputError(f"the teacher's output {o.name!r} is {o.type}, not a tensor; the student must "
                                    "reproduce every output of the teacher and can only make tensors: convert the "
                                    "teacher with zipmap off (skl2onnx: options={id(model): {'zipmap': False}}), "
                                    "or drop that output")
    outputs = [TensorSpec(name=o.name, dtype=_ORT_TYPES.get(o.type, o.type), shape=_shape(o.shape or []))
               for o in session.get_outputs()]
    floats = [o for o in outputs if o.dtype in _FLOAT_DTYPES]
    described = ", ".join(f"{o.name} ({o.dtype})" for o in outputs)
    if spec.teacher_output is not None:
        chosen = next((o for o in outputs if o.name == spec.teacher_output), None)
        if chosen is None:
            raise DistillInputError(f"teacher_output {spec.teacher_output!r} is not an output of the teacher; "
                                    f"its outputs are: {described}")
        if chosen.dtype not in _FLOAT_DTYPES:
            raise DistillInputError(f"teacher_output {chosen.name!r} is {chosen.dtype}; distill a float output "
                                    f"(logits, probabilities or values); the outputs are: {described}")
    elif not floats:
        raise DistillInputError(
            f"the teacher has no float output to distill (outputs: {described}); a class label alone carries no soft "
            "targets: export the logits or probabilities too (skl2onnx: zipmap off gives 'probabilities')")
    else:
        chosen = floats[0]
    if len(chosen.shape) not in (1, 2):
        raise DistillInputError(f"teacher output {chosen.name!r} has shape {chosen.shape}; distillation handles "
                                "[N, K] (logits, probabilities, values) or [N]: flatten it in the teacher")
    return TeacherInfo(inp.name, in_shape, in_dtype, outputs, chosen.name)


def _open_npz(npz: bytes | Path):
    try:
        raw = Path(npz).read_bytes() if isinstance(npz, (str, Path)) else bytes(npz)
    except OSError as exc:
        raise DistillInputError(f"the transfer set cannot be read: {exc}") from None
    if not raw:
        raise DistillInputError("the transfer set is empty (0 bytes); save it with numpy.savez(path, x=..., y=...)")
    try:
        return np.load(io.BytesIO(raw), allow_pickle=False)
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise DistillInputError(f"the transfer set is not an .npz archive ({exc}); save it with "
                                "numpy.savez(path, x=inputs, y=labels)") from None


def _check_finite(name: str, a: np.ndarray) -> None:
    bad = ~np.isfinite(a)
    if bad.any():
        rows = np.unique(np.nonzero(bad.reshape(len(a), -1))[0])
        raise DistillInputError(f"the transfer set's {name} holds {int(bad.sum())} NaN or infinite values in "
                                f"{len(rows)} rows (first rows: {rows[:5].tolist()}); drop or impute those rows")


def load_transfer_set(npz: bytes | Path, teacher: TeacherInfo, spec: DistillSpec) -> TransferSet:
    archive = _open_npz(npz)
    with archive:
        keys = list(archive.files)
        xkey = next((k for k in _X_KEYS if k in keys), None)
        if xkey is None:
            raise DistillInputError(f"the transfer set has no inputs array: expected key 'x' (or 'X', 'inputs'), "
                                    f"found {keys}")
        try:
            x = archive[xkey]
            ykey = next((k for k in _Y_KEYS if k in keys), None)
            y = archive[ykey] if ykey is not None else None
        except ValueError as exc:  # object arrays need pickle, which we refuse
            raise DistillInputError(f"the transfer set holds a non-numeric array ({exc}); store plain numeric "
                                    "arrays") from None
    if x.dtype.kind not in "fiub":
        raise DistillInputError(f"the transfer set's x is {x.dtype}; it must be numeric (float32 preferred)")
    if x.ndim == 0 or len(x) == 0:
        raise DistillInputError("the transfer set is empty (x has no rows); give at least "
                                f"{MIN_SAMPLES} samples, ideally thousands")
    expected = teacher.input_shape
    if x.ndim != len(expected) or any(isinstance(d, int) and d != s for d, s in zip(expected[1:], x.shape[1:])):
        shown = ["N" if not isinstance(d, int) else d for d in expected]
        raise DistillInputError(f"the transfer set's x has shape {list(x.shape)} but the teacher's input "
                                f"{teacher.input_name!r} is {shown}; reshape x to match the teacher")
    if len(x) < MIN_SAMPLES:
        raise DistillInputError(f"the transfer set has {len(x)} samples; at least {MIN_SAMPLES} are needed to split "
                                "into training, validation and held-out parts")
    x = x.astype(np.float32, copy=False)
    _check_finite("x", x)
    if y is not None:
        y = check_labels(y, len(x), teacher.n_out, spec)
    return TransferSet(np.ascontiguousarray(x), y)


def check_labels(y: np.ndarray, n: int, n_out: int | None, spec: DistillSpec) -> np.ndarray:
    """Labels fit the task: one per row; class indices in [0, K) for classification. Returns them typed."""
    y = np.asarray(y)
    count = len(y) if y.ndim else 0
    if count != n:
        raise DistillInputError(f"the transfer set has {count} labels for {n} inputs; give one label per row of x")
    if y.dtype.kind not in "fiub":
        raise DistillInputError(f"the labels are {y.dtype}; they must be numeric")
    if spec.task == "regression":
        y = y.astype(np.float32)
        _check_finite("y", y)
        if n_out is not None and y.reshape(n, -1).shape[1] != n_out:
            raise DistillInputError(f"the regression targets have width {y.reshape(n, -1).shape[1]} but the teacher "
                                    f"outputs {n_out} values per row; give y of shape [N, {n_out}]")
        return y
    if y.ndim != 1:
        raise DistillInputError(f"classification labels must be class indices of shape [N], got {list(y.shape)} "
                                "(one-hot? use y.argmax(1))")
    if y.dtype.kind == "f" and not (np.isfinite(y).all() and (y == np.round(y)).all()):
        raise DistillInputError("classification labels must be whole class indices; found fractional or NaN values")
    y = y.astype(np.int64)
    # -1 marks an unlabelled row: a transfer set labelled in part (the soft targets cover every row).
    if y.min() < -1 or (n_out is not None and y.max() >= n_out):
        width = f"the teacher's {n_out} outputs (0..{n_out - 1})" if n_out is not None else "0 or more"
        raise DistillInputError(f"labels range over {int(y.min())}..{int(y.max())}, which does not match {width}; "
                                "labels must be class indices in the order of the teacher's output (-1 for an "
                                "unlabelled row)")
    return y


def split(n: int, spec: DistillSpec) -> Split:
    order = np.random.default_rng(spec.seed).permutation(n)
    n_held = max(1, int(round(n * spec.heldout_fraction)))
    n_val = max(1, int(round(n * spec.val_fraction)))
    if n - n_held - n_val < 1:
        raise DistillInputError(f"{n} samples leave nothing to train on after the validation and held-out parts")
    # Sorted within each part: batches are drawn by a seeded shuffle anyway, and sorted indices read memory in order.
    return Split(np.sort(order[n_held + n_val:]), np.sort(order[n_held:n_held + n_val]), np.sort(order[:n_held]))


__all__ = ["MIN_SAMPLES", "Split", "TeacherInfo", "TransferSet", "check_labels", "inspect_teacher",
           "load_transfer_set", "open_session", "split"]
