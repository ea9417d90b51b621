"""The teacher's interface, read from its ONNX graph, and a student exported with exactly that interface.

Theory: a student is deployed under the teacher's name, so every app that called the teacher must be able to call
the student with the same code: the same input (name, dtype, dynamic dimensions) and the same outputs (names, order,
dtypes, ranks and meaning). `describe` reads the interface from the teacher's signature and one small teacher run on
the transfer set, and gives every output a role:
  - the distilled output (`scores`): logits, probabilities or values, as `teacher` detected it;
  - an integer output is a `label`: the argmax of the scores, read through the teacher's class values when they are
    not 0..K-1 (learnt from the run: skl2onnx gives `classes_[argmax]`);
  - another float output of the scores' width whose argmax agrees with theirs: `probabilities` (by name, or rows that
    lie in [0, 1] and sum to 1) or `logits`.
Anything a student cannot reproduce (an embedding output, a string label; a ZipMap is refused earlier by `data`)
is refused before training, naming the output and the fix.

`export_student` exports the trained trunk (float32 in, raw logits or values out) with `export.to_onnx` and composes
the head with onnx.helper: a Cast from the teacher's input dtype; per output an Identity (logits, values; a Reshape
for a rank-1 output), a Softmax (probabilities), or an ArgMax (keepdims as the teacher's label rank) then a Gather of
the class values or a Cast to the label dtype; a Cast to a float64/float16 output dtype. Head nodes are named
`edgefleet_head/...`, as are the trunk's input standardisation nodes, so that `artifacts` keeps them in float32
(int8 and fp16 leave them out: a quantized Softmax would no longer sum to 1, and int8 of the raw inputs loses the
small-ranged features); the scores output's name is recorded in the model's metadata (`edgefleet.scores_output`)
for scoring and drift checks (`scores_output`).

Dynamic dimensions: the batch axis always stays dynamic (a teacher with a fixed batch gets a student that takes any).
The conv families end in global average pooling, so a dynamic time or spatial axis stays dynamic: the export keeps
it and the check runs ONNX Runtime against torch at the training size and at two others. What cannot follow is fixed
and said (`notes`): the flat MLP needs a fixed feature count, so it is skipped for a teacher with a dynamic time or
spatial axis (`filter_candidates`), and a dynamic feature or channel axis takes the transfer set's size.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

import numpy as np

from edgefleet.cloud.distill.data import TeacherInfo
from edgefleet.cloud.distill.errors import DistillInputError
from edgefleet.cloud.distill.families import Candidate, channels_last
from edgefleet.cloud.distill.teacher import TeacherOutputs, looks_like_probabilities, named_probabilities, run_outputs
from edgefleet.cloud.errors import CloudError

Role = Literal["logits", "probabilities", "label", "values"]
SCORES_KEY = "edgefleet.scores_output"
INTERFACE_KEY = "edgefleet.interface"
HEAD = "edgefleet_head/"
# ONNX Runtime type strings -> numpy dtype names.
ORT_DTYPES = {"tensor(float)": "float32", "tensor(double)": "float64", "tensor(float16)": "float16",
              "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int16)": "int16", "tensor(int8)": "int8",
              "tensor(uint8)": "uint8", "tensor(uint16)": "uint16", "tensor(uint32)": "uint32",
              "tensor(uint64)": "uint64", "tensor(bool)": "bool"}
_FLOATS = ("float32", "float64", "float16")
_INTS = ("int64", "int32", "int16", "int8", "uint8", "uint16", "uint32", "uint64", "bool")
# Rows of the transfer set the roles are read from, spread over all of it (a set sorted by class still shows every
# class); the teacher has already run on every row, so this second, uncached run costs at most that much again.
_SAMPLE_ROWS = 4096
_AGREE = 0.99  # share of sample rows on which a label / second float output must follow the scores' argmax
# float32 reassociation between torch and ORT stays orders below 1e-4 (export.py); fp16 outputs keep 3 digits.
_ATOL = {"float16": 1e-2}


@dataclass(frozen=True)
class Port:
    name: str
    dtype: str  # numpy dtype name
    shape: tuple  # batch first; int: fixed, str: a named dynamic dimension, None: an anonymous one
    role: Role | None = None  # outputs only
    classes: tuple[int, ...] | None = None  # a label's value for each class index, when it is not the index itself


@dataclass(frozen=True)
class Interface:
    input: Port
    outputs: tuple[Port, ...]  # in the teacher's order
    scores: str  # the output that carries the distilled logits, probabilities or values
    fixed_axes: tuple[int, ...] = ()  # dynamic in the teacher, fixed to the transfer set's size in the student
    notes: tuple[str, ...] = ()  # what the student's interface does differently, and why

    @property
    def dynamic_axes(self) -> tuple[int, ...]:
        """Non-batch input axes that stay dynamic in the student."""
        return tuple(i for i, d in enumerate(self.input.shape)
                     if i > 0 and not isinstance(d, int) and i not in self.fixed_axes)

    def output(self, name: str) -> Port:
        return next(o for o in self.outputs if o.name == name)

    def skip_reason(self, family: str) -> str | None:
        """Why a family cannot be exported with this interface, or None."""
        if family == "mlp" and len(self.input.shape) > 2 and self.dynamic_axes:
            return (f"the flat MLP students are not tried: the teacher's input {self.input.name!r} has dynamic "
                    f"dimensions (axes {list(self.dynamic_axes)} of {_shown(self.input.shape)}) and an MLP takes a "
                    "fixed number of features; the convolutional students take any size there")
        return None


def _shown(shape) -> list:
    return [d if isinstance(d, int) else (d or "?") for d in shape]


def filter_candidates(iface: Interface, candidates: list[Candidate]) -> tuple[list[Candidate], list[str]]:
    """(the candidates this interface can be exported for, why others were left out); none left: DistillInputError."""
    kept = [c for c in candidates if iface.skip_reason(c.family) is None]
    reasons = sorted({r for c in candidates if (r := iface.skip_reason(c.family)) is not None})
    if not kept:
        raise DistillInputError(f"no student family can keep the teacher's interface: {'; '.join(reasons)}")
    return kept, reasons


# ---- reading the teacher's interface


def describe(teacher_bytes: bytes, info: TeacherInfo, targets: TeacherOutputs, x: np.ndarray,
             task: str = "classification") -> Interface:
    """The teacher's interface; `x` is the transfer set (float32, rows in the order `targets` was computed on)."""
    rows = np.unique(np.linspace(0, len(x) - 1, min(len(x), _SAMPLE_ROWS)).astype(np.int64))
    sample = x[rows]
    n = len(sample)
    others = [o.name for o in info.outputs if o.name != info.chosen_output]
    raw = run_outputs(teacher_bytes, sample, info, others) if others else {}
    scores = targets.logits[rows]
    width = int(scores.shape[1])
    winner = scores.argmax(axis=1)
    outputs: list[Port] = []
    for o in info.outputs:
        classes = None
        rank = len(o.shape)
        if rank not in (1, 2):
            raise DistillInputError(f"the teacher's output {o.name!r} has shape {_shown(o.shape)}; a student makes "
                                    "[N] or [N, K] outputs: flatten it in the teacher")
        if o.name == info.chosen_output:
            role: Role = targets.kind
        elif o.dtype in _INTS:
            if task == "regression":
                raise DistillInputError(f"the teacher's output {o.name!r} is {o.dtype}, which a regression student "
                                        "cannot reproduce; export the teacher without it")
            role = "label"
            classes = _label_classes(o.name, np.asarray(raw[o.name]), rank, winner, width, info.chosen_output)
        elif o.dtype in _FLOATS:
            role = _float_role(o.name, np.asarray(raw[o.name]).reshape(n, -1), scores, winner, task,
                               info.chosen_output)
        else:
            raise DistillInputError(f"the teacher's output {o.name!r} is {o.dtype}, which a student cannot make "
                                    "(float and integer tensors only); encode string class labels as integers "
                                    "(e.g. sklearn's LabelEncoder) before converting, or drop that output")
        if rank == 1 and role != "label" and width != 1:
            raise DistillInputError(f"the teacher's output {o.name!r} has shape [N] but {width} values per row")
        tail = () if rank == 1 else (1 if role == "label" else width,)
        outputs.append(Port(o.name, o.dtype, (_batch_dim(o.shape[0], info.input_shape[0]), *tail), role, classes))
    batch = _batch_dim(info.input_shape[0], None)
    shape = (batch, *info.input_shape[1:])
    fixed, notes = _fixed_axes(info, x.shape)
    if isinstance(info.input_shape[0], int):
        notes.append(f"the teacher's input {info.input_name!r} has a fixed batch of {info.input_shape[0]}; the "
                     "student takes any batch size (batches of that size included)")
    return Interface(Port(info.input_name, info.input_dtype, shape), tuple(outputs), info.chosen_output, fixed,
                     tuple(notes))


