"""Synthetic training rows for small transfer sets, labelled by the teacher: MUNGE for tables, mixup, shifts and
noise for signals and images.

Theory: a student learns the teacher's function only where the transfer set has points. With 100-200 rows a small
net fits those points and is free to do anything between them; the teacher, though, can label as many inputs as we
make. Bucila, Caruana and Niculescu-Mizil (2006, "Model compression", KDD, section 4.3 and Algorithm 2) make them
with MUNGE, which draws near the data's own manifold rather than from a box around it:

    for pass in 1..k:                                  (k = the size multiplier)
        T' <- a copy of the training rows
        for each example e in T':
            e' <- the example of T' closest to e
            for each attribute a, with probability p:
                continuous: sd = |e_a - e'_a| / s;  e_a <- norm(e'_a, sd),  e'_a <- norm(e_a, sd)
                nominal:    swap e_a and e'_a
        D <- D + T'

As in the paper both examples change in place (e' too), and later nearest-neighbour searches of the pass see the
changed rows; the two draws use the values from before the step, so a continuous attribute is a swap blurred by a
normal of width |e_a - e'_a| / s, as a nominal one is a plain swap. The distance is Euclidean over the continuous
attributes standardised by their spread (so a feature in thousands does not drown one in fractions), plus 1 for each
nominal attribute that differs. A column whose training values are whole numbers of at most `NOMINAL_MAX_VALUES`
kinds (flags, one-hot codes, small counts) is nominal: swapped, never blurred into values it cannot take. `p` and `s`
are the paper's two knobs (`MUNGE_P`, `MUNGE_S`: p = 0.5, s = 10 here); the last pass is cut short at the count.

Signals [N, C, T] and images [N, C, H, W] get no nearest neighbours (a distance between raw waveforms or pixel grids
says little of their likeness). A third of the synthetic rows are mixup (Zhang et al. 2018: lambda x_i + (1 -
lambda) x_j, lambda ~ Beta(1, 1), random pairs, so many cross a class boundary, where the teacher's soft targets
teach most), a third are shifted by up to an eighth of each axis (one pixel of an 8x8 digit), the rest carry
Gaussian noise of `NOISE_SIGMA` times the channel's spread. The teacher labels every synthetic input, so a shift or a
mix that changes what an input is changes its targets too. Measured on digits (the teacher CNN at 99.6 % on 450
held-out images; the 9k-MAC MLP mlp-w1-d2): 96.4 % without synthetic rows, 98.4 % with 3000 of mixup and noise
alone, 98.9-99.1 % with 2000 of mixup, shifts and noise (3 seeds; 99.1 % in bench/distill.py's run).
Values are clipped to the training range per feature (tables) or per channel: a pixel stays within 0..16.

Rows: synthetic inputs come from the TRAINING part only and go into the training part only, appended after the real
rows, so validation (early stopping) and held-out (the report) stay the user's own rows and their indices do not
move. Unlabelled synthetic rows carry y = -1 (the hard-label term skips them); regression has no such mark, so a
synthetic row's target is the teacher's own value there. `augment = "auto"` (the default) adds `augment_rows`
synthetic rows to a transfer set under `AUTO_BELOW_ROWS` rows, "on" to any, "off" to none; never more than
`MAX_MULTIPLIER` per real training row. Seeded by the spec's seed: the same spec gives the same rows (and hits the
teacher's cached outputs on them).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edgefleet.cloud.distill.data import Split, TransferSet
from edgefleet.cloud.distill.spec import DistillSpec
from edgefleet.cloud.distill.teacher import TeacherOutputs

MUNGE_P = 0.5  # probability that an attribute is swapped with the neighbour's
MUNGE_S = 10.0  # the blur's width is |e_a - e'_a| / s: a tenth of the gap keeps the draw near the two rows
NOMINAL_MAX_VALUES = 10
MIXUP_ALPHA = 1.0  # Beta(1, 1): lambda uniform on [0, 1]
NOISE_SIGMA = 0.1
SHIFT_SHARE = 0.125  # an eighth of each axis: one pixel of an 8x8 digit, 16 samples of a 128-sample signal
AUTO_BELOW_ROWS = 1000  # "auto" augments transfer sets smaller than this
MAX_MULTIPLIER = 20  # at most this many synthetic rows per real training row: past it MUNGE mostly re-blurs itself
_SEED_SALT = 0x5EED  # augmentation's own random stream, apart from the split's and training's


@dataclass(frozen=True)
class Augmentation:
    method: str  # "munge", "mixup+shift+noise" or "none"
    n_real_train: int
    n_synthetic: int
    reason: str


def synthetic_count(n_rows: int, n_train: int, spec: DistillSpec) -> tuple[int, str]:
    """How many synthetic rows to add for a transfer set of `n_rows` whose training part has `n_train`, and why."""
    if spec.augment == "off":
        return 0, "augment is off"
    if spec.augment == "auto" and n_rows >= AUTO_BELOW_ROWS:
        return 0, f"{n_rows} transfer rows, at least {AUTO_BELOW_ROWS}: no synthetic rows (augment 'on' adds them)"
    n = min(spec.augment_rows, MAX_MULTIPLIER * n_train)
    why = "augment is on" if spec.augment == "on" else f"{n_rows} transfer rows, fewer than {AUTO_BELOW_ROWS}"
    capped = f" (capped at {MAX_MULTIPLIER}x the {n_train} real training rows)" if n < spec.augment_rows else ""
    return n, f"{why}: {n} synthetic training rows{capped}"


def _nominal_columns(x: np.ndarray) -> np.ndarray:
    whole = np.all(x == np.round(x), axis=0)
    few = np.array([len(np.unique(col)) <= NOMINAL_MAX_VALUES for col in x.T])
    return whole & few


def munge(x: np.ndarray, n: int, rng: np.random.Generator, p: float = MUNGE_P, s: float = MUNGE_S) -> np.ndarray:
    """`n` MUNGE rows from the tabular rows `x` [N, F] (Algorithm 2 of Bucila et al. 2006; as many passes as needed,
    the last one cut short)."""
    x = np.asarray(x, np.float64)
    rows, features = x.shape
    if rows < 2 or n <= 0:
        return np.empty((0, features), np.float32)
    nominal = _nominal_columns(x)
    cont = ~nominal
    spread = x.std(axis=0)
    inv = np.where(spread > 0, 1.0 / np.where(spread > 0, spread, 1.0), 0.0)
    out = []
    for _ in range(-(-n // rows)):
        t = x.copy()
        for i in range(rows):
            gap = (t[:, cont] - t[i, cont]) * inv[cont]
            dist = np.einsum("ij,ij->i", gap, gap) + (t[:, nominal] != t[i, nominal]).sum(axis=1)
            dist[i] = np.inf
            j = int(np.argmin(dist))
            e, e2 = t[i].copy(), t[j].copy()
            pick = rng.random(features) < p
            sd = np.abs(e - e2) / s
            draw_e, draw_e2 = rng.normal(e2, sd), rng.normal(e, sd)
            blur, swap = pick & cont, pick & nominal
            t[i, blur], t[j, blur] = draw_e[blur], draw_e2[blur]
            t[i, swap], t[j, swap] = e2[swap], e[swap]
        out.append(t)
    synth = np.concatenate(out)[:n]
    return np.clip(synth, x.min(axis=0), x.max(axis=0)).astype(np.float32)


def mixup_shift_noise(x: np.ndarray, n: int, rng: np.random.Generator, alpha: float = MIXUP_ALPHA,
                      sigma: float = NOISE_SIGMA, channel_axis: int = 1) -> np.ndarray:
    """`n` rows from signals or images `x` [N, C, ...] (channels-last: `channel_axis=-1`): a third mixup of random
    pairs, a third shifted, the rest with Gaussian noise of `sigma` times each channel's spread."""
    x = np.asarray(x, np.float32)
    if len(x) < 2 or n <= 0:
        return np.empty((0, *x.shape[1:]), np.float32)
    channel_axis %= x.ndim
    axes = tuple(a for a in range(x.ndim) if a != channel_axis)
    lo, hi = x.min(axis=axes, keepdims=True), x.max(axis=axes, keepdims=True)
    n_mix = n_shift = n // 3
    i, j = rng.integers(0, len(x), n_mix), rng.integers(0, len(x), n_mix)
    lam = rng.beta(alpha, alpha, n_mix).astype(np.float32).reshape(-1, *([1] * (x.ndim - 1)))
    mixed = lam * x[i] + (1 - lam) * x[j]
    shifted = shift(x[rng.integers(0, len(x), n_shift)], rng, channel_axis)
    k = rng.integers(0, len(x), n - n_mix - n_shift)
    spread = x.std(axis=axes, keepdims=True)
    noisy = x[k] + sigma * spread * rng.standard_normal((len(k), *x.shape[1:])).astype(np.float32)
    return np.clip(np.concatenate([mixed, shifted, noisy]), lo, hi).astype(np.float32)


