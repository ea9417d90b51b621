"""REST views: what the cloud's `/api/v1` returns and accepts, shared by the cloud routes and the `fleet` CLI.

These are HTTP bodies between the cloud and operators, not device messages; they live here so that the CLI parses
the same types the API serves. Errors are always `ErrorBody`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from edgefleet.protos.limits import MAX_ENERGY_MJ, MAX_LATENCY_MS, Version
from edgefleet.protos.messages import (
    Budgets,
    DeviceClassInfo,
    ModelStatus,
    SignedDesiredState,
    TensorSpec,
)

# 10 years: a token's expiry must be a time both databases and `datetime` hold (a ttl_s of 1e11 overflowed into a
# 500); no enrollment token should outlive the devices it enrolls.
MAX_TOKEN_TTL_S = 10 * 365 * 24 * 3600


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
    # Ranges of the columns they are stored in (cloud/db/models.py): a value outside is a 422 naming the field,
    # never a database error. version: INTEGER (32-bit on PostgreSQL); deployments.target: String(200).
    model: str = Field(max_length=64)
    version: Version | None = None  # None: the latest version
    device_id: str | None = Field(default=None, max_length=128)
    device_class: str | None = Field(default=None, max_length=64)
    label: str | None = Field(default=None, max_length=200)  # "key=value"
    # Budgets for the offload policy on the devices, over the class's defaults (`fleet deploy --p95-ms ...`).
    p95_ms: float | None = Field(default=None, gt=0, le=MAX_LATENCY_MS, allow_inf_nan=False)
    mj_per_inference: float | None = Field(default=None, gt=0, le=MAX_ENERGY_MJ, allow_inf_nan=False)

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
    p95_ms: float | None = None  # the deployment's budgets (None: the class's)
    mj_per_inference: float | None = None


class TelemetrySummary(View):
    """A model version's telemetry on one device over the look-back. `count` and `errors` are requests, `rows` the
    inferences in them (a batched request is one per row); p50/p95 and `mean_mj` are per request, `row_ms` and
    `row_mj` per inference."""

    model: str
    version: int
    count: int
    errors: int
    p50_ms: float | None = None
    p95_ms: float | None = None
    mean_mj: float | None = None
    energy_source: str = "estimated"
    window_end: datetime | None = None
    rows: int | None = None
    row_ms: float | None = None
    row_mj: float | None = None


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
    # Identity: whether the agent registered a device key, and enrollments of this id that were refused.
    has_device_key: bool = False
    reset_pending: bool = False  # an operator reset it; the next enrollment registers its key
    enrollments_refused: int = 0
    last_refused_at: datetime | None = None
    last_refused_reason: str | None = None


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
    p50_ms: float | None = None  # per request
    p95_ms: float | None = None  # per request
    mean_mj: float | None = None  # per request
    energy_source: str | None = None
    requests: int | None = None
    rows: int | None = None  # inferences: a batched request is one per row
    row_ms: float | None = None  # mean latency per inference
    row_mj: float | None = None  # energy per inference
    inferences_per_kwh: float | None = None  # from row_mj (cloud/efficiency.py)
    cost_per_million: float | None = None  # row_mj's energy at the kWh price (offload not included)
    # Inferences run in the cloud by the device's offload policy over all of them, and its decisions per reason.
    offload_share: float | None = None
    offload_reasons: dict[str, int] = Field(default_factory=dict)


class ClassesView(View):
    classes: list[DeviceClassInfo]


class EnrollmentTokenRequest(View):
    note: str = Field(default="", max_length=200)  # tokens.note is String(200)
    ttl_s: int = Field(default=7 * 24 * 3600, gt=0, le=MAX_TOKEN_TTL_S)


class EnrollmentTokenView(View):
    token: str  # shown once
    expires_at: datetime
    note: str = ""
    id: int | None = None  # for `fleet tokens revoke ID`


class TokenView(View):
    """A bearer token as `fleet tokens list` shows it: never the token, never its hash."""

    id: int
    kind: Literal["admin", "enroll", "device"]
    device_id: str | None = None
    note: str = ""
    created_at: datetime
    expires_at: datetime | None = None
    expired: bool = False


class TokenExpiryRequest(View):
    """Set when a token stops working: `ttl_s` seconds from now."""

    ttl_s: int = Field(gt=0, le=MAX_TOKEN_TTL_S)


# ---------------------------------------------------------------------------------------------------- efficiency
# Efficiency figures (cloud/efficiency.py): energy per inference, inferences per kWh and cost per million inferences,
# each labelled with where its energy came from. The label rule: "measured" when every inference with an energy
# figure was metered, "estimated" when none was, "mixed" (with `measured_share`) otherwise, "none" without energy.
EnergyLabel = Literal["measured", "estimated", "mixed", "none"]


class PricesView(View):
    """The prices the costs are computed with (cloud settings). Currency-agnostic: whatever the price is in."""

    energy_price_per_kwh: float
    offload_price_per_million: float


class EfficiencyFigures(View):
    """One slice of telemetry (a device, class, model version or the fleet) over the look-back.

    `inferences` are rows (a batched request is one per row), local and offloaded (`where == "cloud"`). Energy is
    the device's, gross, per inference, over the inferences that carry an energy figure (`metered_inferences`);
    `cost_per_million` is that energy at the kWh price plus `offload_share` x the cloud's price per million."""

    inferences: int = 0
    offloaded: int = 0
    offload_share: float | None = None
    metered_inferences: int = 0
    mj_per_inference: float | None = None  # gross
    net_mj_per_inference: float | None = None  # idle-subtracted, where the agent sent it
    inferences_per_kwh: float | None = None
    cost_per_million: float | None = None
    energy_kwh: float = 0.0  # of the metered inferences
    energy_cost: float = 0.0
    offload_cost: float = 0.0
    total_cost: float = 0.0
    ms_per_inference: float | None = None
    p95_ms: float | None = None  # request-weighted mean of the windows' p95, local inferences only
    energy_source: EnergyLabel = "none"
    measured_share: float | None = None  # of the metered inferences


