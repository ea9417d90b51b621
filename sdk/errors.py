"""The SDK's errors, all of them. An app catches `SdkError` for any failure, or one class for the case it handles.

    SdkError                base: `status` (the agent's HTTP-equivalent status, 0 when none), `reason` (its code)
    ├── AgentUnavailable    no agent answers on the socket (not running, wrong path, no permission), or it broke
    │                       the protocol: start the agent, or point Client(socket=...) / EDGEFLEET_AGENT_SOCKET at it
    ├── ModelUnknown        no such model (or version) on the device or the offload server
    ├── InvalidInput        the inputs do not fit the model (names, dtype, shape); the message names its signature
    ├── CloudUnreachable    the model had to run in the cloud and the cloud cannot be reached
    └── BudgetUnmet         the request's deadline or budget cannot be met (the agent refused rather than be late)

Theory: the agent answers every failure with a status and a `reason` code (edge_agent/sdk_server.py `status_of`);
`from_reply` turns that pair into one of these once, here, so an app never parses a message. Each message says
what to do next. Imports nothing but the standard library.
"""

from __future__ import annotations


class SdkError(Exception):
    reason = "error"

    def __init__(self, message: str, *, status: int = 0, reason: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        if reason is not None:
            self.reason = reason


class AgentUnavailable(SdkError):
    reason = "agent_unavailable"


class ModelUnknown(SdkError):
    reason = "model_not_found"


class InvalidInput(SdkError):
    reason = "inference"


class CloudUnreachable(SdkError):
    reason = "cloud_unavailable"


class BudgetUnmet(SdkError):
    reason = "budget_unmet"


def from_reply(status: int, reason: str, message: str) -> SdkError:
    """The typed error for an agent's error reply (status and reason code from its error frame)."""
    if reason == "model_not_found" or status == 404:
        return ModelUnknown(message, status=status, reason=reason)
    if reason == "cloud_unavailable":
        return CloudUnreachable(message, status=status, reason=reason)
    if "budget" in reason or "deadline" in reason or status == 504:
        return BudgetUnmet(message, status=status, reason=reason)
    if reason == "model_not_ready":
        return AgentUnavailable(f"{message} (the agent is still loading the model)", status=status, reason=reason)
    if status in (400, 413):
        return InvalidInput(message, status=status, reason=reason)
    return AgentUnavailable(f"the agent failed this request ({status} {reason}): {message}", status=status,
                            reason=reason)


__all__ = ["AgentUnavailable", "BudgetUnmet", "CloudUnreachable", "InvalidInput", "ModelUnknown", "SdkError",
           "from_reply"]