def _batch_dim(dim, fallback):
    if isinstance(dim, str) or dim is None:
        return dim
    return fallback if isinstance(fallback, str) else "batch"


def _fixed_axes(info: TeacherInfo, train_shape) -> tuple[tuple[int, ...], list[str]]:
    shape = info.input_shape
    rank = len(shape)
    if rank == 2:
        feature_axes = [1]
    else:
        feature_axes = [3 if rank == 4 and channels_last([None, *train_shape[1:]]) else 1]
    fixed = tuple(a for a in feature_axes if not isinstance(shape[a], int))
    what = "feature" if rank == 2 else "channel"
    notes = [f"the teacher's input {info.input_name!r} has a dynamic {what} axis ({a} of {_shown(shape)}); the "
             f"student takes the transfer set's {train_shape[a]} there, since its first layer has one weight per "
             f"{what}" for a in fixed]
    return fixed, notes


def _label_classes(name: str, labels: np.ndarray, rank: int, winner: np.ndarray, width: int,
                   scores: str) -> tuple[int, ...] | None:
    n = len(winner)
    if rank == 2 and labels.reshape(n, -1).shape[1] != 1:
        raise DistillInputError(f"the teacher's integer output {name!r} has {labels.reshape(n, -1).shape[1]} values "
                                "per row; a student reproduces a class label of shape [N] or [N, 1] only")
    labels = labels.reshape(n).astype(np.int64)
    table: dict[int, int] = {}
    for j in np.unique(winner):
        values, counts = np.unique(labels[winner == j], return_counts=True)
        table[int(j)] = int(values[counts.argmax()])
    follows = float(np.mean([table[int(j)] == v for j, v in zip(winner, labels)]))
    if follows < _AGREE:
        raise DistillInputError(f"the teacher's integer output {name!r} is not the class with the highest "
                                f"{scores!r} (it follows it on {follows:.0%} of {n} rows of the transfer set), "
                                "so a student cannot reproduce it; export the teacher without it")
    if all(table[j] == j for j in table):
        return None  # the argmax index itself
    missing = sorted(set(range(width)) - set(table))
    if missing:
        raise DistillInputError(f"the teacher's label {name!r} maps class indices to other values (index "
                                f"{next(iter(table))} is {table[next(iter(table))]}), and classes {missing[:5]} never "
                                f"win on {n} rows of the transfer set, so their label values are unknown; give "
                                "a transfer set where every class occurs, or export labels 0..K-1")
    return tuple(table[j] for j in range(width))


