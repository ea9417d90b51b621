"""The TFLite converter: onnx2tf in its own virtual environment, made on first use and run by subprocess.

Theory: onnx2tf pins TensorFlow 2.19, numpy 1.26 and onnxruntime 1.23, which cannot share a venv with ours (numpy 2,
onnxruntime 1.32, torch). So the worker keeps a second venv under `$EDGEFLEET_CONVERTER_DIR` (default
`~/.cache/edgefleet/converter`), one folder per hash of (requirements, Python version): changing the pins makes a
new venv instead of mutating one in use. A venv is complete only once its `.complete` marker exists; an flock on
`{hash}.lock` makes a second worker wait for the first one's build instead of racing it, and a folder without the
marker (a build killed half way) is removed and built again. Each conversion runs `_tflite_convert.py` with the
venv's python in a fresh work directory, under a timeout; the model never enters our process as TensorFlow objects.

Measured on the build machine (2 vCPUs, PyPI over the network, empty pip cache): building the venv took 122 s
(2.6 GB), 98 s again with a warm pip cache; converting the small DS-CNNs of the tests took 9-18 s per
precision (TensorFlow start-up dominates).
A failed build (no network, pip error, wrong Python) raises ConverterUnavailable with pip's last lines and what to
do; a model onnx2tf cannot convert raises ConverterUnavailable too (detail["stage"] = "convert"), so the pipeline
drops the TFLite variant for that class and says why instead of failing the job.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# onnx2tf 1.29.24 pins its own stack (tensorflow==2.19.0, numpy==1.26.4, onnx==1.19.1, ai-edge-litert==2.1.0, ...);
# we pin onnx2tf only, so the hash changes exactly when we choose another converter release.
REQUIREMENTS = ("onnx2tf==1.29.24",)
BUILD_TIMEOUT_S = 1800  # 122 s measured with a fast link; TensorFlow alone is ~600 MB to download
CONVERT_TIMEOUT_S = 600  # 10 s measured for a small CNN; onnx2tf's graph checks grow with model size
SCRIPT = Path(__file__).with_name("_tflite_convert.py")
# The file onnx2tf would download from GitHub (see _tflite_convert.py); it reads it from the working directory first.
ONNX2TF_SAMPLE_FILE = "calibration_image_sample_data_20x128x128x3_float32.npy"


def _unavailable(message: str, **detail):
    from edgefleet.cloud.distill.errors import ConverterUnavailable

    return ConverterUnavailable(message, detail=detail or None)


def default_root() -> Path:
    configured = os.environ.get("EDGEFLEET_CONVERTER_DIR")
    return Path(configured) if configured else Path.home() / ".cache" / "edgefleet" / "converter"


@dataclass(frozen=True)
class BuildInfo:
    venv: Path
    built: bool  # False: an existing venv was reused
    seconds: float


class ConverterEnv:
    """The converter venv for one requirements set. `ensure()` builds it once; `convert()` runs onnx2tf in it."""

    def __init__(self, root: Path | None = None, requirements: tuple[str, ...] = REQUIREMENTS,
                 python: str | None = None, build_timeout_s: float = BUILD_TIMEOUT_S) -> None:
        self.root = Path(root) if root is not None else default_root()
        self.requirements = tuple(requirements)
        # The base interpreter, not this venv's: `python -m venv` from inside a venv works but nests oddly on some
        # distributions. EDGEFLEET_CONVERTER_PYTHON picks another (TensorFlow 2.19 wheels exist for 3.9-3.12).
        self.python = python or os.environ.get("EDGEFLEET_CONVERTER_PYTHON") or getattr(sys, "_base_executable",
                                                                                         sys.executable)
        self.build_timeout_s = build_timeout_s
        key = "\n".join(self.requirements) + f"\npython {sys.version_info.major}.{sys.version_info.minor}"
        self.key = hashlib.sha256(key.encode()).hexdigest()[:16]
        self.venv = self.root / f"venv-{self.key}"

    @property
    def venv_python(self) -> Path:
        return self.venv / "bin" / "python"

    def ready(self) -> bool:
        return (self.venv / ".complete").is_file() and self.venv_python.exists()

    def ensure(self) -> BuildInfo:
        if self.ready():
            return BuildInfo(self.venv, False, 0.0)
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / f"{self.key}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # a second worker waits here while the first builds
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
        steps = [[self.python, "-m", "venv", str(self.venv)],
                 [str(self.venv_python), "-m", "pip", "install", "--disable-pip-version-check", "--no-input",
                  *self.requirements]]
        deadline = time.monotonic() + self.build_timeout_s
        for cmd in steps:
            try:
                left_s = max(1.0, deadline - time.monotonic())
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=left_s)
            except subprocess.TimeoutExpired:
                shutil.rmtree(self.venv, ignore_errors=True)
                raise _unavailable(f"building the TFLite converter venv took over {self.build_timeout_s:.0f} s "
                                   f"({' '.join(cmd[:4])}...); check the network to PyPI or raise the build timeout",
                                   stage="build", venv=str(self.venv)) from None
            except OSError as exc:
                raise _unavailable(f"cannot run {cmd[0]} to build the TFLite converter venv: {exc}; set "
                                   "EDGEFLEET_CONVERTER_PYTHON to a Python 3.10-3.12 interpreter",
                                   stage="build") from None
            if proc.returncode != 0:
                shutil.rmtree(self.venv, ignore_errors=True)
                tail = "\n".join([line for line in (proc.stderr or proc.stdout).splitlines()
                                  if not line.startswith("WARNING: Location")][-8:])
                raise _unavailable(f"building the TFLite converter venv failed ({' '.join(cmd[2:5])} exited "
                                   f"{proc.returncode}). pip needs PyPI (or a mirror via PIP_INDEX_URL) to install "
                                   f"{', '.join(self.requirements)}; TFLite variants are skipped until it works. "
                                   f"Last lines:\n{tail}", stage="build", venv=str(self.venv)) from None
        (self.venv / ".complete").write_text("\n".join(self.requirements) + "\n")

    def convert(self, onnx_bytes: bytes, calib_x: np.ndarray | None, work: Path, precision: str = "fp32",
                timeout_s: float = CONVERT_TIMEOUT_S) -> bytes:
        """TFLite bytes for `onnx_bytes`. int8 calibrates on `calib_x` (samples with the batch axis first)."""
        self.ensure()
        work = Path(tempfile.mkdtemp(prefix="tflite-", dir=work))  # onnx2tf rewrites its input file in place
        model, out = work / "model.onnx", work / "model.tflite"
        model.write_bytes(onnx_bytes)
        cmd = [str(self.venv_python), str(SCRIPT), str(model), str(out), "--precision", precision]
        if calib_x is not None:
            np.save(work / "calib.npy", np.ascontiguousarray(calib_x, dtype=np.float32))
            cmd += ["--calib", str(work / "calib.npy")]
            np.save(work / ONNX2TF_SAMPLE_FILE, onnx2tf_sample_images(calib_x))
        elif precision == "int8":
            raise ValueError("int8 TFLite needs calibration samples (calib_x)")
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": "-1", "PYTHONNOUSERSITE": "1"}
        env.pop("PYTHONPATH", None)  # our packages (numpy 2) must not leak into the TensorFlow interpreter
        try:
            proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=timeout_s, env=env)
        except subprocess.TimeoutExpired:
            raise _unavailable(f"onnx2tf did not finish within {timeout_s:.0f} s", stage="convert",
                               work=str(work)) from None
        if proc.returncode != 0 or not out.is_file():
            tail = "\n".join((proc.stderr + proc.stdout).strip().splitlines()[-10:])
            raise _unavailable(f"onnx2tf could not convert this model to TFLite ({precision}); the class keeps its "
                               f"ONNX variants. Last lines:\n{tail}", stage="convert", work=str(work))
        return out.read_bytes()


def onnx2tf_sample_images(x: np.ndarray, count: int = 20, size: int = 128) -> np.ndarray:
    """The (20, 128, 128, 3) float32 array in [0, 1] that onnx2tf would otherwise fetch, made from our samples
    (nearest-neighbour resize of NCHW images, channels repeated or cut to 3; non-image inputs tiled)."""
    x = np.asarray(x, dtype=np.float32)
    idx = np.arange(count) % max(1, len(x))
    if x.ndim == 4:
        images = x[idx]
        rows = np.arange(size) * images.shape[2] // size
        cols = np.arange(size) * images.shape[3] // size
        images = images[:, :, rows][:, :, :, cols].transpose(0, 2, 3, 1)
        images = images[..., np.arange(3) % images.shape[-1]]
    else:
        flat = x[idx].reshape(count, -1)
        images = np.resize(flat, (count, size * size * 3)).reshape(count, size, size, 3)
    low, high = float(images.min()), float(images.max())
    return ((images - low) / (high - low if high > low else 1.0)).astype(np.float32)


__all__ = ["BuildInfo", "ConverterEnv", "REQUIREMENTS", "default_root", "onnx2tf_sample_images"]
