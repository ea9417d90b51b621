"""How sure a classifier is of its answer, per row: max probability, top-2 margin, or normalized entropy.

Theory: the cascade (offload.py) keeps a local answer when the device's student is sure of it and asks the
cloud's teacher otherwise; the three usual measures of "sure" are offered (Wang et al., "IDK cascades"; Teerapittayanon
et al., BranchyNet, use entropy). Models export either probabilities (skl2onnx's `probabilities`, a Softmax head)
or raw logits, so `probabilities` looks first: rows in [0, 1] that sum to 1 (within 1e-3) are taken as they are,
anything else goes through a stable softmax. A logit row that happens to look like a distribution is read as one;
name the probability output in the config (`offload.cascade_output`) when a model has both.

Every measure is oriented the same way, higher = surer, so one threshold rule serves all: escalate when the score
is below it. Entropy is reported as 1 - H(p)/log(K) (1: one class certain, 0: uniform), so its threshold is in
[0, 1] like the others. A batch's confidence is its least sure row: one doubtful row sends the request up.
"""

from __future__ import annotations

import numpy as np

METRICS = ("max_prob", "margin", "entropy")


def probabilities(scores: np.ndarray) -> np.ndarray:
    """`scores` [rows, classes] as probabilities: as given when they already are, else softmax(scores)."""
    x = np.asarray(scores, dtype=np.float64)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2 or x.shape[1] < 2:
        raise ValueError(f"confidence needs scores of shape [rows, classes >= 2], got {list(np.shape(scores))}")
    if not np.isfinite(x).all():
        raise ValueError("confidence needs finite scores; the model produced NaN or infinity")
    if x.min() >= 0.0 and x.max() <= 1.0 and np.allclose(x.sum(axis=1), 1.0, atol=1e-3):
        return x
    z = np.exp(x - x.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def scores(p: np.ndarray, metric: str) -> np.ndarray:
    """Per-row confidence of probabilities `p` [rows, classes] under `metric`, higher = surer, in [0, 1]."""
    if metric == "max_prob":
        return p.max(axis=1)
    if metric == "margin":
        top2 = np.partition(p, p.shape[1] - 2, axis=1)[:, -2:]
        return top2[:, 1] - top2[:, 0]
    if metric == "entropy":
        with np.errstate(divide="ignore", invalid="ignore"):
            h = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)
        return 1.0 - h / np.log(p.shape[1])
    raise ValueError(f"unknown confidence metric {metric!r}; use one of {', '.join(METRICS)}")


def confidence(outputs: dict[str, np.ndarray], metric: str, output: str = "") -> float | None:
    """The least sure row's confidence in a model's `outputs`, or None when no output is class scores.

    `output` names the tensor; empty: the first floating output of shape [rows, classes >= 2]."""
    array = outputs.get(output) if output else _class_scores(outputs)
    if array is None or array.size == 0:
        return None
    return float(scores(probabilities(array), metric).min())


def _class_scores(outputs: dict[str, np.ndarray]) -> np.ndarray | None:
    for array in outputs.values():
        if array.dtype.kind == "f" and array.ndim == 2 and array.shape[1] >= 2:
            return array
    return None


__all__ = ["METRICS", "confidence", "probabilities", "scores"]
