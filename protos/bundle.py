"""What a bundle carries and the device class it is built for: budgets, class facts, tensor specs, the file list,
the smoke test, and the manifest (manifest.json at the root of a bundle archive).

Theory: the manifest names every file of the archive with its sha256 and size, so the agent checks each one it
unpacks against it (edge_agent/unpack.py), and the smoke test the agent runs before it activates the model. A
`DeviceClassInfo` is a catalog entry: its power figures feed the agent's modelled energy meter, its budgets the
distillation's choice of student.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import Field, field_validator

from edgefleet.protos.base import SHA256_RE, Message, Name, Versioned
from edgefleet.protos.limits import (
    INT64_MAX,
    MAX_CORES,
    MAX_EMULATION_FACTOR,
    MAX_ENERGY_MJ,
    MAX_LATENCY_MS,
    MAX_LIST_ENTRIES,
    MAX_MODEL_MB,
    MAX_PATH_CHARS,
    MAX_TENSOR_RANK,
    MAX_TOLERANCE,
    MAX_WATTS,
    Int64,
    Version,
    Watts,
)


class Budgets(Message):
    """What a model must keep on a device class. None means no limit."""

    p95_latency_ms: float | None = Field(default=None, gt=0, le=MAX_LATENCY_MS, allow_inf_nan=False)
    mj_per_inference: float | None = Field(default=None, gt=0, le=MAX_ENERGY_MJ, allow_inf_nan=False)
    model_mb: float | None = Field(default=None, gt=0, le=MAX_MODEL_MB, allow_inf_nan=False)


class DeviceClassInfo(Message):
    """A device class from the catalog. Power figures feed the modelled energy meter on the agent."""

    name: Name
    description: str = ""
    cpu: str = ""
    cores: int = Field(ge=1, le=MAX_CORES)
    memory_mb: int = Field(ge=1, le=INT64_MAX)
    accelerator: str | None = None
    runtimes: list[str] = Field(min_length=1, max_length=MAX_LIST_ENTRIES)  # "onnxruntime", "litert"
    execution_providers: list[str] = Field(default_factory=lambda: ["CPUExecutionProvider"],
                                           max_length=MAX_LIST_ENTRIES)
    preferred_precision: Literal["fp32", "fp16", "int8"] = "fp32"
    idle_watts: Watts
    active_watts: float = Field(gt=0, le=MAX_WATTS, allow_inf_nan=False)
    budgets: Budgets = Budgets()


class TensorSpec(Message):
    name: str = Field(min_length=1, max_length=256)
    dtype: str = Field(max_length=256)  # numpy dtype name: "float32", "int64", ...
    # None or a string for a dynamic dimension; ONNX dimensions are int64.
    shape: list[Annotated[int, Field(ge=-INT64_MAX - 1, le=INT64_MAX)] | Annotated[str, Field(max_length=256)]
                | None] = Field(max_length=MAX_TENSOR_RANK)


class FileEntry(Message):
    path: str = Field(min_length=1, max_length=MAX_PATH_CHARS)  # relative, '/'-separated, no '..'
    sha256: str
    size: Int64

    @field_validator("sha256")
    @classmethod
    def _hex(cls, v: str) -> str:
        if not SHA256_RE.match(v):
            raise ValueError("sha256 must be 64 lowercase hex characters")
        return v

    @field_validator("path")
    @classmethod
    def _relative(cls, v: str) -> str:
        parts = v.split("/")
        if v.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in v:
            raise ValueError(f"file path {v!r} must be relative with no '.', '..' or empty parts")
        return v


class SmokeTest(Message):
    """The on-device check run before activation: feed `input_file`, compare with `expected_file`."""

    input_file: str = Field(max_length=MAX_PATH_CHARS)  # an .npz inside the bundle: one array per model input
    expected_file: str = Field(max_length=MAX_PATH_CHARS)  # an .npz: one array per model output, by output name
    rtol: float = Field(default=1e-3, ge=0, le=MAX_TOLERANCE, allow_inf_nan=False)
    atol: float = Field(default=1e-4, ge=0, le=MAX_TOLERANCE, allow_inf_nan=False)


class Manifest(Versioned):
    kind: Literal["manifest"] = "manifest"
    name: Name
    version: Version
    device_class: Name
    runtime: Literal["onnxruntime", "litert"] = "onnxruntime"
    execution_providers: list[str] = Field(default_factory=lambda: ["CPUExecutionProvider"],
                                           max_length=MAX_LIST_ENTRIES)
    precision: Literal["fp32", "fp16", "int8"] = "fp32"
    model_file: str = Field(max_length=MAX_PATH_CHARS)
    inputs: list[TensorSpec] = Field(min_length=1, max_length=MAX_LIST_ENTRIES)
    outputs: list[TensorSpec] = Field(min_length=1, max_length=MAX_LIST_ENTRIES)
    # every file in the archive except manifest.json
    files: list[FileEntry] = Field(min_length=1, max_length=MAX_LIST_ENTRIES)
    budgets: Budgets = Budgets()
    smoke_test: SmokeTest
    created_at: datetime
    # The cost model's predicted time of this bundle on its class over the same on the build machine (x86-cpu):
    # the slowdown an agent emulating the class on such a machine applies (`offload.emulate_class`). None: unknown.
    emulation_factor: float | None = Field(default=None, ge=1.0, le=MAX_EMULATION_FACTOR, allow_inf_nan=False)


__all__ = ["Budgets", "DeviceClassInfo", "FileEntry", "Manifest", "SmokeTest", "TensorSpec"]
