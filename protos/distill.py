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
outputs against the teacher's). `score` is what the choice maximises: accuracy when there are labels, else
agreement.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import Field

from edgefleet.protos.messages import Budgets, Message, Versioned

Precision = Literal["fp32", "fp16", "int8"]
Runtime = Literal["onnxruntime", "litert"]


class ModelFigures(Message):
    """The teacher: size, counted work (None when the counter cannot read its operators) and held-out quality."""

    size_bytes: int = Field(ge=0)
    params: int | None = None
    macs: int | None = None
    counter: str | None = None  # which op counter produced params/macs
    accuracy: float | None = None  # on the held-out rows, against the labels
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
    params: int
    macs: int
    size_bytes: int
    train_s: float


class CandidateFigures(Message):
    """A candidate as built for one class: its variant, predictions and verdict against the class's budgets."""

    candidate: str
    family: Literal["mlp", "dscnn2d", "cnn1d"]
    width_mult: float
    depth: int
    precision: Precision
    runtime: Runtime
    format: Literal["onnx", "tflite"] = "onnx"
    precision_reason: str = ""  # why this precision/runtime for this class (int8 pays or not, fp16 preferred...)
    accuracy: float | None = None
    agreement: float
    score: float  # accuracy if labels were given, else agreement
    params: int
    macs: int
    size_bytes: int  # of this variant's file
    predicted_p95_ms: float
    predicted_mj: float
    measured_p95_ms: float | None = None  # single-sample p95 measured on the build machine, where done
    fits: bool
    why_not: str | None = None
    drift: float | None = None  # share of held-out predictions the variant changed vs the fp32 student


class ClassResult(Message):
    device_class: str
    budgets: Budgets
    calibration_source: str = ""  # where the class's cost figures come from (assumed, measured, fleet)
    chosen: CandidateFigures | None = None
    reason: str  # why the chosen one, or why none fits
    nearest: CandidateFigures | None = None  # when none fits: the closest to the budgets
    candidates: list[CandidateFigures] = Field(default_factory=list)
    teacher_predicted_p95_ms: float | None = None
    teacher_predicted_mj: float | None = None


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
    has_labels: bool
    temperature: float
    alpha: float
    students: list[StudentFigures] = Field(default_factory=list)
    classes: dict[str, ClassResult] = Field(default_factory=dict)
    seed: int
    created_at: datetime


__all__ = ["CandidateFigures", "ClassResult", "DistillReport", "ModelFigures", "StudentFigures"]
