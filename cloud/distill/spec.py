"""What a distillation job is asked to do: the `DistillSpec`, checked once, and the budgets it resolves per class.

Theory: a spec is plain data (frozen, JSON-able through `to_dict`/`from_dict`) so that the jobs table can store it
and a worker can rebuild it. Every range is checked in `__post_init__`, and the class names against the catalog in
`resolve_budgets`, so that a bad spec is a `DistillInputError` before any teacher run or training. A per-class
budget override replaces only the fields it sets; the catalog's figures fill in the rest.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from edgefleet.cloud.distill.errors import DistillInputError
from edgefleet.protos.messages import Budgets, DeviceClassInfo

Task = Literal["classification", "regression"]
OutputKind = Literal["auto", "logits", "probabilities"]
Objective = Literal["accuracy", "efficiency"]
Augment = Literal["auto", "on", "off"]


@dataclass(frozen=True)
class DistillSpec:
    classes: tuple[str, ...]
    task: Task = "classification"
    teacher_output: str | None = None  # which teacher output to distill; None: the first float output
    output_kind: OutputKind = "auto"
    budgets: Mapping[str, Budgets] = field(default_factory=dict)  # per class, overrides the catalog's
    temperature: float = 4.0
    alpha: float = 0.7  # weight of the soft (KD) loss; 1 - alpha goes to the hard labels when there are any
    max_epochs: int = 60
    patience: int = 8
    val_fraction: float = 0.15
    heldout_fraction: float = 0.15  # never trained on; accuracy, agreement and drift are measured here
    seed: int = 0
    drift_tolerance: float = 0.02  # max share of held-out predictions an artifact may change
    max_candidates: int = 6
    batch_size: int = 64
    learning_rate: float = 3e-3
    # Tiny students train fastest on one thread (thread hand-offs cost more than the 1-10k-MAC layers); None: use
    # min(2, cores). One thread also makes a build bit-identical regardless of the machine's core count.
    threads: int | None = 1
    # Which candidate a class ships (cloud/distill/choice.py): "efficiency", the least predicted mJ/inference within
    # `max_accuracy_drop` points of the teacher's score, or "accuracy", the best score within the budgets.
    objective: Objective = "efficiency"
    max_accuracy_drop: float = 1.0
    # Synthetic training rows labelled by the teacher (cloud/distill/augment.py): `augment_rows` of them (at most 20
    # per real training row), "auto" for transfer sets under 1000 rows, "on" for any, "off" never.
    augment: Augment = "auto"
    augment_rows: int = 2000

    def __post_init__(self) -> None:
        if isinstance(self.classes, str):
            object.__setattr__(self, "classes", (self.classes,))
        object.__setattr__(self, "classes", tuple(self.classes))
        if not self.classes:
            raise DistillInputError("no target device classes: name at least one (e.g. classes=('rpi4',))")
        budgets = {}
        for name, value in dict(self.budgets).items():
            budgets[name] = value if isinstance(value, Budgets) else Budgets.model_validate(value)
        object.__setattr__(self, "budgets", budgets)
        checks = [
            (self.task in ("classification", "regression"), "task must be 'classification' or 'regression'"),
            (self.output_kind in ("auto", "logits", "probabilities"),
             "output_kind must be 'auto', 'logits' or 'probabilities'"),
            (math.isfinite(self.temperature) and self.temperature > 0, "temperature must be > 0 (4 is usual)"),
            (0.0 <= self.alpha <= 1.0, "alpha must be within [0, 1]"),
            (self.max_epochs >= 1, "max_epochs must be >= 1"),
            (self.patience >= 1, "patience must be >= 1"),
            (0.0 < self.val_fraction < 0.5, "val_fraction must be within (0, 0.5)"),
            (0.0 < self.heldout_fraction < 0.5, "heldout_fraction must be within (0, 0.5)"),
            (self.val_fraction + self.heldout_fraction < 0.8, "val_fraction + heldout_fraction must stay below 0.8"),
            (0.0 <= self.drift_tolerance <= 1.0, "drift_tolerance must be within [0, 1]"),
            (self.max_candidates >= 1, "max_candidates must be >= 1"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.learning_rate > 0, "learning_rate must be > 0"),
            (self.threads is None or self.threads >= 1, "threads must be >= 1 or None"),
            (self.objective in ("accuracy", "efficiency"), "objective must be 'accuracy' or 'efficiency'"),
            (math.isfinite(self.max_accuracy_drop) and 0.0 <= self.max_accuracy_drop <= 100.0,
             "max_accuracy_drop must be within [0, 100] points"),
            (self.augment in ("auto", "on", "off"), "augment must be 'auto', 'on' or 'off'"),
            (self.augment_rows >= 0, "augment_rows must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise DistillInputError(f"distill spec: {message}")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["classes"] = list(self.classes)
        data["budgets"] = {k: v.model_dump(mode="json") for k, v in self.budgets.items()}
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DistillSpec:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise DistillInputError(f"distill spec: unknown keys {unknown}; known keys are {sorted(known)}")
        try:
            return cls(**{**data, "classes": tuple(data.get("classes", ()))})
        except (TypeError, ValueError) as exc:
            raise DistillInputError(f"distill spec: {exc}") from None


def merge_budgets(base: Budgets, override: Budgets | None) -> Budgets:
    """`override`'s set fields replace `base`'s; unset (None) fields keep the catalog's figure."""
    if override is None:
        return base
    merged = base.model_dump()
    merged.update(override.model_dump(exclude_none=True))
    return Budgets(**merged)


def resolve_budgets(spec: DistillSpec, catalog: Mapping[str, DeviceClassInfo]) -> dict[str, Budgets]:
    """The budgets per target class; an unknown class (in `classes` or in `budgets`) is a DistillInputError."""
    known = ", ".join(sorted(catalog)) or "(none)"
    for name in spec.classes:
        if name not in catalog:
            raise DistillInputError(f"unknown device class {name!r}; known classes: {known}. Add it to the catalog "
                                    "(a TOML file in {data_dir}/classes/ or POST /api/v1/classes) or fix the name")
    for name in spec.budgets:
        if name not in spec.classes:
            raise DistillInputError(f"budgets given for {name!r}, which is not a target class {list(spec.classes)}")
    return {name: merge_budgets(catalog[name].budgets, spec.budgets.get(name)) for name in spec.classes}


__all__ = ["DistillSpec", "Objective", "OutputKind", "Task", "merge_budgets", "resolve_budgets"]
