"""Every control-plane message between cloud and agent, typed, frozen and versioned.

Theory: each message carries `schema_version` and a `kind` literal; `WireMessage` is the closed union keyed by
`kind`. A receiver calls `parse_message(raw, Expected)` and gets a model or a `MessageError` whose text says what is
wrong and what to do; it never gets a half-parsed dict. Nothing outside this module builds a payload by hand: build
the model, send `model.to_wire()`.

Signed documents (the desired state) are verified over the canonical JSON of the *received* payload dict, never over
a re-serialisation of the parsed model, so the signature does not depend on pydantic's output format. The signing
and verification code lives in the trust modules; this module only holds the shapes.

Limits: every number, list and text a device sends is bounded (`protos/limits.py`: finite floats, integer ranges
that fit the cloud's columns, capped lengths, errors <= count, ordered percentiles), so whatever the contract admits
the cloud can store and sum. `MessageError.reason` tells garbage ("malformed") from a readable message outside a
limit (`MessageError.refused`), which receivers count apart.

Schema evolution: adding an optional field keeps `SCHEMA_VERSION`; removing or changing one bumps it. A message with a
newer version than the receiver knows is refused with a message that says to upgrade the receiver.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from edgefleet.protos.limits import (
    INT64_MAX,
    MAX_CORES,
    MAX_ENERGY_MJ,
    MAX_INFERENCES_PER_S,
    MAX_LABEL_CHARS,
    MAX_LABELS,
    MAX_LATENCY_MS,
    MAX_LIST_ENTRIES,
    MAX_MODEL_MB,
    MAX_MODELS_PER_DEVICE,
    MAX_MODELS_PER_REPORT,
    MAX_PATH_CHARS,
    MAX_TENSOR_RANK,
    MAX_TOLERANCE,
    MAX_WATTS,
    MAX_WINDOW_S,
    MAX_WINDOWS_PER_BATCH,
    REFUSAL_REASONS,
    EnergyMj,
    ErrorText,
    Generation,
    Int32,
    Int64,
    LatencyMs,
    ShortText,
    Timestamp,
    Version,
    Watts,
    reason_of,
)

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
    """A message could not be parsed or validated. `str()` is one line a person can act on.

    `reason`: "malformed" (not JSON, wrong shape, unknown field, ...), "too_large", or one of the limits'
    `REFUSAL_REASONS` (a readable message outside the contract's ranges). `field`: the first wrong field's dotted
    path ("windows.0.p95_ms"), or None when the whole message is wrong.
    """

    def __init__(self, message: str, *, reason: str = "malformed", field: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.field = field

    @property
    def refused(self) -> bool:
        """True for a readable message whose values break a limit of the contract, rather than garbage."""
        return self.reason in REFUSAL_REASONS


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


# ---------------------------------------------------------------------------------------------------------------
# Bundle manifest (manifest.json at the root of a bundle archive)


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


# ---------------------------------------------------------------------------------------------------------------
# Enrollment (HTTP, POST /api/v1/enroll with an enrollment token)


ENROLL_PROOF_PURPOSE = "edgefleet-enroll-v1"
# ed25519: a 32-byte public key and a 64-byte signature, base64 (44 and 88 characters).
_B64_32 = r"^[A-Za-z0-9+/]{43}=$"
_B64_64 = r"^[A-Za-z0-9+/]{86}==$"


class EnrollProof(Message):
    """The agent's signature, with the key it registered at its first enrollment, over `enroll_proof_bytes`."""

    signed_at: datetime  # must be newer than the last proof the cloud accepted for this device (no replay)
    signature: str = Field(pattern=_B64_64)


def enroll_proof_bytes(device_id: str, device_class: str, public_key: str, signed_at: datetime) -> bytes:
    """What an `EnrollProof` signs: one canonical JSON line, the same bytes on both sides."""
    doc = {"purpose": ENROLL_PROOF_PURPOSE, "device_id": device_id, "device_class": device_class,
           "public_key": public_key, "signed_at": signed_at.isoformat()}
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode("utf-8")


class EnrollRequest(Versioned):
    kind: Literal["enroll_request"] = "enroll_request"
    device_id: DeviceId
    device_class: Name
    labels: dict[str, str] = Field(default_factory=dict, max_length=MAX_LABELS)
    agent_version: ShortText = ""  # devices.agent_version is String(64)
    # The agent's own ed25519 key (edge_agent/identity.py), base64 of the 32 raw bytes; registered at the first
    # enrollment. Re-enrolling an enrolled id needs a proof by that key, or an operator's `fleet devices reset`.
    public_key: str | None = Field(default=None, pattern=_B64_32)
    proof: EnrollProof | None = None

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        for key, value in v.items():
            check_name(key)
            # A lone surrogate could be stored but not served: every device listing would fail to encode.
            if len(value) > MAX_LABEL_CHARS or any(ord(c) < 32 or 0xD800 <= ord(c) <= 0xDFFF for c in value):
                raise ValueError(f"label {key!r}: value must be at most {MAX_LABEL_CHARS} printable characters")
        return v


class BrokerInfo(Message):
    host: str
    port: int = Field(ge=1, le=65535)
    topic_prefix: str = "edgefleet"
    tls: bool = False
    username: str | None = None
    password: str | None = None
    keepalive_s: int = Field(default=30, ge=5, le=65535)  # MQTT's keep alive is a 16-bit field


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
    version: Version
    bundle_target: str = Field(max_length=MAX_PATH_CHARS)  # TUF target path, e.g. "bundles/digits/v3/rpi4.tar.gz"
    runtime: Literal["onnxruntime", "litert"] = "onnxruntime"


class DesiredState(Versioned):
    kind: Literal["desired_state"] = "desired_state"
    device_id: DeviceId
    device_class: Name
    generation: Generation  # rises with every change for this device; the agent refuses older ones
    issued_at: datetime
    expires_at: datetime  # the agent refuses an expired document (freeze protection for the control plane)
    models: list[DesiredModel] = Field(default_factory=list, max_length=MAX_MODELS_PER_DEVICE)


class Signature(Message):
    keyid: str = Field(max_length=256)
    sig: str = Field(max_length=1024)  # hex


class SignedDesiredState(Versioned):
    kind: Literal["signed_desired_state"] = "signed_desired_state"
    payload: DesiredState
    signatures: list[Signature] = Field(min_length=1, max_length=MAX_LIST_ENTRIES)


# ---------------------------------------------------------------------------------------------------------------
# Desired-state keys (cloud -> agent): how the desired-state signing key is rotated. Version N lists the keys that
# sign desired states from then on; it must be signed by `threshold` of version N-1's keys and by every key new in
# it (version 0 is the key set handed out at enrollment before any rotation). Each version travels as the `custom`
# of TUF target DESIRED_KEYS_TARGET, so TUF adds rollback and freeze protection to the chain of signatures.

DESIRED_KEYS_TARGET = "trust/desired-state-keys/{version}.json"


class DesiredStateKeys(Versioned):
    kind: Literal["desired_state_keys"] = "desired_state_keys"
    version: Version  # rises by exactly one per change; the agent walks them in order
    issued_at: Timestamp
    keys: list[dict[str, Any]] = Field(min_length=1, max_length=MAX_LIST_ENTRIES)  # key dicts with "keyid"
    threshold: Version = 1  # signatures by distinct listed keys a desired state (and the next version) needs
    revoked: list[Annotated[str, Field(max_length=256)]] = Field(default_factory=list, max_length=MAX_LIST_ENTRIES)


class SignedDesiredStateKeys(Versioned):
    kind: Literal["signed_desired_state_keys"] = "signed_desired_state_keys"
    payload: DesiredStateKeys
    signatures: list[Signature] = Field(min_length=1, max_length=MAX_LIST_ENTRIES)


# ---------------------------------------------------------------------------------------------------------------
# Agent -> cloud. Every number, list and text is bounded (protos/limits.py); the cloud refuses a message outside.


class ModelStatus(Message):
    name: Name
    active_version: Version | None = None  # what serves inferences now
    target_version: Version | None = None  # what the desired state asks for
    state: Literal["active", "installing", "failed", "removed"]
    phase: ShortText | None = None  # install phase while installing, or where it failed
    error: ErrorText | None = None  # why the last install of target_version failed (the agent clips it)


class ReportedState(Versioned):
    kind: Literal["reported_state"] = "reported_state"
    device_id: DeviceId
    # Highest desired generation accepted; the cloud also refuses one above what it issued to the device.
    generation: Generation
    models: list[ModelStatus] = Field(default_factory=list, max_length=MAX_MODELS_PER_REPORT)
    last_error: ErrorText | None = None  # a refused desired state, for instance
    agent_version: ShortText = ""
    reported_at: Timestamp


def _inconsistent(template: str, **context: Any) -> PydanticCustomError:
    return PydanticCustomError("inconsistent", template, context)


class TelemetryWindow(Message):
    """One (model, version, where) window. Latency and energy figures are of the successful inferences only."""

    model: Name
    version: Version
    start: Timestamp
    end: Timestamp  # start <= end, at most MAX_WINDOW_S apart
    count: Int32  # inferences, failed ones included; at most MAX_INFERENCES_PER_S per second of window
    errors: Int32  # <= count
    # Present only when some inference succeeded (count > errors), ordered p50 <= p95 <= p99.
    p50_ms: LatencyMs | None = None
    p95_ms: LatencyMs | None = None
    p99_ms: LatencyMs | None = None
    mean_mj: EnergyMj | None = None  # mean energy per successful inference, millijoules
    energy_source: Literal["measured", "estimated", "none"] = "estimated"
    energy_meter: ShortText = ""  # which meter: "modelled", "rapl", "ina3221", ...
    where: Literal["local", "cloud"] = "local"

    @model_validator(mode="after")
    def _consistent(self) -> TelemetryWindow:
        length_s = (self.end - self.start).total_seconds()
        if length_s < 0:
            raise _inconsistent("end {end} is before start {start}", end=str(self.end), start=str(self.start))
        if length_s > MAX_WINDOW_S:
            raise PydanticCustomError("out_of_range", "window of {length} s is longer than {most} s",
                                      {"length": length_s, "most": MAX_WINDOW_S})
        if self.errors > self.count:
            raise _inconsistent("errors {errors} exceed count {count}", errors=self.errors, count=self.count)
        capacity = max(length_s, 1.0) * MAX_INFERENCES_PER_S
        if self.count > capacity:
            raise PydanticCustomError("out_of_range", "count {count} is more than a {length} s window holds at "
                                      "{rate} inferences/s", {"count": self.count, "length": length_s,
                                                              "rate": MAX_INFERENCES_PER_S})
        figures = {k: v for k, v in (("p50_ms", self.p50_ms), ("p95_ms", self.p95_ms), ("p99_ms", self.p99_ms),
                                     ("mean_mj", self.mean_mj)) if v is not None}
        if figures and self.count <= self.errors:
            raise _inconsistent("{fields} given but no inference succeeded (count {count}, errors {errors})",
                                fields=", ".join(figures), count=self.count, errors=self.errors)
        latencies = [(k, v) for k, v in figures.items() if k != "mean_mj"]
        for (lower, low), (upper, high) in zip(latencies, latencies[1:]):
            if low > high:
                raise _inconsistent("{lower} {low} is above {upper} {high}; percentiles rise p50 <= p95 <= p99",
                                    lower=lower, low=low, upper=upper, high=high)
        return self


class TelemetryBatch(Versioned):
    kind: Literal["telemetry"] = "telemetry"
    device_id: DeviceId
    seq: Int64  # rises per batch; the cloud ignores a seq it has stored (outbox replays)
    windows: list[TelemetryWindow] = Field(default_factory=list, max_length=MAX_WINDOWS_PER_BATCH)
    dropped_windows: Int32 = 0  # windows the outbox had to drop since the last batch (full disk)
    sent_at: Timestamp


class DeviceStatus(Versioned):
    kind: Literal["status"] = "status"
    device_id: DeviceId
    online: bool
    at: Timestamp | None = None  # None in the last will, which is written at connect time


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
            raise MessageError(f"message of {len(raw)} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit",
                               reason="too_large")
        try:
            data = json.loads(raw)
        # ValueError also covers an integer of more than 4300 digits; RecursionError a deeply nested document.
        except (ValueError, RecursionError) as exc:
            raise MessageError(f"message is not valid UTF-8 JSON: {str(exc)[:200]}") from None
    else:
        data = raw
    if not isinstance(data, dict):
        raise MessageError(f"message must be a JSON object, got {type(data).__name__}")
    try:
        model = expected.model_validate(data) if expected is not None else _wire.validate_python(data)
    except ValidationError as exc:
        name = expected.__name__ if expected is not None else "message"
        errors = exc.errors()
        reasons = [reason_of(e["type"]) for e in errors]
        # Refused (a limit of the contract) only when every error is one; anything else wrong makes it malformed.
        reason = reasons[0] if all(r in REFUSAL_REASONS for r in reasons) else "malformed"
        field = ".".join(str(p) for p in errors[0].get("loc", ())) or None
        raise MessageError(f"invalid {name}: {_describe(exc)}", reason=reason, field=field) from None
    return model
