"""The errors raised by the neutral code (`edgefleet.common`), and the root the agent's tree hangs from.

    EdgefleetError ("error")
    ├── RuntimeLoadError ("runtime_load")  an engine could not load or run a model (missing package, bad file)
    ├── InferenceError ("inference")       a bad inference request: missing input, wrong dtype or shape
    ├── SignatureError ("bad_signature")   a DSSE envelope that does not verify under the trusted keys (dsse.py)
    └── (edge_agent.errors.AgentError and its tree)

Each class carries a short `reason` code that goes into the agent's reported state. The cloud, which runs the same
runtimes to check what it builds, wraps these into its own `CloudError` tree where they enter cloud code.
"""

from __future__ import annotations


class EdgefleetError(Exception):
    reason = "error"


class RuntimeLoadError(EdgefleetError):
    reason = "runtime_load"


class InferenceError(EdgefleetError):
    reason = "inference"


class SignatureError(EdgefleetError):
    reason = "bad_signature"


__all__ = ["EdgefleetError", "InferenceError", "RuntimeLoadError", "SignatureError"]