def _float_role(name: str, values: np.ndarray, scores: np.ndarray, winner: np.ndarray, task: str,
                chosen: str) -> Role:
    if task == "regression":
        if values.shape == scores.shape and np.allclose(values, scores, rtol=1e-4, atol=1e-5):
            return "values"
        raise DistillInputError(f"the teacher's output {name!r} differs from the distilled {chosen!r}; a student "
                                "reproduces one set of values: export the teacher without it, or distill it instead "
                                "(teacher_output)")
    if values.shape[1] != scores.shape[1]:
        raise DistillInputError(f"the teacher's output {name!r} has {values.shape[1]} values per row, the distilled "
                                f"{chosen!r} {scores.shape[1]}; a student reproduces the scores, their softmax and "
                                "the label only: export the teacher without it")
    agree = float((values.argmax(axis=1) == winner).mean())
    if agree < _AGREE:
        raise DistillInputError(f"the teacher's output {name!r} predicts another class than {chosen!r} on "
                                f"{1 - agree:.0%} of the rows; a student cannot reproduce both: export the teacher "
                                "without one of them")
    if (named_probabilities(name) and values.min() >= 0) or looks_like_probabilities(values):
        return "probabilities"
    return "logits"


# ---- the scores output of a model


def scores_output(model) -> str:
    """The output that carries the scores: the one recorded by `export_student`, else the first float output.
    `model`: ONNX bytes, an onnx.ModelProto or an onnxruntime.InferenceSession."""
    if hasattr(model, "get_modelmeta"):
        recorded = model.get_modelmeta().custom_metadata_map.get(SCORES_KEY)
        outputs = [(o.name, ORT_DTYPES.get(o.type, o.type)) for o in model.get_outputs()]
    else:
        import onnx
        from onnx import helper

        if isinstance(model, (bytes, bytearray)):
            model = onnx.load_from_string(bytes(model))
        recorded = {p.key: p.value for p in model.metadata_props}.get(SCORES_KEY)
        outputs = [(o.name, _np_name(helper.tensor_dtype_to_np_dtype(o.type.tensor_type.elem_type)))
                   if o.type.HasField("tensor_type") else (o.name, "") for o in model.graph.output]
    names = [name for name, _ in outputs]
    if recorded in names:
        return str(recorded)
    return next((name for name, dtype in outputs if dtype in _FLOATS), names[0])


