"""The distillation report: what a distill job tells an operator, as frozen, versioned JSON models.

Theory: one `DistillReport` per job. It names the teacher and how its outputs were read (logits, or probabilities
turned into logits and why that is sound), lists every trained student once (`students`), and per target class
every candidate's figures on that class (`ClassResult.candidates`: the variant built for the class, its precision and
runtime with the reason, predicted p95/mJ/MB, drift against the fp32 student, whether it fits the budgets and why
not), the chosen candidate or, when none fits, `chosen = None` with the nearest candidate and a reason. The same
models serve the cloud's `GET /api/v1/jobs/{id}/report`, the CLI and the SVG plot; nothing builds this JSON by hand.
Imports nothing of cloud.

Figures: `accuracy` is against the transfer set's labels on the held-out rows (None without labels); `agreement`
is the share of held-out rows where the student's argmax equals the teacher's (regression: R^2 of the student's
outputs against the teacher's); `test_accuracy` is on the user's own test set, rows no model saw. `score` is what
both choice rules rank on: test accuracy when a test set was given, else held-out accuracy when there are labels,
else agreement. The teacher's own variant for each class is a candidate too (`family = "teacher"`): no student
costlier than it is ever chosen, and it ships when it is the best (`teacher_is_best`).
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import Field

from edgefleet.protos.messages import Budgets, Message, Versioned

Precision = Literal["fp32", "fp16", "int8"]
Runtime = Literal["onnxruntime", "litert"]
# "teacher": the teacher's own variant for a class, a candidate like the students (it ships when it is the best).
CandidateFamily = Literal["mlp", "dscnn2d", "cnn1d", "teacher"]
Objective = Literal["accuracy", "efficiency"]


class ModelFigures(Message):
    """The teacher: size, counted work (None when the counter cannot read its operators) and held-out quality."""

    size_bytes: int = Field(ge=0)
    params: int | None = None
    macs: int | None = None
    counter: str | None = None  # which op counter produced params/macs ("measured-equivalent": see macs_basis)
    macs_basis: str = ""  # how macs was found: counted, or inferred from latency measured on the build machine
    accuracy: float | None = None  # on the held-out rows, against the labels
    test_accuracy: float | None = None  # on the user's test set (rows no model saw), when one was given
    measured_p95_ms: float | None = None  # single-sample fp32 p95 on the build machine
    input_shape: list[int | str | None] = Field(default_factory=list)
    output: str = ""


class StudentFigures(Message):
    """One trained fp32 student, before any per-class variant."""

    candidate: str  # e.g. "mlp-w0.5-d1"
    family: Literal["mlp", "dscnn2d", "cnn1d"]
    width_mult: float
    depth: int
    hidden: list[int] = Field(default_factory=list)
    epochs: int
    best_epoch: int
    val_agreement: float
    accuracy: float | None = None
    agreement: float
    test_accuracy: float | None = None  # on the user's test set, when one was given
    params: int
    macs: int
    size_bytes: int
    train_s: float
    warnings: list[str] = Field(default_factory=list)  # degenerate students: one class, low agreement, below baseline


class CandidateFigures(Message):
    """A candidate as built for one class: its variant, predictions and verdict against the class's budgets."""

    candidate: str
    family: CandidateFamily
    width_mult: float
    depth: int
    precision: Precision
    runtime: Runtime
    format: Literal["onnx", "tflite"] = "onnx"
    precision_reason: str = ""  # why this precision/runtime for this class (int8 pays or not, fp16 preferred...)
    accuracy: float | None = None
    agreement: float
    test_accuracy: float | None = None
    score: float  # what both rules rank on: test accuracy if a test set was given, else accuracy, else agreement
    params: int
    macs: int
    size_bytes: int  # of this variant's file
    predicted_p95_ms: float
    predicted_mj: float
    measured_p95_ms: float | None = None  # single-sample p95 measured on the build machine, where done
    fits: bool  # within the budgets and never costlier than the teacher's own variant for the class
    why_not: str | None = None
    drift: float | None = None  # share of held-out predictions the variant changed vs the fp32 student
    warnings: list[str] = Field(default_factory=list)


class ClassResult(Message):
    device_class: str
    budgets: Budgets
    calibration_source: str = ""  # where the class's cost figures come from (assumed, measured, fleet)
    objective: Objective = "accuracy"
    chosen: CandidateFigures | None = None  # the pick of `objective`'s rule (the teacher's variant when it is best)
    reason: str  # why the chosen one, or why none fits
    nearest: CandidateFigures | None = None  # when none fits: the closest to the budgets
    candidates: list[CandidateFigures] = Field(default_factory=list)
    teacher_predicted_p95_ms: float | None = None
    teacher_predicted_mj: float | None = None
    # Both rules' picks, side by side, whichever one the objective ships; and the teacher as a candidate.
    chosen_by_accuracy: CandidateFigures | None = None
    chosen_by_efficiency: CandidateFigures | None = None
    teacher_variant: CandidateFigures | None = None
    teacher_is_best: bool = False


class DistillReport(Versioned):
    kind: Literal["distill_report"] = "distill_report"
    model_name: str
    task: Literal["classification", "regression"]
    teacher: ModelFigures
    teacher_output_kind: Literal["logits", "probabilities", "values"]
    how_probabilities_were_handled: str | None = None
    metric: str  # what `score` means here, in words
    n_samples: int
    n_train: int
    n_val: int
    n_heldout: int
    # Synthetic training rows the teacher labelled (MUNGE for [N, F], mixup and noise else; cloud/distill/augment):
    # trained on beside the n_train real rows, never counted in n_samples, n_train, n_val or n_heldout (the user's own).
    n_synthetic: int = Field(default=0, ge=0)
    has_labels: bool
    temperature: float
    alpha: float
    students: list[StudentFigures] = Field(default_factory=list)
    classes: dict[str, ClassResult] = Field(default_factory=dict)
    seed: int
    created_at: datetime
    objective: Objective = "accuracy"
    max_accuracy_drop: float = 1.0  # points: the efficiency rule's allowance below the teacher's score
    # Where the figures that rank candidates come from: "test" (the user's test set) or "heldout" (a split of the
    # transfer set, which may overlap the teacher's own training data: `evaluation_note` says so in words).
    evaluation: Literal["heldout", "test"] = "heldout"
    evaluation_note: str = ""
    n_test: int = 0
    majority_baseline: float | None = None  # accuracy of always predicting the most frequent label, same rows
    warnings: list[str] = Field(default_factory=list)  # the report's warnings, for the CLI to print first
    # Where the students' interface differs from the teacher's, and why (a dynamic axis fixed, a family skipped).
    interface_notes: list[str] = Field(default_factory=list)


__all__ = ["CandidateFamily", "CandidateFigures", "ClassResult", "DistillReport", "ModelFigures", "Objective",
           "StudentFigures"]
