"""The executor: carries out the planner's steps against the disk, the network seams and the runtime.

Theory of operation: `Executor.apply(step, now)` does one step. An install walks the lifecycle table
(`lifecycle.TRANSITIONS`), and before each phase's side effect the `Journal` saves the phase to `state.json`:

    download    target_info (trusted length) -> Fetcher.fetch into {data_dir}/downloads/ (resumable)
    verify      TargetVerifier.verify_file: trusted length + sha256 BEFORE unpacking; only verified bytes go on
    unpack      safe extraction into models/{name}/.staging-{version}-{random}, manifest and file hashes checked,
                manifest name/version/device class/runtime must match the desired entry
    smoke_test  check the tree again, load with the manifest's runtime, run smoke/input.npz, compare with
                smoke/expected.npz within the manifest's rtol/atol
    activate    rename staging to models/{name}/{version}, switch `current` (previous kept), tell `on_activate`
    commit      forget the record and the last failure, delete the download, collect old versions

Every phase is idempotent so that a restart can run it again. A failure before activate leaves `current` untouched
and cleans the staging dir; a failure from activate on goes through roll back, which points `current` back at the
version active when the install began. Both end in a `FailedRecord` (reason, phase, time) that the planner uses to
back off, and in `ModelStatus(state="failed", error=...)` for the report. A network failure (`CloudUnavailable`)
is not a failure of the bundle: the record stays in its phase with a back-off (`not_before`).

Seams (`Protocol`s): `Fetcher` (the lead's cloud client: resumable HTTP Range download), `TargetVerifier`
(`edge_agent.trust.BundleTrust`), the runtime factory (`runtimes.make_runtime`), and `on_activate(name, version)`
(the inference service reloads; `version=None` unloads). Tests give in-memory ones.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edgefleet.common.runtimes import make_runtime
from edgefleet.common.runtimes.base import Runtime
from edgefleet.edge_agent.config import AgentConfig
from edgefleet.edge_agent.errors import (
    AgentError,
    BundleError,
    CloudUnavailable,
    CrashLoop,
    EdgefleetError,
    SmokeTestFailed,
)
from edgefleet.edge_agent.installer import Installer
from edgefleet.edge_agent.lifecycle import Journal, Outcome, Phase, next_phase
from edgefleet.edge_agent.reconcile import (
    Activate,
    AgentSnapshot,
    Install,
    Remove,
    Report,
    Resume,
    RetryPolicy,
    Rollback,
    Step,
    plan,
)
from edgefleet.edge_agent.records import FailedRecord, InstallRecord
from edgefleet.edge_agent.state import StateStore
from edgefleet.edge_agent.unpack import UnpackLimits, check_tree, read_manifest, unpack_bundle
from edgefleet.protos.limits import clip_text
from edgefleet.protos.messages import DesiredState, Manifest, ModelStatus

log = logging.getLogger(__name__)


class Fetcher(Protocol):
    def fetch(self, target_path: str, dest: Path, *, expected_length: int | None = None) -> None:
        """Download the TUF target to `dest`, resuming from the bytes already in `dest` (HTTP Range).
        Never writes more than `expected_length` bytes. Raises CloudUnavailable on network trouble."""
        ...


class TargetVerifier(Protocol):
    def target_info(self, target_path: str) -> Any:
        """Trusted metadata for the target (an object with `.length`); TrustError when untrusted or unknown."""
        ...

    def verify_file(self, path: Path, info: Any) -> None:
        """Raise TrustError unless the file's length and sha256 match `info`."""
        ...


@dataclass(frozen=True)
class StepResult:
    step: Step
    ok: bool
    status: ModelStatus | None = None  # for install-like steps: where the model stands now
    error: str | None = None


