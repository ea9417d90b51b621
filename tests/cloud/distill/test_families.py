"""cloud/distill/families.py: the family follows the input's rank; grids run smallest first; students run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgefleet.cloud.distill.errors import DistillInputError
from edgefleet.cloud.distill.families import Candidate, build_student, candidates_for, channels_last, family_for


@pytest.mark.parametrize("shape, family", [([None, 64], "mlp"), ([None, 3, 100], "cnn1d"),
                                           ([None, 1, 8, 8], "dscnn2d"), (["batch", 28, 28, 1], "dscnn2d")])
def test_family_by_rank(shape, family):
    assert family_for(shape) == family
    cands = candidates_for(shape, 10, 6)
    # Small fixed inputs (at most SMALL_INPUT_FEATURES values) also get MLP candidates over the flat vector; the cap
    # of 6 applies per family.
    assert {c.family for c in cands} <= {family, "mlp"}
    assert sum(c.family == family for c in cands) == 6 and sum(c.family == "mlp" for c in cands) in (0, 6)


@pytest.mark.parametrize("shape", [[None], [None, 1, 2, 3, 4], [None, 1, 2, 3, 4, 5]])
def test_other_ranks_are_refused(shape):
    with pytest.raises(DistillInputError, match=f"rank {len(shape)}"):
        candidates_for(shape, 10, 6)


@pytest.mark.parametrize("shape", [[None, 64], [None, 1, 8, 8], [None, 2, 50]])
def test_grid_runs_smallest_to_largest_and_is_trimmed(shape):
    def params(c):
        return sum(p.numel() for p in build_student(c, shape, 10).parameters())

    cands = candidates_for(shape, 10, 6)
    sizes = [params(c) for c in cands]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]
    trimmed = candidates_for(shape, 10, 2)
    for family in {c.family for c in cands}:  # the cap keeps each family's smallest
        assert [c for c in trimmed if c.family == family] == [c for c in cands if c.family == family][:2]
    assert len({c.id for c in cands}) == len(cands)


def test_channels_last_detection():
    assert channels_last([None, 28, 28, 1]) and channels_last([None, 32, 32, 3])
    assert not channels_last([None, 1, 8, 8]) and not channels_last([None, 3, 32, 32])


@pytest.mark.parametrize("shape", [[None, 64], [None, 1, 8, 8], [None, 8, 8, 1], [None, 2, 50]])
def test_students_map_inputs_to_n_out(shape):
    for c in candidates_for(shape, 7, 6):
        net = build_student(c, shape, 7).eval()
        with torch.no_grad():
            out = net(torch.zeros(3, *shape[1:]))
        assert out.shape == (3, 7), c


def test_standardisation_buffers_scale_raw_inputs():
    mean, std = np.full(64, 8.0, np.float32), np.full(64, 4.0, np.float32)
    std[0] = 0.0  # a constant feature divides by 1, not by 0
    c = Candidate("mlp", 0.25, 1, (16,))
    net = build_student(c, [None, 64], 10, mean, std)
    scale = net[0]
    x = torch.full((1, 64), 12.0)
    z = scale(x)
    assert torch.allclose(z[0, 1:], torch.ones(63)) and z[0, 0] == 4.0


def test_small_images_and_signals_are_also_tried_flat():
    """An 8x8 image (64 values) gets MLP candidates beside the DS-CNNs; a 3x64x64 image (12288) does not."""
    small = candidates_for([None, 1, 8, 8], 10, 64)
    assert {c.family for c in small} == {"dscnn2d", "mlp"}
    assert {c.family for c in candidates_for([None, 3, 64, 64], 10, 64)} == {"dscnn2d"}
    assert {c.family for c in candidates_for(["N", 1, "T"], 10, 64)} == {"cnn1d"}  # dynamic length: no flat MLP
    mlp = next(c for c in small if c.family == "mlp")
    module = build_student(mlp, [None, 1, 8, 8], 10, x_mean=np.zeros(64), x_std=np.ones(64))
    assert module(torch.zeros(5, 1, 8, 8)).shape == (5, 10)


@pytest.mark.parametrize("shape", [[None, 30], [None, 1, 8, 8], [None, 8, 8, 1], [None, 2, 128], [None, 3, 12],
                                   [None, 1, 40]])
def test_param_estimate_is_the_built_count(shape):
    """The grid is sorted by `_param_estimate`: it must count exactly what `build_student` makes, kernels included."""
    from edgefleet.cloud.distill.families import _param_estimate

    for c in candidates_for(shape, 6, 6):
        built = sum(p.numel() for p in build_student(c, shape, 6).parameters())
        assert _param_estimate(c, [1 if s is None else s for s in shape], 6) == built, c


def test_cnn1d_stem_strides_long_signals_only():
    c = next(c for c in candidates_for([None, 2, 128], 6, 6) if c.family == "cnn1d")
    long_stem = next(m for m in build_student(c, [None, 2, 128], 6) if isinstance(m, torch.nn.Conv1d))
    short_stem = next(m for m in build_student(c, [None, 2, 12], 6) if isinstance(m, torch.nn.Conv1d))
    assert long_stem.stride == (2,) and long_stem.kernel_size == (7,) and short_stem.stride == (1,)
    assert build_student(c, [None, 2, 128], 6)(torch.zeros(2, 2, 128)).shape == (2, 6)
    assert build_student(c, ["N", 2, "T"], 6)(torch.zeros(2, 2, 300)).shape == (2, 6)  # any length


def test_every_1d_candidate_costs_less_than_a_modest_signal_teacher():
    """The 1-D grid once held students of 2.8x the MACs of a 3-layer signal CNN; now even its largest is cheaper."""
    from edgefleet.cloud.distill import costmodel
    from edgefleet.cloud.distill.export import to_onnx
    from tests.cloud.distill.distill_teachers import SIGNAL_SHAPE, signal_teacher_net, torch_onnx

    teacher_macs = costmodel.count_ops(torch_onnx(signal_teacher_net(), (1, *SIGNAL_SHAPE)), list(SIGNAL_SHAPE)).macs
    shape = [None, *SIGNAL_SHAPE]
    macs = {c.id: costmodel.count_ops(to_onnx(build_student(c, shape, 6).eval(), shape), list(SIGNAL_SHAPE)).macs
            for c in candidates_for(shape, 6, 6) if c.family == "cnn1d"}
    assert len(macs) == 6 and max(macs.values()) < teacher_macs, (teacher_macs, macs)
    assert sum(m * 5 <= teacher_macs for m in macs.values()) >= 4  # most of the grid is 5x cheaper or more


def test_a_1d_student_with_5x_fewer_macs_stays_within_reach_of_the_signal_teacher():
    """A real signal teacher (tests' 3-layer 1-D CNN on the synthetic event task) and the 1-D family's w0.75-d2
    student, distilled on the teacher's 1500 rows and scored on 600 signals no model saw. The bench measures the
    1-point claim on 1000 test signals (bench/distill.py `families`); here, with a shorter training, the student
    must come within 2 points at 5x fewer MACs or more (measured: teacher 94.0 %, student 94.7 % at 53k MACs, 7.0x
    fewer)."""
    from edgefleet.cloud.distill import costmodel
    from edgefleet.cloud.distill.data import TransferSet, inspect_teacher, split
    from edgefleet.cloud.distill.export import run_onnx, to_onnx
    from edgefleet.cloud.distill.spec import DistillSpec
    from edgefleet.cloud.distill.teacher import teacher_outputs
    from edgefleet.cloud.distill.train import train_student
    from tests.cloud.distill.distill_teachers import SIGNAL_SHAPE, signal_task, signal_teacher

    x, y = signal_task(2100)
    x_fit, y_fit, x_test, y_test = x[:1500], y[:1500], x[1500:], y[1500:]
    teacher = signal_teacher(x_fit, y_fit, epochs=15)
    spec = DistillSpec(classes=("x86-cpu",), learning_rate=1e-2, max_epochs=40, patience=8)
    targets = teacher_outputs(teacher, x_fit, inspect_teacher(teacher, spec), spec, None)
    cand = next(c for c in candidates_for([None, *SIGNAL_SHAPE], 6, 6) if c.id == "cnn1d-w0.75-d2")
    student = to_onnx(train_student(cand, TransferSet(x_fit, y_fit), targets, split(1500, spec), spec).module,
                      [None, *SIGNAL_SHAPE])
    accuracy = {name: float((run_onnx(model, x_test).argmax(1) == y_test).mean())
                for name, model in (("teacher", teacher), ("student", student))}
    macs = {name: costmodel.count_ops(model, list(SIGNAL_SHAPE)).macs
            for name, model in (("teacher", teacher), ("student", student))}
    assert macs["teacher"] >= 5 * macs["student"], macs
    assert accuracy["student"] >= accuracy["teacher"] - 0.02, accuracy
    assert accuracy["teacher"] > 0.85, accuracy  # a non-trivial task the teacher has learnt
