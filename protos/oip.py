"""Open Inference Protocol (KServe v2) REST bodies, as served by the agent's local API and by offload targets.

Spec: https://kserve.github.io/website/latest/modelserving/data_plane/v2_protocol/ . Tensors travel as flat
row-major `data` lists with a `shape` and a `datatype` ("FP32", "INT64", ...). `parameters` on the response carries
edgefleet's provenance: where it ran, the model version, latency and energy.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

# OIP datatype <-> numpy dtype name
DATATYPES = {
    "BOOL": "bool",
    "UINT8": "uint8",
    "UINT16": "uint16",
    "UINT32": "uint32",
    "UINT64": "uint64",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "FP16": "float16",
    "FP32": "float32",
    "FP64": "float64",
}
NUMPY_TO_DATATYPE = {v: k for k, v in DATATYPES.items()}


class _OIP(BaseModel):
    # extra="allow": other OIP clients send fields we do not use (e.g. "binary_data_size" parameters).
    model_config = ConfigDict(extra="allow")


class InferTensor(_OIP):
    name: str
    shape: list[int] = Field(min_length=0)
    datatype: str
    data: list[Any]
    parameters: dict[str, Any] | None = None


class RequestedOutput(_OIP):
    name: str
    parameters: dict[str, Any] | None = None


class InferRequest(_OIP):
    id: str | None = None
    inputs: list[InferTensor] = Field(min_length=1)
    outputs: list[RequestedOutput] | None = None
    parameters: dict[str, Any] | None = None


class InferResponse(_OIP):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    outputs: list[InferTensor]
    parameters: dict[str, Any] | None = None


class ModelMetadata(_OIP):
    name: str
    versions: list[str] = Field(default_factory=list)
    platform: str = "onnxruntime_onnx"
    inputs: list[dict[str, Any]] = Field(default_factory=list)
    outputs: list[dict[str, Any]] = Field(default_factory=list)
