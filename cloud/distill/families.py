"""Student families, chosen by the rank of the teacher's input, and the small grid of sizes tried per family.

Theory: the input's shape says which inductive bias is cheap and right. [N, F] is tabular or flattened: an MLP.
An image or signal of at most `SMALL_INPUT_FEATURES` values is also tried flattened through the MLP grid.
[N, C, H, W] is an image: a stem convolution then depthwise-separable blocks (a 3x3 depthwise plus a 1x1 pointwise
costs about 1/9 + 1/C_out of a full 3x3 convolution, the MobileNet trade), widened by `width_mult` and deepened by
`depth`, ending in global average pooling so any H, W works. [N, C, T] is a signal: the same with 1-D convolutions,
but a 7-tap stem that strides by 2 (once the signal is longer than 16 samples) and 9-tap depthwise filters: in 1-D a
depthwise tap costs what one more pointwise channel costs (C*T MACs), so a long kernel buys the receptive field an
event of tens of samples needs almost free, where wider channels pay C*C'*T in every pointwise layer.
A channels-last image ([N, H, W, C], what Keras exports) is permuted inside the student, so the student's ONNX
takes exactly the teacher's input. Every student standardises its input with the training set's mean and std held
as buffers, so it accepts the teacher's raw values (digits' 0..16 pixels) and the ONNX graph carries the scaling.

The grid runs smallest to largest (by parameter count), so `max_candidates` trims the large end. Torch is imported
inside `build_student` only: the API server inspects candidates without loading it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from edgefleet.cloud.distill.errors import DistillInputError

Family = Literal["mlp", "dscnn2d", "cnn1d"]

# (width_mult, depth) per family, smallest first. MLP base width 64, conv base width 16: digits-sized problems reach
# the teacher's agreement by about the middle of each grid, and the ends bracket the budget trade-off. The MLP grid
# tops out at 96-96 (16.8k MACs on 64 inputs, 150x fewer than the digits teacher CNN) rather than 128-128 (26.5k,
# 96x): as accurate on digits (98.0-98.9 % against 98.4-99.3 %, 3 seeds, 3000 synthetic rows) and inside the
# 100x aim. The 1-D grid has a 0.75 width between 0.5 and 1.0 and no 2.0: its sweet spot (see `_KERNELS`).
_GRIDS: dict[str, list[tuple[float, int]]] = {
    "mlp": [(0.25, 1), (0.5, 1), (1.0, 1), (0.5, 2), (1.0, 2), (1.5, 2)],
    "dscnn2d": [(0.25, 1), (0.5, 1), (0.5, 2), (1.0, 2), (1.0, 3), (2.0, 3)],
    "cnn1d": [(0.25, 1), (0.5, 1), (0.5, 2), (0.75, 2), (1.0, 2), (1.0, 3)],
}
_MLP_BASE = 64
_CONV_BASE = 16
# (stem kernel, depthwise kernel). Measured on the 1-D signal teacher of tests/cloud/distill/distill_teachers.py
# (372k MACs, 95.6 % on 1000 test signals; bench/distill.py `families`): the former 1-D design (5-tap, unstrided
# stem, widths doubling from 16) needed w1-d2, 149k MACs (2.5x fewer than the teacher), for 94.4 %, and its largest
# candidate cost 2.8x the teacher; with a strided 7-tap stem and 9-tap depthwise filters w0.75-d2 reaches 95.0-96.3 %
# (3 seeds) at 53k MACs (7x fewer), w0.5-d2 94.4-95.4 % at 30k (12.6x). A stem stride of 4 lost 2-3 points.
_KERNELS = {"dscnn2d": (3, 3), "cnn1d": (7, 9)}
# A 1-D stem strides by 2 once the signal is longer than this (every later layer then runs on half the samples).
_STRIDED_STEM_FROM = 16


def _stem_stride(family: str, size: int) -> int:
    return 2 if family == "cnn1d" and size > _STRIDED_STEM_FROM else 1


@dataclass(frozen=True)
class Candidate:
    family: Family
    width_mult: float
    depth: int
    hidden: tuple[int, ...] = ()  # MLP hidden widths, or conv channels per stage

    @property
    def id(self) -> str:
        return f"{self.family}-w{self.width_mult:g}-d{self.depth}"


def family_for(input_shape: tuple | list) -> Family:
    rank = len(input_shape)
    if rank == 2:
        return "mlp"
    if rank == 3:
        return "cnn1d"
    if rank == 4:
        return "dscnn2d"
    raise DistillInputError(
        f"teacher input has rank {rank} (shape {list(input_shape)}); students exist for [N, F] (MLP), [N, C, T] "
        "(1-D CNN) and [N, C, H, W] or [N, H, W, C] (2-D CNN): reshape the input to one of these when exporting "
        "the teacher"
    )


def channels_last(input_shape: tuple | list) -> bool:
    """[N, H, W, C] (Keras/tf2onnx) rather than [N, C, H, W]: a last dim of 1-4 channels after a larger dim 1."""
    if len(input_shape) != 4:
        return False
    c_last, d1 = input_shape[3], input_shape[1]
    return isinstance(c_last, int) and c_last <= 4 and (not isinstance(d1, int) or d1 > 4)


def _widths(family: str, w: float, depth: int) -> tuple[int, ...]:
    if family == "mlp":
        return tuple(max(4, int(round(_MLP_BASE * w))) for _ in range(depth))
    # Conv stages: a stem of base*w channels, then each block doubles it (capped at 8x), as strides shrink the map.
    stem = max(4, int(round(_CONV_BASE * w)))
    return tuple(min(stem * 2 ** i, stem * 8) for i in range(depth + 1))


# An image or signal this small (digits' 8x8 = 64 values) is also tried as a flat vector: an MLP over 64 inputs
# costs a few thousand MACs where the smallest DS-CNN costs tens of thousands (the convolutions run at every pixel),
# and on such inputs it is about as accurate (measured on digits: bench/distill.py).
SMALL_INPUT_FEATURES = 1024


def flat_features(input_shape: tuple | list) -> int | None:
    """Values per sample when every non-batch dimension is fixed, else None."""
    dims = list(input_shape[1:])
    if not dims or not all(isinstance(d, int) and d > 0 for d in dims):
        return None
    return int(np.prod(dims))


def candidates_for(input_shape: tuple | list, n_out: int, max_candidates: int) -> list[Candidate]:
    """The grid for this input (shape with batch first), smallest first, at most `max_candidates` per family."""
    family = family_for(input_shape)
    if n_out < 1:
        raise DistillInputError(f"teacher output width {n_out} is not usable; a student needs at least one output")
    shape = [1 if not isinstance(s, int) or s <= 0 else s for s in input_shape]

    def grid_of(fam: str) -> list[Candidate]:
        grid = [Candidate(fam, w, d, _widths(fam, w, d)) for w, d in _GRIDS[fam]]  # type: ignore[arg-type]
        grid.sort(key=lambda c: (_param_estimate(c, shape, n_out), c.depth, c.width_mult))
        return grid[:max_candidates]

    grid = grid_of(family)
    flat = flat_features(input_shape)
    if family != "mlp" and flat is not None and flat <= SMALL_INPUT_FEATURES:
        # The cap applies per family: flat MLPs must not crowd the larger, more accurate CNNs out of the grid.
        grid += grid_of("mlp")
        grid.sort(key=lambda c: (_param_estimate(c, shape, n_out), c.depth, c.width_mult))
    return grid


def _param_estimate(c: Candidate, shape: list[int], n_out: int) -> int:
    """The student's trainable parameter count, exactly as `build_student` makes it (so mixed grids sort right)."""
    if c.family == "mlp":
        sizes = [int(np.prod(shape[1:])), *c.hidden, n_out]
        return sum(a * b + b for a, b in zip(sizes, sizes[1:]))
    stem_k, k = _KERNELS[c.family]
    if c.family == "dscnn2d":
        stem_k, k = stem_k * stem_k, k * k
    cin = shape[3] if channels_last(shape) else shape[1]
    stem = c.hidden[0]
    total = cin * stem * stem_k + 2 * stem  # stem convolution (no bias) and its batch norm
    for a, b in zip(c.hidden, c.hidden[1:]):
        total += a * k + 2 * a + a * b + 2 * b  # depthwise + BN, pointwise + BN
    return total + c.hidden[-1] * n_out + n_out