def _np_name(dtype) -> str:
    return np.dtype(dtype).name


def head_nodes(model) -> list[str]:
    """Names of the interface nodes `export_student` added (kept in float32 by int8 and fp16)."""
    return [n.name for n in model.graph.node if n.name.startswith(HEAD)]


# ---- exporting a student with the interface


def export_student(module, iface: Interface, train_shape, doc_string: str = "") -> bytes:
    """ONNX bytes of `module` (float32 in, raw logits or values out) with exactly the teacher's interface.

    `train_shape`: batch first, every other dimension the transfer set's; the axes the interface keeps dynamic are
    exported dynamic and checked at two other sizes."""
    import onnx

    from edgefleet.cloud.distill.export import to_onnx

    inp = iface.input
    trunk_in = inp.name if inp.dtype == "float32" else HEAD + "input_float32"
    trunk_out = HEAD + "scores"
    dynamic = {a: f"dim{a}" for a in iface.dynamic_axes}
    trunk = to_onnx(module, train_shape, input_name=trunk_in, output_name=trunk_out, doc_string=doc_string,
                    dynamic_dims=dynamic)
    model = _compose(onnx.load_from_string(trunk), iface, train_shape, trunk_in, trunk_out)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise CloudError(f"the student with the teacher's interface failed the ONNX checker: {exc}") from None
    data = model.SerializeToString()
    _check(data, module, iface, train_shape)
    return data


def _compose(model, iface: Interface, train_shape, trunk_in: str, trunk_out: str):
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    inp = iface.input
    # The teacher's dims: fixed ones as they are, dynamic ones by the teacher's name (or none), except the axes the
    # student fixes; a fixed batch becomes dynamic.
    dims = [train_shape[i] if i in iface.fixed_axes else d for i, d in enumerate(inp.shape)]
    dims[0] = _batch_dim(inp.shape[0], None)
    new_input = helper.make_tensor_value_info(inp.name, helper.np_dtype_to_tensor_dtype(np.dtype(inp.dtype)), dims)
    nodes = []
    if trunk_in != inp.name:
        nodes.append(helper.make_node("Cast", [inp.name], [trunk_in], name=HEAD + "cast_input", to=TensorProto.FLOAT))
    nodes.extend(graph.node)
    _mark_standardize(nodes)
    outputs, inits = [], []
    for o in iface.outputs:
        elem = helper.np_dtype_to_tensor_dtype(np.dtype(o.dtype))
        src = trunk_out
        if o.role == "label":
            keep = 1 if len(o.shape) == 2 else 0
            src = _add(nodes, "ArgMax", [src], o.name, "argmax", axis=1, keepdims=keep)
            if o.classes is not None:
                table = HEAD + f"{o.name}/classes"
                inits.append(numpy_helper.from_array(np.asarray(o.classes, dtype=o.dtype), table))
                src = _add(nodes, "Gather", [table, src], o.name, "classes", axis=0)
            elif o.dtype != "int64":
                src = _add(nodes, "Cast", [src], o.name, "cast", to=elem)
        else:
            if o.role == "probabilities":
                src = _add(nodes, "Softmax", [src], o.name, "softmax", axis=-1)
            if len(o.shape) == 1:
                flat = HEAD + f"{o.name}/flat_shape"
                inits.append(numpy_helper.from_array(np.asarray([-1], np.int64), flat))
                src = _add(nodes, "Reshape", [src, flat], o.name, "reshape")
            if o.dtype != "float32":
                src = _add(nodes, "Cast", [src], o.name, "cast", to=elem)
        if src == trunk_out:
            src = _add(nodes, "Identity", [src], o.name, "identity")
        nodes[-1].output[0] = o.name  # the last node of each chain writes the teacher's output
        outputs.append(helper.make_tensor_value_info(o.name, elem, list(o.shape)))
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(inits)
    del graph.input[:]
    graph.input.append(new_input)
    del graph.output[:]
    graph.output.extend(outputs)
    roles = {o.name: o.role for o in iface.outputs}
    del model.metadata_props[:]
    for key, value in ((SCORES_KEY, iface.scores), (INTERFACE_KEY, json.dumps(roles, sort_keys=True))):
        model.metadata_props.add(key=key, value=value)
    return model


