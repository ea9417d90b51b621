"""REST views: what the cloud's `/api/v1` returns and accepts, shared by the cloud routes and the `fleet` CLI.

These are HTTP bodies between the cloud and operators, not device messages; they live here so that the CLI parses
the same types the API serves. Errors are always `ErrorBody`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from edgefleet.protos.messages import (
    Budgets,
    DeviceClassInfo,
    ModelStatus,
    SignedDesiredState,
    TensorSpec,
)


class View(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")


class ErrorBody(View):
    error: str  # machine-readable code, e.g. "model_invalid", "unauthorized", "not_found"
    message: str  # one line a person can act on
    detail: dict[str, Any] | None = None


class ModelVersionView(View):
    name: str
    version: int
    sha256: str
    size_bytes: int
    opset: int | None = None
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    created_at: datetime
    # Set on versions a distillation built: what the variant is and the one class it may be deployed to.
    precision: str | None = None
    runtime: str | None = None
    format: str | None = None
    built_for_class: str | None = None
    job_id: int | None = None


class BundleView(View):
    model: str
    version: int
    device_class: str
    target_path: str  # TUF target path
    sha256: str
    size_bytes: int
    created_at: datetime


class DeployRequest(View):
    model: str
    version: int | None = None  # None: the latest version
    device_id: str | None = None
    device_class: str | None = None
    label: str | None = None  # "key=value"

    @model_validator(mode="after")
    def _one_target(self) -> DeployRequest:
        chosen = [x for x in (self.device_id, self.device_class, self.label) if x]
        if len(chosen) != 1:
            raise ValueError("give exactly one target: device_id, device_class or label (key=value)")
        if self.label and "=" not in self.label:
            raise ValueError("label must be key=value, e.g. site=kitchen")
        return self


class DeploymentView(View):
    id: int
    model: str
    version: int
    target_kind: Literal["device", "device_class", "label"]
    target: str
    created_at: datetime
    devices: list[str]  # devices the deployment reached when it was made
    bundles: list[BundleView]


class TelemetrySummary(View):
    model: str
    version: int
    count: int
    errors: int
    p50_ms: float | None = None
    p95_ms: float | None = None
    mean_mj: float | None = None
    energy_source: str = "estimated"
    window_end: datetime | None = None


class DeviceView(View):
    device_id: str
    device_class: str
    labels: dict[str, str]
    online: bool
    last_seen: datetime | None = None
    enrolled_at: datetime
    desired_generation: int
    reported_generation: int | None = None
    desired_models: dict[str, int]  # model name -> version
    models: list[ModelStatus]  # as last reported
    last_error: str | None = None
    telemetry: list[TelemetrySummary] = Field(default_factory=list)  # latest window per model version


class DeviceStatusRow(View):
    """One row of `fleet status`: desired against reported."""

    device_id: str
    device_class: str
    online: bool
    last_seen: datetime | None = None
    model: str | None = None
    desired_version: int | None = None
    active_version: int | None = None
    state: str  # "in_sync", "pending", "installing", "failed", "no_model"
    error: str | None = None
    p50_ms: float | None = None
    p95_ms: float | None = None
    mean_mj: float | None = None
    energy_source: str | None = None


class ClassesView(View):
    classes: list[DeviceClassInfo]


class EnrollmentTokenRequest(View):
    note: str = ""
    ttl_s: int = Field(default=7 * 24 * 3600, gt=0)


class EnrollmentTokenView(View):
    token: str  # shown once
    expires_at: datetime
    note: str = ""


class StatsView(View):
    """Counters a person checks when something looks wrong: malformed messages, refused documents."""

    counters: dict[str, int]


__all__ = [
    "Budgets",
    "BundleView",
    "ClassesView",
    "DeployRequest",
    "DeploymentView",
    "DeviceClassInfo",
    "DeviceStatusRow",
    "DeviceView",
    "EnrollmentTokenRequest",
    "EnrollmentTokenView",
    "ErrorBody",
    "ModelVersionView",
    "SignedDesiredState",
    "StatsView",
    "TelemetrySummary",
]
