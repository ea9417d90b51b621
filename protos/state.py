"""Desired and reported state, like a device shadow: what the cloud wants a device to run (signed, generation
numbered, expiring), the keys that sign it and their rotation, what the device says it runs, and its online status.

Theory: the desired state travels cloud -> agent (retained on MQTT, also served over HTTP). The agent accepts only a
generation above the one it has and refuses an expired document (freeze protection), so duplicates and replays are
harmless. Desired-state keys rotate in numbered versions: version N lists the keys that sign from then on and must be
signed by `threshold` of version N-1's keys and by every key new in it (version 0 is the key set handed out at
enrollment); each version travels as the `custom` of TUF target `DESIRED_KEYS_TARGET`, so TUF adds rollback and
freeze protection to the chain. Agent -> cloud, every number, list and text is bounded (protos/limits.py).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import Field

from edgefleet.protos.base import DeviceId, Message, Name, Versioned
from edgefleet.protos.limits import (
    MAX_ENERGY_MJ,
    MAX_LATENCY_MS,
    MAX_LIST_ENTRIES,
    MAX_MODELS_PER_DEVICE,
    MAX_MODELS_PER_REPORT,
    MAX_PATH_CHARS,
    ErrorText,
    Generation,
    ShortText,
    Timestamp,
    Version,
)

# ---------------------------------------------------------------------------------------------------------------
# Desired state (cloud -> agent; retained on MQTT, also served over HTTP)


class ModelBudgets(Message):
    """A deployment's budgets for the offload policy, over the class's in the bundle's manifest. Whole microseconds
    and microjoules: the desired state's signature covers canonical JSON, which has no floats. None: no override."""

    p95_us: int | None = Field(default=None, gt=0, le=int(MAX_LATENCY_MS * 1000))
    uj_per_inference: int | None = Field(default=None, gt=0, le=int(MAX_ENERGY_MJ * 1000))

    @classmethod
    def from_ms_mj(cls, p95_ms: float | None, mj_per_inference: float | None) -> ModelBudgets | None:
        if p95_ms is None and mj_per_inference is None:
            return None
        return cls(p95_us=None if p95_ms is None else max(1, round(p95_ms * 1000)),
                   uj_per_inference=None if mj_per_inference is None else max(1, round(mj_per_inference * 1000)))

    @property
    def p95_ms(self) -> float | None:
        return None if self.p95_us is None else self.p95_us / 1000.0

    @property
    def mj_per_inference(self) -> float | None:
        return None if self.uj_per_inference is None else self.uj_per_inference / 1000.0


class DesiredModel(Message):
    name: Name
    version: Version
    bundle_target: str = Field(max_length=MAX_PATH_CHARS)  # TUF target path, e.g. "bundles/digits/v3/rpi4.tar.gz"
    runtime: Literal["onnxruntime", "litert"] = "onnxruntime"
    # The deployment's budgets over the class's (in the bundle's manifest): what the agent's offload policy keeps.
    # None: the manifest's budgets hold.
    budgets: ModelBudgets | None = None


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
# Desired-state keys (cloud -> agent): how the desired-state signing key is rotated (see the module docstring).

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


class DeviceStatus(Versioned):
    kind: Literal["status"] = "status"
    device_id: DeviceId
    online: bool
    at: Timestamp | None = None  # None in the last will, which is written at connect time


__all__ = ["DESIRED_KEYS_TARGET", "DesiredModel", "DesiredState", "DesiredStateKeys", "DeviceStatus", "ModelBudgets",
           "ModelStatus",
           "ReportedState", "Signature", "SignedDesiredState", "SignedDesiredStateKeys"]