class Executor:
    def __init__(self, config: AgentConfig, store: StateStore, installer: Installer, fetcher: Fetcher,
                 verifier: TargetVerifier, *, runtime_factory: Callable[[str], Runtime] | None = None,
                 on_activate: Callable[[str, int | None], None] | None = None,
                 on_phase: Callable[[str, int, Phase], None] | None = None,
                 reporter: Callable[[list[ModelStatus]], None] | None = None,
                 policy: RetryPolicy | None = None) -> None:
        self.config = config
        self.store = store
        self.installer = installer
        self.fetcher = fetcher
        self.verifier = verifier
        self.runtime_factory = runtime_factory or partial(
            _make_runtime, intra_op_threads=config.runtime.intra_op_threads,
            inter_op_threads=config.runtime.inter_op_threads)
        self.on_activate = on_activate or (lambda name, version: None)
        self.on_phase = on_phase or (lambda name, version, phase: None)  # observers: logs, progress, tests
        self.reporter = reporter
        self.policy = policy or RetryPolicy.from_config(config)
        self.journal = Journal(store, cap=self.policy.max_phase_entries, saves_cap=self.policy.max_install_saves)
        self.limits = UnpackLimits.from_config(config)
        self.bundle_max_bytes = int(config.limits.bundle_max_mb * 1024 * 1024)
        config.downloads_dir.mkdir(parents=True, exist_ok=True)

    # -- planning ---------------------------------------------------------------------------------------------------

    def start(self) -> list[str]:
        """At process start: collect trash, stale staging dirs, old versions and downloads no record uses."""
        records = self.store.state.installs.values()
        keep = {r.name: {r.version} for r in records}
        staging = {r.staging for r in records if r.staging}
        removed = self.installer.gc(keep=keep, keep_staging=staging)
        wanted = {Path(r.download).name for r in records if r.download}
        for path in self.config.downloads_dir.iterdir():
            # A fetcher may keep its partial bytes beside the target name ("x.tar.gz.part"): keep those too.
            if not any(path.name == w or path.name.startswith(w + ".") for w in wanted):
                path.unlink(missing_ok=True)
                removed.append(f"downloads/{path.name}")
        return removed

    def snapshot(self) -> AgentSnapshot:
        state = self.store.state
        return AgentSnapshot(device_class=self.config.device_class, installed=self.installer.installed(),
                             active=self.installer.active(), installs=dict(state.installs),
                             failed=dict(state.failed),
                             reported=tuple(state.reported) if state.reported is not None else None)

    def plan(self, desired: DesiredState | None, now: datetime) -> list[Step]:
        return plan(self.snapshot(), desired, now, self.policy)

    def converge(self, desired: DesiredState | None, clock: Callable[[], datetime], max_rounds: int | None = None,
                 *, on_stall: Callable[[str], None] | None = None) -> list[StepResult]:
        """Plan and apply until the plan is empty or makes no progress; the daemon's inner loop.

        Steps still planned after `max_rounds` (default `reconcile.max_rounds`) mean a step that does not do what
        the planner expects: that is logged and handed to `on_stall` as one line naming the steps, never silent.
        """
        rounds = self.config.reconcile.max_rounds if max_rounds is None else max_rounds
        results: list[StepResult] = []
        round_results: list[StepResult] = []
        for _ in range(rounds):
            steps = self.plan(desired, clock())
            if not steps:
                return results
            round_results = [self.apply(step, clock()) for step in steps]
            results += round_results
            if all(isinstance(r.step, Report) for r in round_results) and not all(r.ok for r in round_results):
                return results  # only a report left and it could not be sent: no progress to make now
        left = self.plan(desired, clock())
        if left:
            def names(steps: list[Step]) -> str:
                words = [" ".join([s.kind, getattr(s, "name", "")] + ([f"v{s.version}"] if hasattr(s, "version")
                                                                      else [])).strip() for s in steps[:5]]
                return ", ".join(words) + (f" and {len(steps) - 5} more" if len(steps) > 5 else "")

            errors = "; ".join(r.error for r in round_results[-3:] if r.error)
            message = (f"reconcile stopped after {rounds} rounds without converging: last round "
                       f"{names([r.step for r in round_results]) or 'nothing'}, still planned {names(left)}"
                       + (f" (errors: {errors})" if errors else "") + "; the agent tries again on its next tick")
            log.warning("%s", message)
            if on_stall is not None:
                on_stall(message)
        return results

    # -- steps ------------------------------------------------------------------------------------------------------

    def apply(self, step: Step, now: datetime) -> StepResult:
        if isinstance(step, Report):
            return self._report(step)
        if isinstance(step, Install):
            record = InstallRecord(name=step.name, version=step.version, bundle_target=step.bundle_target,
                                   runtime=step.runtime, generation=step.generation, attempt=step.attempt,
                                   previous_version=self.installer.active_version(step.name),
                                   started_at=now, updated_at=now)
            return self._run(self.journal.begin(record), now, step)
        if isinstance(step, Resume):
            record = self.store.state.installs.get(step.name)
            if record is None or record.version != step.version:
                return StepResult(step, False, error="no such install record")
            return self._run(record, now, step)
        if isinstance(step, Rollback):
            record = self.store.state.installs.get(step.name)
            if record is None:
                return StepResult(step, True)
            return self._rollback(record, step.reason, step.mark_failed, now, step)
        if isinstance(step, Activate):
            return self._activate_installed(step, now)
        if isinstance(step, Remove):
            self.on_activate(step.name, None)
            self.installer.remove_model(step.name)
            self.store.update(lambda s: s.without_failed(step.name))
            return StepResult(step, True)
        raise TypeError(f"unknown step {step!r}")

    def _report(self, step: Report) -> StepResult:
        if self.reporter is None:
            return StepResult(step, False, error="no reporter")
        try:
            self.reporter(step.models)
        except AgentError as exc:
            return StepResult(step, False, error=str(exc))
        self.mark_reported(step.models)
        return StepResult(step, True)

    def mark_reported(self, models: list[ModelStatus]) -> None:
        """The cloud has these statuses; the planner reports again only when they change."""
        self.store.update(lambda s: s.model_copy(update={"reported": list(models)}))

    def _activate_installed(self, step: Activate, now: datetime) -> StepResult:
        before = self.installer.active_version(step.name)
        self.installer.activate(step.name, step.version, previous=before)
        try:
            self.on_activate(step.name, step.version)
        except EdgefleetError as exc:
            if before is not None:
                self.installer.activate(step.name, before, previous=None)
            else:
                self.installer.deactivate(step.name)
            self.on_activate(step.name, before)
            # Remembered like a failed install, so the planner backs off instead of switching in a hot loop.
            failed = FailedRecord(name=step.name, version=step.version, generation=step.generation,
                                  phase=Phase.ACTIVATE.value, reason=exc.reason, error=str(exc), at=now)
            self.store.update(lambda s: s.with_failed(failed))
            return StepResult(step, False, error=str(exc))
        self.store.update(lambda s: s.without_failed(step.name))
        return StepResult(step, True, ModelStatus(name=step.name, active_version=step.version,
                                                  target_version=step.version, state="active"))

    # -- the install lifecycle ----------------------------------------------------------------------------------------

    def _run(self, record: InstallRecord, now: datetime, step: Step) -> StepResult:
        phases = {Phase.DOWNLOAD: self._download, Phase.VERIFY: self._verify, Phase.UNPACK: self._unpack,
                  Phase.SMOKE_TEST: self._smoke_test, Phase.ACTIVATE: self._activate, Phase.COMMIT: self._commit}
        while record.phase not in (Phase.DONE, Phase.FAILED, Phase.ROLLBACK):
            phase = record.phase
            try:
                # Saved BEFORE the side effect; a crash in the phase resumes it, a crash loop ends in roll back.
                record = self.journal.enter(record, phase, now, **self._phase_changes(record, phase))
            except CrashLoop as exc:
                return self._rollback(record, f"crash loop: {exc}", True, now, step)
            self.on_phase(record.name, record.version, phase)
            try:
                record = phases[phase](record) or record
                outcome, reason, error = Outcome.OK, None, None
            except CloudUnavailable as exc:
                outcome, reason, error = Outcome.RETRY, exc.reason, str(exc)
            except EdgefleetError as exc:  # AgentError and the runtimes' errors (edgefleet.common)
                outcome, reason, error = Outcome.ERROR, exc.reason, str(exc)
            except OSError as exc:  # a full disk, a read-only file system: this attempt fails, the old model stays
                outcome, reason, error = Outcome.ERROR, "io_error", f"{type(exc).__name__}: {exc}"
            following = next_phase(phase, outcome)
            if outcome is Outcome.RETRY:
                delay = min(self.config.retry.retry_max_s, self.config.retry.retry_initial_s * 2 ** record.retries)
                delay *= random.uniform(0.5, 1.0)  # jitter: a fleet that lost the cloud must not return in step
                self.journal.retry(record, error, now + timedelta(seconds=delay))
                return StepResult(step, False, self._status(record, "installing", error), error)
            if following is Phase.FAILED:
                return self._fail(record, phase, reason, error, now, step)
            if following is Phase.ROLLBACK:
                return self._rollback(record, f"{reason}: {error}", True, now, step, failed_phase=phase)
            record = record.model_copy(update={"phase": following, "entries": 0, "error": None})
        return StepResult(step, True, self._status(record, "active"))

    def _phase_changes(self, record: InstallRecord, phase: Phase) -> dict[str, Any]:
        if phase is Phase.DOWNLOAD and record.download is None:
            return {"download": str(self.config.downloads_dir / f"{record.name}-v{record.version}.tar.gz")}
        if phase is Phase.UNPACK:
            # A fresh staging dir per attempt; its name is saved before anything is written into it.
            self.installer.remove_staging(record.staging)
            name = self.installer.new_staging(record.name, record.version)
            return {"staging": str(name)}
        return {}

    def _target_info(self, record: InstallRecord) -> Any:
        info = self.verifier.target_info(record.bundle_target)
        length = getattr(info, "length", None)
        if length is not None and length > self.bundle_max_bytes:
            raise BundleError(f"bundle {record.bundle_target} is {length} bytes, over the "
                              f"{self.config.limits.bundle_max_mb:g} MB limit (limits.bundle_max_mb)")
        return info

    def _download(self, record: InstallRecord) -> None:
        info = self._target_info(record)
        dest = Path(record.download)
        length = getattr(info, "length", None)
        if length is not None and dest.exists() and dest.stat().st_size > length:
            dest.unlink()  # longer than the trusted length: garbage, start over
        self.fetcher.fetch(record.bundle_target, dest, expected_length=length)

    def _verify(self, record: InstallRecord) -> None:
        info = self._target_info(record)
        try:
            self.verifier.verify_file(Path(record.download), info)
        except AgentError:
            _drop_download(record)  # never resume onto bytes that failed verification
            raise

    def _unpack(self, record: InstallRecord) -> None:
        manifest = unpack_bundle(record.download, record.staging, self.limits)
        self._check_manifest(record, manifest)

    def _check_manifest(self, record: InstallRecord, manifest: Manifest) -> None:
        if manifest.device_class != self.config.device_class:
            raise BundleError(f"bundle is built for device class {manifest.device_class!r}, this device is "
                              f"{self.config.device_class!r}; deploy the {self.config.device_class} build")
        if manifest.name != record.name or manifest.version != record.version:
            raise BundleError(f"bundle holds {manifest.name} v{manifest.version}, the desired state asked for "
                              f"{record.name} v{record.version}")
        if manifest.runtime != record.runtime:
            raise BundleError(f"bundle runtime {manifest.runtime!r} differs from the desired {record.runtime!r}")

    def _smoke_test(self, record: InstallRecord) -> None:
        staging = Path(record.staging or "")
        if not staging.is_dir():
            raise BundleError(f"staging directory {staging} is gone; the install restarts from unpack")
        manifest = read_manifest(staging)
        self._check_manifest(record, manifest)
        check_tree(staging, manifest)  # again: a power cut may have eaten data written before the last save
        smoke_test(self.runtime_factory(manifest.runtime), staging, manifest)

    def _activate(self, record: InstallRecord) -> None:
        staged = bool(record.staging) and Path(record.staging).is_dir()
        if staged or not self.installer.version_dir(record.name, record.version).is_dir():
            self.installer.promote(record.name, record.version, record.staging or "")
        self.installer.activate(record.name, record.version, previous=record.previous_version)
        self.on_activate(record.name, record.version)

    def _commit(self, record: InstallRecord) -> None:
        _drop_download(record)
        name = record.name
        self.store.update(lambda s: s.without_install(name).without_failed(name))
        keep = {record.version} | ({record.previous_version} if record.previous_version is not None else set())
        for version in self.installer.versions(name):
            if version not in keep and version not in (self.installer.active_version(name),
                                                       self.installer.previous_version(name)):
                self.installer.remove_version(name, version)

    # -- endings ------------------------------------------------------------------------------------------------------

    def _fail(self, record: InstallRecord, phase: Phase, reason: str, error: str, now: datetime,
              step: Step) -> StepResult:
        # Before activate: `current` was never touched, so clean up and remember the failure.
        self.installer.remove_staging(record.staging)
        _drop_download(record)
        failed = FailedRecord(name=record.name, version=record.version, generation=record.generation,
                              phase=phase.value, reason=reason, error=error, at=now, attempts=record.attempt)
        self.store.update(lambda s: s.without_install(record.name).with_failed(failed))
        log.warning("install of %s v%d failed in %s: %s", record.name, record.version, phase.value, error)
        return StepResult(step, False, self._status(record, "failed", f"{reason}: {error}", phase.value), error)

    def _rollback(self, record: InstallRecord, reason: str, mark_failed: bool, now: datetime, step: Step,
                  failed_phase: Phase | None = None) -> StepResult:
        failed_phase = failed_phase or (record.phase if record.phase is not Phase.ROLLBACK else None)
        if record.phase is not Phase.ROLLBACK:
            record = self.journal.enter(record, Phase.ROLLBACK, now, error=reason, mark_failed=mark_failed)
        self.on_phase(record.name, record.version, Phase.ROLLBACK)
        name, version, previous = record.name, record.version, record.previous_version
        if self.installer.active_version(name) == version:
            if previous is not None and self.installer.version_dir(name, previous).is_dir():
                self.installer.activate(name, previous, previous=None)
            else:
                self.installer.deactivate(name)
            self.on_activate(name, self.installer.active_version(name))
        self.installer.remove_staging(record.staging)
        if version not in (self.installer.active_version(name), self.installer.previous_version(name)):
            self.installer.remove_version(name, version)
        _drop_download(record)
        phase_name = failed_phase.value if failed_phase is not None else Phase.ROLLBACK.value
        if mark_failed:
            failed = FailedRecord(name=name, version=version, generation=record.generation, phase=phase_name,
                                  reason="rolled_back", error=reason, at=now, attempts=record.attempt)
            self.store.update(lambda s: s.without_install(name).with_failed(failed))
        else:
            self.journal.finish(name)
        log.warning("install of %s v%d rolled back: %s", name, version, reason)
        status = self._status(record, "failed" if mark_failed else "installing", reason, phase_name)
        return StepResult(step, not mark_failed, status, reason)

    def _status(self, record: InstallRecord, state: str, error: str | None = None,
                phase: str | None = None) -> ModelStatus:
        return ModelStatus(name=record.name, active_version=self.installer.active_version(record.name),
                           target_version=record.version, state=state, phase=phase or record.phase.value,
                           error=clip_text(error))  # an exception's text may exceed the contract's cap


