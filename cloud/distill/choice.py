"""Which candidate a class ships: the two rules an operator picks between, and the gate no student passes that costs
more than the teacher. Pure: figures in, a decision out.

Theory: a distilled student exists to be cheaper than its teacher; one that is larger or slower must never ship,
however accurate. So the teacher's own variant for the class (built like a student's: int8 where it pays, fp16
where the class prefers it, LiteRT where the class runs it) is a candidate too, and `gate_on_teacher` marks every
student with more MACs or a higher predicted mJ/inference than it as not fitting, saying so. Then, among the
candidates that fit the class's budgets:

  - `accuracy`: the highest score; ties broken by less predicted energy, then fewer MACs (so a student as good as
    the teacher wins over it, being cheaper);
  - `efficiency`: the least predicted mJ/inference among candidates whose score is within `max_accuracy_drop`
    points of the teacher's on the same rows; ties broken by fewer MACs, then the higher score.

The teacher is chosen only when it is the best by the rule; the decision says so. When no candidate fits, nothing
is chosen and the nearest (the smallest worst ratio of figure to budget) is named. Both rules' picks are returned,
so the report can show them side by side whichever one ships.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgefleet.protos.distill import CandidateFigures, Objective
from edgefleet.protos.messages import Budgets

TEACHER = "teacher"


@dataclass(frozen=True)
class Choice:
    chosen: CandidateFigures | None  # the objective's pick
    by_accuracy: CandidateFigures | None
    by_efficiency: CandidateFigures | None
    nearest: CandidateFigures | None  # when nothing fits the budgets
    reason: str

    @property
    def teacher_is_best(self) -> bool:
        return self.chosen is not None and self.chosen.family == TEACHER


def overruns(fig: CandidateFigures, budgets: Budgets) -> list[tuple[str, float, float]]:
    """(what, value, limit) for every budget the candidate breaks."""
    checks = [("p95", fig.predicted_p95_ms, budgets.p95_latency_ms, "ms"),
              ("energy", fig.predicted_mj, budgets.mj_per_inference, "mJ"),
              ("size", fig.size_bytes / 1e6, budgets.model_mb, "MB")]
    return [(f"{what} {value:.4g} {unit} > {limit:g} {unit}", value, limit)
            for what, value, limit, unit in checks if limit is not None and value > limit]


def costlier_than_teacher(fig: CandidateFigures, teacher: CandidateFigures) -> str | None:
    """Why `fig` costs more than the teacher's variant for the same class, or None."""
    if fig.family == TEACHER:
        return None
    if fig.macs > teacher.macs:
        return f"costlier than the teacher: {fig.macs:,} MACs > the teacher's {teacher.macs:,}"
    if fig.predicted_mj > teacher.predicted_mj:
        return (f"costlier than the teacher: {fig.predicted_mj:.3g} mJ/inference predicted > the teacher's "
                f"{teacher.predicted_mj:.3g} ({teacher.precision} {teacher.runtime})")
    return None


def gate_on_teacher(figures: list[CandidateFigures], teacher: CandidateFigures | None) -> list[CandidateFigures]:
    """The figures with every student costlier than the teacher marked as not fitting, with the reason."""
    if teacher is None:
        return list(figures)
    out = []
    for fig in figures:
        why = costlier_than_teacher(fig, teacher)
        if why is not None:
            fig = fig.model_copy(update={"fits": False,
                                         "why_not": why if fig.why_not is None else f"{why}; {fig.why_not}"})
        out.append(fig)
    return out


def _describe(f: CandidateFigures) -> str:
    who = "the teacher" if f.family == TEACHER else f.candidate
    return (f"{who} as {f.precision} on {f.runtime} (score {f.score:.4f}; p95 {f.predicted_p95_ms:.3g} ms, "
            f"{f.predicted_mj:.3g} mJ, {f.macs:,} MACs, {f.size_bytes / 1e6:.3g} MB)")


def by_accuracy(fitting: list[CandidateFigures]) -> CandidateFigures | None:
    if not fitting:
        return None
    return max(fitting, key=lambda f: (round(f.score, 6), -f.predicted_mj, -f.macs, f.family != TEACHER))


def by_efficiency(fitting: list[CandidateFigures], teacher_score: float,
                  max_accuracy_drop: float) -> CandidateFigures | None:
    floor = teacher_score - max_accuracy_drop / 100.0
    within = [f for f in fitting if round(f.score, 6) >= round(floor, 6)]
    if not within:
        return None
    return min(within, key=lambda f: (f.predicted_mj, f.macs, -f.score, f.family == TEACHER))


def choose(figures: list[CandidateFigures], budgets: Budgets, *, objective: Objective = "accuracy",
           teacher: CandidateFigures | None = None, max_accuracy_drop: float = 1.0) -> Choice:
    """Decide for one class. `figures` are the students' (already gated by `gate_on_teacher`); `teacher` is the
    teacher's variant for the class, a candidate too. `max_accuracy_drop` is in points (1.0 = one percent)."""
    pool = list(figures) + ([teacher] if teacher is not None else [])
    if not pool:
        return Choice(None, None, None, None, "no candidates were built")
    fitting = [f for f in pool if f.fits]
    if not fitting:
        def worst(f: CandidateFigures) -> float:
            ratios = [value / limit for _, value, limit in overruns(f, budgets)]
            return max(ratios, default=1.0)

        nearest = min(pool, key=lambda f: (worst(f), -f.score))
        return Choice(None, None, None, nearest, (
            f"no candidate fits the budgets; the nearest is {_describe(nearest)}: {nearest.why_not}; relax the "
            "budget, pick a faster class, or give a smaller grid"))
    teacher_score = teacher.score if teacher is not None else max(f.score for f in pool)
    acc = by_accuracy(fitting)
    eff = by_efficiency(fitting, teacher_score, max_accuracy_drop)
    tail = f"{len(fitting)} of {len(pool)} candidates (the teacher's variant among them) fit"
    if objective == "accuracy":
        assert acc is not None
        rule = "scores best within the budgets"
        chosen = acc
    else:
        chosen = eff
        rule = (f"spends the least energy within {max_accuracy_drop:g} points of the teacher's score "
                f"({teacher_score:.4f})")
        if chosen is None:
            best = by_accuracy(fitting)
            assert best is not None
            return Choice(None, acc, None, None, (
                f"no candidate that fits is within {max_accuracy_drop:g} points of the teacher's score "
                f"({teacher_score:.4f}); the best that fits is {_describe(best)}. Raise --max-accuracy-drop, or "
                f"use --objective accuracy; {tail}"))
    if chosen.family == TEACHER:
        beaten = "no student is cheaper within the allowance" if objective == "efficiency" else \
            "no student matches its score"
        reason = (f"the teacher itself is the best choice ({beaten}): it ships as its own {chosen.precision} "
                  f"{chosen.runtime} variant; {_describe(chosen)} {rule}; {tail}")
    else:
        reason = f"{_describe(chosen)} {rule}; {tail}"
    return Choice(chosen, acc, eff, None, reason)


__all__ = ["Choice", "Objective", "TEACHER", "by_accuracy", "by_efficiency", "choose", "costlier_than_teacher",
           "gate_on_teacher", "overruns"]
