"""cloud/distill/interface.py: the student keeps the teacher's interface, so the app that called the teacher calls the
student with the same code. Teachers the project did not write: a scikit-learn tree ensemble through skl2onnx, a
1-D signal CNN with a dynamic time axis, an image CNN with dynamic height and width, a float64 pipeline; each is
distilled with a tiny grid and then run, teacher and student, by the same client code on the same request, through
ONNX Runtime, the agent's runtime classes from a real bundle, its int8/fp16 variants and (where the converter venv
exists) TFLite on LiteRT."""

from __future__ import annotations

import io
import tarfile
import warnings
from datetime import datetime, timezone

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgefleet.cloud.bundles import build_bundle
from edgefleet.cloud.catalog import builtin_catalog
from edgefleet.cloud.distill import artifacts, pipeline
from edgefleet.cloud.distill.data import inspect_teacher
from edgefleet.cloud.distill.errors import DistillInputError
from edgefleet.cloud.distill.families import build_student, candidates_for
from edgefleet.cloud.distill.interface import describe, export_student, filter_candidates, scores_output
from edgefleet.cloud.distill.pipeline import run_distillation
from edgefleet.cloud.distill.spec import DistillSpec
from edgefleet.cloud.distill.teacher import teacher_outputs
from edgefleet.cloud.registry import validate_model
from edgefleet.common.runtimes import make_runtime
from edgefleet.edge_agent.apply import smoke_test
from tests.cloud.distill.distill_teachers import npz_bytes

TINY = dict(max_candidates=1, max_epochs=12, patience=4)
NOW = datetime(2024, 6, 1, tzinfo=timezone.utc)


# ---- the client: what an app written against the teacher does


class App:
    """An app written against the teacher: it knows the teacher's input name and dtype and asks for its outputs by
    name. It runs any model with exactly that code."""

    def __init__(self, teacher: bytes) -> None:
        session = ort.InferenceSession(teacher, providers=["CPUExecutionProvider"])
        arg = session.get_inputs()[0]
        self.input, self.dtype = arg.name, {"tensor(float)": np.float32, "tensor(double)": np.float64}[arg.type]
        self.outputs = [o.name for o in session.get_outputs()]

    def request(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return {self.input: np.asarray(x, dtype=self.dtype)}

    def __call__(self, model: bytes, x: np.ndarray) -> dict[str, np.ndarray]:
        session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
        return dict(zip(self.outputs, session.run(self.outputs, self.request(x))))


def _signature(model: bytes) -> tuple[list, list]:
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return ([(a.name, a.type, a.shape) for a in session.get_inputs()],
            [(a.name, a.type, len(a.shape)) for a in session.get_outputs()])


def _meaning(answer: dict[str, np.ndarray], roles: dict[str, str], classes=None) -> None:
    """Probabilities are distributions; a label is the argmax of the scores beside it (through the class values)."""
    scores = next(answer[n] for n, r in roles.items() if r in ("probabilities", "logits"))
    for name, role in roles.items():
        if role == "probabilities":
            assert answer[name].min() >= 0 and np.allclose(answer[name].sum(axis=1), 1.0, atol=1e-5), name
        if role == "label":
            index = scores.argmax(axis=1)
            want = index if classes is None else np.asarray(classes)[index]
            np.testing.assert_array_equal(answer[name].reshape(len(scores)), want)


def assert_same_interface(teacher: bytes, student: bytes, x: np.ndarray, roles: dict[str, str], classes=None,
                          min_agreement: float = 0.8) -> None:
    assert _signature(student) == _signature(teacher)
    app = App(teacher)
    want, got = app(teacher, x), app(student, x)
    assert list(got) == list(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape, name
    _meaning(want, roles, classes)
    _meaning(got, roles, classes)
    label = next((n for n, r in roles.items() if r == "label"), None)
    if label is not None:  # the same meaning: the student's labels are mostly the teacher's
        assert float((got[label] == want[label]).mean()) >= min_agreement


def _distil(tmp_path, teacher: bytes, x: np.ndarray, y=None, **spec):
    arrays = {"x": x} if y is None else {"x": x, "y": y}
    return run_distillation(teacher, npz_bytes(**arrays), DistillSpec(classes=("x86-cpu",), **{**TINY, **spec}),
                            builtin_catalog(), {}, tmp_path, measure_classes=())


def _student(result) -> bytes:
    assert len(result.students) == 1
    return next(iter(result.students.values()))


# ---- the teachers


def _torch_onnx(module, example, input_name, output_names, axes) -> bytes:
    import torch

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (torch.from_numpy(example),), buf, dynamo=False, opset_version=17,
                          input_names=[input_name], output_names=output_names, dynamic_axes=axes)
    return buf.getvalue()


def _fit(net, x: np.ndarray, y: np.ndarray, steps: int = 60) -> None:
    import torch

    torch.manual_seed(0)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(xt)[0], yt).backward()
        opt.step()


