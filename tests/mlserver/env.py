"""MLServer's own virtual environment: built once per machine from PyPI, reused by every test run after.

Theory: MLServer 1.7.1 pins its web stack (fastapi, starlette, uvicorn, pydantic ranges, protobuf, grpcio) to
releases older than ours, so it cannot share /work/main/.venv; and it is a *peer* server in the tests (the agent
must speak to it over the network exactly as to Triton or KServe), so it belongs in its own process and its own
interpreter anyway. The venv lives under a cache folder keyed by a hash of (requirements, Python version):
`$EDGEFLEET_MLSERVER_VENV` names the venv itself, else `~/.cache/edgefleet/mlserver-<hash>`. Changing the pins makes
a new venv instead of mutating one a running test uses. A venv is complete only once its `.complete` marker exists;
an flock on `<venv>.lock` makes a second pytest process wait for the first one's build instead of racing it, and a
folder without the marker (a build killed half way) is removed and built again. The same shape as the TFLite
converter's venv (cloud/distill/converter.py).

Built with the base interpreter (`sys._base_executable`), not this venv's python, so the new venv does not
inherit ours. `BuildInfo.seconds` is the build's time: 44-45 s measured here (empty pip cache, 404 MB venv).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# mlserver pins its own stack; onnxruntime and numpy are left to its resolver (the runtime class only needs
# InferenceSession and ndarray). uvloop < 0.22: with 0.23 (what pip picks) MLServer 1.7.1's inference-pool worker
# dies at start (`asyncio.get_event_loop()` raises "There is no current event loop" in worker.py), so any
# parallel_workers > 0, MLServer's own default, cannot serve.
REQUIREMENTS = ("mlserver==1.7.1", "onnxruntime", "numpy", "uvloop<0.22")
BUILD_TIMEOUT_S = 1200  # measured 44-45 s on the 2-core machine from the PyPI mirror (404 MB); a slow link needs more


class MLServerUnavailable(RuntimeError):
    """MLServer cannot be installed or started here; the message says why and what to do."""


@dataclass(frozen=True)
class BuildInfo:
    venv: Path
    built: bool  # False: an existing, complete venv was reused
    seconds: float


def _key(requirements: tuple[str, ...]) -> str:
    text = "\n".join(requirements) + f"\npython {sys.version_info.major}.{sys.version_info.minor}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def default_venv(requirements: tuple[str, ...] = REQUIREMENTS) -> Path:
    configured = os.environ.get("EDGEFLEET_MLSERVER_VENV")
    if configured:
        return Path(configured)
    return Path.home() / ".cache" / "edgefleet" / f"mlserver-{_key(requirements)}"


class MLServerEnv:
    """The MLServer venv. `ensure()` builds it once (serialised across processes); `.mlserver` is its CLI."""

    def __init__(self, venv: Path | None = None, requirements: tuple[str, ...] = REQUIREMENTS,
                 python: str | None = None, build_timeout_s: float = BUILD_TIMEOUT_S) -> None:
        self.requirements = tuple(requirements)
        self.venv = Path(venv) if venv is not None else default_venv(self.requirements)
        self.python = python or os.environ.get("EDGEFLEET_MLSERVER_PYTHON") or getattr(
            sys, "_base_executable", sys.executable)
        self.build_timeout_s = build_timeout_s

    @property
    def venv_python(self) -> Path:
        return self.venv / "bin" / "python"

    @property
    def mlserver(self) -> Path:
        return self.venv / "bin" / "mlserver"

    @property
    def marker(self) -> Path:
        return self.venv / ".complete"

    def ready(self) -> bool:
        return self.marker.is_file() and self.venv_python.exists() and self.mlserver.exists()

    def ensure(self) -> BuildInfo:
        if self.ready():
            return BuildInfo(self.venv, False, 0.0)
        self.venv.parent.mkdir(parents=True, exist_ok=True)
        with open(self.venv.with_name(self.venv.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # a second pytest process waits here while the first builds
            try:
                if self.ready():
                    return BuildInfo(self.venv, False, 0.0)
                start = time.monotonic()
                self._build()
                return BuildInfo(self.venv, True, time.monotonic() - start)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _build(self) -> None:
        if self.venv.exists():
            shutil.rmtree(self.venv)  # a build that died half way: no marker, start over
        pip = [str(self.venv_python), "-m", "pip", "install", "--disable-pip-version-check", "--no-input"]
        steps = [[self.python, "-m", "venv", str(self.venv)], [*pip, *self.requirements]]
        # Our venv's variables must not steer the new one (a PYTHONPATH would put our numpy 2 / fastapi in front).
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
        deadline = time.monotonic() + self.build_timeout_s
        for cmd in steps:
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                                      timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                shutil.rmtree(self.venv, ignore_errors=True)
                raise MLServerUnavailable(
                    f"building the MLServer venv {self.venv} took over {self.build_timeout_s:.0f} s "
                    f"({' '.join(cmd[:5])}...); check the link to PyPI (or PIP_INDEX_URL's mirror)") from None
            except OSError as exc:
                raise MLServerUnavailable(f"cannot run {cmd[0]} to build the MLServer venv: {exc}; set "
                                          "EDGEFLEET_MLSERVER_PYTHON to a Python 3.9-3.12 interpreter") from None
            if proc.returncode != 0:
                shutil.rmtree(self.venv, ignore_errors=True)
                tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-12:])
                raise MLServerUnavailable(
                    f"building the MLServer venv failed ({' '.join(cmd[:5])}... exited {proc.returncode}); pip "
                    f"needs PyPI or a mirror (PIP_INDEX_URL) to install {', '.join(self.requirements)}. "
                    f"Last lines:\n{tail}") from None
        self.marker.write_text("\n".join(self.requirements) + "\n")


__all__ = ["BUILD_TIMEOUT_S", "REQUIREMENTS", "BuildInfo", "MLServerEnv", "MLServerUnavailable", "default_venv"]
