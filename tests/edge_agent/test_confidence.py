"""edge_agent/confidence.py: probabilities vs logits, the three metrics by hand, the batch's least sure row."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgefleet.edge_agent.confidence import confidence, probabilities, scores


def test_probabilities_pass_through_and_logits_go_through_softmax():
    probs = np.array([[0.7, 0.2, 0.1]], dtype=np.float32)
    assert probabilities(probs) == pytest.approx(probs)
    logits = np.array([[2.0, 1.0, 0.0]])
    e = np.exp([2.0, 1.0, 0.0])
    assert probabilities(logits)[0] == pytest.approx(e / e.sum())
    # in [0, 1] but not summing to 1 (a sigmoid head, or small logits): softmax
    assert probabilities(np.array([[0.5, 0.5, 0.5]]))[0] == pytest.approx([1 / 3] * 3)
    big = probabilities(np.array([[1000.0, 0.0]]))  # stable: no overflow
    assert big[0] == pytest.approx([1.0, 0.0])


@pytest.mark.parametrize("bad", [np.zeros((2, 1)), np.zeros((2, 2, 2)), np.array([[np.nan, 1.0]])])
def test_probabilities_refuses_what_is_not_class_scores(bad):
    with pytest.raises(ValueError, match="confidence needs"):
        probabilities(bad)


def test_metrics_by_hand():
    p = np.array([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25], [1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3]])
    assert scores(p, "max_prob") == pytest.approx([0.7, 0.4, 1.0, 1 / 3])
    assert scores(p, "margin") == pytest.approx([0.5, 0.05, 1.0, 0.0])
    h = -(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1))
    assert scores(p, "entropy") == pytest.approx([1 - h / math.log(3), scores(p, "entropy")[1], 1.0, 0.0])
    with pytest.raises(ValueError, match="use one of max_prob, margin, entropy"):
        scores(p, "vibes")


def test_confidence_of_model_outputs_is_the_least_sure_row():
    outputs = {"label": np.array([0, 1], dtype=np.int64),
               "probabilities": np.array([[0.9, 0.1], [0.6, 0.4]], dtype=np.float32)}
    assert confidence(outputs, "max_prob") == pytest.approx(0.6)  # the first float [rows, classes] output
    assert confidence(outputs, "margin", "probabilities") == pytest.approx(0.2)
    assert confidence({"label": np.array([1])}, "max_prob") is None  # nothing to judge
    assert confidence({"y": np.zeros((0, 3), np.float32)}, "max_prob") is None
