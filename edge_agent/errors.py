"""The agent's exception hierarchy. Each carries a short `reason` code that goes into reported state.

    AgentError ("agent_error")
    ├── ConfigError ("config")             a bad config file: one line naming the key
    ├── EnrollError ("enroll")             the cloud refused enrollment
    ├── CloudUnavailable ("cloud_unavailable")   network or 5xx: retry with backoff
    ├── TrustError ("untrusted")           TUF or desired-state verification failed
    │   ├── BadSignature ("bad_signature")
    │   ├── Replayed ("replayed")          generation not newer than the highest accepted
    │   ├── Expired ("expired")
    │   ├── WrongDevice ("wrong_device")
    │   └── WrongClass ("wrong_class")
    ├── BundleError ("bad_bundle")         unsafe or inconsistent archive, manifest mismatch
    ├── SmokeTestFailed ("smoke_test_failed")
    ├── RuntimeLoadError ("runtime_load")  the runtime could not load or run the model
    └── InferenceError ("inference")       a bad inference request: shape, dtype, unknown input

Library exceptions (httpx, onnxruntime, paho, tuf) are wrapped where they enter agent code.
"""

from __future__ import annotations


class AgentError(Exception):
    reason = "agent_error"


class ConfigError(AgentError):
    reason = "config"


class EnrollError(AgentError):
    reason = "enroll"


class CloudUnavailable(AgentError):
    reason = "cloud_unavailable"


class TrustError(AgentError):
    reason = "untrusted"


class BadSignature(TrustError):
    reason = "bad_signature"


class Replayed(TrustError):
    reason = "replayed"


class Expired(TrustError):
    reason = "expired"


class WrongDevice(TrustError):
    reason = "wrong_device"


class WrongClass(TrustError):
    reason = "wrong_class"


class BundleError(AgentError):
    reason = "bad_bundle"


class SmokeTestFailed(AgentError):
    reason = "smoke_test_failed"


class RuntimeLoadError(AgentError):
    reason = "runtime_load"


class InferenceError(AgentError):
    reason = "inference"
