"""The ground every wire model stands on: the base classes, the schema version, the one error a receiver sees, and
the name and id types that appear in topics, URLs and paths.

Theory: every message is a frozen pydantic model that forbids unknown fields (`Message`); a document that travels on
its own also carries `schema_version` (`Versioned`), and one newer than this software is refused with a line that
says to upgrade. `MessageError` is what `parse_message` (protos/messages.py) raises for anything it cannot accept;
its `reason` tells garbage from a readable message outside a limit of the contract (protos/limits.py). Device ids
and names are checked here once, by regular expression, so no topic, URL, TUF path or directory is built from a
string that would break it.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, field_validator

from edgefleet.protos.limits import REFUSAL_REASONS

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


__all__ = ["DEVICE_ID_RE", "MAX_MESSAGE_BYTES", "NAME_RE", "SCHEMA_VERSION", "SHA256_RE", "DeviceId", "Message",
           "MessageError", "Name", "Versioned", "check_device_id", "check_name"]
