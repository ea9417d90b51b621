"""Distillation: one teacher model becomes, per device class, the most accurate student that fits the class's budgets.

Theory: a teacher ONNX (any framework) and a transfer set go through checks that refuse bad input before training
(`data`), one cached teacher run (`teacher`), a small grid of students chosen by the input's shape (`families`)
trained by knowledge distillation (`train`), exported to ONNX (`export`), turned per class into the variant that
class runs (int8 / fp16 / TFLite through `artifacts`) with predicted cost (`costmodel`), and chosen under the
budgets (`pipeline`); `report` renders the result. Jobs run this in worker processes; torch is imported lazily, so
importing this package (the API server does, for the spec and errors) does not load it.

    from edgefleet.cloud.distill import DistillSpec, run_distillation
    result = run_distillation(teacher_bytes, npz_bytes, DistillSpec(classes=("rpi4",)), catalog, {}, work_dir)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from edgefleet.cloud.distill.errors import ArtifactDrift, ConverterUnavailable, DistillCancelled, DistillInputError
from edgefleet.cloud.distill.spec import DistillSpec, resolve_budgets

if TYPE_CHECKING:
    from edgefleet.cloud.distill.pipeline import ChosenArtifact, DistillResult, run_distillation
    from edgefleet.cloud.distill.report import plot_svg, summary_text

# name -> module, imported on first use: the pipeline pulls in onnxruntime and (when training) torch.
_LAZY = {"run_distillation": "pipeline", "DistillResult": "pipeline", "ChosenArtifact": "pipeline",
         "plot_svg": "report", "summary_text": "report"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"edgefleet.cloud.distill.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'edgefleet.cloud.distill' has no attribute {name!r}")


__all__ = ["ArtifactDrift", "ChosenArtifact", "ConverterUnavailable", "DistillCancelled", "DistillInputError",
           "DistillResult", "DistillSpec", "plot_svg", "resolve_budgets", "run_distillation", "summary_text"]