class EfficiencyRow(View):
    """Figures of one group; the keys that do not apply to the grouping are None."""

    device_id: str | None = None
    device_class: str | None = None
    model: str | None = None
    version: int | None = None
    figures: EfficiencyFigures


class EfficiencyView(View):
    """`GET /api/v1/efficiency`: the same telemetry grouped per device, per class, per model version, and in all.
    Per rollout comes with rollouts (issue #12)."""

    since: datetime
    window_s: int
    prices: PricesView
    label_rule: str
    total: EfficiencyFigures
    by_device: list[EfficiencyRow] = Field(default_factory=list)  # device, model, version
    by_class: list[EfficiencyRow] = Field(default_factory=list)  # class, model, version
    by_version: list[EfficiencyRow] = Field(default_factory=list)  # model, version


class LabelledFigure(View):
    value: float | None = None
    source: EnergyLabel = "none"  # accuracy: "measured" (on held-out or test rows, see `evaluation`)


class EfficiencySide(View):
    """One column of `fleet efficiency MODEL`: the teacher as it would run on the class, or what edgefleet ships."""

    mj_per_inference: LabelledFigure
    inferences_per_kwh: LabelledFigure
    cost_per_million: LabelledFigure
    accuracy: LabelledFigure
    p95_ms: LabelledFigure
    offload_share: LabelledFigure = Field(default_factory=LabelledFigure)


class ClassEfficiency(View):
    """Per class: teacher against the student variant built for it plus offload, and how many times better."""

    device_class: str
    version: int | None = None  # the student variant's model version, None when no candidate fit the class
    candidate: str | None = None
    precision: str | None = None
    runtime: str | None = None
    teacher_is_best: bool = False
    teacher: EfficiencySide
    edgefleet: EfficiencySide
    # Times better (teacher / edgefleet for mJ, cost and p95; edgefleet / teacher for inferences per kWh).
    times_better: dict[str, float | None] = Field(default_factory=dict)
    accuracy_delta_points: float | None = None  # edgefleet - teacher, in points
    inferences: int = 0  # telemetry behind the edgefleet column
    devices: int = 0
    notes: list[str] = Field(default_factory=list)


class ModelEfficiencyView(View):
    """`GET /api/v1/models/{name}/efficiency`: the question the product exists for, per class."""

    model: str
    job_id: int | None = None
    evaluation: str = ""  # where accuracy comes from: "heldout" or "test"
    since: datetime
    window_s: int
    prices: PricesView
    label_rule: str
    classes: list[ClassEfficiency] = Field(default_factory=list)


class StatsView(View):
    """Counters a person checks when something looks wrong: malformed messages, refused documents; and the fleet's
    efficiency totals over the look-back (inferences, energy, cost), None from an older cloud."""

    counters: dict[str, int]
    efficiency: EfficiencyFigures | None = None
    prices: PricesView | None = None
    window_s: int | None = None


__all__ = [
    "Budgets",
    "BundleView",
    "ClassEfficiency",
    "ClassesView",
    "DeployRequest",
    "DeploymentView",
    "DeviceClassInfo",
    "DeviceStatusRow",
    "DeviceView",
    "EfficiencyFigures",
    "EfficiencyRow",
    "EfficiencySide",
    "EfficiencyView",
    "EnergyLabel",
    "EnrollmentTokenRequest",
    "EnrollmentTokenView",
    "ErrorBody",
    "LabelledFigure",
    "ModelEfficiencyView",
    "ModelVersionView",
    "PricesView",
    "SignedDesiredState",
    "StatsView",
    "TelemetrySummary",
    "TokenExpiryRequest",
    "TokenView",
]
