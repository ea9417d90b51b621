"""Every control-plane message between cloud and agent, typed, frozen and versioned: the one import for them all.

Theory: each message carries `schema_version` and a `kind` literal; `WireMessage` is the closed union keyed by
`kind`. A receiver calls `parse_message(raw, Expected)` and gets a model or a `MessageError` whose text says what is
wrong and what to do; it never gets a half-parsed dict. Nothing outside protos/ builds a payload by hand: build
the model, send `model.to_wire()`.

The models live one concept per module and are re-exported here, so `from edgefleet.protos.messages import X` is
the import for every one of them:

    base.py       Message, Versioned, SCHEMA_VERSION, MessageError, device ids and names
    bundle.py     Budgets, DeviceClassInfo, TensorSpec, FileEntry, SmokeTest, Manifest
    enroll.py     EnrollRequest (with EnrollProof), BrokerInfo, EnrollResponse, AgentChannelInfo
    state.py      desired state (signed) and its keys, reported state, device status
    telemetry.py  TelemetryWindow (requests and rows), TelemetryBatch, TelemetryAck

Signed documents (the desired state) are verified over the canonical JSON of the *received* payload dict, never over
a re-serialisation of the parsed model, so the signature does not depend on pydantic's output format. The signing
and verification code lives in the trust modules; protos/ only holds the shapes.

Limits: every number, list and text a device sends is bounded (`protos/limits.py`: finite floats, integer ranges
that fit the cloud's columns, capped lengths, errors <= count, ordered percentiles), so whatever the contract admits
the cloud can store and sum. `MessageError.reason` tells garbage ("malformed") from a readable message outside a
limit (`MessageError.refused`), which receivers count apart.

Schema evolution: adding an optional field keeps `SCHEMA_VERSION`; removing or changing one bumps it. A message with a
newer version than the receiver knows is refused with a message that says to upgrade the receiver.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from pydantic import Field, TypeAdapter, ValidationError

from edgefleet.protos.base import (
    DEVICE_ID_RE,
    MAX_MESSAGE_BYTES,
    NAME_RE,
    SCHEMA_VERSION,
    SHA256_RE,
    DeviceId,
    Message,
    MessageError,
    Name,
    Versioned,
    check_device_id,
    check_name,
)
from edgefleet.protos.bundle import Budgets, DeviceClassInfo, FileEntry, Manifest, SmokeTest, TensorSpec
from edgefleet.protos.enroll import (
    ENROLL_PROOF_PURPOSE,
    AgentChannelInfo,
    BrokerInfo,
    EnrollProof,
    EnrollRequest,
    EnrollResponse,
    enroll_proof_bytes,
)
from edgefleet.protos.limits import REFUSAL_REASONS, reason_of
from edgefleet.protos.state import (
    DESIRED_KEYS_TARGET,
    DesiredModel,
    DesiredState,
    DesiredStateKeys,
    DeviceStatus,
    ModelBudgets,
    ModelStatus,
    ReportedState,
    Signature,
    SignedDesiredState,
    SignedDesiredStateKeys,
)
from edgefleet.protos.telemetry import TelemetryAck, TelemetryBatch, TelemetryWindow

WireMessage = Annotated[
    Manifest | EnrollRequest | EnrollResponse | SignedDesiredState | DesiredState | ReportedState | TelemetryBatch
    | TelemetryAck | DeviceStatus,
    Field(discriminator="kind"),
]
_wire: TypeAdapter[Any] = TypeAdapter(WireMessage)


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
        if expected is not None:
            # The fast path: pydantic-core parses the JSON and validates in one pass (about twice as fast as
            # json.loads then model_validate, measured by bench/telemetry.py). Only an accepted message leaves here;
            # anything it refuses goes the slow way below, so every refusal reads and counts as it always did.
            try:
                return expected.model_validate_json(raw)
            except ValidationError:
                pass
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


__all__ = [
    "DESIRED_KEYS_TARGET", "DEVICE_ID_RE", "ENROLL_PROOF_PURPOSE", "MAX_MESSAGE_BYTES", "NAME_RE", "SCHEMA_VERSION",
    "SHA256_RE", "AgentChannelInfo", "BrokerInfo", "Budgets", "DesiredModel", "DesiredState", "DesiredStateKeys",
    "DeviceClassInfo",
    "DeviceId", "DeviceStatus", "EnrollProof", "EnrollRequest", "EnrollResponse", "FileEntry", "Manifest", "Message",
    "MessageError", "ModelBudgets", "ModelStatus", "Name", "ReportedState", "Signature", "SignedDesiredState",
    "SignedDesiredStateKeys", "SmokeTest", "TelemetryAck", "TelemetryBatch", "TelemetryWindow", "TensorSpec",
    "Versioned", "WireMessage", "check_device_id", "check_name", "enroll_proof_bytes", "parse_message",
]