@pytest.fixture(scope="module")
def forest():
    """A random forest on wine through skl2onnx (zipmap off): `label` int64 holding the classes 1..3 (not the
    index) and `probabilities` float32; the input is named `features`."""
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.datasets import load_wine
    from sklearn.ensemble import RandomForestClassifier

    x, y = load_wine(return_X_y=True)
    clf = RandomForestClassifier(n_estimators=30, max_depth=4, random_state=0).fit(x, y + 1)
    onx = to_onnx(clf, initial_types=[("features", FloatTensorType([None, 13]))],
                  options={id(clf): {"zipmap": False}}, target_opset={"": 17, "ai.onnx.ml": 3})
    return onx.SerializeToString(), x.astype(np.float32)


@pytest.fixture(scope="module")
def forest_student(forest, tmp_path_factory):
    teacher, x = forest
    return _student(_distil(tmp_path_factory.mktemp("forest"), teacher, x, max_epochs=30))


def _signals(n: int, t: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two-channel signals whose class (0..2) is the frequency of a noisy sine."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    time = np.arange(t) / t
    phase = rng.uniform(0, 2 * np.pi, (n, 1))
    wave = np.sin(2 * np.pi * (2 + 3 * y[:, None]) * time + phase)
    x = np.stack([wave, np.cos(2 * np.pi * (2 + 3 * y[:, None]) * time + phase)], axis=1)
    return (x + 0.3 * rng.standard_normal(x.shape)).astype(np.float32), y.astype(np.int64)


@pytest.fixture(scope="module")
def signal_teacher():
    """A torch 1-D CNN over [N, 2, time] with a dynamic time axis: `scores` logits and `label` int32 [N, 1]."""
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Sequential(nn.Conv1d(2, 16, 9, padding=4), nn.ReLU(), nn.Conv1d(16, 16, 9, padding=4),
                                      nn.ReLU())
            self.head = nn.Linear(16, 3)

        def forward(self, v):
            z = self.head(self.conv(v).mean(dim=2))
            return z, z.argmax(dim=1, keepdim=True).to(torch.int32)

    x, y = _signals(300, 64)
    net = Net()
    _fit(net, x, y)
    axes = {"signal": {0: "batch", 2: "time"}, "scores": {0: "batch"}, "label": {0: "batch"}}
    return _torch_onnx(net, x[:2], "signal", ["scores", "label"], axes), x


def test_tree_ensemble_student_answers_the_teachers_client(forest, forest_student):
    teacher, x = forest
    assert_same_interface(teacher, forest_student, x, {"label": "label", "probabilities": "probabilities"},
                          classes=(1, 2, 3))
    assert scores_output(forest_student) == "probabilities"
    # One row and a large batch, as apps send them.
    app = App(teacher)
    assert app(forest_student, x[:1])["label"].shape == (1,)
    assert app(forest_student, np.repeat(x, 10, axis=0))["probabilities"].shape == (1780, 3)


def test_signal_cnn_student_keeps_the_dynamic_time_axis(signal_teacher, tmp_path):
    teacher, x = signal_teacher
    result = _distil(tmp_path, teacher, x, max_epochs=30, patience=8)
    student = _student(result)
    # The flat MLP (2 x 64 = 128 values would have put it in the grid) cannot take another length: not tried.
    assert [s.family for s in result.report.students] == ["cnn1d"]
    assert "flat MLP students are not tried" in onnx.load_from_string(student).doc_string
    roles = {"scores": "logits", "label": "label"}
    assert_same_interface(teacher, student, x, roles, min_agreement=0.7)
    app = App(teacher)
    for t in (17, 64, 200):  # lengths the teacher takes, the student takes too
        test_x, _ = _signals(12, t, seed=t)
        got, want = app(student, test_x), app(teacher, test_x)
        assert got["scores"].shape == want["scores"].shape == (12, 3) and got["label"].shape == (12, 1)
        _meaning(got, roles)


def test_image_cnn_student_keeps_dynamic_height_and_width(tmp_path):
    """[N, 3, H, W], batch, H and W dynamic; one `probabilities` output (a softmax head)."""
    import torch
    from torch import nn

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 240)
    x = (0.5 * rng.standard_normal((240, 3, 12, 12)) + np.eye(3)[y][:, :, None, None]).astype(np.float32)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
            self.head = nn.Linear(8, 3)

        def forward(self, v):
            return (torch.softmax(self.head(self.conv(v).mean(dim=(2, 3))), dim=1),)

    net = Net()

    class Logits(nn.Module):  # trained on the log of the softmax head: cross entropy needs logits
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, v):
            return (torch.log(self.net(v)[0]),)

    _fit(Logits(), x, y)
    teacher = _torch_onnx(net, x[:2], "image", ["probabilities"],
                          {"image": {0: "n", 2: "height", 3: "width"}, "probabilities": {0: "n"}})
    result = _distil(tmp_path, teacher, x)
    student = _student(result)
    assert [s.family for s in result.report.students] == ["dscnn2d"]
    assert_same_interface(teacher, student, x, {"probabilities": "probabilities"})
    app = App(teacher)
    for hw in ((12, 12), (7, 9), (32, 20)):
        got = app(student, rng.standard_normal((4, 3, *hw)))["probabilities"]
        assert got.shape == (4, 3) and np.allclose(got.sum(axis=1), 1.0, atol=1e-5)
    # Agreement on the argmax: the student stands in for the teacher, also at another size.
    test_x = (0.5 * rng.standard_normal((60, 3, 20, 16)) + np.eye(3)[y[:60]][:, :, None, None])
    same = app(student, test_x)["probabilities"].argmax(1) == app(teacher, test_x)["probabilities"].argmax(1)
    assert same.mean() >= 0.8


