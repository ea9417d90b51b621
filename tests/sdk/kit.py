"""The digits model of the SDK tests and bench/offload.py: a 64-128-64-10 float MLP built with `onnx.helper` (the
shape of examples/digits' classifier, seeded weights, no training), and a real bundle of it installed on disk.

`install_digits` writes the bundle files (manifest matching the model, smoke tensors computed by ONNX Runtime),
packs them as the cloud does, and unpacks, promotes and activates them with the agent's own installer.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tests.edge_agent import agent_testkit as kit

INPUT, OUTPUT = "input", "probabilities"


def digits_mlp(seed: int = 0) -> bytes:
    """input float32 [batch, 64] -> Gemm-Relu-Gemm-Relu-Gemm-Softmax -> probabilities float32 [batch, 10]."""
    rng = np.random.default_rng(seed)
    sizes = [64, 128, 64, 10]
    inits, nodes, prev = [], [], INPUT
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        w = (rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32)
        bias = (rng.standard_normal(b) * 0.1).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(bias, f"b{i}")]
        out = f"h{i}"
        nodes.append(helper.make_node("Gemm", [prev, f"w{i}", f"b{i}"], [out]))
        if i < len(sizes) - 2:
            nodes.append(helper.make_node("Relu", [out], [f"r{i}"]))
            out = f"r{i}"
        prev = out
    nodes.append(helper.make_node("Softmax", [prev], [OUTPUT], axis=1))
    graph = helper.make_graph(nodes, "digits_mlp", [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT,
                                                                                 ["batch", 64])],
                              [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["batch", 10])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def sample(rows: int = 1, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).random((rows, 64), dtype=np.float32) * 16


def bundle_files(name: str = "digits", version: int = 1, model: bytes | None = None) -> dict[str, bytes]:
    model = model or digits_mlp()
    smoke_in = {INPUT: sample(2)}
    files = {"model.onnx": model, "smoke/input.npz": kit._npz(smoke_in),
             "smoke/expected.npz": kit._npz(kit.ort_run(model, smoke_in))}
    manifest = {
        "kind": "manifest", "schema_version": 1, "name": name, "version": version, "device_class": kit.DEVICE_CLASS,
        "runtime": "onnxruntime", "execution_providers": ["CPUExecutionProvider"], "precision": "fp32",
        "model_file": "model.onnx",
        "inputs": [{"name": INPUT, "dtype": "float32", "shape": [None, 64]}],
        "outputs": [{"name": OUTPUT, "dtype": "float32", "shape": [None, 10]}],
        "files": [{"path": p, "sha256": kit.sha(d), "size": len(d)} for p, d in files.items()],
        "smoke_test": {"input_file": "smoke/input.npz", "expected_file": "smoke/expected.npz",
                       "rtol": 1e-5, "atol": 1e-6},
        "created_at": kit.T0.isoformat(),
    }
    return {"manifest.json": json.dumps(manifest).encode(), **files}


def install_digits(models_dir: Path, name: str = "digits", version: int = 1, tmp: Path | None = None):
    """A real installed, active digits bundle under `models_dir`; returns the agent's `Installer`."""
    from edgefleet.edge_agent.installer import Installer
    from edgefleet.edge_agent.unpack import unpack_bundle

    inst = Installer(models_dir)
    archive = (tmp or models_dir.parent) / f"{name}-{version}.tar.gz"
    archive.parent.mkdir(parents=True, exist_ok=True)
    archive.write_bytes(kit.make_bundle(files=bundle_files(name, version)))
    staging = inst.new_staging(name, version)
    unpack_bundle(archive, staging)
    inst.promote(name, version, staging)
    inst.activate(name, version, previous=inst.active_version(name))
    return inst


@contextmanager
def serving(tmp: Path, *, read_timeout_s: float = 10.0, max_body_bytes: int = 1 << 20, router_factory=None,
            watts: float | None = 4.0):
    """A real agent local API (LocalApi + InferenceService + Telemetry) over an installed digits bundle, on TCP port
    0 and a unix socket under `tmp`. Yields (api, service, telemetry, socket path)."""
    from edgefleet.edge_agent.inference import InferenceService
    from edgefleet.edge_agent.local_api import LocalApi
    from edgefleet.edge_agent.meters import ModelledMeter
    from edgefleet.edge_agent.outbox import Outbox
    from edgefleet.edge_agent.telemetry import Telemetry

    installer = install_digits(tmp / "models", tmp=tmp)
    telemetry = Telemetry("dev-1", 60, Outbox(tmp / "outbox", 1 << 20))
    service = InferenceService(installer, meter=ModelledMeter(active_watts=watts) if watts else None,
                               telemetry=telemetry)
    assert service.load_active() == {"digits": 1}
    sock = tmp / "api.sock"
    router = router_factory(service) if router_factory else None
    api = LocalApi(service, unix_socket=sock, api_json=tmp / "api.json", max_body_bytes=max_body_bytes,
                   read_timeout_s=read_timeout_s, telemetry=telemetry, router=router).start()
    try:
        yield api, service, telemetry, sock
    finally:
        api.stop()


def reference(x: np.ndarray) -> np.ndarray:
    """What bare ONNX Runtime answers for the digits model: the figure every path must equal exactly."""
    return kit.ort_run(digits_mlp(), {INPUT: x})[OUTPUT]
