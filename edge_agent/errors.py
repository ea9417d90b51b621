"""The agent's exception hierarchy, all of it. Each class carries a short `reason` code that goes into reported state.

    EdgefleetError ("error")               edgefleet.common.errors: the root the agent catches at its boundaries
    ├── RuntimeLoadError ("runtime_load")  common: the runtime could not load or run the model
    ├── InferenceError ("inference")       common: a bad inference request: shape, dtype, unknown input
    │   ├── ModelNotFound ("model_not_found")   no model of that name on this device (HTTP 404)
    │   └── ModelNotReady ("model_not_ready")   installed, but nothing active or loaded (HTTP 503)
    └── AgentError ("agent_error")
        ├── ConfigError ("config")             a bad config file: one line naming the key
        ├── EnrollError ("enroll")             the cloud refused enrollment
        │   └── EnrollmentRefused ("enrollment_refused")   the id is enrolled by another key: reset, or a new id
        ├── CloudUnavailable ("cloud_unavailable")   network or 5xx: retry with backoff
        │   └── MetadataUnavailable             TUF metadata could not be fetched (also a TrustError)
        ├── TrustError ("untrusted")           TUF or desired-state verification failed
        │   ├── BadSignature ("bad_signature")
        │   │   └── UntrustedMetadata ("untrusted_metadata")   TUF metadata not signed by the trusted root's keys
        │   ├── Replayed ("replayed")          generation not newer than the highest accepted
        │   │   └── RollbackAttack ("rollback")         TUF metadata older than what is trusted, or mixed versions
        │   ├── Expired ("expired")
        │   │   └── FrozenRepository ("frozen_repository")   TUF metadata expired
        │   ├── WrongDevice ("wrong_device")
        │   ├── WrongClass ("wrong_class")
        │   ├── UnknownTarget ("unknown_target")        the TUF targets do not list the bundle
        │   ├── BundleMismatch ("bundle_mismatch")      downloaded bytes differ from the trusted length or hash
        │   └── MetadataUnavailable ("cloud_unavailable")
        ├── BundleError ("bad_bundle")         unsafe or inconsistent archive, manifest mismatch
        ├── SmokeTestFailed ("smoke_test_failed")
        ├── LifecycleError ("lifecycle")       no transition in the install table: a bug, never a bundle's fault
        └── CrashLoop ("crash_loop")           an install phase entered too often without finishing

The runtimes live in `edgefleet.common` (the cloud checks its builds with them), so their two errors sit beside
`AgentError` under the common root: code that must survive any agent-side failure catches `EdgefleetError`.
Library exceptions (httpx, onnxruntime, paho, tuf) are wrapped where they enter agent code.
"""

from __future__ import annotations

from edgefleet.common.errors import EdgefleetError, InferenceError, RuntimeLoadError


class ModelNotFound(InferenceError):
    reason = "model_not_found"


class ModelNotReady(InferenceError):
    reason = "model_not_ready"


class AgentError(EdgefleetError):
    reason = "agent_error"


class ConfigError(AgentError):
    reason = "config"


class EnrollError(AgentError):
    reason = "enroll"


class EnrollmentRefused(EnrollError):
    reason = "enrollment_refused"


class MessageRefused(AgentError):
    """The cloud read the message and refused it for good (HTTP 422: outside the contract's limits, or garbage):
    sending it again cannot succeed."""

    reason = "message_refused"


class CloudUnavailable(AgentError):
    reason = "cloud_unavailable"


class TrustError(AgentError):
    reason = "untrusted"


class BadSignature(TrustError):
    reason = "bad_signature"


class UntrustedMetadata(BadSignature):
    reason = "untrusted_metadata"


class Replayed(TrustError):
    reason = "replayed"


class RollbackAttack(Replayed):
    reason = "rollback"


class Expired(TrustError):
    reason = "expired"


class FrozenRepository(Expired):
    reason = "frozen_repository"


class WrongDevice(TrustError):
    reason = "wrong_device"


class WrongClass(TrustError):
    reason = "wrong_class"


class UnknownTarget(TrustError):
    reason = "unknown_target"


class BundleMismatch(TrustError):
    reason = "bundle_mismatch"


class MetadataUnavailable(TrustError, CloudUnavailable):
    reason = "cloud_unavailable"


class BundleError(AgentError):
    reason = "bad_bundle"


class SmokeTestFailed(AgentError):
    reason = "smoke_test_failed"


class LifecycleError(AgentError):
    reason = "lifecycle"


class CrashLoop(AgentError):
    reason = "crash_loop"


__all__ = [
    "AgentError", "BadSignature", "BundleError", "BundleMismatch", "CloudUnavailable", "ConfigError", "CrashLoop",
    "EdgefleetError", "EnrollError", "EnrollmentRefused", "Expired", "FrozenRepository", "InferenceError",
    "LifecycleError",
    "MetadataUnavailable", "ModelNotFound", "ModelNotReady", "Replayed", "RollbackAttack", "RuntimeLoadError",
    "SmokeTestFailed", "TrustError", "UnknownTarget", "UntrustedMetadata", "WrongClass",
    "WrongDevice",
]