def test_float64_pipeline_student_takes_and_gives_float64(tmp_path):
    """skl2onnx in double: input float64, `probabilities` float64, `label` int64 (the task is breast cancer)."""
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import DoubleTensorType
    from sklearn.datasets import load_breast_cancer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = load_breast_cancer(return_X_y=True)
    clf = LogisticRegression(max_iter=500)
    pipe = make_pipeline(StandardScaler(), clf).fit(x, y)
    teacher = to_onnx(pipe, initial_types=[("x", DoubleTensorType([None, 30]))], options={id(clf): {"zipmap": False}},
                      target_opset={"": 17, "ai.onnx.ml": 3}).SerializeToString()
    student = _student(_distil(tmp_path, teacher, x, y=y))
    assert _signature(student)[0] == [("x", "tensor(double)", [None, 30])]
    assert_same_interface(teacher, student, x, {"label": "label", "probabilities": "probabilities"},
                          min_agreement=0.9)


# ---- downstream: variants, bundles and the agent's runtimes keep the interface


def test_int8_and_fp16_variants_keep_names_dtypes_and_meaning(forest, forest_student, tmp_path):
    teacher, x = forest
    roles = {"label": "label", "probabilities": "probabilities"}
    for precision in ("int8", "fp16"):
        v = artifacts.make_variant(forest_student, precision, "onnxruntime", x, tmp_path)
        assert (v.outputs, v.scores) == (("label", "probabilities"), "probabilities")
        assert_same_interface(teacher, v.data, x, roles, classes=(1, 2, 3), min_agreement=0.7)
        # The drift check reads the probabilities, never the int64 label.
        result = artifacts.check_drift(v, forest_student, x, "classification", 1.0)
        assert result.samples == len(x) and result.max_abs_error <= 1.0


def _unpack(archive: bytes, where) -> None:
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        for member in tar.getmembers():
            target = where / member.name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(tar.extractfile(member).read())


def _device_answer(model: bytes, tmp_path, x, app: App, *, cls="x86-cpu", runtime="onnxruntime", fmt="onnx",
                   signature_of: bytes | None = None, precision="fp32"):
    """Bundle the model as the cloud does, smoke-test and serve it with the agent's runtime class, and answer the
    app's request through it."""
    info = validate_model(signature_of or model, max_bytes=1 << 26)
    device_class = builtin_catalog()[cls]
    if runtime == "litert":
        device_class = device_class.model_copy(update={"runtimes": ["litert", "onnxruntime"]})
    archive, manifest = build_bundle(model, name="m", version=1, device_class=device_class, inputs=info.inputs,
                                     outputs=info.outputs, created_at=NOW, runtime=runtime, model_format=fmt,
                                     precision=precision)
    _unpack(archive, tmp_path)
    smoke_test(make_runtime(manifest.runtime), tmp_path, manifest)  # what the agent runs before activation
    served = make_runtime(manifest.runtime)
    served.load(tmp_path, manifest)
    try:
        specs = [(s.name, s.dtype, len(s.shape)) for s in served.outputs]
        return served.run(app.request(x)), specs, manifest
    finally:
        served.close()


