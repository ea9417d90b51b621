"""cloud/inference/pool.py: real ONNX Runtime sessions behind a real resolver; answers equal bare onnxruntime."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from edgefleet.cloud.errors import Invalid, NotFound, TooLarge
from edgefleet.cloud.inference.pool import ModelPool
from edgefleet.cloud.inference.variants import VariantResolver
from edgefleet.cloud.services import Fleet
from edgefleet.cloud.settings import Settings
from tests.cloud.inference import add_distilled, bare_run, mlp_onnx

X = np.random.default_rng(3).standard_normal((5, 64)).astype(np.float32)


@pytest.fixture
def fleet(tmp_path):
    f = Fleet.from_settings(Settings(data_dir=tmp_path / "data"))
    try:
        yield f
    finally:
        f.close()


def test_infer_equals_bare_onnxruntime(fleet):
    model = mlp_onnx(1)
    fleet.push_model("digits", model)
    pool = ModelPool(VariantResolver(fleet))
    got = pool.infer("digits", None, {"x": X})
    assert (got.model_name, got.model_version, got.variant, list(got.outputs)) == ("digits", "1", "version", ["probs"])
    assert np.array_equal(got.outputs["probs"], bare_run(model, {"x": X})["probs"])
    assert pool.ready("digits", "1") and not pool.ready("digits", "2") and not pool.ready("other", None)


def test_teacher_answers_a_distilled_version_and_the_setting_switches_it(fleet):
    teacher, student = mlp_onnx(7, hidden=48), mlp_onnx(8)
    row = add_distilled(fleet, "digits", student, teacher)
    by_teacher = ModelPool(VariantResolver(fleet, "teacher")).infer("digits", str(row.version), {"x": X})
    by_version = ModelPool(VariantResolver(fleet, "version")).infer("digits", str(row.version), {"x": X})
    assert by_teacher.variant == "teacher" and by_version.variant == "version"
    assert np.array_equal(by_teacher.outputs["probs"], bare_run(teacher, {"x": X})["probs"])
    assert np.array_equal(by_version.outputs["probs"], bare_run(student, {"x": X})["probs"])
    assert not np.array_equal(by_teacher.outputs["probs"], by_version.outputs["probs"])


def test_bad_tensors_are_invalid_naming_the_signature(fleet):
    fleet.push_model("digits", mlp_onnx(1))
    pool = ModelPool(VariantResolver(fleet), max_input_bytes=64 * 4 * 10)
    sig = r"the model takes x FP32 \[-1, 64\]"
    with pytest.raises(Invalid, match=r"unknown input 'y'; " + sig):
        pool.infer("digits", None, {"y": X})
    with pytest.raises(Invalid, match=r"input 'x': shape \[5, 63\] does not fit; " + sig):
        pool.infer("digits", None, {"x": X[:, :63]})
    with pytest.raises(Invalid, match=r"input 'x': datatype FP64, but " + sig):
        pool.infer("digits", None, {"x": X.astype(np.float64)})
    with pytest.raises(Invalid, match=r"unknown output 'nope'; the model's outputs are probs FP32 \[-1, 10\]"):
        pool.infer("digits", None, {"x": X}, outputs=["nope"])
    with pytest.raises(TooLarge, match="over the server's limit of 2560; send fewer rows"):
        pool.infer("digits", None, {"x": np.zeros((11, 64), np.float32)})
    with pytest.raises(NotFound, match="no model 'other'"):
        pool.infer("other", None, {"x": X})


def test_metadata_is_the_oip_model_metadata(fleet):
    fleet.push_model("digits", mlp_onnx(1))
    fleet.push_model("digits", mlp_onnx(2))
    pool = ModelPool(VariantResolver(fleet))
    assert pool.metadata("digits", None) == {
        "name": "digits", "versions": ["1", "2"], "platform": "onnxruntime_onnx",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 64]}],
        "outputs": [{"name": "probs", "datatype": "FP32", "shape": [-1, 10]}]}
    assert pool.metadata("digits", "1")["versions"] == ["1"]


def test_sessions_are_shared_per_file_and_kept_in_an_lru(fleet):
    for seed in (1, 2, 3):
        fleet.push_model(f"m{seed}", mlp_onnx(seed))
    fleet.push_model("again", mlp_onnx(1))  # the same bytes as m1: one session
    pool = ModelPool(VariantResolver(fleet), max_loaded=2)
    for name in ("m1", "again"):
        pool.infer(name, None, {"x": X})
    assert len(pool._loaded) == 1
    for name in ("m2", "m3"):
        pool.infer(name, None, {"x": X})
    assert len(pool._loaded) == 2
    assert np.array_equal(pool.infer("m1", None, {"x": X}).outputs["probs"],
                          bare_run(mlp_onnx(1), {"x": X})["probs"])  # evicted, loaded again


def test_concurrent_callers_each_get_their_own_answer(fleet):
    model = mlp_onnx(1)
    fleet.push_model("digits", model)
    pool = ModelPool(VariantResolver(fleet))
    rows = [np.random.default_rng(i).standard_normal((1, 64)).astype(np.float32) for i in range(16)]
    got: dict[int, np.ndarray] = {}

    def call(i: int) -> None:
        for _ in range(20):
            got[i] = pool.infer("digits", None, {"x": rows[i]}).outputs["probs"]

    threads = [threading.Thread(target=call, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, x in enumerate(rows):
        assert np.array_equal(got[i], bare_run(model, {"x": x})["probs"])
