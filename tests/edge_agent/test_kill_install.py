"""SIGKILL a real install process at many points; after every kill the active model is the old complete version or
the new complete one, never half, and a restart converges.

The child (`install_child.py`) drives the real executor on a real data dir and bundles made here. It announces each
phase save on stdout; with EDGEFLEET_TEST_PAUSE_AT it blocks right after the save (before the side effect), with
EDGEFLEET_TEST_PAUSE_CHUNK in the middle of the download. Waits are bounded reads of its stdout, never sleeps.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from edgefleet.edge_agent.installer import Installer
from edgefleet.edge_agent.lifecycle import FORWARD, MAX_PHASE_ENTRIES
from edgefleet.edge_agent.state import StateStore
from edgefleet.edge_agent.unpack import check_tree, read_manifest
from tests.edge_agent import agent_testkit as kit

CHILD = Path(__file__).parent / "install_child.py"
WAIT_S = 60.0


class Child:
    def __init__(self, data_dir: Path, repo: Path, version: int, generation: int = 1, **env: str) -> None:
        environ = {**os.environ, **{f"EDGEFLEET_TEST_{k.upper()}": str(v) for k, v in env.items()}}
        self.proc = subprocess.Popen(
            [sys.executable, str(CHILD), str(data_dir), str(repo), "digits", str(version), str(generation)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environ)
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self.seen: list[str] = []

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def wait_line(self, prefix: str) -> str:
        deadline = time.monotonic() + WAIT_S
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                self.kill()
                raise AssertionError(f"child did not print {prefix!r} within {WAIT_S}s; saw {self.seen}") from None
            if line is None:
                err = self.proc.stderr.read()
                raise AssertionError(f"child exited before {prefix!r}; saw {self.seen}; stderr: {err[-2000:]}")
            self.seen.append(line)
            if line.startswith(prefix):
                return line

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(WAIT_S)

    def finish(self) -> dict:
        result = json.loads(self.wait_line("DONE ")[5:])
        assert self.proc.wait(WAIT_S) == 0
        return result


@pytest.fixture
def repo(tmp_path):
    root = tmp_path / "repo"
    trusted = {}
    for version in range(1, 16):
        target = kit.target_path("digits", version)
        data = kit.make_bundle(version=version)
        (root / target).parent.mkdir(parents=True, exist_ok=True)
        (root / target).write_bytes(data)
        trusted[target] = {"length": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (root / "trusted.json").write_text(json.dumps(trusted))
    return root


def assert_whole(data_dir: Path, allowed: set[int]) -> int:
    """The active model is one of `allowed`, complete: every file matches its manifest."""
    installer = Installer(data_dir / "models")
    version = installer.active_version("digits")
    assert version in allowed, f"active {version}, expected one of {allowed}"
    directory = installer.active_dir("digits")
    manifest = read_manifest(directory)
    assert manifest.version == version
    check_tree(directory, manifest)
    return version


def converge(data_dir: Path, repo: Path, version: int, expect: int, generation: int = 1) -> None:
    result = Child(data_dir, repo, version, generation).finish()
    assert result["active"] == expect
    assert_whole(data_dir, {expect})
    state = StateStore(data_dir / "state.json").state
    assert state.installs == {}
    assert not [p for p in (data_dir / "models" / "digits").iterdir() if p.name.startswith(".staging-")]


def test_kill_at_every_phase_and_mid_download(tmp_path, repo):
    data = tmp_path / "data"
    converge(data, repo, 1, expect=1)
    old = 1
    points = [{"pause_at": p.value} for p in FORWARD] + [{"pause_chunk": 2}, {"pause_chunk": 4}]
    for new, hook in enumerate(points, start=2):
        child = Child(data, repo, new, **hook)
        child.wait_line("PAUSED")
        child.kill()
        assert_whole(data, {old, new})
        converge(data, repo, new, expect=new)  # the restart resumes and finishes
        old = new


def test_kill_at_random_moments(tmp_path, repo):
    data = tmp_path / "data"
    converge(data, repo, 1, expect=1)
    rng = random.Random(1234)
    old = 1
    for new in range(2, 7):
        child = Child(data, repo, new)
        phase = rng.choice([p.value for p in FORWARD])
        child.wait_line(f"PHASE {phase}")
        # a moment inside the phase's side effect (or just after it): wherever it lands, the rule must hold
        deadline = time.monotonic() + rng.uniform(0, 0.02)
        while time.monotonic() < deadline and child.proc.poll() is None:
            pass
        child.kill()
        assert_whole(data, {old, new})
        converge(data, repo, new, expect=new)
        old = new


def test_kill_during_rollback_then_restart_finishes_it(tmp_path, repo):
    data = tmp_path / "data"
    converge(data, repo, 1, expect=1)
    child = Child(data, repo, 2, fail_activate=2, pause_at="rollback")
    child.wait_line("PAUSED rollback")
    child.kill()
    assert_whole(data, {1, 2})
    result = Child(data, repo, 2).finish()  # finishes the roll back; the failure is remembered, not retried at once
    assert result == {"active": 1, "failed": True}
    assert_whole(data, {1})
    assert Installer(data / "models").versions("digits") == (1,)


def test_crash_loop_in_one_phase_ends_in_rollback(tmp_path, repo):
    data = tmp_path / "data"
    converge(data, repo, 1, expect=1)
    converge(data, repo, 2, expect=2)
    for _ in range(MAX_PHASE_ENTRIES):  # the new version "kills the process" at activation every time
        child = Child(data, repo, 3, pause_at="activate")
        child.wait_line("PAUSED activate")
        child.kill()
        assert_whole(data, {2, 3})
    result = Child(data, repo, 3).finish()
    assert result == {"active": 2, "failed": True}
    assert_whole(data, {2})
    failed = StateStore(data / "state.json").state.failed["digits"]
    assert failed.version == 3 and "crash loop" in failed.error