def test_agent_onnx_runtime_serves_the_student_under_the_teachers_names(forest, forest_student, tmp_path):
    teacher, x = forest
    app = App(teacher)
    got, specs, _ = _device_answer(forest_student, tmp_path / "fp32", x, app)
    want = app(teacher, x)
    assert specs == [("label", "int64", 1), ("probabilities", "float32", 2)]
    assert list(got) == list(want) and all(got[n].dtype == want[n].dtype for n in want)
    _meaning(got, {"label": "label", "probabilities": "probabilities"}, classes=(1, 2, 3))
    # An int8 bundle's smoke test compares the probabilities, not a label a near tie could flip on another CPU.
    int8 = artifacts.make_variant(forest_student, "int8", "onnxruntime", x, tmp_path)
    _, _, manifest = _device_answer(int8.data, tmp_path / "int8", x, app, precision="int8")
    with np.load(tmp_path / "int8" / manifest.smoke_test.expected_file) as expected:
        assert list(expected.files) == ["probabilities"]


@pytest.mark.timeout(1800)  # the first run on a machine builds the converter venv (about 2 min measured)
def test_litert_runtime_serves_a_tflite_student_under_the_teachers_names(forest, forest_student, tmp_path):
    from tests.cloud.distill.artifact_models import converter_or_skip

    converter_or_skip()  # a converter that cannot be built fails this test unless EDGEFLEET_SKIP_TFLITE=1 says so
    teacher, x = forest
    v = artifacts.make_variant(forest_student, "fp32", "litert", x, tmp_path / "work")
    assert (v.fmt, v.outputs, v.scores) == ("tflite", ("label", "probabilities"), "probabilities")
    app = App(teacher)
    got, specs, _ = _device_answer(v.data, tmp_path / "bundle", x, app, runtime="litert", fmt="tflite",
                                   signature_of=forest_student)
    assert specs == [("label", "int64", 1), ("probabilities", "float32", 2)]
    assert list(got) == app.outputs
    _meaning(got, {"label": "label", "probabilities": "probabilities"}, classes=(1, 2, 3))
    np.testing.assert_allclose(got["probabilities"], app(forest_student, x)["probabilities"], atol=1e-5)


# ---- dtypes and dimensions the graph declares, without training


def _graph_teacher(in_type, out_type, in_shape, out_name="scores") -> bytes:
    """input -> Cast(float) -> MatMul(4 -> 3) -> Cast(out_type): a teacher of any io dtype."""
    w = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    nodes = [helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT),
             helper.make_node("MatMul", ["xf", "w"], ["z"]),
             helper.make_node("Cast", ["z"], [out_name], to=out_type)]
    graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", in_type, in_shape)],
                              [helper.make_tensor_value_info(out_name, out_type, ["N", 3])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def _export_untrained(teacher: bytes, x: np.ndarray, task: str = "classification"):
    spec = DistillSpec(classes=("rpi4",), task=task)
    info = inspect_teacher(teacher, spec)
    targets = teacher_outputs(teacher, x, info, spec, None)
    iface = describe(teacher, info, targets, x, task)
    shape = [None, *x.shape[1:]]
    cand = candidates_for(shape, targets.n_out, 1)[0]
    return export_student(build_student(cand, shape, targets.n_out), iface, shape), iface


@pytest.mark.parametrize("in_type,out_type", [(TensorProto.FLOAT16, TensorProto.FLOAT16),
                                              (TensorProto.DOUBLE, TensorProto.DOUBLE),
                                              (TensorProto.FLOAT, TensorProto.DOUBLE)])
def test_float16_and_float64_io_are_cast_inside_the_graph(in_type, out_type):
    teacher = _graph_teacher(in_type, out_type, ["N", 4])
    x = np.random.default_rng(1).standard_normal((64, 4)).astype(np.float32)
    student, _ = _export_untrained(teacher, x)
    assert _signature(student) == _signature(teacher)
    dtype = helper.tensor_dtype_to_np_dtype(in_type)
    out = ort.InferenceSession(student, providers=["CPUExecutionProvider"]).run(None, {"x": x.astype(dtype)})[0]
    assert out.dtype == helper.tensor_dtype_to_np_dtype(out_type) and out.shape == (64, 3)


def test_regression_values_of_shape_n_stay_values_of_shape_n():
    w = np.random.default_rng(0).standard_normal((4, 1)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["z"]),
             helper.make_node("Reshape", ["z", "flat"], ["price"])]
    graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("price", TensorProto.FLOAT, ["N"])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([-1]), "flat")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    teacher = model.SerializeToString()
    x = np.random.default_rng(1).standard_normal((64, 4)).astype(np.float32)
    student, iface = _export_untrained(teacher, x, task="regression")
    assert iface.outputs[0].role == "values" and _signature(student) == _signature(teacher)
    assert App(teacher)(student, x)["price"].shape == (64,)


