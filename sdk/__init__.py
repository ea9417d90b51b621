"""edgefleet's SDK for apps on a device: one call, run locally or in the cloud by the agent's offload policy, with
provenance in the answer.

    from edgefleet.sdk import Client, AsyncClient
    result = Client().infer("digits", x, deadline_ms=20)

`Client` and `AsyncClient` talk to the local agent over its unix socket; `Client.standalone(model_path, cloud_url)`
runs without an agent. Every failure is one of the typed errors below (sdk/errors.py). docs/sdk.md has the guide.
`AsyncClient` loads asyncio when first named (a sync app does not pay its 40 ms of import).
"""

from typing import Any

from edgefleet.sdk.client import Client, Provenance, Result
from edgefleet.sdk.errors import (
    AgentUnavailable,
    BudgetUnmet,
    CloudUnreachable,
    InvalidInput,
    ModelUnknown,
    SdkError,
)

__all__ = ["AgentUnavailable", "AsyncClient", "BudgetUnmet", "Client", "CloudUnreachable", "InvalidInput",
           "ModelUnknown", "Provenance", "Result", "SdkError"]


def __getattr__(name: str) -> Any:
    if name == "AsyncClient":
        from edgefleet.sdk.aio import AsyncClient

        return AsyncClient
    raise AttributeError(f"module 'edgefleet.sdk' has no attribute {name!r}")
