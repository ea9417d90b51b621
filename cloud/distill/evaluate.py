"""How good a student is, measured so that the figures do not flatter: scores, the majority baseline, and warnings.

Theory: a distillation report is only as honest as the rows it is measured on. The held-out split of the transfer
set is never trained on by a student, but the teacher may well have been trained on those very rows (users often
distil on the teacher's own training data), so the teacher's held-out accuracy can read 100% where a real test set
shows 98%, and the gap to the student looks smaller than it is. A test set the user passes (`--test test.npz`) is
rows no model saw: when there is one, every figure that ranks candidates comes from it, and without one the report
says in words (`HELDOUT_NOTE`) what the figures may hide.

Three warnings catch students that score well on paper but are broken in use, each with its threshold here:
  - one class for more than `ONE_CLASS_SHARE` of the evaluation rows (a collapsed student: on a skewed set it can
    still look accurate);
  - agreement with the teacher below `MIN_AGREEMENT` (it no longer stands in for the teacher);
  - accuracy below the majority-class baseline (predicting the most frequent label for every row does better).
The teacher gets the baseline warning too: a teacher below it is worth knowing about before distilling it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.cloud.distill.errors import DistillInputError

ONE_CLASS_SHARE = 0.9
MIN_AGREEMENT = 0.9
HELDOUT_NOTE = (
    "No test set was given: accuracy is measured on held-out rows of the transfer set. No student trained on them, "
    "but the teacher may have (if the transfer set is, or overlaps, its training data), so the teacher's figure and "
    "the gap to it can look better than on new data. Pass a test set of rows no model saw (--test test.npz) for "
    "honest figures."
)
TEST_NOTE = ("Figures that rank candidates come from the test set you gave ({n} rows no model saw); held-out "
             "figures are shown beside them.")


def load_test_set(npz: bytes | Path, teacher: Any, spec: Any) -> Any:
    """The user's test set, checked like the transfer set (same keys, shapes, finiteness) and required to carry
    labels: a test set without them measures nothing the held-out split does not."""
    from edgefleet.cloud.distill.data import load_transfer_set

    try:
        test = load_transfer_set(npz, teacher, spec)
    except DistillInputError as exc:
        raise DistillInputError(exc.message.replace("the transfer set", "the test set")
                                .replace("The transfer set", "The test set")) from None
    if test.y is None:
        raise DistillInputError("the test set has no labels: save it with numpy.savez(path, x=inputs, y=labels); "
                                "its accuracy is measured against them")
    if spec.task == "classification" and (test.y < 0).any():
        raise DistillInputError(f"the test set has {int((test.y < 0).sum())} unlabelled rows (-1); label every row "
                                "of a test set or drop the unlabelled ones")
    return test


def r2(pred: np.ndarray, target: np.ndarray) -> float:
    spread = float(((target - target.mean(axis=0)) ** 2).sum())
    return 1.0 - float(((pred - target) ** 2).sum()) / spread if spread > 0 else 0.0


def score_outputs(out: np.ndarray, teacher: np.ndarray, y: np.ndarray | None,
                  task: str) -> tuple[float | None, float]:
    """(accuracy against labels or None, agreement with the teacher) on outputs. Regression: R^2 both."""
    if task == "regression":
        accuracy = None if y is None else r2(out, np.asarray(y, np.float32).reshape(out.shape))
        return accuracy, r2(out, teacher)
    pred = out.argmax(axis=1)
    known = None if y is None else y >= 0  # -1 marks an unlabelled row of a partly labelled transfer set
    accuracy = None if known is None or not known.any() else float((pred[known] == y[known]).mean())
    return accuracy, float((pred == teacher.argmax(axis=1)).mean())


def majority_baseline(y: np.ndarray | None) -> float | None:
    """The accuracy of always predicting the most frequent label (labelled rows only); None without labels."""
    if y is None:
        return None
    known = np.asarray(y)[np.asarray(y) >= 0]
    if not len(known):
        return None
    return float(np.bincount(known).max() / len(known))


def warnings_for(out: np.ndarray, agreement: float, accuracy: float | None, baseline: float | None,
                 task: str, *, who: str = "the student") -> list[str]:
    """The warnings a classifier's outputs on the evaluation rows earn (none for regression)."""
    if task == "regression" or len(out) == 0:
        return []
    found = []
    pred = out.argmax(axis=1)
    counts = np.bincount(pred, minlength=out.shape[1])
    share = float(counts.max() / len(pred))
    if share > ONE_CLASS_SHARE:
        found.append(f"{who} predicts class {int(counts.argmax())} for {share:.0%} of the evaluation rows (over "
                     f"{ONE_CLASS_SHARE:.0%}): it may have collapsed to one class")
    if who != "the teacher" and agreement < MIN_AGREEMENT:
        found.append(f"{who} agrees with the teacher on only {agreement:.1%} of the evaluation rows (below "
                     f"{MIN_AGREEMENT:.0%}): it does not stand in for the teacher")
    if accuracy is not None and baseline is not None and accuracy < baseline:
        found.append(f"{who}'s accuracy {accuracy:.1%} is below the majority-class baseline {baseline:.1%} "
                     "(always predicting the most frequent label)")
    return found


__all__ = ["HELDOUT_NOTE", "MIN_AGREEMENT", "ONE_CLASS_SHARE", "TEST_NOTE", "load_test_set", "majority_baseline", "r2",
           "score_outputs", "warnings_for"]
