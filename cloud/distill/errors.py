"""Errors of the distillation pipeline, placed in the cloud's hierarchy so the one API handler maps them.

    CloudError (500)
    ├── Invalid (422)
    │   └── DistillInputError (422, "distill_input")    bad teacher, transfer set or spec; raised before training
    ├── Unavailable (503)
    │   └── ConverterUnavailable (503, "converter_unavailable")   the TFLite converter venv could not be made
    ├── ArtifactDrift (500, "artifact_drift")           a quantized/converted artifact changed too many predictions
    ├── ArtifactUnrunnable (500, "artifact_unrunnable") the runtime (edgefleet.common.runtimes) cannot load or run it
    └── DistillCancelled (409, "cancelled")             the job was cancelled between two steps

Every message names what is wrong and what to change; figures travel in `detail` so the report and the job log can
show them without parsing the text.
"""

from __future__ import annotations

from edgefleet.cloud.errors import CloudError, Invalid, Unavailable


class DistillInputError(Invalid):
    code = "distill_input"


class ArtifactDrift(CloudError):
    code = "artifact_drift"


class ArtifactUnrunnable(CloudError):
    code = "artifact_unrunnable"


class ConverterUnavailable(Unavailable):
    code = "converter_unavailable"


class DistillCancelled(CloudError):
    # 409: the job's state (cancelled) conflicts with finishing it; nothing is wrong with the input.
    status_code = 409
    code = "cancelled"


__all__ = ["ArtifactDrift", "ArtifactUnrunnable", "ConverterUnavailable", "DistillCancelled", "DistillInputError"]
