"""Every control-plane message between cloud and agent, typed, frozen and versioned.

Theory: each message carries `schema_version` and a `kind` literal; `WireMessage` is the closed union keyed by
`kind`. A receiver calls `parse_message(raw, Expected)` and gets a model or a `MessageError` whose text says what is
wrong and what to do; it never gets a half-parsed dict. Nothing outside this module builds a payload by hand: build
the model, send `model.to_wire()`.

Signed documents (the desired state) are verified over the canonical JSON of the *received* payload dict, never over
a re-serialisation of the parsed model, so the signature does not depend on pydantic's output format. The signing
and verification code lives in the trust modules; this module only holds the shapes.

Schema evolution: adding an optional field keeps `SCHEMA_VERSION`; removing or changing one bumps it. A message with a
newer version than the receiver knows is refused with a message that says to upgrade the receiver.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

SCHEMA_VERSION = 1
# 256 KiB: a desired state for tens of models or a telemetry batch of hundreds of windows fits with room to spare;
# anything larger on a control topic is garbage or an attack.
MAX_MESSAGE_BYTES = 256 * 1024

# Device ids appear in MQTT topics and file names: no '/', '+', '#', whitespace or control characters.
DEVICE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
# Model and class names appear in URLs, TUF target paths and directory names.
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


class MessageError(ValueError):
    """A message could not be parsed or validated. `str()` is one line a person can act on."""


def check_device_id(value: str) -> str:
    if not isinstance(value, str) or not DEVICE_ID_RE.match(value):
        raise ValueError(
            f"invalid device id {value!r}: use 1-128 characters from A-Z a-z 0-9 . _ : - starting with a letter or "
            "digit (no '/', '+', '#', spaces or control characters, which would break MQTT topics)"
        )
    return value


def check_name(value: str) -> str:
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise ValueError(
            f"invalid name {value!r}: use 1-64 characters from a-z 0-9 . _ - starting with a letter or digit"
        )
    return value


DeviceId = Annotated[str, AfterValidator(check_device_id)]
Name = Annotated[str, AfterValidator(check_name)]


class Message(BaseModel):
    """Base of every wire model: frozen, strict about unknown fields."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    def to_wire(self) -> bytes:
        """UTF-8 JSON bytes for MQTT payloads, files and HTTP bodies."""
        return self.model_dump_json().encode()

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class Versioned(Message):
    schema_version: int = SCHEMA_VERSION

    @field_validator("schema_version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if v > SCHEMA_VERSION:
            raise ValueError(
                f"schema_version {v} is newer than this software understands ({SCHEMA_VERSION}); upgrade edgefleet"
            )
        if v < 1:
            raise ValueError(f"schema_version {v} is not valid; it starts at 1")
        return v


# ---------------------------------------------------------------------------------------------------------------
# Shared pieces


class Budgets(Message):
    """What a model must keep on a device class. None means no limit."""

    p95_latency_ms: float | None = Field(default=None, gt=0)
    mj_per_inference: float | None = Field(default=None, gt=0)
    model_mb: float | None = Field(default=None, gt=0)


class DeviceClassInfo(Message):
    """A device class from the catalog. Power figures feed the modelled energy meter on the agent."""

    name: Name
    description: str = ""
    cpu: str = ""
    cores: int = Field(ge=1)
    memory_mb: int = Field(ge=1)
    accelerator: str | None = None
    runtimes: list[str] = Field(min_length=1)  # "onnxruntime", "litert"
    execution_providers: list[str] = Field(default_factory=lambda: ["CPUExecutionProvider"])
    preferred_precision: Literal["fp32", "fp16", "int8"] = "fp32"
    idle_watts: float = Field(ge=0)
    active_watts: float = Field(gt=0)
    budgets: Budgets = Budgets()


class TensorSpec(Message):
    name: str = Field(min_length=1, max_length=256)
    dtype: str  # numpy dtype name: "float32", "int64", ...
    shape: list[int | str | None]  # None or a string for a dynamic dimension


class FileEntry(Message):
    path: str = Field(min_length=1, max_length=255)  # relative, '/'-separated, no '..'
    sha256: str
    size: int = Field(ge=0)

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

    input_file: str  # an .npz inside the bundle: one array per model input, keyed by input name
    expected_file: str  # an .npz: one array per model output, keyed by output name
    rtol: float = Field(default=1e-3, ge=0)
    atol: float = Field(default=1e-4, ge=0)


# ---------------------------------------------------------------------------------------------------------------
# Bundle manifest (manifest.json at the root of a bundle archive)


class Manifest(Versioned):
    kind: Literal["manifest"] = "manifest"
    name: Name
    version: int = Field(ge=1)
    device_class: Name
    runtime: Literal["onnxruntime", "litert"] = "onnxruntime"
    execution_providers: list[str] = Field(default_factory=lambda: ["CPUExecutionProvider"])
    precision: Literal["fp32", "fp16", "int8"] = "fp32"
    model_file: str
    inputs: list[TensorSpec] = Field(min_length=1)
    outputs: list[TensorSpec] = Field(min_length=1)
    files: list[FileEntry] = Field(min_length=1)  # every file in the archive except manifest.json
    budgets: Budgets = Budgets()
    smoke_test: SmokeTest
    created_at: datetime


# ---------------------------------------------------------------------------------------------------------------
# Enrollment (HTTP, POST /api/v1/enroll with an enrollment token)


class EnrollRequest(Versioned):
    kind: Literal["enroll_request"] = "enroll_request"
    device_id: DeviceId
    device_class: Name
    labels: dict[str, str] = Field(default_factory=dict)
    agent_version: str = ""

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        for key, value in v.items():
            check_name(key)
            if len(value) > 128 or any(ord(c) < 32 for c in value):
                raise ValueError(f"label {key!r}: value must be at most 128 printable characters")
        return v


class BrokerInfo(Message):
    host: str
    port: int = Field(ge=1, le=65535)
    topic_prefix: str = "edgefleet"
    tls: bool = False
    username: str | None = None
    password: str | None = None
    keepalive_s: int = Field(default=30, ge=5)


class EnrollResponse(Versioned):
    kind: Literal["enroll_response"] = "enroll_response"
    device_id: DeviceId
    device_token: str  # bearer token for this device's HTTP calls; shown once
    device_class: DeviceClassInfo
    broker: BrokerInfo
    tuf_root: dict[str, Any]  # the trusted root.json (signed metadata dict) the agent pins
    tuf_metadata_url: str  # base URL of TUF metadata, e.g. http://cloud/tuf/metadata/
    tuf_targets_url: str  # base URL of TUF targets (bundles), served with Range support
    desired_state_keys: list[dict[str, Any]]  # securesystemslib key dicts (with "keyid") that sign desired states
    desired_state_url: str  # GET with the device token returns the current SignedDesiredState


# ---------------------------------------------------------------------------------------------------------------
# Desired state (cloud -> agent; retained on MQTT, also served over HTTP)


class DesiredModel(Message):
    name: Name
    version: int = Field(ge=1)
    bundle_target: str  # TUF target path, e.g. "bundles/digits/v3/rpi4.tar.gz"
    runtime: Literal["onnxruntime", "litert"] = "onnxruntime"


class DesiredState(Versioned):
    kind: Literal["desired_state"] = "desired_state"
    device_id: DeviceId
    device_class: Name
    generation: int = Field(ge=0)  # rises with every change for this device; the agent refuses older ones
    issued_at: datetime
    expires_at: datetime  # the agent refuses an expired document (freeze protection for the control plane)
    models: list[DesiredModel] = Field(default_factory=list)


class Signature(Message):
    keyid: str
    sig: str  # hex


class SignedDesiredState(Versioned):
    kind: Literal["signed_desired_state"] = "signed_desired_state"
    payload: DesiredState
    signatures: list[Signature] = Field(min_length=1)


# ---------------------------------------------------------------------------------------------------------------
# Agent -> cloud


class ModelStatus(Message):
    name: Name
    active_version: int | None = None  # what serves inferences now
    target_version: int | None = None  # what the desired state asks for
    state: Literal["active", "installing", "failed", "removed"]
    phase: str | None = None  # install phase while installing, or where it failed
    error: str | None = None  # why the last install of target_version failed


class ReportedState(Versioned):
    kind: Literal["reported_state"] = "reported_state"
    device_id: DeviceId
    generation: int = Field(ge=0)  # highest desired generation accepted
    models: list[ModelStatus] = Field(default_factory=list)
    last_error: str | None = None  # a refused desired state, for instance
    agent_version: str = ""
    reported_at: datetime


class TelemetryWindow(Message):
    model: Name
    version: int = Field(ge=1)
    start: datetime
    end: datetime
    count: int = Field(ge=0)
    errors: int = Field(ge=0)
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    mean_mj: float | None = None  # mean energy per inference, millijoules
    energy_source: Literal["measured", "estimated", "none"] = "estimated"
    energy_meter: str = ""  # which meter: "modelled", "rapl", "ina3221", ...
    where: Literal["local", "cloud"] = "local"


class TelemetryBatch(Versioned):
    kind: Literal["telemetry"] = "telemetry"
    device_id: DeviceId
    seq: int = Field(ge=0)  # rises per batch; the cloud ignores a seq it has stored (outbox replays)
    windows: list[TelemetryWindow] = Field(default_factory=list)
    dropped_windows: int = Field(default=0, ge=0)  # windows the outbox had to drop since the last batch (full disk)
    sent_at: datetime


class DeviceStatus(Versioned):
    kind: Literal["status"] = "status"
    device_id: DeviceId
    online: bool
    at: datetime | None = None  # None in the last will, which is written at connect time


WireMessage = Annotated[
    Manifest | EnrollRequest | EnrollResponse | SignedDesiredState | DesiredState | ReportedState | TelemetryBatch
    | DeviceStatus,
    Field(discriminator="kind"),
]
_wire = TypeAdapter(WireMessage)


def _describe(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ())) or "message"
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{where}: {first.get('msg', 'invalid')}{more}"


def parse_message(raw: bytes | str | dict[str, Any], expected: type[Message] | None = None) -> Any:
    """Parse bytes, text or a decoded dict into a wire model; raise MessageError with one clear line.

    With `expected`, anything else is refused. Without it, `kind` picks the model.
    """
    if isinstance(raw, (bytes, bytearray, str)):
        if len(raw) > MAX_MESSAGE_BYTES:
            raise MessageError(f"message of {len(raw)} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit")
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise MessageError(f"message is not valid UTF-8 JSON: {exc}") from None
    else:
        data = raw
    if not isinstance(data, dict):
        raise MessageError(f"message must be a JSON object, got {type(data).__name__}")
    try:
        model = expected.model_validate(data) if expected is not None else _wire.validate_python(data)
    except ValidationError as exc:
        name = expected.__name__ if expected is not None else "message"
        raise MessageError(f"invalid {name}: {_describe(exc)}") from None
    return model