def _mark_standardize(nodes: list) -> None:
    """The input's layout change and standardisation ((x - mean) * inv_std, families.py) join the head: int8 would
    otherwise quantize x - mean per tensor, where one feature's range (wine's proline, hundreds) wipes out the
    others (hue, about 1), and change a third of the predictions."""
    for node in nodes:
        if node.op_type not in ("Cast", "Transpose", "Flatten", "Sub", "Mul"):
            return
        if not node.name.startswith(HEAD):
            node.name = HEAD + "standardize" + (node.name if node.name.startswith("/") else "/" + node.name)


def _add(nodes: list, op: str, inputs: list[str], output: str, what: str, **attrs) -> str:
    from onnx import helper

    out = HEAD + f"{output}/{what}"
    nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
    return out


def _other_sizes(size: int) -> list[int]:
    return sorted({max(1, size // 2), size + 3} - {size})


def _check(data: bytes, module, iface: Interface, train_shape) -> None:
    """ONNX Runtime against torch on every output, at the training size and at two other sizes of the dynamic axes."""
    import onnxruntime as ort
    import torch

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(data, sess_options=options, providers=["CPUExecutionProvider"])
    got_sig = [(o.name, ORT_DTYPES.get(o.type, o.type), len(o.shape)) for o in session.get_outputs()]
    want_sig = [(o.name, o.dtype, len(o.shape)) for o in iface.outputs]
    if got_sig != want_sig or session.get_inputs()[0].name != iface.input.name:
        raise CloudError(f"the exported student's signature {got_sig} is not the teacher's {want_sig}; not shipping")
    train = [int(d) for d in train_shape[1:]]
    sizes = [train]
    for k in range(2 if iface.dynamic_axes else 0):
        sizes.append([_other_sizes(d)[min(k, len(_other_sizes(d)) - 1)] if i + 1 in iface.dynamic_axes else d
                      for i, d in enumerate(train)])
    rng = np.random.default_rng(0)
    for dims in sizes:
        x = rng.standard_normal((3, *dims)).astype(iface.input.dtype)
        with torch.no_grad():
            expected = module.eval()(torch.from_numpy(x.astype(np.float32))).numpy().astype(np.float64)
        try:
            results = session.run(None, {iface.input.name: x})
        except Exception as exc:  # noqa: BLE001 - onnxruntime's own types: the student refuses this size
            raise CloudError(f"the exported student fails at input size {dims} the teacher accepts: "
                             f"{' '.join(str(exc).split())[:200]}") from None
        for port, got in zip(iface.outputs, results):
            _compare(port, np.asarray(got), expected, dims)


def _compare(port: Port, got: np.ndarray, expected: np.ndarray, dims) -> None:
    n = len(expected)
    where = f"output {port.name!r} at input size {dims}"
    if got.dtype.name != port.dtype or got.ndim != len(port.shape):
        raise CloudError(f"the exported student's {where} is {got.dtype.name} of rank {got.ndim}, the teacher's is "
                         f"{port.dtype} of rank {len(port.shape)}; not shipping")
    if port.role == "label":
        top2 = np.sort(expected, axis=1)[:, -2:] if expected.shape[1] > 1 else np.zeros((n, 2))
        clear = (top2[:, 1] - top2[:, 0]) > 1e-4  # a near tie may resolve either way in float32
        want = expected.argmax(axis=1)
        want = np.asarray(port.classes)[want] if port.classes is not None else want
        if not np.array_equal(got.reshape(n)[clear], want[clear]):
            raise CloudError(f"the exported student's {where} is not the argmax of its scores; not shipping")
        return
    want = expected
    if port.role == "probabilities":
        e = np.exp(expected - expected.max(axis=1, keepdims=True))
        want = e / e.sum(axis=1, keepdims=True)
    atol = _ATOL.get(port.dtype, 1e-4)
    got = got.reshape(n, -1).astype(np.float64)
    if got.shape != want.shape or not np.allclose(got, want, atol=atol, rtol=1e-4):
        worst = float(np.abs(got - want).max()) if got.shape == want.shape else float("inf")
        raise CloudError(f"the exported student's {where} disagrees with torch (max |diff| {worst:.2e}); "
                         "not shipping")


__all__ = ["HEAD", "INTERFACE_KEY", "ORT_DTYPES", "SCORES_KEY", "Interface", "Port", "Role", "describe",
           "export_student", "filter_candidates", "head_nodes", "scores_output"]