def shift(x: np.ndarray, rng: np.random.Generator, channel_axis: int = 1) -> np.ndarray:
    """Each row moved along every non-channel axis by a uniform whole step of at most `SHIFT_SHARE` of that axis
    (at least 1), the edge values filling in: a digit's blank border stays blank, a signal's level continues."""
    axes = [a for a in range(1, x.ndim) if a != channel_axis % x.ndim]
    reach = {a: max(1, int(x.shape[a] * SHIFT_SHARE)) for a in axes}
    pad = [(0, 0)] + [(reach[a], reach[a]) if a in reach else (0, 0) for a in range(1, x.ndim)]
    padded = np.pad(x, pad, mode="edge")
    steps = {a: rng.integers(-reach[a], reach[a] + 1, len(x)) for a in axes}
    out = np.empty_like(x)
    for r in range(len(x)):
        cut = tuple(slice(reach[a] + int(steps[a][r]), reach[a] + int(steps[a][r]) + x.shape[a]) if a in reach
                    else slice(None) for a in range(1, x.ndim))
        out[r] = padded[r][cut]
    return out


def synthesize(x_train: np.ndarray, n: int, seed: int, channels_last: bool = False) -> tuple[np.ndarray, str]:
    """(`n` synthetic inputs shaped like `x_train`'s rows, the method): MUNGE for [N, F], mixup + noise else."""
    rng = np.random.default_rng([seed, _SEED_SALT])
    if x_train.ndim == 2:
        return munge(x_train, n, rng), "munge"
    return mixup_shift_noise(x_train, n, rng, channel_axis=-1 if channels_last else 1), "mixup+shift+noise"


