"""Test kit for the agent: tiny ONNX models, real bundles, and in-memory Fetcher / TargetVerifier.

Bundles follow docs/internals.md: a gzip tar of manifest.json, model.onnx, smoke/input.npz, smoke/expected.npz, with
the expected output computed by ONNX Runtime here, as the cloud does. `onnx` is a dev dependency (tests only).
Imported by the test files as `tests.edge_agent.agent_testkit` (pytest puts the repo root on sys.path: `pythonpath`).
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from edgefleet.edge_agent.config import AgentConfig
from edgefleet.edge_agent.errors import CloudUnavailable, TrustError
from edgefleet.protos.messages import DesiredModel, DesiredState

T0 = datetime(2030, 1, 1, tzinfo=timezone.utc)
DEVICE_CLASS = "x86-cpu"


def affine_model(scale: float = 2.0, bias: float = 1.0, width: int = 3) -> bytes:
    """Y = X * scale + bias, X float32 [batch, width] with a dynamic batch."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])
    s = helper.make_tensor("s", TensorProto.FLOAT, [1], [scale])
    b = helper.make_tensor("b", TensorProto.FLOAT, [1], [bias])
    graph = helper.make_graph([helper.make_node("Mul", ["x", "s"], ["xs"]),
                               helper.make_node("Add", ["xs", "b"], ["y"])],
                              "affine", [x], [y], initializer=[s, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8  # loadable by every onnxruntime >= 1.14
    onnx.checker.check_model(model)
    return model.SerializeToString()


def ort_run(model_bytes: bytes, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    return {o.name: v for o, v in zip(sess.get_outputs(), sess.run(None, inputs))}


def _npz(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def bundle_files(name: str = "digits", version: int = 1, device_class: str = DEVICE_CLASS, *,
                 model: bytes | None = None, expected_override: dict[str, np.ndarray] | None = None,
                 runtime: str = "onnxruntime", emulation_factor: float | None = None) -> dict[str, bytes]:
    """The files of a bundle, manifest.json included, consistent with each other."""
    model = model or affine_model(scale=float(version + 1))
    smoke_in = {"x": np.arange(6, dtype=np.float32).reshape(2, 3)}
    expected = expected_override or ort_run(model, smoke_in)
    files = {"model.onnx": model, "smoke/input.npz": _npz(smoke_in), "smoke/expected.npz": _npz(expected)}
    manifest = {
        "kind": "manifest", "schema_version": 1, "name": name, "version": version, "device_class": device_class,
        "runtime": runtime, "execution_providers": ["CUDAExecutionProvider", "CPUExecutionProvider"],
        "precision": "fp32", "model_file": "model.onnx",
        "inputs": [{"name": "x", "dtype": "float32", "shape": [None, 3]}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": [None, 3]}],
        "files": [{"path": p, "sha256": sha(d), "size": len(d)} for p, d in files.items()],
        "smoke_test": {"input_file": "smoke/input.npz", "expected_file": "smoke/expected.npz",
                       "rtol": 1e-5, "atol": 1e-6},
        "created_at": T0.isoformat(),
    }
    if emulation_factor is not None:
        manifest["emulation_factor"] = emulation_factor
    return {"manifest.json": json.dumps(manifest).encode(), **files}


def tar_gz(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def file_member(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    return info, data


def make_bundle(files: dict[str, bytes] | None = None, **kwargs) -> bytes:
    files = files if files is not None else bundle_files(**kwargs)
    return tar_gz([file_member(n, d) for n, d in files.items()])


def target_path(name: str, version: int, device_class: str = DEVICE_CLASS) -> str:
    return f"bundles/{name}/v{version}/{device_class}.tar.gz"


def desired(models: list[tuple[str, int]], generation: int = 1, device_class: str = DEVICE_CLASS) -> DesiredState:
    return DesiredState(device_id="dev-1", device_class=device_class, generation=generation, issued_at=T0,
                        expires_at=T0 + timedelta(days=1),
                        models=[DesiredModel(name=n, version=v, bundle_target=target_path(n, v, device_class))
                                for n, v in models])


def make_config(tmp: Path, **changes) -> AgentConfig:
    base = dict(device_id="dev-1", device_class=DEVICE_CLASS, cloud_url="http://127.0.0.1:9", data_dir=tmp / "data")
    base.update(changes)
    return AgentConfig(**base)


# -- the seams ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TargetInfo:
    length: int
    sha256: str


@dataclass
class MemoryRepo:
    """Both seams over one dict of target bytes: `trusted` is what the (pretend) TUF metadata says."""

    targets: dict[str, bytes] = field(default_factory=dict)
    trusted: dict[str, TargetInfo] = field(default_factory=dict)
    fail_fetches: int = 0  # the next N fetches raise CloudUnavailable
    chunk_hook: Callable[[int], None] | None = None
    fetch_calls: int = 0
    chunk_bytes: int = 4096

    def publish(self, path: str, data: bytes, *, served: bytes | None = None) -> None:
        """Trust `data`; serve `served` (tampered bytes) when given."""
        self.trusted[path] = TargetInfo(len(data), sha(data))
        self.targets[path] = served if served is not None else data

    # TargetVerifier
    def target_info(self, path: str) -> TargetInfo:
        if path not in self.trusted:
            raise TrustError(f"target {path} is not in trusted metadata")
        return self.trusted[path]

    def verify_file(self, path: Path, info: TargetInfo) -> None:
        data = Path(path).read_bytes()
        if len(data) != info.length or sha(data) != info.sha256:
            raise TrustError(f"{path.name}: length or sha256 differs from trusted metadata")

    # Fetcher: resumes from what `dest` already holds, in chunks
    def fetch(self, path: str, dest: Path, *, expected_length: int | None = None) -> None:
        self.fetch_calls += 1
        if self.fail_fetches > 0:
            self.fail_fetches -= 1
            raise CloudUnavailable("cloud unreachable (test)")
        data = self.targets[path]
        dest.parent.mkdir(parents=True, exist_ok=True)
        have = dest.stat().st_size if dest.exists() else 0
        limit = len(data) if expected_length is None else min(len(data), expected_length)
        with open(dest, "ab") as fh:
            for offset in range(have, limit, self.chunk_bytes):
                fh.write(data[offset:min(offset + self.chunk_bytes, limit)])
                fh.flush()
                if self.chunk_hook:
                    self.chunk_hook(offset)


def install_direct(models_dir: Path, name: str = "digits", version: int = 1, tmp: Path | None = None):
    """Put a real bundle in place without the executor (for tests of what serves it)."""
    from edgefleet.edge_agent.installer import Installer
    from edgefleet.edge_agent.unpack import unpack_bundle

    inst = Installer(models_dir)
    archive = (tmp or models_dir.parent) / f"{name}-{version}.tar.gz"
    archive.write_bytes(make_bundle(name=name, version=version))
    staging = inst.new_staging(name, version)
    unpack_bundle(archive, staging)
    inst.promote(name, version, staging)
    inst.activate(name, version, previous=inst.active_version(name))
    return inst
