"""cloud/distill/train.py: KD loss, early stopping on agreement, reproducible builds, progress and cancel."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgefleet.cloud.distill.data import TransferSet, inspect_teacher, split
from edgefleet.cloud.distill.errors import DistillCancelled
from edgefleet.cloud.distill.export import run_onnx, to_onnx
from edgefleet.cloud.distill.families import candidates_for
from edgefleet.cloud.distill.spec import DistillSpec
from edgefleet.cloud.distill.teacher import teacher_outputs
from edgefleet.cloud.distill.train import predict, train_labels_only, train_student
from tests.cloud.distill.distill_teachers import digits, linear_teacher, torch_teacher

SPEC = DistillSpec(classes=("rpi4",), max_epochs=12, patience=4)


@pytest.fixture(scope="module")
def digits_case():
    x, y = digits()
    onx = torch_teacher("mlp")
    info = inspect_teacher(onx, SPEC)
    return TransferSet(x, y), teacher_outputs(onx, x, info, SPEC, None), split(len(x), SPEC)


def _agreement(module, x, t):
    return float((predict(module, x).argmax(1) == t.argmax(1)).mean())


def test_distilled_mlp_agrees_with_teacher(digits_case):
    data, targets, parts = digits_case
    cand = candidates_for([None, 64], 10, 6)[1]
    st = train_student(cand, data, targets, parts, SPEC)
    held = parts.heldout_idx
    assert st.val_agreement > 0.9 and 1 <= st.best_epoch <= st.epochs <= SPEC.max_epochs
    assert _agreement(st.module, data.x[held], targets.logits[held]) > 0.9
    assert [h["epoch"] for h in st.history] == list(range(1, st.epochs + 1))
    assert not st.module.training


def test_without_labels_the_soft_loss_alone_trains(digits_case):
    data, targets, parts = digits_case
    cand = candidates_for([None, 64], 10, 6)[0]
    st = train_student(cand, TransferSet(data.x, None), targets, parts, SPEC)
    assert st.val_agreement > 0.85


def test_same_seed_same_onnx_bytes_other_seed_differs(digits_case):
    data, targets, parts = digits_case
    cand = candidates_for([None, 64], 10, 6)[0]
    spec = DistillSpec(classes=("rpi4",), max_epochs=3, patience=3)
    a = to_onnx(train_student(cand, data, targets, parts, spec).module, [None, 64])
    b = to_onnx(train_student(cand, data, targets, parts, spec).module, [None, 64])
    assert a == b
    other = DistillSpec(classes=("rpi4",), max_epochs=3, patience=3, seed=1)
    c = to_onnx(train_student(cand, data, targets, parts, other).module, [None, 64])
    assert c != a


def test_cnn_student_is_reproducible_too():
    x, y = digits()
    x = x.reshape(-1, 1, 8, 8)[:400]
    onx = torch_teacher("cnn")
    spec = DistillSpec(classes=("rpi4",), max_epochs=2, patience=2)
    targets = teacher_outputs(onx, x, inspect_teacher(onx, spec), spec, None)
    parts = split(len(x), spec)
    cand = candidates_for([None, 1, 8, 8], 10, 6)[2]
    first = train_student(cand, TransferSet(x, y[:400]), targets, parts, spec)
    second = train_student(cand, TransferSet(x, y[:400]), targets, parts, spec)
    np.testing.assert_array_equal(predict(first.module, x), predict(second.module, x))


def test_early_stopping_keeps_the_best_epoch(digits_case):
    data, targets, parts = digits_case
    cand = candidates_for([None, 64], 10, 6)[0]
    spec = DistillSpec(classes=("rpi4",), max_epochs=200, patience=2, learning_rate=0.05)
    st = train_student(cand, data, targets, parts, spec)
    assert st.val_agreement == max(h["val_agreement"] for h in st.history)
    first_best = next(h["epoch"] for h in st.history if h["val_agreement"] == st.val_agreement)
    assert st.epochs < 200 and st.epochs - first_best == 2  # stopped `patience` epochs after agreement last rose
    val = parts.val_idx
    assert _agreement(st.module, data.x[val], targets.logits[val]) == pytest.approx(st.val_agreement)


def test_ties_on_agreement_go_to_the_lower_validation_loss(digits_case):
    """Of the epochs that reach the best validation agreement, the one kept has the lowest validation loss (the kept
    weights give that loss again); patience still counts from the epoch where agreement last rose."""
    import torch.nn.functional as F

    from edgefleet.cloud.distill.data import Split

    data, targets, parts = digits_case
    parts = Split(parts.train_idx, parts.val_idx[:25], parts.heldout_idx)  # 25 rows: agreement in 4-point steps
    cand = candidates_for([None, 64], 10, 6)[1]
    spec = DistillSpec(classes=("rpi4",), max_epochs=30, patience=6)
    st = train_student(cand, data, targets, parts, spec)
    tied = [h for h in st.history if h["val_agreement"] == st.val_agreement]
    assert len(tied) > 1 and tied[0]["epoch"] != st.best_epoch  # the first to reach the best level is not kept
    best = min(tied, key=lambda h: h["val_loss"])
    assert best["epoch"] == st.best_epoch
    assert st.epochs == spec.max_epochs or st.epochs - tied[0]["epoch"] == spec.patience
    val = parts.val_idx
    out = torch.from_numpy(predict(st.module, data.x[val]))
    t = torch.from_numpy(targets.logits[val])
    T, a = spec.temperature, spec.alpha
    kd = F.kl_div(F.log_softmax(out / T, 1), F.log_softmax(t / T, 1), log_target=True, reduction="batchmean") * T * T
    loss = a * kd + (1 - a) * F.cross_entropy(out, torch.from_numpy(data.y[val]))
    assert float(loss) == pytest.approx(best["val_loss"], rel=1e-4)


def test_progress_and_cancel(digits_case):
    data, targets, parts = digits_case
    cand = candidates_for([None, 64], 10, 6)[0]
    seen = []
    train_student(cand, data, targets, parts, SPEC, progress=lambda stage, f: seen.append((stage, f)))
    assert seen and all(stage == f"train {cand.id}" for stage, _ in seen)
    fractions = [f for _, f in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    calls = iter([False, False, True])
    with pytest.raises(DistillCancelled, match="epoch 3"):
        train_student(cand, data, targets, parts, SPEC, should_cancel=lambda: next(calls))


def test_torch_globals_are_restored(digits_case):
    data, targets, parts = digits_case
    threads = torch.get_num_threads()
    det = torch.are_deterministic_algorithms_enabled()
    train_student(candidates_for([None, 64], 10, 6)[0], data, targets, parts,
                  DistillSpec(classes=("rpi4",), max_epochs=1))
    assert torch.get_num_threads() == threads and torch.are_deterministic_algorithms_enabled() == det


def test_kd_loss_matches_the_formula():
    """One step's loss equals alpha*T^2*KL(softmax(t/T) || softmax(s/T)) + (1-alpha)*CE(s, y) at the start."""
    import torch.nn.functional as F

    x, y = digits()
    x, y = x[:64], y[:64]
    rng = np.random.default_rng(0)
    t = rng.standard_normal((64, 10)).astype(np.float32) * 3
    spec = DistillSpec(classes=("rpi4",), max_epochs=1, batch_size=1000, temperature=3.0, alpha=0.6)

    class Targets:
        logits, n_out = t, 10

    parts = split(64, spec)
    cand = candidates_for([None, 64], 10, 6)[0]
    st = train_student(cand, TransferSet(x, y), Targets, parts, spec)
    # Recompute the loss of the single full-batch step with the weights it started from.
    from edgefleet.cloud.distill.families import build_student
    from edgefleet.cloud.distill.train import _stats, torch_settings

    with torch_settings(spec):
        mean, std = _stats(cand, x[parts.train_idx])
        net = build_student(cand, [None, 64], 10, mean, std)
        idx = torch.from_numpy(parts.train_idx)
        s = net(torch.from_numpy(x)[idx])
    T, a = 3.0, 0.6
    pt = torch.softmax(torch.from_numpy(t)[idx] / T, 1)
    kl = (pt * (pt.log() - F.log_softmax(s / T, 1))).sum(1).mean()
    expected = a * T * T * kl + (1 - a) * F.cross_entropy(s, torch.from_numpy(y)[idx])
    assert st.history[0]["train_loss"] == pytest.approx(float(expected.detach()), rel=1e-5)