TeacherRun = Callable[[np.ndarray, DistillSpec], TeacherOutputs]


def extend(transfer: TransferSet, targets: TeacherOutputs, parts: Split, spec: DistillSpec,
           run_teacher: TeacherRun) -> tuple[TransferSet, TeacherOutputs, Split, Augmentation]:
    """The transfer set, teacher outputs and split with synthetic rows appended to the training part.

    `run_teacher(x, spec)` labels the synthetic inputs (the pipeline's cached `teacher_outputs`); it is handed a
    spec whose `output_kind` is what the real rows' outputs were found to be, so both are read the same way.
    """
    from edgefleet.cloud.distill.families import channels_last

    n_train = len(parts.train_idx)
    n, reason = synthetic_count(len(transfer.x), n_train, spec)
    if n == 0:
        return transfer, targets, parts, Augmentation("none", n_train, 0, reason)
    x_syn, method = synthesize(transfer.x[parts.train_idx], n, spec.seed, channels_last(transfer.x.shape))
    n = len(x_syn)
    if n == 0:
        return transfer, targets, parts, Augmentation("none", n_train, 0, "too few training rows to augment")
    kind = "logits" if targets.kind == "values" else targets.kind
    syn = run_teacher(x_syn, dataclasses.replace(spec, output_kind=kind))
    logits = np.concatenate([targets.logits, syn.logits.astype(np.float32)])
    y = transfer.y
    if y is not None:
        if spec.task == "regression":  # the label width is the teacher's (data.check_labels)
            y_syn = syn.logits.reshape(n, -1)[:, :int(np.prod(y.shape[1:]))].reshape(n, *y.shape[1:])
            y = np.concatenate([y, y_syn.astype(y.dtype)])
        else:
            y = np.concatenate([y, np.full(n, -1, dtype=y.dtype)])
    first = len(transfer.x)
    train_idx = np.concatenate([parts.train_idx, np.arange(first, first + n)])
    return (TransferSet(np.ascontiguousarray(np.concatenate([transfer.x, x_syn])), y),
            dataclasses.replace(targets, logits=logits), Split(train_idx, parts.val_idx, parts.heldout_idx),
            Augmentation(method, n_train, n, reason))


__all__ = ["Augmentation", "extend", "mixup_shift_noise", "munge", "shift", "synthesize", "synthetic_count"]
