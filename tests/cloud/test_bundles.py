"""cloud/bundles.py: archives built from real ONNX models, read back as the agent would, checked member by member."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from datetime import datetime, timezone

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgefleet.cloud.bundles import build_bundle, smoke_inputs, target_path
from edgefleet.cloud.catalog import builtin_catalog
from edgefleet.cloud.errors import Invalid
from edgefleet.cloud.registry import validate_model
from edgefleet.protos.messages import Budgets, Manifest, parse_message

CREATED = datetime(2025, 3, 1, 12, 0, 0, tzinfo=timezone.utc)


def _model(nodes, inputs, outputs, inits=()) -> bytes:
    model = helper.make_model(helper.make_graph(nodes, "m", inputs, outputs, list(inits)),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def mlp_bytes() -> bytes:
    rng = np.random.default_rng(1)
    return _model(
        [helper.make_node("Gemm", ["x", "W", "B"], ["h"]), helper.make_node("Sigmoid", ["h"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "W"),
         numpy_helper.from_array(np.zeros(3, np.float32), "B")],
    )


def two_input_bytes() -> bytes:
    table = numpy_helper.from_array(np.arange(30, dtype=np.float32).reshape(10, 3), "table")
    return _model(
        [helper.make_node("Gather", ["table", "ids"], ["emb"], axis=0), helper.make_node("Add", ["a", "emb"], ["s"]),
         helper.make_node("ArgMax", ["s"], ["best"], axis=1, keepdims=0)],
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [None, 3]),
         helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch"])],
        [helper.make_tensor_value_info("s", TensorProto.FLOAT, [None, 3]),
         helper.make_tensor_value_info("best", TensorProto.INT64, [None])],
        [table],
    )


def build(data: bytes, cls_name: str = "rpi4", **overrides):
    info = validate_model(data, max_bytes=10 * 1024 * 1024)
    cls = overrides.pop("device_class", builtin_catalog()[cls_name])
    return build_bundle(data, name="demo", version=3, device_class=cls, inputs=info.inputs, outputs=info.outputs,
                        created_at=CREATED, **overrides)


def members(archive: bytes) -> dict[str, tuple[tarfile.TarInfo, bytes]]:
    out = {}
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        for info in tar.getmembers():
            out[info.name] = (info, tar.extractfile(info).read())
    return out


def test_target_path_layout():
    assert target_path("digits", 7, "jetson-nano") == "bundles/digits/v7/jetson-nano.tar.gz"


def test_mlp_bundle_members_manifest_and_smoke_files():
    data = mlp_bytes()
    archive, manifest = build(data)
    got = members(archive)
    assert list(got) == ["manifest.json", "model.onnx", "smoke/expected.npz", "smoke/input.npz"]
    for info, _ in got.values():
        assert info.isreg() and info.mode == 0o644 and info.uid == 0 and info.gid == 0
    assert got["model.onnx"][1] == data
    # The manifest in the archive is the one returned, and it parses as the contract.
    parsed = parse_message(got["manifest.json"][1], Manifest)
    assert parsed == manifest
    assert (manifest.name, manifest.version, manifest.device_class) == ("demo", 3, "rpi4")
    assert manifest.budgets == builtin_catalog()["rpi4"].budgets
    assert manifest.execution_providers == ["CPUExecutionProvider"]
    assert manifest.created_at == CREATED
    # files: every other member, with its real sha256 and size
    assert {f.path for f in manifest.files} == set(got) - {"manifest.json"}
    for f in manifest.files:
        assert f.sha256 == hashlib.sha256(got[f.path][1]).hexdigest()
        assert f.size == len(got[f.path][1])
    # smoke: dynamic batch -> 1, expected = ONNX Runtime on that input
    feeds = dict(np.load(io.BytesIO(got["smoke/input.npz"][1]), allow_pickle=False))
    expected = dict(np.load(io.BytesIO(got["smoke/expected.npz"][1]), allow_pickle=False))
    assert list(feeds) == ["x"] and feeds["x"].shape == (1, 4) and feeds["x"].dtype == np.float32
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(expected["y"], session.run(["y"], feeds)[0], rtol=1e-6)
    assert expected["y"].shape == (1, 3)


def test_the_manifest_carries_the_class_cost_models_emulation_factor():
    """What an agent with offload.emulate_class slows each run by: the cost model's time on the class over the
    build machine's, for this model (costmodel.emulation_factor); none where it cannot be counted."""
    from edgefleet.cloud.distill import costmodel as cm

    data = mlp_bytes()
    factors = {name: build(data, name)[1].emulation_factor for name in ("rpi4", "rpi5", "x86-cpu")}
    macs = cm.count_ops(data, (4,)).macs
    ref, pi4 = cm.default_calibration(builtin_catalog()["x86-cpu"]), cm.default_calibration(builtin_catalog()["rpi4"])
    assert factors["rpi4"] == round(cm.latency_ms(macs, pi4, "fp32") / cm.latency_ms(macs, ref, "fp32"), 2)
    assert factors["rpi4"] > factors["rpi5"] > 1.0 == factors["x86-cpu"]  # the build machine emulates nothing
    custom = builtin_catalog()["rpi4"].model_copy(update={"name": "my-board"})
    assert build(data, device_class=custom)[1].emulation_factor is None  # no figures of its own: not guessed
    assert build(two_input_bytes())[1].emulation_factor is None  # two inputs: the counter takes one