def test_a_dynamic_feature_axis_is_fixed_and_said():
    teacher = _graph_teacher(TensorProto.FLOAT, TensorProto.FLOAT, ["N", "features"])
    x = np.random.default_rng(1).standard_normal((64, 4)).astype(np.float32)
    student, iface = _export_untrained(teacher, x)
    assert _signature(student)[0] == [("x", "tensor(float)", ["N", 4])]
    assert iface.fixed_axes == (1,) and "dynamic feature axis" in iface.notes[0] and "4" in iface.notes[0]


# ---- refusals, before any training


@pytest.fixture
def no_training(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("training started despite a teacher whose interface a student cannot keep")

    monkeypatch.setattr(pipeline, "train_student", boom)


def _zipmap_teacher() -> bytes:
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.datasets import load_wine
    from sklearn.linear_model import LogisticRegression

    x, y = load_wine(return_X_y=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # not converged in 50 iterations: the fit does not matter here
        clf = LogisticRegression(max_iter=50).fit(x, y)
    return to_onnx(clf, initial_types=[("features", FloatTensorType([None, 13]))],
                   target_opset={"": 17, "ai.onnx.ml": 3}).SerializeToString()


def _string_label_teacher() -> bytes:
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.datasets import load_wine
    from sklearn.linear_model import LogisticRegression

    x, y = load_wine(return_X_y=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clf = LogisticRegression(max_iter=50).fit(x, np.array(["barolo", "grignolino", "barbera"])[y])
    return to_onnx(clf, initial_types=[("features", FloatTensorType([None, 13]))],
                   options={id(clf): {"zipmap": False}}, target_opset={"": 17, "ai.onnx.ml": 3}).SerializeToString()


def _extra_output_teacher(kind: str) -> bytes:
    """[N, 4] -> logits [N, 3], plus an `embedding` [N, 8] or a `label` that is the argMIN, not the argmax."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["logits"])]
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "w")]
    if kind == "embedding":
        nodes.append(helper.make_node("MatMul", ["x", "e"], ["embedding"]))
        inits.append(numpy_helper.from_array(rng.standard_normal((4, 8)).astype(np.float32), "e"))
        extra = helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", 8])
    else:
        nodes.append(helper.make_node("ArgMin", ["logits"], ["label"], axis=1, keepdims=0))
        extra = helper.make_tensor_value_info("label", TensorProto.INT64, ["N"])
    graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3]), extra], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


@pytest.mark.parametrize("teacher,width,message", [
    (_zipmap_teacher, 13, "'output_probability' is seq.*zipmap off"),
    (_string_label_teacher, 13, "'label' is str.*encode string class labels as integers"),
    (lambda: _extra_output_teacher("embedding"), 4, "'embedding' has 8 values per row.*export the teacher without"),
    (lambda: _extra_output_teacher("argmin"), 4, "'label' is not the class with the highest 'logits'"),
], ids=["zipmap", "string-label", "embedding", "label-not-argmax"])
def test_outputs_a_student_cannot_reproduce_are_refused_by_name(teacher, width, message, tmp_path, no_training):
    x = np.random.default_rng(0).standard_normal((178, width)).astype(np.float32)
    with pytest.raises(DistillInputError, match=message):
        _distil(tmp_path, teacher(), x)


def test_no_family_left_is_refused_with_the_reason(signal_teacher):
    teacher, x = signal_teacher
    spec = DistillSpec(classes=("rpi4",))
    info = inspect_teacher(teacher, spec)
    iface = describe(teacher, info, teacher_outputs(teacher, x, info, spec, None), x)
    mlp_only = [c for c in candidates_for([None, 2, 64], 3, 2) if c.family == "mlp"]
    with pytest.raises(DistillInputError, match="dynamic dimensions .*axes \\[2\\]"):
        filter_candidates(iface, mlp_only)
