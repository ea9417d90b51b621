"""Enrollment (HTTP, POST /api/v1/enroll with an enrollment token): what the agent asks with, and what it gets.

Theory: an agent enrolls once with an operator's enrollment token and its own ed25519 key; the answer hands it
everything it needs to run without asking again: its device token, its class, the broker, the TUF root it pins and
the keys that sign its desired states. Re-enrolling an enrolled id needs a proof signed by the key registered the
first time (`EnrollProof` over `enroll_proof_bytes`), or an operator's `fleet devices reset`, so a leaked
enrollment token cannot take over a device that exists.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Literal

from pydantic import Field, field_validator

from edgefleet.protos.base import DeviceId, Message, Name, Versioned, check_name
from edgefleet.protos.bundle import DeviceClassInfo
from edgefleet.protos.limits import MAX_LABEL_CHARS, MAX_LABELS, ShortText

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


class AgentChannelInfo(Message):
    """Where agents with `transport = "grpc"` connect: `GET /api/v1/agent-channel` (a device's or the admin's token).
    Not part of EnrollResponse, so an agent that predates the channel enrolls at a cloud that has it."""

    target: str = Field(min_length=3, max_length=300)  # host:port
    tls: bool = False


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


__all__ = ["ENROLL_PROOF_PURPOSE", "AgentChannelInfo", "BrokerInfo", "EnrollProof", "EnrollRequest", "EnrollResponse",
           "enroll_proof_bytes"]