@pytest.mark.parametrize("garbage", [0.5, 0, -3, 1e9, "7x", float("inf"), float("nan"), [7]])
def test_a_manifest_with_a_garbage_emulation_factor_is_refused_naming_the_field(garbage):
    """A bundle whose manifest says it runs 0.5x, NaN or "7x" slower is refused whole, before anything installs."""
    from edgefleet.protos.base import MessageError

    _, manifest = build(mlp_bytes())
    doc = json.loads(manifest.to_wire())
    doc["emulation_factor"] = garbage
    with pytest.raises(MessageError) as info:
        parse_message(json.dumps(doc, allow_nan=True).encode(), Manifest)
    assert info.value.field == "emulation_factor" or "emulation_factor" in str(info.value)


def test_build_is_byte_for_byte_deterministic():
    data = mlp_bytes()
    first, _ = build(data)
    second, _ = build(data)
    assert first == second
    # gzip header carries no time (bytes 4-8 are MTIME) and no file name (FLG.FNAME unset)
    assert first[4:8] == b"\x00\x00\x00\x00" and not first[3] & 0x08


def test_two_inputs_get_one_array_each_keyed_by_name():
    archive, manifest = build(two_input_bytes())
    got = members(archive)
    feeds = dict(np.load(io.BytesIO(got["smoke/input.npz"][1]), allow_pickle=False))
    expected = dict(np.load(io.BytesIO(got["smoke/expected.npz"][1]), allow_pickle=False))
    assert sorted(feeds) == ["a", "ids"]
    assert feeds["a"].shape == (1, 3) and feeds["ids"].dtype == np.int64 and feeds["ids"].shape == (1,)
    assert not feeds["ids"].any()  # integer inputs are zeros: a valid index for any table
    assert sorted(expected) == ["best", "s"]
    assert expected["best"].dtype == np.int64
    np.testing.assert_allclose(expected["s"], feeds["a"] + np.arange(3, dtype=np.float32))
    assert [s.name for s in manifest.inputs] == ["a", "ids"]


def test_smoke_input_is_seeded():
    info = validate_model(mlp_bytes(), max_bytes=1 << 20)
    a, b = smoke_inputs(info.inputs), smoke_inputs(info.inputs)
    np.testing.assert_array_equal(a["x"], b["x"])
    assert not np.array_equal(a["x"], smoke_inputs(info.inputs, seed=1)["x"])


def test_sklearn_classifier_bundle_has_label_and_probabilities():
    skl2onnx = pytest.importorskip("skl2onnx")
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.linear_model import LogisticRegression

    x = np.random.default_rng(0).standard_normal((60, 5)).astype(np.float32)
    clf = LogisticRegression().fit(x, (x[:, 0] + x[:, 1] > 0).astype(int))
    onx = skl2onnx.convert_sklearn(clf, initial_types=[("input", FloatTensorType([None, 5]))],
                                   options={id(clf): {"zipmap": False}})
    archive, manifest = build(onx.SerializeToString(), "x86-cpu")
    expected = dict(np.load(io.BytesIO(members(archive)["smoke/expected.npz"][1]), allow_pickle=False))
    feeds = dict(np.load(io.BytesIO(members(archive)["smoke/input.npz"][1]), allow_pickle=False))
    assert expected["label"].dtype == np.int64
    assert expected["probabilities"].shape == (1, 2)
    np.testing.assert_allclose(expected["probabilities"], clf.predict_proba(feeds["input"]), rtol=1e-4)
    assert expected["label"][0] == clf.predict(feeds["input"])[0]


def test_class_without_onnxruntime_is_refused():
    cls = builtin_catalog()["rpi4"].model_copy(update={"runtimes": ["litert"]})
    with pytest.raises(Invalid, match="litert"):
        build(mlp_bytes(), device_class=cls)


def test_model_over_the_class_budget_is_refused():
    cls = builtin_catalog()["rpi4"].model_copy(update={"budgets": Budgets(model_mb=0.0001)})
    with pytest.raises(Invalid, match="model budget"):
        build(mlp_bytes(), device_class=cls)


def test_model_that_cannot_run_on_its_sample_input_is_a_clear_error():
    # Reshape to a fixed [2, 4] needs N = 2, but the smoke input sets the dynamic batch to 1.
    shape = numpy_helper.from_array(np.array([2, 4], dtype=np.int64), "shape")
    data = _model([helper.make_node("Reshape", ["x", "shape"], ["y"])],
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], [shape])
    with pytest.raises(Invalid, match="smoke run failed"):
        build(data)


def test_manifest_json_is_valid_utf8_json_first_in_the_stream():
    archive, _ = build(mlp_bytes())
    raw = gzip.decompress(archive)
    first = tarfile.open(fileobj=io.BytesIO(raw)).next()
    assert first.name == "manifest.json"
    assert json.loads(tarfile.open(fileobj=io.BytesIO(raw)).extractfile(first).read())["kind"] == "manifest"
