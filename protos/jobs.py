"""REST views of background jobs (distillation) and of a device class's cost-model facts, shared by the cloud's
routes and the `fleet` CLI.

A job moves through one closed set of states: queued -> running -> succeeded | failed | cancelled; a running job
whose worker died goes back through a claim (attempts + 1) without passing through queued again. `DistillSubmit`
is the JSON `spec` field of `POST /api/v1/distill`: every knob of the distillation is optional here (None: the
core's default) and unknown keys are refused, so a misspelt `max_epoch` is a 422 rather than a silent default.
The distillation report itself is `protos.distill.DistillReport`, served as is by `GET /api/v1/jobs/{id}/report`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from edgefleet.protos.api import View
from edgefleet.protos.messages import Budgets, DeviceClassInfo, check_name

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
FINISHED_STATES: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
Precision = Literal["fp32", "fp16", "int8"]


class DistillSubmit(BaseModel):
    """The `spec` of a distillation: what to build (name, classes) and, optionally, how."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str  # the model name the built variants become versions of
    classes: list[str] = Field(min_length=1, max_length=32)
    task: Literal["classification", "regression"] = "classification"
    budgets: dict[str, Budgets] = Field(default_factory=dict)  # per class, over the catalog's budgets
    seed: int = 0
    teacher_output: str | None = None
    output_kind: Literal["auto", "logits", "probabilities"] | None = None
    temperature: float | None = Field(default=None, gt=0)
    alpha: float | None = Field(default=None, ge=0, le=1)
    max_epochs: int | None = Field(default=None, ge=1, le=10_000)
    patience: int | None = Field(default=None, ge=1)
    val_fraction: float | None = Field(default=None, gt=0, lt=1)
    heldout_fraction: float | None = Field(default=None, gt=0, lt=1)
    drift_tolerance: float | None = Field(default=None, ge=0, le=1)
    max_candidates: int | None = Field(default=None, ge=1, le=64)
    learning_rate: float | None = Field(default=None, gt=0, le=1)
    batch_size: int | None = Field(default=None, ge=1, le=65536)
    # "efficiency" (default): the least predicted mJ/inference within max_accuracy_drop points of the teacher;
    # "accuracy": the best score within the budgets (cloud/distill/choice.py).
    objective: Literal["accuracy", "efficiency"] | None = None
    max_accuracy_drop: float | None = Field(default=None, ge=0, le=100)
    # Synthetic training rows labelled by the teacher (cloud/distill/augment.py): "auto" below 1000 rows.
    augment: Literal["auto", "on", "off"] | None = None
    augment_rows: int | None = Field(default=None, ge=1, le=1_000_000)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        check_name(v)
        return v

    @field_validator("classes")
    @classmethod
    def _classes(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("each class may be named once")
        return v


class BuiltVersion(View):
    """A model version a job registered: the chosen variant for one class."""

    device_class: str
    model: str
    version: int
    precision: Precision
    runtime: Literal["onnxruntime", "litert"]
    format: Literal["onnx", "tflite"]
    predicted_p95_ms: float | None = None
    predicted_mj: float | None = None


class JobView(View):
    id: int
    kind: str
    state: JobState
    stage: str  # what the job does now: "queued", "teacher", "train mlp x1.0", "export", ...
    progress: float  # 0..1 over the whole job
    attempts: int  # claims so far; a worker that died costs one
    max_attempts: int
    worker: str | None = None
    lease_until: datetime | None = None
    cancel_requested: bool = False
    error: str | None = None
    spec: dict[str, Any]
    created_at: datetime
    started_at: datetime | None = None
    heartbeat_at: datetime | None = None
    finished_at: datetime | None = None
    versions: list[BuiltVersion] = Field(default_factory=list)  # once succeeded
    has_report: bool = False
    has_plot: bool = False

    @property
    def finished(self) -> bool:
        return self.state in FINISHED_STATES


class JobLogLineView(View):
    at: datetime
    attempt: int
    line: str


class JobLogView(View):
    job_id: int
    state: JobState
    lines: list[JobLogLineView]
    next: int  # pass as ?since= to read only newer lines


class CalibrationView(View):
    """The cost model's figures for one class (costmodel.Calibration as JSON)."""

    device_class: str
    source: str  # "default" (from the catalog's figures) or "refit" (from telemetry)
    samples: int = 0
    values: dict[str, Any]  # every field of the Calibration, as stored


class VariantMeasurement(View):
    """A deployed variant of the class: what the cost model predicted against what the devices measured.

    An inference is a row: a request of 1,200 rows is 1,200 inferences. `measured_p95_ms` is per request (of
    `batch` rows on average); `measured_ms` and `measured_mj` are per inference, comparable with the predictions
    (the cost model predicts single-row inferences)."""

    model: str
    version: int
    precision: str | None = None
    runtime: str | None = None
    predicted_p95_ms: float | None = None
    measured_p95_ms: float | None = None  # per request
    predicted_mj: float | None = None
    measured_mj: float | None = None  # per inference (row)
    measured_ms: float | None = None  # mean latency per inference (row)
    inferences: int = 0  # rows behind the measured figures
    requests: int = 0
    batch: float | None = None  # mean rows per request
    windows: int = 0
    devices: int = 0


class ClassDetailView(View):
    info: DeviceClassInfo
    calibration: CalibrationView
    variants: list[VariantMeasurement] = Field(default_factory=list)


class RefitView(View):
    """The answer of `POST /api/v1/classes/{name}/refit[?accept=true]`: the calibration a refit proposes from the
    class's telemetry, and whether it was applied.

    A refit that would move a figure (a precision's throughput, the active power) by more than `max_factor` is held:
    `held` says why, one line per figure, and nothing changes until an operator accepts it (`accept=true`, `fleet
    classes refit NAME --accept`); the automatic refit before each distillation never does. Only windows of at least
    `min_rows` rows (inferences) count: `windows_ignored` were smaller."""

    device_class: str
    applied: bool
    held: list[str] = Field(default_factory=list)  # figures past max_factor: why it waits for an `accept`
    accepted: bool = False  # applied past a hold, by the operator's confirmation
    current: CalibrationView  # in force before the call
    proposed: CalibrationView  # what the telemetry fits
    windows: int = 0  # telemetry windows the fit learnt from
    inferences: int = 0  # rows in them
    windows_ignored: int = 0  # windows below min_rows
    min_rows: int
    max_factor: float
    variants: list[VariantMeasurement] = Field(default_factory=list)  # what was measured, per deployed variant


__all__ = [
    "FINISHED_STATES",
    "BuiltVersion",
    "CalibrationView",
    "ClassDetailView",
    "DistillSubmit",
    "JobLogLineView",
    "JobLogView",
    "JobState",
    "JobView",
    "RefitView",
    "VariantMeasurement",
]
