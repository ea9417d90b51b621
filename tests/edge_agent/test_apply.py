"""edge_agent/apply.py: the executor on real bundles, with in-memory Fetcher and TargetVerifier."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest

from edgefleet.edge_agent.apply import Executor
from edgefleet.edge_agent.errors import RuntimeLoadError
from edgefleet.edge_agent.inference import InferenceService
from edgefleet.edge_agent.installer import Installer
from edgefleet.edge_agent.lifecycle import FORWARD, MAX_PHASE_ENTRIES, Phase
from edgefleet.edge_agent.reconcile import Activate, Install, Report, Rollback
from edgefleet.edge_agent.state import StateStore
from edgefleet.edge_agent.unpack import check_tree, read_manifest
from tests.edge_agent import agent_testkit as kit


class Crash(BaseException):
    """Stands in for SIGKILL in-process: nothing below catches a BaseException."""


class Env:
    def __init__(self, tmp_path: Path, **config_changes) -> None:
        self.config = kit.make_config(tmp_path, **config_changes)
        self.repo = kit.MemoryRepo()
        self.reports: list = []
        self.crash_at: Phase | None = None
        self.fail_activate: set[int] = set()
        self.clock_now = kit.T0
        self.build()

    def build(self) -> None:
        """(Re)build everything from disk, as a restarted process would."""
        self.store = StateStore(self.config.state_path)
        self.installer = Installer(self.config.models_dir)
        self.service = InferenceService(self.installer)
        self.executor = Executor(self.config, self.store, self.installer, self.repo, self.repo,
                                 on_activate=self.on_activate, on_phase=self.on_phase, reporter=self.reports.append)
        self.executor.start()
        self.service.load_active()

    def on_activate(self, name, version):
        if version in self.fail_activate:
            raise RuntimeLoadError(f"cannot load v{version} (test)")
        self.service.activate(name, version)

    def on_phase(self, name, version, phase):
        if phase == self.crash_at:
            raise Crash(phase)

    def publish(self, version: int, **kwargs) -> None:
        files = kwargs.pop("files", None)
        data = kit.make_bundle(files) if files is not None else kit.make_bundle(version=version, **kwargs)
        self.repo.publish(kit.target_path("digits", version), data)

    def converge(self, *versions: int, generation: int = 1):
        want = kit.desired([("digits", v) for v in versions], generation)
        return self.executor.converge(want, lambda: self.clock_now)

    def infer(self, x=(1.0, 2.0, 3.0)):
        out, prov = self.service.run("digits", {"x": np.asarray([x], dtype=np.float32)})
        return out["y"][0].tolist(), prov.model_version


def assert_complete(env: Env, version: int) -> None:
    assert env.installer.active_version("digits") == version
    directory = env.installer.active_dir("digits")
    check_tree(directory, read_manifest(directory))
    assert env.store.state.installs == {}
    assert not [p for p in (env.config.models_dir / "digits").iterdir() if p.name.startswith(".staging-")]


@pytest.fixture
def env(tmp_path):
    e = Env(tmp_path)
    e.publish(1)
    e.publish(2)
    return e


def test_fresh_install_then_upgrade_keeps_previous(env):
    results = env.converge(1)
    assert [type(r.step).__name__ for r in results] == ["Report", "Install", "Report"]
    assert_complete(env, 1)
    assert env.infer() == ([3.0, 5.0, 7.0], 1)  # y = 2x + 1
    assert env.reports[-1][0].state == "active" and env.reports[-1][0].active_version == 1
    assert not list(env.config.downloads_dir.iterdir())  # the bundle file goes at commit
    env.converge(2)
    assert_complete(env, 2)
    assert env.infer() == ([4.0, 7.0, 10.0], 2)  # y = 3x + 1
    assert env.installer.previous_version("digits") == 1
    assert env.executor.converge(kit.desired([("digits", 2)]), lambda: env.clock_now) == []  # nothing left


def test_downgrade_to_previous_is_a_pointer_switch(env):
    env.converge(1)
    env.converge(2)
    fetches = env.repo.fetch_calls
    results = env.converge(1, generation=2)
    assert any(isinstance(r.step, Activate) for r in results)
    assert env.repo.fetch_calls == fetches and env.infer()[1] == 1


def test_remove(env):
    env.converge(1)
    env.executor.converge(kit.desired([]), lambda: env.clock_now)
    assert env.installer.names() == [] and env.service.models() == {}


def failing_cases():
    files = kit.bundle_files(version=2)
    edited = dict(files)
    edited["model.onnx"] = kit.affine_model(scale=9.0)  # manifest hash no longer matches
    return [
        ("tampered in transit", dict(served=b"x" * 100), "untrusted", "verify"),
        ("manifest hash mismatch", dict(files=edited), "bad_bundle", "unpack"),
        ("wrong class", dict(device_class="rpi4"), "device class 'rpi4'", "unpack"),
        ("smoke test mismatch", dict(expected_override={"y": np.zeros((2, 3), np.float32)}), "smoke_test_failed",
         "smoke_test"),
        ("not a gzip", dict(raw=b"garbage"), "not a valid gzip tar", "unpack"),
    ]


@pytest.mark.parametrize("case,kwargs,error,phase", failing_cases(), ids=[c[0] for c in failing_cases()])
def test_a_failed_check_keeps_the_last_good_model(env, case, kwargs, error, phase):
    env.converge(1)
    target = kit.target_path("digits", 2)
    if "served" in kwargs:
        env.repo.publish(target, kit.make_bundle(version=2), served=kwargs["served"])
    elif "raw" in kwargs:
        env.repo.publish(target, kwargs["raw"])
    else:
        env.publish(2, **kwargs)
    env.converge(2)
    assert_complete(env, 1)
    assert env.infer()[1] == 1
    assert env.installer.versions("digits") == (1,)  # nothing of v2 reached the install directory
    status = env.reports[-1][0]
    assert status.state == "failed" and status.phase == phase and error in status.error
    assert status.active_version == 1 and status.target_version == 2
    # Not retried in a hot loop...
    assert not [r for r in env.converge(2) if isinstance(r.step, Install)]
    # ...but after the back-off, as attempt 2.
    env.clock_now += timedelta(seconds=env.config.retry.failed_retry_initial_s + 1)
    env.publish(2)
    results = env.converge(2)
    assert [r.step.attempt for r in results if isinstance(r.step, Install)] == [2]
    assert_complete(env, 2)


def test_newer_generation_retries_a_failure_at_once(env):
    env.converge(1)
    env.publish(2, device_class="rpi4")
    env.converge(2)
    env.publish(2)
    env.converge(2, generation=2)
    assert_complete(env, 2)


def test_bundle_over_the_size_limit_is_not_downloaded(tmp_path):
    env = Env(tmp_path, limits=kit.make_config(tmp_path).limits.__class__(bundle_max_mb=0.0001))
    env.publish(1)
    env.converge(1)
    assert env.repo.fetch_calls == 0
    assert "limits.bundle_max_mb" in env.reports[-1][0].error


def test_network_failure_backs_off_and_resumes(env):
    env.repo.fail_fetches = 1
    env.converge(1)
    record = env.store.state.installs["digits"]
    assert record.phase is Phase.DOWNLOAD and record.not_before is not None and record.entries == 0
    assert env.reports[-1][0].state == "installing" and "unreachable" in env.reports[-1][0].error
    assert env.converge(1) == []  # still backing off: nothing to do, nothing new to report
    env.clock_now = record.not_before
    env.converge(1)
    assert_complete(env, 1)


def test_download_resumes_from_partial_file(env):
    data = env.repo.targets[kit.target_path("digits", 1)]
    partial = env.config.downloads_dir / "digits-v1.tar.gz"

    def cut(offset):
        if offset >= 512 and not env.repo.fetch_calls > 1:
            raise Crash("power cut mid-download")

    env.repo.chunk_hook = cut
    env.repo.chunk_bytes = 256
    with pytest.raises(Crash):
        env.converge(1)
    assert 0 < partial.stat().st_size < len(data)
    env.repo.chunk_hook = lambda offset: None
    env.build()
    env.converge(1)
    assert_complete(env, 1)


def test_activation_failure_rolls_back(env):
    env.converge(1)
    env.fail_activate = {2}
    env.converge(2)
    assert_complete(env, 1)
    assert env.infer()[1] == 1
    status = env.reports[-1][0]
    assert status.state == "failed" and status.phase == "activate" and "cannot load v2" in status.error


@pytest.mark.parametrize("phase", FORWARD, ids=[p.value for p in FORWARD])
def test_crash_loop_in_any_phase_ends_in_rollback(env, phase):
    """In-process crashes (a BaseException after the phase save) at the same phase until the cap."""
    env.converge(1)
    env.crash_at = phase
    for attempt in range(1, MAX_PHASE_ENTRIES + 1):
        with pytest.raises(Crash):
            env.converge(2)
        env.build()  # restart
        assert env.store.state.installs["digits"].entries == attempt
        assert env.installer.active_version("digits") in (1, 2)
        assert env.service.models()["digits"] == env.installer.active_version("digits")
    results = env.converge(2)
    assert [r.step for r in results if isinstance(r.step, Rollback)]
    assert_complete(env, 1)
    assert env.infer()[1] == 1
    assert env.store.state.failed["digits"].reason == "rolled_back"
    assert f"phase {phase.value}" in env.reports[-1][0].error


def test_superseded_install_rolls_back_without_failure(env):
    env.publish(3)
    env.converge(1)
    env.crash_at = Phase.SMOKE_TEST
    with pytest.raises(Crash):
        env.converge(2)
    env.crash_at = None
    env.build()
    env.converge(3, generation=2)
    assert_complete(env, 3)
    assert "digits" not in env.store.state.failed


def test_state_file_is_plain_json(env):
    env.converge(1)
    data = json.loads(env.config.state_path.read_text())
    assert data["installs"] == {} and data["reported"][0]["state"] == "active"
    assert oct(env.config.state_path.stat().st_mode & 0o777) == "0o600"


def test_report_failure_is_retried(env):
    def broken(models):
        from edgefleet.edge_agent.errors import CloudUnavailable
        raise CloudUnavailable("offline")

    env.executor.reporter = broken
    results = env.converge(1)
    assert_complete(env, 1)
    assert isinstance(results[-1].step, Report) and not results[-1].ok
    env.executor.reporter = env.reports.append
    assert [type(r.step).__name__ for r in env.converge(1)] == ["Report"]


def test_start_collects_garbage_but_keeps_what_a_record_uses(env):
    env.converge(1)
    env.crash_at = Phase.VERIFY
    with pytest.raises(Crash):
        env.converge(2)
    downloads = env.config.downloads_dir
    (downloads / "digits-v2.tar.gz.part").write_bytes(b"partial")  # a fetcher's partial file beside the target
    (downloads / "orphan-v9.tar.gz").write_bytes(b"x")
    stale = env.installer.new_staging("digits", 7)
    env.crash_at = None
    env.build()
    assert sorted(p.name for p in downloads.iterdir()) == ["digits-v2.tar.gz", "digits-v2.tar.gz.part"]
    assert not stale.exists()
    env.converge(2)
    assert_complete(env, 2)
    assert list(downloads.iterdir()) == []


def test_failed_pointer_switch_is_remembered_not_looped(env):
    env.converge(1)
    env.converge(2)
    env.fail_activate = {1}
    results = env.converge(1, generation=2)
    assert [type(r.step).__name__ for r in results].count("Activate") == 1
    assert env.infer()[1] == 2 and env.store.state.failed["digits"].version == 1
    assert env.reports[-1][0].state == "failed"
