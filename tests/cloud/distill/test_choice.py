"""cloud/distill/choice.py: the two rules (accuracy, efficiency), the never-costlier-than-the-teacher gate, the
teacher as a candidate that ships when it is best, and the nearest candidate when nothing fits."""

from __future__ import annotations

import pytest

from edgefleet.cloud.distill.choice import choose, costlier_than_teacher, gate_on_teacher
from edgefleet.protos.distill import CandidateFigures
from edgefleet.protos.messages import Budgets

BUDGETS = Budgets(p95_latency_ms=10, mj_per_inference=5)


def _fig(cid, score, mj, p95=1.0, fits=True, why_not=None, macs=100, family="mlp"):
    return CandidateFigures(candidate=cid, family=family, width_mult=1.0, depth=1, precision="fp32",
                            runtime="onnxruntime", agreement=score, score=score, params=macs, macs=macs,
                            size_bytes=1000, predicted_p95_ms=p95, predicted_mj=mj, fits=fits, why_not=why_not)


def _teacher(score=0.99, mj=4.0, macs=10_000, fits=True):
    return _fig("teacher", score, mj, macs=macs, fits=fits, family="teacher")


def test_accuracy_rule_takes_the_best_score_ties_to_less_energy_then_fewer_macs():
    figs = [_fig("a", 0.90, 1.0), _fig("b", 0.95, 3.0), _fig("c", 0.95, 2.0, macs=300),
            _fig("c2", 0.95, 2.0, macs=200), _fig("d", 0.99, 9.0, 1.0, False, "energy")]
    decision = choose(figs, BUDGETS, objective="accuracy")
    assert decision.chosen.candidate == "c2" and decision.nearest is None
    assert "4 of 5 candidates" in decision.reason


def test_efficiency_rule_takes_the_least_energy_within_the_allowed_drop():
    teacher = _teacher(score=0.98, mj=4.0)
    figs = [_fig("tiny", 0.960, 0.5), _fig("small", 0.972, 1.0), _fig("big", 0.980, 3.0)]
    decision = choose(figs, BUDGETS, objective="efficiency", teacher=teacher, max_accuracy_drop=1.0)
    assert decision.chosen.candidate == "small"  # tiny is 2 points below the teacher
    assert decision.by_accuracy.candidate == "big"  # the other rule's pick, shown side by side
    assert decision.by_efficiency.candidate == "small"
    wider = choose(figs, BUDGETS, objective="efficiency", teacher=teacher, max_accuracy_drop=3.0)
    assert wider.chosen.candidate == "tiny"


def test_the_teacher_ships_when_it_is_the_best_and_the_reason_says_so():
    teacher = _teacher(score=0.99, mj=1.0, macs=1000)
    figs = [_fig("s", 0.90, 0.8, macs=500)]
    decision = choose(figs, BUDGETS, objective="efficiency", teacher=teacher, max_accuracy_drop=1.0)
    assert decision.teacher_is_best and decision.chosen.family == "teacher"
    assert "the teacher itself is the best choice" in decision.reason
    assert choose(figs, BUDGETS, objective="accuracy", teacher=teacher).teacher_is_best


def test_a_student_as_good_as_the_teacher_beats_it_on_cost_under_either_rule():
    teacher = _teacher(score=0.97, mj=4.0)
    figs = [_fig("s", 0.97, 1.0)]
    for objective in ("accuracy", "efficiency"):
        assert choose(figs, BUDGETS, objective=objective, teacher=teacher).chosen.candidate == "s"


@pytest.mark.parametrize("macs, mj, costlier", [(20_000, 1.0, "MACs"), (100, 6.0, "mJ"), (100, 1.0, None)])
def test_no_student_costlier_than_the_teacher_is_ever_chosen(macs, mj, costlier):
    teacher = _teacher(score=0.90, mj=4.0, macs=10_000)
    student = _fig("s", 0.999, mj, macs=macs)  # far more accurate than the teacher, and within every budget
    why = costlier_than_teacher(student, teacher)
    gated = gate_on_teacher([student], teacher)
    decision = choose(gated, Budgets(), objective="accuracy", teacher=teacher)
    if costlier is None:
        assert why is None and decision.chosen.candidate == "s"
    else:
        assert costlier in why and not gated[0].fits and "costlier than the teacher" in gated[0].why_not
        assert decision.chosen.family == "teacher"


def test_efficiency_with_nothing_within_the_drop_ships_nothing_and_says_how_to_proceed():
    teacher = _teacher(score=0.99, fits=False)  # the teacher itself breaks the budget
    figs = [_fig("s", 0.90, 1.0)]
    decision = choose(figs, BUDGETS, objective="efficiency", teacher=teacher, max_accuracy_drop=1.0)
    assert decision.chosen is None and decision.by_accuracy.candidate == "s"
    assert "--max-accuracy-drop" in decision.reason and "--objective accuracy" in decision.reason


def test_none_fits_picks_the_smallest_worst_overrun():
    budgets = Budgets(p95_latency_ms=1, mj_per_inference=1)
    figs = [_fig("a", 0.9, 3.0, 1.5, False, "x"), _fig("b", 0.99, 1.2, 8.0, False, "y"),
            _fig("c", 0.8, 2.0, 2.0, False, "z")]
    decision = choose(figs, budgets)
    assert decision.chosen is None and decision.nearest.candidate == "c" and "nearest is c" in decision.reason


def test_no_candidates():
    assert choose([], BUDGETS).reason == "no candidates were built"
