"""The `Runtime` seam: load a verified model directory, run named numpy tensors, describe inputs and outputs.

Theory of operation: the rest of the agent never imports an inference engine. It asks `make_runtime(name)` for a
`Runtime` by the manifest's `runtime` field ("onnxruntime", "litert") and talks to it through this protocol only, so a
new engine is one file (`runtimes/litert.py`) and one `register_runtime` call. An engine whose Python package is not
installed on this device fails with a `RuntimeLoadError` that says which package to install, not an ImportError.

A runtime wraps its engine's exceptions where they enter our code: load problems become `RuntimeLoadError`, bad
inputs `InferenceError`. `run` must be safe to call from several threads at once (ONNX Runtime sessions are).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from edgefleet.common.errors import RuntimeLoadError
from edgefleet.protos.messages import Manifest, TensorSpec


@runtime_checkable
class Runtime(Protocol):
    name: str

    def load(self, model_dir: Path, manifest: Manifest) -> None: ...

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    @property
    def inputs(self) -> list[TensorSpec]: ...

    @property
    def outputs(self) -> list[TensorSpec]: ...

    def close(self) -> None: ...


RuntimeFactory = Callable[..., Runtime]

# name -> (python module that must be importable, pip package to suggest, factory or None when not built yet)
_REGISTRY: dict[str, tuple[str, str, RuntimeFactory | None]] = {}


def register_runtime(name: str, module: str, pip_package: str, factory: RuntimeFactory | None) -> None:
    _REGISTRY[name] = (module, pip_package, factory)


def available_runtimes() -> list[str]:
    return sorted(n for n, (mod, _, fac) in _REGISTRY.items() if fac is not None and importlib.util.find_spec(mod))


def make_runtime(name: str, **options: Any) -> Runtime:
    """A fresh, unloaded runtime for the manifest's `runtime` name; `options` e.g. intra_op_threads."""
    if name not in _REGISTRY:
        raise RuntimeLoadError(f"runtime {name!r} is unknown to this agent; known: {', '.join(sorted(_REGISTRY))}")
    module, pip_package, factory = _REGISTRY[name]
    if importlib.util.find_spec(module) is None:
        raise RuntimeLoadError(f"runtime {name!r} is not installed on this device: pip install {pip_package}")
    if factory is None:
        raise RuntimeLoadError(f"runtime {name!r} is installed but this agent version cannot drive it yet; "
                               "deploy an onnxruntime build for this device class")
    return factory(**options)
