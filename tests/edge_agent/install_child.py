"""A real agent-side install in its own process, for test_kill_install.py to SIGKILL at chosen points.

    python install_child.py DATA_DIR REPO_DIR NAME VERSION GENERATION

REPO_DIR holds the targets (bundles/...) and trusted.json ({target: {"length", "sha256"}}). The child builds the
real StateStore, Installer, Executor and InferenceService on DATA_DIR and converges to NAME@VERSION, printing a line
per event. Hooks (environment):
    EDGEFLEET_TEST_PAUSE_AT=phase   print "PAUSED phase" after that phase is saved, then block on stdin (to be killed)
    EDGEFLEET_TEST_PAUSE_CHUNK=n    same, after the n-th download chunk (mid-download)
    EDGEFLEET_TEST_FAIL_ACTIVATE=v  the runtime reload of version v fails (drives the roll back path)
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

from edgefleet.edge_agent.apply import Executor
from edgefleet.edge_agent.config import AgentConfig
from edgefleet.edge_agent.errors import CloudUnavailable, RuntimeLoadError, TrustError
from edgefleet.edge_agent.inference import InferenceService
from edgefleet.edge_agent.installer import Installer
from edgefleet.edge_agent.state import StateStore
from edgefleet.protos.messages import DesiredModel, DesiredState


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def pause(what: str) -> None:
    say(f"PAUSED {what}")
    sys.stdin.readline()  # the test kills us here


class FileRepo:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.trusted = json.loads((root / "trusted.json").read_text())
        self.chunks = 0
        self.pause_chunk = int(os.environ.get("EDGEFLEET_TEST_PAUSE_CHUNK", "0"))

    def target_info(self, target: str):
        if target not in self.trusted:
            raise TrustError(f"unknown target {target}")
        return type("Info", (), self.trusted[target])

    def verify_file(self, path: Path, info) -> None:
        data = path.read_bytes()
        if len(data) != info.length or hashlib.sha256(data).hexdigest() != info.sha256:
            raise TrustError("hash mismatch")

    def fetch(self, target: str, dest: Path, *, expected_length: int | None = None) -> None:
        src = self.root / target
        if not src.exists():
            raise CloudUnavailable("missing")
        have = dest.stat().st_size if dest.exists() else 0
        with open(src, "rb") as fh, open(dest, "ab") as out:
            fh.seek(have)
            while chunk := fh.read(256):
                out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
                self.chunks += 1
                if self.chunks == self.pause_chunk:
                    pause(f"chunk {self.chunks}")


def main() -> None:
    data_dir, repo_dir, name, version, generation = sys.argv[1:6]
    config = AgentConfig(device_id="dev-1", device_class="x86-cpu", cloud_url="http://127.0.0.1:9",
                         data_dir=Path(data_dir))
    pause_at = os.environ.get("EDGEFLEET_TEST_PAUSE_AT")
    fail_activate = int(os.environ.get("EDGEFLEET_TEST_FAIL_ACTIVATE", "0"))
    store = StateStore(config.state_path)
    installer = Installer(config.models_dir)
    service = InferenceService(installer)
    repo = FileRepo(Path(repo_dir))

    def on_activate(model: str, v: int | None) -> None:
        if v is not None and v == fail_activate:
            raise RuntimeLoadError(f"v{v} refuses to load (test)")
        service.activate(model, v)

    def on_phase(model: str, v: int, phase) -> None:
        say(f"PHASE {phase.value}")
        if phase.value == pause_at:
            pause(phase.value)

    executor = Executor(config, store, installer, repo, repo, on_activate=on_activate, on_phase=on_phase,
                        reporter=lambda models: None)
    executor.start()
    service.load_active()
    say(f"SERVING {json.dumps(service.models())}")
    now = datetime(2030, 1, 1, tzinfo=timezone.utc)
    desired = DesiredState(device_id="dev-1", device_class="x86-cpu", generation=int(generation), issued_at=now,
                           expires_at=now + timedelta(days=1),
                           models=[DesiredModel(name=name, version=int(version),
                                                bundle_target=f"bundles/{name}/v{version}/x86-cpu.tar.gz")])
    executor.converge(desired, lambda: now)
    say(f"DONE {json.dumps({'active': installer.active_version(name), 'failed': name in store.state.failed})}")


if __name__ == "__main__":
    main()
