"""Tests of cloud/inference/. Helpers the REST and gRPC tests share:

    mlp_onnx(seed=0, n_in=64, hidden=32, n_out=10, batch="N") -> bytes: a real ONNX MLP (x [batch, n_in] FP32 ->
        probs [batch, n_out]), different weights per seed, so two seeds give two models whose answers differ.
    add_distilled(fleet, name, student, teacher, fmt="onnx") -> ModelVersion: a version as a distillation job leaves
        it (a Job row whose inputs name the teacher blob, then the version with job_id), made the way
        services_distill.py does, without running the (slow) distillation itself.
    bare_run(onnx_bytes, feeds) -> dict of outputs: plain onnxruntime, the reference every answer must equal.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import numpy as np
from onnx import TensorProto, helper, numpy_helper


def mlp_onnx(seed: int = 0, n_in: int = 64, hidden: int = 32, n_out: int = 10, batch: int | str = "N") -> bytes:
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.standard_normal((n_in, hidden)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal(hidden).astype(np.float32), "b1"),
             numpy_helper.from_array(rng.standard_normal((hidden, n_out)).astype(np.float32), "w2"),
             numpy_helper.from_array(rng.standard_normal(n_out).astype(np.float32), "b2")]
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "w2", "b2"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["probs"], axis=-1)]
    graph = helper.make_graph(nodes, f"mlp{seed}",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, n_in])],
                              [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [batch, n_out])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def add_distilled(fleet: Any, name: str, student: bytes, teacher: bytes, fmt: str = "onnx") -> Any:
    from edgefleet.cloud.registry import validate_model

    now = datetime.now(timezone.utc).replace(microsecond=0)
    job = fleet.store.enqueue_job("distill", spec={"name": name}, inputs={
        "teacher": fleet.blobs.put_bytes(teacher), "data": fleet.blobs.put_bytes(b"transfer set")},
        max_attempts=1, now=now)
    info = validate_model(teacher, max_bytes=fleet.settings.max_model_bytes)  # the student keeps its signature
    return fleet.store.add_model_version(
        name, sha256=fleet.blobs.put_bytes(student), size_bytes=len(student), opset=17,
        inputs=[s.to_dict() for s in info.inputs], outputs=[s.to_dict() for s in info.outputs], now=now,
        variant=dict(precision="fp32", runtime="onnxruntime" if fmt == "onnx" else "litert", format=fmt,
                     built_for_class="rpi4", job_id=job.id))


def bare_run(onnx_bytes: bytes, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))
