"""The records the agent keeps in `state.json`: plain frozen values, no I/O.

`reconcile.plan` reads them and `lifecycle.Journal` writes new ones through a store; `state.StateStore` persists
`AgentState` crash-safe. Keeping them apart from the store means the pure core never imports file-writing code
(`tests/edge_agent/test_purity.py` checks it).

What lives in `AgentState` and why:
- `enrollment`: what the cloud answered at enrollment (an `EnrollResponse` as a dict), owned by the daemon.
- `highest_generation` and `desired`: the highest accepted desired-state generation and that signed document, so a
  restart replans from it before any network and a replay of an older document is refused.
- `installs`: one `InstallRecord` per model with an install under way: its phase, how often that phase was entered
  and how many phase saves the whole install made (the lifecycle journal's counters), so a crash resumes or, in a
  crash loop, rolls back.
- `failed`: the last failed (name, version) per model with reason and time, so the planner backs off instead of
  retrying a broken bundle in a hot loop.
- `reported`: the model statuses last reported to the cloud, so the planner reports only changes.

What does NOT live here: installed and active versions; the file system (`models/{name}/current`) is the truth for
those and the installer reads it, so the two can never disagree.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidatorFunctionWrapHandler, field_validator

from edgefleet.edge_agent.lifecycle import Phase
from edgefleet.protos.messages import ModelStatus

STATE_VERSION = 1


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class InstallRecord(_Frozen):
    name: str
    version: int
    bundle_target: str
    runtime: str = "onnxruntime"
    generation: int = 0  # of the desired state that asked for it
    attempt: int = 1  # 1 for the first try of this (name, version), more after failures
    phase: Phase = Phase.DOWNLOAD
    entries: int = 0  # times the current phase was entered without finishing (the crash-loop counter)
    saves: int = 0  # phase saves over the whole install
    previous_version: int | None = None  # active when the install began: what a roll back returns to
    staging: str | None = None  # staging dir of the unpack in progress
    download: str | None = None  # partial or complete bundle file
    started_at: datetime
    updated_at: datetime
    not_before: datetime | None = None  # after a transient error: resume no earlier than this
    retries: int = 0
    error: str | None = None  # last transient error, or the reason of a roll back in progress
    mark_failed: bool = True  # a roll back in progress: record a failure (False when superseded)


class FailedRecord(_Frozen):
    name: str
    version: int
    generation: int  # of the desired state that asked for it; a newer generation retries at once
    phase: str
    reason: str  # short code (AgentError.reason)
    error: str
    at: datetime
    attempts: int = 1


class AgentState(_Frozen):
    state_version: int = STATE_VERSION
    enrollment: dict[str, Any] | None = None
    highest_generation: int | None = None
    desired: dict[str, Any] | None = None
    installs: dict[str, InstallRecord] = Field(default_factory=dict)
    failed: dict[str, FailedRecord] = Field(default_factory=dict)
    reported: list[ModelStatus] | None = None

    @field_validator("reported", mode="wrap")
    @classmethod
    def _reported_or_none(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> list[ModelStatus] | None:
        # Statuses an older agent saved may break today's contract (an error text past its cap). They are only a
        # cache of what was last sent: forget them and the planner reports afresh, rather than the whole state file
        # being set aside as unreadable (and the highest generation with it).
        try:
            result: list[ModelStatus] | None = handler(value)
        except ValidationError:
            return None
        return result

    def with_install(self, record: InstallRecord) -> AgentState:
        return self.model_copy(update={"installs": {**self.installs, record.name: record}})

    def without_install(self, name: str) -> AgentState:
        return self.model_copy(update={"installs": {k: v for k, v in self.installs.items() if k != name}})

    def with_failed(self, record: FailedRecord) -> AgentState:
        return self.model_copy(update={"failed": {**self.failed, record.name: record}})

    def without_failed(self, name: str) -> AgentState:
        return self.model_copy(update={"failed": {k: v for k, v in self.failed.items() if k != name}})


__all__ = ["STATE_VERSION", "AgentState", "FailedRecord", "InstallRecord"]
