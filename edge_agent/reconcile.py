"""The pure core of the agent: `plan(current, desired, now) -> list[Step]`.

Theory of operation (anchors: balena-supervisor `applyTarget` / `nextStepsForAppUpdate`, h11 `_state.py`): the
planner compares an `AgentSnapshot` (what is installed and active, the install records and failures from
`state.json`) with the verified `DesiredState` and returns the next steps. It reads no files, sockets or clocks;
`now` comes in. The daemon applies the steps and plans again until the plan is empty, so each plan only needs to
say the NEXT thing to do per model, never a whole script.

Steps are a closed union keyed by `kind`:
    install   start a fresh install of (name, version) from its bundle target
    resume    continue an install record from its saved phase (after a restart or a transient error)
    rollback  undo an install record: a crash loop, or the desired version changed under it
    activate  switch `current` to a version already installed and verified (a downgrade to the kept previous one)
    remove    the model is no longer desired
    report    the model statuses changed since the last report

Failure memory: a failed (name, version) is retried only when a newer desired generation arrives or after a
back-off that doubles per attempt (`RetryPolicy`), never in a hot loop. `desired=None` (no desired state accepted
yet) installs and removes nothing: the agent keeps serving what it has.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from edgefleet.edge_agent.lifecycle import MAX_INSTALL_SAVES, MAX_PHASE_ENTRIES, Phase, crash_loop_reason, is_crash_loop
from edgefleet.edge_agent.records import FailedRecord, InstallRecord
from edgefleet.protos.limits import clip_text
from edgefleet.protos.messages import DesiredModel, DesiredState, ModelStatus

if TYPE_CHECKING:
    from edgefleet.edge_agent.config import AgentConfig


class _Step(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Install(_Step):
    kind: Literal["install"] = "install"
    name: str
    version: int
    bundle_target: str
    runtime: str = "onnxruntime"
    generation: int = 0
    attempt: int = 1


class Resume(_Step):
    kind: Literal["resume"] = "resume"
    name: str
    version: int
    phase: Phase


class Rollback(_Step):
    kind: Literal["rollback"] = "rollback"
    name: str
    version: int
    reason: str
    mark_failed: bool = True


class Activate(_Step):
    kind: Literal["activate"] = "activate"
    name: str
    version: int
    generation: int = 0


class Remove(_Step):
    kind: Literal["remove"] = "remove"
    name: str


class Report(_Step):
    kind: Literal["report"] = "report"
    models: list[ModelStatus]


Step = Annotated[Install | Resume | Rollback | Activate | Remove | Report, Field(discriminator="kind")]


@dataclass(frozen=True)
class RetryPolicy:
    failed_retry_initial_s: float = 60.0
    failed_retry_max_s: float = 3600.0
    max_phase_entries: int = MAX_PHASE_ENTRIES
    max_install_saves: int = MAX_INSTALL_SAVES

    @classmethod
    def from_config(cls, config: AgentConfig) -> RetryPolicy:
        return cls(config.retry.failed_retry_initial_s, config.retry.failed_retry_max_s)

    def failed_backoff_s(self, attempts: int) -> float:
        return min(self.failed_retry_max_s, self.failed_retry_initial_s * 2.0 ** max(0, attempts - 1))


@dataclass(frozen=True)
class AgentSnapshot:
    """What the agent has, as the planner sees it. Built by `apply.Executor.snapshot()`."""

    device_class: str
    installed: Mapping[str, tuple[int, ...]] = field(default_factory=dict)  # versions on disk per model
    active: Mapping[str, int] = field(default_factory=dict)  # what `current` names per model
    installs: Mapping[str, InstallRecord] = field(default_factory=dict)  # installs under way
    failed: Mapping[str, FailedRecord] = field(default_factory=dict)  # last failure per model
    reported: tuple[ModelStatus, ...] | None = None  # last statuses the cloud acknowledged


def _failed_for(current: AgentSnapshot, name: str, version: int) -> FailedRecord | None:
    rec = current.failed.get(name)
    return rec if rec is not None and rec.version == version else None


def retry_due(rec: FailedRecord, desired: DesiredState, now: datetime, policy: RetryPolicy) -> bool:
    if desired.generation > rec.generation:
        return True
    return now >= rec.at + timedelta(seconds=policy.failed_backoff_s(rec.attempts))


def statuses(current: AgentSnapshot, desired: DesiredState | None) -> list[ModelStatus]:
    """The model statuses to report: one per desired model, and one per model still active but not desired."""
    out: list[ModelStatus] = []
    wanted = {m.name: m for m in desired.models} if desired is not None else {}
    for name in sorted(set(wanted) | set(current.active) | set(current.installs)):
        active = current.active.get(name)
        want = wanted.get(name)
        rec = current.installs.get(name)
        target = want.version if want is not None else None
        if rec is not None and (want is None or rec.version == want.version):
            out.append(ModelStatus(name=name, active_version=active, target_version=target or rec.version,
                                   state="installing", phase=rec.phase.value, error=clip_text(rec.error)))
        elif want is None:
            out.append(ModelStatus(name=name, active_version=active, target_version=None,
                                   state="removed" if desired is not None else "active"))
        elif active == want.version:
            out.append(ModelStatus(name=name, active_version=active, target_version=target, state="active"))
        elif (failed := _failed_for(current, name, want.version)) is not None:
            out.append(ModelStatus(name=name, active_version=active, target_version=target, state="failed",
                                   phase=failed.phase, error=clip_text(f"{failed.reason}: {failed.error}")))
        else:
            out.append(ModelStatus(name=name, active_version=active, target_version=target, state="installing"))
    return out


def _plan_record(rec: InstallRecord, want: DesiredModel | None, desired: DesiredState | None, now: datetime,
                 policy: RetryPolicy) -> list[Step]:
    if rec.phase == Phase.ROLLBACK:  # a roll back was under way when we stopped: finish it
        return [Rollback(name=rec.name, version=rec.version, reason=rec.error or "roll back resumed",
                         mark_failed=rec.mark_failed)]
    if desired is not None and (want is None or want.version != rec.version):
        target = f"version {want.version}" if want is not None else "removal"
        return [Rollback(name=rec.name, version=rec.version, reason=f"superseded by {target}", mark_failed=False)]
    if is_crash_loop(rec, policy.max_phase_entries, policy.max_install_saves):
        return [Rollback(name=rec.name, version=rec.version, mark_failed=True,
                         reason=f"crash loop: {crash_loop_reason(rec, policy.max_phase_entries)}")]
    if rec.not_before is not None and now < rec.not_before:
        return []  # backing off after a transient error
    return [Resume(name=rec.name, version=rec.version, phase=rec.phase)]


def _plan_model(current: AgentSnapshot, want: DesiredModel, desired: DesiredState, now: datetime,
                policy: RetryPolicy) -> list[Step]:
    name = want.name
    if current.active.get(name) == want.version:
        return []
    failed = _failed_for(current, name, want.version)
    if failed is not None and not retry_due(failed, desired, now, policy):
        return []
    if want.version in current.installed.get(name, ()):
        # Kept from an earlier install (the previous version): verified then, so a pointer switch suffices.
        return [Activate(name=name, version=want.version, generation=desired.generation)]
    attempt = failed.attempts + 1 if failed is not None else 1
    return [Install(name=name, version=want.version, bundle_target=want.bundle_target, runtime=want.runtime,
                    generation=desired.generation, attempt=attempt)]


def plan(current: AgentSnapshot, desired: DesiredState | None, now: datetime,
         policy: RetryPolicy = RetryPolicy()) -> list[Step]:
    """The next steps, report first (so the cloud sees 'installing' before a long download), then per model by name."""
    wanted = {m.name: m for m in desired.models} if desired is not None else {}
    steps: list[Step] = []
    for name in sorted(set(wanted) | set(current.installs) | set(current.active) | set(current.installed)):
        want = wanted.get(name)
        rec = current.installs.get(name)
        if rec is not None:
            steps += _plan_record(rec, want, desired, now, policy)
        elif want is not None and desired is not None:  # (a wanted model implies a desired state)
            steps += _plan_model(current, want, desired, now, policy)
        elif desired is not None:
            steps.append(Remove(name=name))
    report = statuses(current, desired)
    if current.reported is None or list(current.reported) != report:
        steps.insert(0, Report(models=report))
    return steps


def next_wakeup(current: AgentSnapshot, desired: DesiredState | None, now: datetime,
                policy: RetryPolicy = RetryPolicy()) -> datetime | None:
    """When a plan that is empty now may stop being empty (a back-off ends); None when only news can change it."""
    times: list[datetime] = [r.not_before for r in current.installs.values() if r.not_before and r.not_before > now]
    if desired is not None:
        for m in desired.models:
            rec = _failed_for(current, m.name, m.version)
            if rec is not None and current.active.get(m.name) != m.version:
                times.append(rec.at + timedelta(seconds=policy.failed_backoff_s(rec.attempts)))
    future = [t for t in times if t > now]
    return min(future) if future else None
