"""examples/digits/teacher_cnn.py: a short training run exports an ONNX graph that matches torch, with a dynamic
batch, and writes transfer and held-out sets that the distillation pipeline accepts."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import sklearn  # noqa: F401
import torch  # noqa: F401

from examples.digits import teacher_cnn


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    return out, teacher_cnn.train_teacher(out, epochs=2, limit=256)


def test_export_matches_torch_and_takes_any_batch(trained):
    out, result = trained
    assert result["max_abs_diff"] < 1e-4
    assert result["onnx_accuracy"] == pytest.approx(result["accuracy"])
    assert result["opset"] == 17

    session = ort.InferenceSession(str(out / "teacher.onnx"), providers=["CPUExecutionProvider"])
    (inp,), (outp,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, inp.type, inp.shape[1:]) == ("input", "tensor(float)", [1, 8, 8])
    assert isinstance(inp.shape[0], str)  # dynamic batch
    assert (outp.name, outp.shape[1]) == ("logits", 10)
    held = np.load(out / "heldout.npz")
    for n in (1, 7):
        logits = session.run(None, {"input": held["x"][:n]})[0]
        assert logits.shape == (n, 10) and logits.dtype == np.float32


def test_transfer_and_heldout_sets_are_disjoint_images_with_labels(trained):
    out, result = trained
    transfer, held = np.load(out / "transfer.npz"), np.load(out / "heldout.npz")
    for part, n in ((transfer, 256), (held, result["n_heldout"])):
        assert part["x"].dtype == np.float32 and part["x"].shape == (n, 1, 8, 8)
        assert part["y"].dtype == np.int64 and part["y"].shape == (n,)
        assert 0 <= part["x"].min() and part["x"].max() <= 16  # raw pixels: the teacher scales them itself
    assert result["n_heldout"] == 450  # 25 % of 1797, stratified
    x_all, _, x_held, _ = teacher_cnn.load_images()
    seen = {row.tobytes() for row in x_all}
    assert sum(row.tobytes() in seen for row in x_held) < 5  # digits has a few duplicate images, no more


def test_the_distillation_pipeline_accepts_the_outputs(trained):
    from edgefleet.cloud.distill import data
    from edgefleet.cloud.distill.spec import DistillSpec

    out, _ = trained
    spec = DistillSpec(classes=("rpi4",))
    info = data.inspect_teacher((out / "teacher.onnx").read_bytes(), spec)
    assert info.chosen_output == "logits" and info.n_out == 10
    transfer = data.load_transfer_set(out / "transfer.npz", info, spec)
    assert transfer.x.shape == (256, 1, 8, 8) and transfer.y is not None


def test_training_is_seeded():
    x, y, x_held, _ = teacher_cnn.load_images()
    a = teacher_cnn.predict_logits(teacher_cnn.fit(x[:128], y[:128], epochs=1), x_held[:16])
    b = teacher_cnn.predict_logits(teacher_cnn.fit(x[:128], y[:128], epochs=1), x_held[:16])
    np.testing.assert_array_equal(a, b)