def _in_channels(input_shape: tuple | list) -> int:
    dim = input_shape[3] if channels_last(input_shape) else input_shape[1]
    if not isinstance(dim, int) or dim <= 0:
        raise DistillInputError(f"the channel dimension of input shape {list(input_shape)} must be fixed")
    return dim


def build_student(c: Candidate, input_shape: tuple | list, n_out: int,
                  x_mean: np.ndarray | None = None, x_std: np.ndarray | None = None):
    """A torch module for `c`. `x_mean`/`x_std` (per feature for the MLP, per channel for CNNs) become buffers."""
    import torch
    from torch import nn

    class Standardize(nn.Module):
        def __init__(self, size: int, view: tuple[int, ...]):
            super().__init__()
            mean = np.zeros(size, np.float32) if x_mean is None else np.asarray(x_mean, np.float32).reshape(size)
            std = np.ones(size, np.float32) if x_std is None else np.asarray(x_std, np.float32).reshape(size)
            # A constant feature (digits' always-zero corner pixels) has std 0: divide by 1 there, not by 0.
            std = np.where(std < 1e-6, 1.0, std).astype(np.float32)
            self.register_buffer("mean", torch.from_numpy(mean).reshape(view))
            self.register_buffer("inv_std", torch.from_numpy(1.0 / std).reshape(view))

        def forward(self, x):
            return (x - self.mean) * self.inv_std

    class Permute(nn.Module):
        def forward(self, x):
            return x.permute(0, 3, 1, 2)

    def sep_block(cin: int, cout: int, stride: int, conv, bn, k: int) -> list:
        pad = k // 2
        return [conv(cin, cin, k, stride=stride, padding=pad, groups=cin, bias=False), bn(cin), nn.ReLU(),
                conv(cin, cout, 1, bias=False), bn(cout), nn.ReLU()]

    if c.family == "mlp":
        features = flat_features(input_shape) if len(input_shape) > 2 else int(input_shape[1])
        if features is None:
            raise DistillInputError(f"an MLP student needs fixed input dimensions, got {list(input_shape)}")
        # A small image or signal is flattened first (any layout: an MLP does not care about the order).
        layers: list = [nn.Flatten()] if len(input_shape) > 2 else []
        layers.append(Standardize(features, (1, features)))
        sizes = [features, *c.hidden]
        for a, b in zip(sizes, sizes[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(sizes[-1], n_out))
        return nn.Sequential(*layers)

    cin = _in_channels(input_shape)
    if c.family == "dscnn2d":
        conv, bn, pool = nn.Conv2d, nn.BatchNorm2d, nn.AdaptiveAvgPool2d
        spatial = list(input_shape[1:3] if channels_last(input_shape) else input_shape[2:4])
        view: tuple[int, ...] = (1, cin, 1, 1)
    else:
        conv, bn, pool = nn.Conv1d, nn.BatchNorm1d, nn.AdaptiveAvgPool1d
        spatial = [input_shape[2]]
        view = (1, cin, 1)
    stem_k, k = _KERNELS[c.family]
    size = min((s for s in spatial if isinstance(s, int) and s > 0), default=32)
    stem_stride = _stem_stride(c.family, size)
    layers = [Permute()] if channels_last(input_shape) else []
    layers.append(Standardize(cin, view))
    stem = c.hidden[0]
    layers += [conv(cin, stem, stem_k, stride=stem_stride, padding=stem_k // 2, bias=False), bn(stem), nn.ReLU()]
    size = (size + stem_stride - 1) // stem_stride
    for a, b in zip(c.hidden, c.hidden[1:]):
        # Stride 2 while the map is still larger than 4: an 8x8 digit goes 8 -> 4, then keeps its size.
        stride = 2 if size > 4 else 1
        size = (size + 1) // 2 if stride == 2 else size
        layers += sep_block(a, b, stride, conv, bn, k)
    layers += [pool(1), nn.Flatten(), nn.Linear(c.hidden[-1], n_out)]
    return nn.Sequential(*layers)


__all__ = ["Candidate", "Family", "build_student", "candidates_for", "channels_last", "family_for", "flat_features"]