def _drop_download(record: InstallRecord) -> None:
    if record.download:
        dest = Path(record.download)
        dest.unlink(missing_ok=True)
        dest.with_name(dest.name + ".part").unlink(missing_ok=True)


def _make_runtime(name: str, **options: Any) -> Runtime:
    return make_runtime(name, **options)


def smoke_test(runtime: Runtime, model_dir: Path, manifest: Manifest) -> None:
    """Load the model and compare its answer on the bundle's smoke input with the expected output."""
    try:
        runtime.load(model_dir, manifest)
        try:
            with np.load(model_dir / manifest.smoke_test.input_file, allow_pickle=False) as data:
                inputs = {k: data[k] for k in data.files}
            with np.load(model_dir / manifest.smoke_test.expected_file, allow_pickle=False) as data:
                expected = {k: data[k] for k in data.files}
        except (OSError, ValueError) as exc:
            raise BundleError(f"smoke test files are unreadable: {exc}") from None
        outputs = runtime.run(inputs)
        for name, want in expected.items():
            if name not in outputs:
                raise SmokeTestFailed(f"smoke test: the model has no output {name!r}")
            got = np.asarray(outputs[name])
            if got.shape != want.shape:
                raise SmokeTestFailed(f"smoke test: output {name!r} has shape {list(got.shape)}, "
                                      f"expected {list(want.shape)}")
            rtol, atol = manifest.smoke_test.rtol, manifest.smoke_test.atol
            if not np.allclose(got, want, rtol=rtol, atol=atol, equal_nan=True):
                worst = float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64))))
                raise SmokeTestFailed(f"smoke test: output {name!r} differs from the expected output by up to "
                                      f"{worst:.6g} (rtol={rtol:g}, atol={atol:g})")
    finally:
        runtime.close()
