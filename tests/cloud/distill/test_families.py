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