def test_regression_distils_values():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 8)).astype(np.float32)
    onx = linear_teacher((1, 8), 2)
    spec = DistillSpec(classes=("rpi4",), task="regression", max_epochs=40, patience=10)
    targets = teacher_outputs(onx, x, inspect_teacher(onx, spec), spec, None)
    parts = split(len(x), spec)
    st = train_student(candidates_for([None, 8], 2, 6)[2], TransferSet(x, None), targets, parts, spec)
    held = parts.heldout_idx
    mse = float(((predict(st.module, x[held]) - targets.logits[held]) ** 2).mean())
    assert mse < 0.1 * float(targets.logits[held].var()) and st.val_agreement <= 0


def test_labels_only_baseline(digits_case):
    data, _, parts = digits_case
    st = train_labels_only(candidates_for([None, 64], 10, 6)[1], data.x, data.y, parts, SPEC)
    held = parts.heldout_idx
    onnx_out = run_onnx(to_onnx(st.module, [None, 64]), data.x[held])
    assert float((onnx_out.argmax(1) == data.y[held]).mean()) > 0.85


def test_partly_labelled_set_trains_and_masks_unlabelled_rows():
    """-1 marks an unlabelled row: the hard term sees only labelled rows, and a batch with none stays finite."""
    import numpy as np
    import torch

    from edgefleet.cloud.distill.train import train_student as _train

    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 6)).astype(np.float32)
    w = rng.normal(size=(6, 3)).astype(np.float32)
    logits = x @ w
    y = logits.argmax(1).astype(np.int64)
    y_part = np.full_like(y, -1)
    y_part[:12] = y[:12]  # 10% labelled
    from edgefleet.cloud.distill.data import TransferSet
    from edgefleet.cloud.distill.data import split as _split
    from edgefleet.cloud.distill.families import Candidate
    from edgefleet.cloud.distill.spec import DistillSpec
    from edgefleet.cloud.distill.teacher import TeacherOutputs

    spec = DistillSpec(classes=("x86-cpu",), max_epochs=3, patience=3, batch_size=8)
    parts = _split(len(x), spec)
    out = _train(Candidate("mlp", 0.5, 1), TransferSet(x, y_part), TeacherOutputs(logits, "logits"), parts, spec)
    assert np.isfinite(out.val_agreement) and all(np.isfinite(h.get("loss", 0.0)) for h in out.history)
    assert isinstance(out.module, torch.nn.Module)
